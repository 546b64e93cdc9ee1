"""The run report: one Markdown page per pipeline run, like nanochat's report card.

`write_report(params, name, root)` reads what the stages left in reports/<name>/ (and the token
manifests, the checkpoint, dvc.lock) and writes reports/<name>/report.md: hardware, data
statistics, the params that shaped the model, the loss curve, evaluation, quantization and parity
tables, the deploy record and timings. A stage that has not run yet is a line saying so. The page
needs no network (the loss curve is `loss_curve.png` beside it and a table of the same numbers).
`log_report(...)` attaches it to the model's MLflow run.
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
from importlib import metadata
from pathlib import Path

from barkgpt.config import Params
from barkgpt.fileio import read_json, write_text
from barkgpt.layout import Layout


def _read(path: Path):
    try:
        return read_json(path) if path.exists() else None
    except (OSError, ValueError):
        return None


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def numerics(t, summary: dict) -> str:
    """dtype, compile and threads as trained (the summary's resolved settings, measured where params
    say auto), else as params set them."""
    got = summary.get("settings") or {}
    dtype, compile_, threads = (got.get(k, getattr(t, k)) for k in ("dtype", "compile", "threads"))
    text = f"{dtype}, compile {str(compile_).lower()}, threads {threads or 'all'}"
    note = got.get("note", "")
    return text + (f" ({note})" if note.startswith("chosen by measurement") else "")


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out + [""]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def hardware() -> list[list]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "-"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    rows = [["CPU", cpu], ["cores", os.cpu_count()], ["memory", mem],
            ["OS", f"{platform.system()} {platform.release()}"], ["python", platform.python_version()],
            ["torch", _version("torch")], ["llama-cpp-python", _version("llama-cpp-python")]]
    try:
        import torch

        if torch.cuda.is_available():
            rows.append(["GPU", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))])
    except Exception:  # torch missing or broken: the report still has the rest
        pass
    return rows


def loss_rows(log: Path, points: int = 12) -> list[list]:
    """About `points` rows of the training log, evenly spaced, always with the last one."""
    if not log.exists():
        return []
    rows = list(csv.DictReader(log.open()))
    if not rows:
        return []
    every = max(1, len(rows) // points)
    picked = rows[::every]
    if picked[-1] is not rows[-1]:
        picked.append(rows[-1])

    def num(r, k):
        return float(r[k]) if r.get(k) not in (None, "") else None

    return [[int(r["step"]), num(r, "loss"), num(r, "val_loss"), num(r, "lr"), num(r, "tokens_per_s")] for r in picked]


def _mtime(path: Path) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc) if path.exists() else None


def build_report(params: Params, name: str, root: Path | str = ".") -> str:
    from barkgpt import __version__
    from barkgpt.tracking.runs import commit_id, dvc_data_md5

    lay = Layout(name, Path(root))
    cfg = getattr(params, name)
    now = dt.datetime.now(dt.timezone.utc)
    lines = [f"# BarkGPT run report: {name}", "",
             f"Written {now:%Y-%m-%d %H:%M:%S} UTC by barkgpt {__version__}, git commit "
             f"`{commit_id(lay.root)[:12]}`.", ""]
    run = _read(lay.run_record)
    if run:
        from barkgpt.tracking.runs import run_link

        lines += [run_link(params, lay) or f"MLflow run `{run.get('run_id')}` ({run.get('tracking_uri')}).", ""]

    lines += ["## Hardware", ""] + _table(["", ""], hardware())

    lines += ["## Data", ""]
    rows = []
    for split in ("train", "val"):
        m = _read(lay.token_manifest(split))
        text = lay.text(split)
        n_lines = sum(1 for _ in text.open(encoding="utf-8")) if text.exists() else None
        if m or n_lines is not None:
            rows.append([split, n_lines, text.stat().st_size if text.exists() else None, (m or {}).get("tokens"),
                         (m or {}).get("vocab_size"), (m or {}).get("tokenizer_hash")])
    lines += _table(["split", "lines", "bytes", "tokens", "vocabulary", "tokenizer hash"], rows) if rows else \
        ["No data yet: run the data and tokenize stages.", ""]
    val = _read(lay.validation_report)
    if val:
        lines += [f"Great Expectations: {val.get('expectations', 0) - val.get('failed', 0)} of "
                  f"{val.get('expectations')} expectations passed (Data Docs: {lay.validation_docs.name}/index.html).", ""]
        failed = [[suite.get("suite"), c.get("expectation"), c.get("column"), c.get("unexpected_count"),
                   ", ".join(map(str, (c.get("unexpected_rows") or [])[:10]))]
                  for suite in val.get("suites") or [] for c in suite.get("checks") or [] if not c.get("success")]
        if failed:
            lines += _table(["failed suite", "expectation", "column", "unexpected", "rows"], failed)
    dvc = dvc_data_md5(lay)
    if dvc:
        lines += ["DVC data hashes (dvc.lock):", ""] + _table(["path", "md5"], sorted([k, v] for k, v in dvc.items()))

    lines += ["## Params that shaped the model", ""]
    m, t = cfg.model, cfg.train
    vocab = next((r[4] for r in rows if r[4]), None)
    from barkgpt.memory import parameter_count

    lines += _table(["param", "value"], [
        ["model", f"{m.n_layer} layers x {m.n_embd} wide, {m.n_head} heads ({m.kv_heads} kv), context {m.block_size}"
                  f", SwiGLU {m.hidden_dim}"],
        ["parameters", parameter_count(m, vocab) if vocab else "-"],
        ["budget", f"max_steps {t.max_steps}" + (f", max_seconds {t.max_seconds:g}" if t.max_seconds else "")
                   + (f", max_tokens {t.max_tokens:,}" if t.max_tokens else "")],
        ["batch", f"{t.batch_size} x {m.block_size} tokens x grad_accum {t.grad_accum}"],
        ["optimizer", f"AdamW lr {t.learning_rate:g} (warm-up {t.warmup_steps}, cosine to {t.min_lr_ratio:g}x), "
                      f"weight decay {t.weight_decay:g}, betas ({t.beta1:g}, {t.beta2:g}), clip {t.grad_clip:g}"],
        ["numerics", numerics(t, _read(lay.train_summary) or {}) + f", dropout {m.dropout:g}"],
        ["seeds", f"project {params.seed}, training {t.seed}"],
    ])

    lines += ["## Training", ""]
    summary = _read(lay.train_summary)
    if summary:
        lines += _table(["steps", "tokens", "seconds", "tokens/s", "final train loss", "best val loss", "val bpb"],
                        [[summary.get("step"), summary.get("tokens"), summary.get("seconds"),
                          summary.get("tokens_per_s"), summary.get("train_loss"), summary.get("best_val_loss"),
                          summary.get("val_bpb")]])
        if lay.loss_curve.exists():
            lines += [f"![loss curve]({lay.loss_curve.name})", ""]
        curve = loss_rows(lay.train_log)
        if curve:
            lines += _table(["step", "train loss", "val loss", "lr", "tokens/s"], curve)
    else:
        lines += ["Not trained yet.", ""]

    lines += ["## Evaluation", ""]
    metrics = _read(lay.metrics)
    if metrics:
        lines += evaluation_section(metrics, _read(lay.samples))
    else:
        lines += ["Not evaluated yet.", ""]

    lines += ["## Quantization and parity (llama.cpp)", ""]
    parity, quant = _read(lay.parity_report), _read(lay.quantization_report)
    if parity:
        f32 = parity.get("f32_parity", {})
        lines += [f"F32 GGUF vs PyTorch: {'passed' if f32.get('passed') else 'FAILED'}: tokenization agreement "
                  f"{_fmt(f32.get('tokenization_agreement'))} on {_fmt(f32.get('validation_lines'))} lines, max |logit "
                  f"diff| {_fmt(f32.get('logits_max_abs_diff'))} (tolerance {_fmt(f32.get('logits_tolerance'))}), "
                  f"greedy identical {f32.get('greedy_identical')}.", ""]
        rows = [[q, e.get("bytes"), e.get("size_ratio_vs_f32"), e.get("metric"), e.get("value"), e.get("delta"),
                 len(e.get("fallbacks") or []), e.get("status"), e.get("reason")]
                for q, e in (parity.get("quantizations") or {}).items()]
        lines += _table(["file", "bytes", "size vs F32", "metric", "value", "delta vs F32", "fallback tensors",
                         "status", "why"], rows)
        gate, served = parity.get("gate", {}), parity.get("served") or {}
        lines += [f"Deploy file `{gate.get('deploy_file')}`: gate {'passed' if gate.get('deploy_passed') else 'FAILED'}"
                  + (f"; as served (flash attention), max |logit diff| {_fmt(served['logits']['max_abs_diff'])} "
                     f"vs PyTorch" if served.get("logits") else "") + ".", ""]
    elif quant:
        lines += _table(["file", "bytes", "fallback tensors"],
                        [[q, e.get("bytes"), len(e.get("fallbacks") or [])] for q, e in quant.items()])
    else:
        lines += ["Not exported yet.", ""]
    kinds = [k for e in (quant or {}).values() if isinstance(e, dict) for k in e.get("llama_cpp_warnings") or []]
    kinds += (parity or {}).get("llama_cpp_warnings") or []
    warned = sum(k.get("count", 0) for k in kinds)
    unexplained = sum(k.get("count", 0) for k in kinds if not k.get("explained"))
    if quant or parity:
        lines += [f"llama.cpp logged {warned} warnings, {unexplained} of them of a kind not known to be harmless "
                  f"(listed, with the reasons, in {lay.quantization_report.name} and {lay.parity_report.name}).", ""]

    lines += ["## Deploy", ""]
    deploy = _read(lay.deploy_report)
    if deploy:
        fn, rel, smoke = deploy.get("function", {}), deploy.get("release", {}), deploy.get("smoke") or {}
        lines += _table(["", ""], [
            ["target", deploy.get("target")], ["release", f"{rel.get('id')} ({rel.get('status')})"],
            ["manifest", rel.get("manifest_uri")],
            ["function", f"{fn.get('name')} version {fn.get('version')} (alias {fn.get('alias')}, was "
                         f"{fn.get('previous_version')})"],
            ["url", f"{fn.get('url')} ({fn.get('url_auth_type')})"],
            ["smoke test", f"{smoke.get('mode')}: {smoke.get('reply')!r}"],
            ["cold start", f"{(smoke.get('cold_start') or {}).get('cold_start_s', 0) * 1000:.0f} ms"
                           if smoke.get("cold_start") else "-"],
            ["deploy seconds", deploy.get("seconds")]])
    else:
        lines += ["Not deployed.", ""]

    lines += ["## Timings", ""]
    stamps = [(stage, _mtime(path)) for stage, path in (
        ("data", lay.val_text), ("validate", lay.validation_report), ("tokenize", lay.token_manifest("val")),
        ("train", lay.train_summary), ("evaluate", lay.metrics), ("export", lay.gguf("f32")),
        ("quantize", lay.quantization_report), ("parity", lay.parity_report), ("deploy", lay.deploy_report))]
    stamps = [(s, t) for s, t in stamps if t is not None]
    rows, previous = [], None
    for stage, when in stamps:
        rows.append([stage, f"{when:%Y-%m-%d %H:%M:%S}", f"{(when - previous).total_seconds():.1f}" if previous else "-"])
        previous = when
    if summary:
        rows.append(["training itself", "", f"{summary.get('seconds', 0):.1f}"])
    lines += ["When each stage's output was written (UTC), and seconds since the previous one:", ""]
    lines += _table(["stage", "written", "seconds"], rows)
    return "\n".join(lines).rstrip() + "\n"


def evaluation_section(metrics: dict, samples: dict | None) -> list[str]:
    """Numbers in one table, the gate's checks in another, a few samples: no raw dicts or lists."""
    rows = [[k, v] for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    rows += [[f"{k}: {kk}", vv] for k, v in metrics.items() if isinstance(v, dict) and k not in ("gate", "judged")
             for kk, vv in v.items() if isinstance(vv, (int, float))]
    lines = _table(["metric", "value"], rows)
    gate = metrics.get("gate") or {}
    lines += [f"Gate: **{'passed' if metrics.get('gate_passed') else 'FAILED'}**.", ""]
    if gate.get("checks"):
        lines += _table(["check", "result", "detail"], [[c.get("name"), "pass" if c.get("passed") else "FAIL",
                                                         c.get("detail")] for c in gate["checks"]])
    test = gate.get("test")
    if test:
        lines += [f"The contract test: pass when at most {test['max_failures']} of {test['samples']} samples break "
                  f"the contract; a model with accuracy {test['accuracy']:g} passes with P = "
                  f"{test['pass_probability']:.5f}, one with {test['reject_accuracy']:g} with P = "
                  f"{test['reject_pass_probability']:.5f}.", ""]
    if samples and samples.get("completions"):
        lines += [f"Samples of `{samples.get('prompt', '')}`:", ""]
        lines += [f"- `{c}`" for c in samples["completions"][:5]] + [""]
    elif samples and isinstance(samples, dict):
        pairs = [(k, v) for k, v in samples.items() if isinstance(v, str)][:5]
        if pairs:
            lines += ["Samples:", ""] + [f"- `{k}` → `{v}`" for k, v in pairs] + [""]
    return lines


def inline_images(markdown: str, folder: Path) -> str:
    """Relative PNG links as data: URIs, so the page renders where its folder is not (a Prefect
    artifact, a page copied elsewhere)."""
    import base64
    import re

    def embed(match: re.Match) -> str:
        path = folder / match.group(2)
        if not path.is_file():
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([^):/]+\.png)\)", embed, markdown)


def write_report(params: Params, name: str, root: Path | str = ".") -> Path:
    """reports/<name>/report.md (atomic); returns its path."""
    path = Layout(name, Path(root)).report_page
    write_text(path, build_report(params, name, root))
    return path


def log_report(params: Params, name: str, root: Path | str = ".", path: Path | None = None) -> str | None:
    """Attach the report (and the loss curve it shows) to the model's MLflow run; None when untracked."""
    from barkgpt.tracking.runs import client_for

    lay = Layout(name, Path(root))
    run = _read(lay.run_record)
    if not params.tracking.enabled or not run:
        return None
    _, client = client_for(params, lay.root)
    try:
        client.get_run(run["run_id"])
    except Exception:  # the checkpoint's run is in another store (e.g. after dvc pull)
        return None
    client.log_artifact(run["run_id"], str(path or lay.report_page), "reports")
    return run["run_id"]


def report_markdown(params: Params, name: str, root: Path | str = ".") -> str:
    """Write the report, log it to MLflow, return its Markdown with the loss curve inlined (what a
    Prefect artifact shows: it cannot reach the PNG beside the file)."""
    path = write_report(params, name, root)
    log_report(params, name, root, path)
    return inline_images(path.read_text(encoding="utf-8"), path.parent)


if __name__ == "__main__":  # python -m barkgpt.report bark
    import sys

    from barkgpt.config import load_params

    print(json.dumps({"report": str(write_report(load_params(), sys.argv[1] if len(sys.argv) > 1 else "bark"))}))
