"""Parity: the same evaluation on the PyTorch checkpoint and on every exported GGUF, diffed.

Both sides are barkgpt.lm models (TorchLM, LlamaLM). Per file: tokenization (llama.cpp's tokenizer
from the GGUF vs BarkGPT's, on every validation line), logits on fixed prompts, greedy completions,
and the pipeline's quality measure from barkgpt.evaluate (bark: the contract test, sampled through
llama.cpp's own sampler; webtext: bits per byte on the validation stream). The verdict is
barkgpt.gates.judge over the report; the report records the sha256 of every file it judged.
"""
from __future__ import annotations

import numpy as np

from barkgpt.errors import BarkError
from barkgpt.evaluate import contract_quality, validation_loss
from barkgpt.export import llama_log
from barkgpt.export.checksums import verify_recorded
from barkgpt.fileio import write_json
from barkgpt.gates import GateError, deploy_quantization, judge, judged_files, measurement_settings
from barkgpt.layout import Layout
from barkgpt.lm import LM, Sampling


def tokenization_parity(theirs, ours, lines: list[str]) -> dict:
    """Token ids on every line, and decode round trips (text equality, then ids again)."""
    same = round_trip = 0
    first_mismatch = None
    for line in lines:
        a, b = ours.encode(line), theirs.encode(line)
        if a == b:
            same += 1
        elif first_mismatch is None:
            first_mismatch = {"line": line[:200], "barkgpt": a[:32], "llama_cpp": b[:32]}
        text = theirs.decode(b)
        round_trip += text == ours.decode(a) and theirs.encode(text) == b
    n = max(1, len(lines))
    return {"lines": len(lines), "agreement": same / n, "detokenize_round_trip": round_trip / n,
            "first_mismatch": first_mismatch}


def logits_parity(a: LM, b: LM, prompts: list[list[int]]) -> dict:
    worst = max((float(np.abs(a.logits(ids) - b.logits(ids)).max()) for ids in prompts), default=0.0)
    return {"prompts": len(prompts), "max_abs_diff": worst}


def greedy_parity(a: LM, b: LM, prompts: list[list[int]], max_new: int) -> dict:
    s = Sampling(temperature=0.0, max_new_tokens=max_new)
    same, examples = 0, []
    for ids in prompts:
        ours, theirs = list(a.generate(ids, s)), list(b.generate(ids, s))
        same += ours == theirs
        if len(examples) < 4 or ours != theirs:
            examples.append({"prompt": ids, a.backend: ours, b.backend: theirs})
    return {"prompts": len(prompts), "identical": same, "all_identical": same == len(prompts),
            "examples": examples[:8]}


def parity_prompts(tok, val_lines: list[str], n_ctx: int, pipe) -> tuple[list[list[int]], list[list[int]]]:
    """(logit prompts, greedy prompts): fixed, derived from the validation text; the greedy ones
    are the pipeline's own (bark: the prompt contract; text: the start of validation lines)."""
    greedy_ids = pipe.greedy_prompts(tok, val_lines, n_ctx)
    logit_ids = [ids[:n_ctx] for ids in (tok.encode(line) for line in val_lines[:8]) if ids] + greedy_ids
    return logit_ids, [g for g in greedy_ids if 0 < len(g) < n_ctx]


def parity_report(lay: Layout, params, pipe, val_lines: list[str]) -> dict:
    """Compare every exported file with PyTorch; judge; write parity.json and its summary.

    Raises GateError (after writing the report) when F32 parity fails or the deploy quantization
    is rejected.
    """
    import llama_cpp

    from barkgpt.evaluate import open_for_evaluation
    from barkgpt.lm.llama_lm import LlamaLM

    p, name = params.export, lay.pipeline
    section = pipe.params(params)
    files = {"f32": lay.gguf("f32"), **({"f16": lay.gguf("f16")} if p.f16 else {}),
             **{q: lay.gguf(q) for q in p.quantizations}}
    missing = [str(f) for f in files.values() if not f.exists()]
    if missing:
        raise BarkError(f"exported files are missing: {missing}; run the export and quantize stages first")
    for path in files.values():  # judge the files the stages wrote (their recorded sha256), not copies damaged since
        verify_recorded(lay, path)
    ref, val_ids, token_bytes = open_for_evaluation(lay, threads=max(1, min(2, p.threads)))
    tok = ref.tokenizer
    if pipe.metric == "contract_accuracy":  # the contract test, as the evaluate stage runs it
        metric = "contract"

        def quality(lm: LM) -> dict:
            return {k: v for k, v in contract_quality(lm, section.gates, section.eval).items() if k != "completions"}
    else:
        metric = "val_bpb"

        def quality(lm: LM) -> dict:
            return validation_loss(lm, val_ids[: p.bpb_tokens], token_bytes, 16, None)
    logit_prompts, greedy_prompts = parity_prompts(tok, val_lines, ref.n_ctx, pipe)
    report: dict = {"pipeline": name, "stage": "parity", "metric": metric, "llama_cpp_python": llama_cpp.__version__,
                    "tokenizer": tok.kind, "reference": {"backend": ref.backend, **quality(ref)}, "files": {}}
    f32_size = files["f32"].stat().st_size
    warned: list[str] = []  # llama.cpp's warnings while opening the files: into the report, not the log
    for variant, path in files.items():
        lm = LlamaLM(path, n_ctx=ref.n_ctx, threads=p.threads, all_logits=True)
        warned += lm.warnings
        try:
            report["files"][variant] = {
                "path": str(path), "bytes": path.stat().st_size, "size_ratio_vs_f32": path.stat().st_size / f32_size,
                "tokenization": tokenization_parity(lm.tokenizer, tok, val_lines),
                "logits": logits_parity(ref, lm, logit_prompts),
                "greedy": greedy_parity(ref, lm, greedy_prompts, p.greedy_max_new_tokens),
                "quality": quality(lm)}
        finally:
            lm.close()
    # What ships is judged as it is served: the deploy file with llama.cpp's flash attention, which
    # the server turns on (barkgpt/serve/backends.py) and the comparisons above keep off.
    deploy = deploy_quantization(params)
    served = LlamaLM(lay.gguf(deploy), n_ctx=ref.n_ctx, threads=p.threads, all_logits=True, flash_attn=True)
    warned += served.warnings
    try:
        report["served"] = {"path": str(lay.gguf(deploy)), "file": deploy, "flash_attn": True,
                            "logits": logits_parity(ref, served, logit_prompts), "quality": quality(served)}
    finally:
        served.close()
    verdict = judge(report, params)
    report["quantizations"] = {q: _quantization_entry(report, q, verdict, lay) for q in p.quantizations}
    report["gate"] = {**verdict.as_dict(), "deploy_quantization": deploy, "deploy_file": str(lay.gguf(deploy)),
                      "f32_parity_passed": verdict.passed_for("f32."), "deploy_passed": verdict.passed,
                      "rejected": [q for q in p.quantizations if not verdict.passed_for(f"{q}.")]}
    f32 = report["files"]["f32"]
    report["f32_parity"] = {
        "passed": verdict.passed_for("f32."), "tokenization_agreement": f32["tokenization"]["agreement"],
        "detokenize_round_trip": f32["tokenization"]["detokenize_round_trip"],
        "validation_lines": f32["tokenization"]["lines"], "logits_max_abs_diff": f32["logits"]["max_abs_diff"],
        "logits_tolerance": p.logits_tolerance,
        "greedy_identical": f"{f32['greedy']['identical']}/{f32['greedy']['prompts']}"}
    report["judged"] = judged_files(lay.root, {"checkpoint": lay.checkpoint, "tokenizer": lay.tokenizer,
                                               "val_text": lay.val_text, "val_tokens": lay.token_manifest("val"), **files})
    report["measured_under"] = measurement_settings(params, pipe, pipe.stage("parity"))
    report["llama_cpp_warnings"] = llama_log.summary(warned)
    write_json(lay.parity_report, report)
    print(llama_log.one_line(f"parity {name}", warned, str(lay.parity_report)), flush=True)
    # For `dvc metrics show` and `dvc exp show`: one value per quantization, and a name of its own for
    # the verdict (a key shared with summary.json makes DVC prefix both columns with the file path).
    write_json(lay.parity_summary, {"parity_passed": verdict.passed,
                                    **{q: e["value"] for q, e in report["quantizations"].items()}})
    if not verdict.passed_for("f32."):
        raise GateError(f"F32 GGUF parity failed ({verdict.reason('f32.')}); see {lay.parity_report}. The export "
                        "does not reproduce the PyTorch model; fix the exporter before deploying")
    if not verdict.passed:
        raise GateError(f"deploy quantization {deploy} was rejected: {verdict.reason(deploy + '.')} (see "
                        f"{lay.parity_report}); choose another export.deploy_quantization or retrain")
    return report


def _quantization_entry(report: dict, q: str, verdict, lay: Layout) -> dict:
    """One line per quantization: size, the measured value against PyTorch's, the verdict, tensor types."""
    from barkgpt.fileio import read_json

    e, metric = report["files"][q], report["metric"]
    key = "contract_accuracy" if metric == "contract" else "val_bpb"
    value, base = e["quality"][key], report["reference"][key]
    quant = (read_json(lay.quantization_report) if lay.quantization_report.exists() else {}).get(q, {})
    return {"size_ratio_vs_f32": e["size_ratio_vs_f32"], "bytes": e["bytes"], "metric": key, "value": value,
            "pytorch_value": base, "delta": value - base, "relative_delta": (value - base) / base if base else None,
            "logits_max_abs_diff_vs_pytorch": e["logits"]["max_abs_diff"],
            "greedy_identical": f"{e['greedy']['identical']}/{e['greedy']['prompts']}",
            "status": "accepted" if verdict.passed_for(f"{q}.") else "rejected",
            "reason": "; ".join(c.detail for c in verdict.checks if c.name.startswith(f"{q}.")),
            "fallbacks": quant.get("fallbacks", []),
            "tensor_types": {k: v["type"] for k, v in quant.get("tensors", {}).items()}}
