"""Quality gates: one pure function over a report (`judge`), the binomial test behind the bark
contract gate, and the binding of a report to the exact files it judged.

`judge(report, params)` is the gate, wherever a verdict is needed: the evaluate stage (which also
decides MLflow's champion), the parity stage and deploy. It reads only the report's numbers and the
current params, so the same report always gets the same verdict.

The bark contract gate is a one-sided binomial test. The evaluation samples n completions at the
evaluation temperature and counts the failures X (answers that are not barks then <EOS>). For a
model whose true contract accuracy is a, X ~ Binomial(n, 1 - a). The gate passes when X <= k, with
k the smallest count such that a model at `bark.gates.contract_accuracy` passes with probability
>= `bark.gates.pass_probability`. With the defaults (n = 1000, a = 0.995, 0.999) k = 13: a model at
0.995 passes with probability 0.99933, one at 0.97 with probability 0.00035 (docs/evaluation.md).

Gating reports record the sha256 of every file they judged (`judged_files`); `verify_judged`
refuses a report whose files have changed since, naming the report and the stage to re-run. They
also record how their numbers were measured (`measured_under`: the params their DVC stage declares
and the sha256 of its code), and `settings_mismatch` refuses a report measured under other settings
than the params a promotion or deploy runs under (greedy decoding cannot pass a sampled-contract gate).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from math import comb
from pathlib import Path

from barkgpt.errors import BarkError
from barkgpt.fileio import read_json, sha256_file

STAGE_OF_REPORT = {"metrics": "evaluate", "parity": "parity", "quantization": "quantize"}


class GateError(BarkError):
    """A gate failed; the report it was written to names what failed."""


# --- the binomial test ----------------------------------------------------------------------------

def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed exactly in rational arithmetic."""
    p = Fraction(str(p))
    return float(sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(min(k, n) + 1)))


@lru_cache(maxsize=64)
def max_failures(n: int, accuracy: float, pass_probability: float) -> int:
    """Smallest k with P(failures <= k) >= pass_probability for a model of true `accuracy`."""
    p = Fraction(str(1 - Fraction(str(accuracy))))
    total, target = Fraction(0), Fraction(str(pass_probability))
    for k in range(n + 1):
        total += comb(n, k) * p**k * (1 - p) ** (n - k)
        if total >= target:
            return k
    return n


@dataclass(frozen=True)
class ContractTest:
    samples: int  # n
    max_failures: int  # k: pass when failures <= k
    accuracy: float  # a model this good ...
    pass_probability: float  # ... passes with this probability (>= the configured one)
    reject_accuracy: float  # a model this bad ...
    reject_pass_probability: float  # ... passes with this probability

    def describe(self) -> str:
        return (f"pass when at most {self.max_failures} of {self.samples} sampled completions break the "
                f"contract; P(pass) = {self.pass_probability:.5f} at true accuracy {self.accuracy}, "
                f"{self.reject_pass_probability:.5f} at {self.reject_accuracy}")


def contract_test(gates) -> ContractTest:
    """The test `bark.gates` states (its fields: contract_samples, contract_accuracy,
    pass_probability, reject_accuracy)."""
    n = gates.contract_samples
    k = max_failures(n, gates.contract_accuracy, gates.pass_probability)
    return ContractTest(n, k, gates.contract_accuracy, binomial_cdf(k, n, 1 - gates.contract_accuracy),
                        gates.reject_accuracy, binomial_cdf(k, n, 1 - gates.reject_accuracy))


# --- the gate ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    name: str  # "contract", "val_bpb", "f32.logits", "q8_0.quality", ...
    passed: bool
    detail: str


@dataclass(frozen=True)
class Verdict:
    passed: bool
    checks: tuple[Check, ...]

    def failed(self, prefix: str = "") -> list[Check]:
        return [c for c in self.checks if not c.passed and c.name.startswith(prefix)]

    def passed_for(self, prefix: str) -> bool:
        return not self.failed(prefix)

    def reason(self, prefix: str = "") -> str:
        bad = self.failed(prefix)
        return "; ".join(f"{c.name}: {c.detail}" for c in bad) if bad else "all checks passed"

    def as_dict(self) -> dict:
        return {"passed": self.passed, "checks": [c.__dict__ for c in self.checks]}


def judge(report: dict, params) -> Verdict:
    """The gate over a report the evaluate or parity stage wrote, with the current params. Pure."""
    stage, name = report.get("stage"), report.get("pipeline")
    section = getattr(params, str(name), None)
    if section is None:
        raise BarkError(f"the report names pipeline {name!r}, which params has no section for; re-run its stage")
    if stage == "evaluate":
        checks = _quality_checks("", report, section.gates)
        return Verdict(all(c.passed for c in checks), tuple(checks))
    if stage == "parity":
        return _judge_parity(report, section.gates, params.export, deploy_quantization(params))
    raise BarkError(f"a {stage!r} report has no gate; gates judge evaluate and parity reports")


def deploy_quantization(params) -> str:
    return params.deploy.quantization or params.export.deploy_quantization


def _quality_checks(prefix: str, measured: dict, gates) -> list[Check]:
    """The pipeline's evaluation gate on `measured` (an evaluation report or a file's quality):
    what it checks is its gates section's own (`quality_checks` of the pipeline's gates class)."""
    return gates.quality_checks(prefix, measured)


def _judge_parity(report: dict, gates, export, deploy_quant: str) -> Verdict:
    files, reference = report.get("files", {}), report.get("reference", {})
    f32 = files.get("f32")
    if f32 is None:
        return Verdict(False, (Check("f32", False, "the report has no F32 file; re-run parity"),))
    tok, logits, greedy = f32["tokenization"], f32["logits"], f32["greedy"]
    checks = [
        Check("f32.tokenization", tok["agreement"] == 1.0 and tok["detokenize_round_trip"] == 1.0,
              f"ids agree on {tok['agreement']:.2%} of lines, round trip {tok['detokenize_round_trip']:.2%}"),
        Check("f32.logits", logits["max_abs_diff"] <= export.logits_tolerance,
              f"max |diff| {logits['max_abs_diff']:.2e} vs tolerance {export.logits_tolerance:.0e}"),
        Check("f32.greedy", greedy["identical"] == greedy["prompts"],
              f"{greedy['identical']}/{greedy['prompts']} greedy completions identical"),
    ]

    def quality_checks(name: str, quality: dict, file: str) -> list[Check]:
        if report.get("metric") == "val_bpb":
            limit, bpb, ref = export.max_bpb_delta.get(file), quality["val_bpb"], reference["val_bpb"]
            rel = (bpb - ref) / ref
            ok = limit is None or rel <= limit
            return [Check(f"{name}.quality", ok, f"bpb {bpb:.4f}, {rel:+.2%} vs PyTorch " + (
                "(no threshold configured)" if limit is None else f"({'<=' if ok else '>'} {limit:.2%})"))]
        return [Check(f"{name}.quality", c.passed, c.detail) for c in _quality_checks("", quality, gates)]

    for q in dict.fromkeys([*export.quantizations, deploy_quant]):
        entry = files.get(q)
        if entry is None:
            checks.append(Check(f"{q}.quality", False, "not in the report; re-run parity"))
            continue
        checks.append(Check(f"{q}.tokenization", entry["tokenization"]["agreement"] == 1.0,
                            f"ids agree on {entry['tokenization']['agreement']:.2%} of lines"))
        checks += quality_checks(q, entry["quality"], q)
    # The deploy file as the server runs it (flash attention on): the same gate as the file itself.
    served = report.get("served")
    if served is None or served.get("file") != deploy_quant:
        checks.append(Check("served.quality", False, f"the report does not measure {deploy_quant} as served; "
                                                     "re-run parity"))
    else:
        checks += quality_checks("served", served["quality"], deploy_quant)
    passed = all(c.passed for c in checks if c.name.startswith(("f32.", f"{deploy_quant}.", "served.")))
    return Verdict(passed, tuple(checks))


# --- reports bound to the bytes they judged ----------------------------------------------------------

def judged_files(root: Path, files: dict[str, Path]) -> dict:
    """{role: {path, sha256}} of the files a report judged, for the report itself."""
    root = Path(root).resolve()
    out = {}
    for role, path in files.items():
        path = Path(path)
        try:
            shown = str(path.resolve().relative_to(root))
        except ValueError:
            shown = str(path)
        out[role] = {"path": shown, "sha256": sha256_file(path)}
    return out


def verify_judged(report_path: Path, files: dict[str, Path]) -> dict:
    """The report, if it judged exactly these files (same sha256); else BarkError naming the stale
    report and the stage that re-judges them."""
    report_path = Path(report_path)
    stage = STAGE_OF_REPORT.get(report_path.stem, report_path.stem)
    if not report_path.exists():
        raise BarkError(f"{report_path}: not found; run the {stage} stage first (dvc repro)")
    report = read_json(report_path)
    judged, stale = report.get("judged") or {}, []
    for role, path in files.items():
        entry = judged.get(role)
        if entry is None:
            stale.append(f"it never judged the {role} {path}")
        elif not Path(path).exists():
            stale.append(f"the {role} {path} is missing")
        elif (now := sha256_file(path)) != entry.get("sha256"):
            stale.append(f"the {role} {path} changed since it was judged (sha256 {now[:12]}..., judged "
                         f"{str(entry.get('sha256'))[:12]}...)")
    if stale:
        raise BarkError(f"{report_path} is stale: {'; '.join(stale)}. Re-run the {stage} stage (barkgpt {stage} "
                        f"{report.get('pipeline', '<pipeline>')}, or dvc repro) before releasing this model")
    return report


# --- reports bound to how they were measured --------------------------------------------------------

def _code_sha256(paths: tuple[str, ...]) -> dict[str, str | None]:
    """sha256 of each code path a stage declares (a folder: over its .py files), read from the
    installed package, so a staged copy of a project is judged against the code that runs."""
    import hashlib

    import barkgpt

    base = Path(barkgpt.__file__).resolve().parent.parent
    out: dict[str, str | None] = {}
    for rel in paths:
        path = base / rel
        if path.is_dir():
            digest = hashlib.sha256()
            for f in sorted(path.rglob("*.py")):
                digest.update(f.relative_to(path).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
            out[rel] = digest.hexdigest()
        else:
            out[rel] = sha256_file(path) if path.is_file() else None
    return out


def measurement_settings(params, pipe, stage) -> dict:
    """What a gating report's numbers depend on besides the files it judged: the params its DVC stage
    declares (`stage`: the pipeline's declaration, so exactly what DVC tracks) with their values, and
    the sha256 of the stage's code (its derived dependencies, as dvc.yaml lists them).
    {"params": {dotted key: value}, "code": {path: sha256}}."""
    keys = [key.replace("{p}", pipe.name) for key in stage.params]
    return {"params": _param_values(params, keys), "code": _code_sha256(tuple(pipe.stage_code(stage)))}


def _param_values(params, keys) -> dict:
    dump, values = params.model_dump(mode="json"), {}
    for key in keys:
        value = dump
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        values[key] = value
    return values


def _flatten(value, prefix: str) -> dict:
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _flatten(sub, f"{prefix}.{key}").items()}
    return {prefix: value}


def settings_mismatch(report: dict, params, report_path: Path) -> str | None:
    """None when the report was measured under the settings `params` state; else what differs, named."""
    stage, pipeline = report.get("stage"), report.get("pipeline")
    recorded = report.get("measured_under")
    if not isinstance(recorded, dict):
        return (f"{report_path} does not record the settings it was measured under; re-run the {stage} stage "
                f"(barkgpt {stage} {pipeline}, or dvc repro)")
    # The keys and code paths the stage declared when it wrote the report, valued under these params
    # (an edited list is an edited report: the registry's sha256 tag and `dvc status` refuse it).
    now = {"params": _param_values(params, list(recorded.get("params") or {})),
           "code": _code_sha256(tuple(recorded.get("code") or {}))}
    was, want = _flatten(recorded.get("params"), "params"), _flatten(now["params"], "params")
    diffs = [f"{k[7:]} was {was.get(k)!r}, params say {want.get(k)!r}" for k in sorted(set(was) | set(want))
             if was.get(k) != want.get(k)]
    code = recorded.get("code") or {}
    diffs += [f"{path} changed since" for path, sha in now["code"].items() if code.get(path) != sha]
    if not diffs:
        return None
    shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    return (f"{report_path} was measured under other settings than these params ({shown}); re-run the {stage} "
            f"stage with the params this runs under (barkgpt {stage} {pipeline}, or dvc repro)")


def check_release(params, name: str, root: Path, artifact: str) -> dict:
    """Before a release or a promotion: every report that judged what ships describes these exact
    files and passes its gate. Raises GateError naming every stale or failing report."""
    from barkgpt.layout import layout

    lay = layout(name, root)
    shipped = {"checkpoint": lay.checkpoint, "tokenizer": lay.tokenizer}
    problems, summary = [], {}
    reports = [(lay.metrics, shipped)]
    quant = deploy_quantization(params)
    if artifact == "gguf":
        reports.append((lay.parity_report, {"checkpoint": lay.checkpoint, quant: lay.gguf(quant)}))
    for path, files in reports:
        try:
            report = verify_judged(path, files)
            verdict = judge(report, params)
        except BarkError as err:
            problems.append(str(err))
            continue
        if mismatch := settings_mismatch(report, params, path):
            problems.append(mismatch)
            continue
        key = "eval" if report.get("stage") == "evaluate" else "parity"
        summary[key] = {"passed": verdict.passed, "failed": verdict.reason()}
        if key == "eval":
            summary[key].update({k: v for k, v in report.items() if isinstance(v, (int, float, bool, str))})
            if not verdict.passed:
                problems.append(f"{path}: the evaluation gate did not pass ({verdict.reason()}); improve the "
                                "model, or set deploy.require_gates: false to override")
        elif not verdict.passed_for("f32."):
            problems.append(f"{path}: F32 GGUF parity with PyTorch failed ({verdict.reason('f32.')})")
        elif not verdict.passed_for(f"{quant}."):
            problems.append(f"{path}: quantization {quant} did not pass its gate ({verdict.reason(quant + '.')}); "
                            "re-run parity, or choose another export.deploy_quantization")
    if problems:
        raise GateError("not releasing this model:" + "".join(f"\n  - {p}" for p in problems))
    return summary
