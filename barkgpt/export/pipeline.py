"""The export stages' work: GGUF + HF files, llama.cpp quantizations, the parity report and gate.

`barkgpt.stages` calls these with the paths of one pipeline (bark, webtext); everything here is a
plain function so the CLI, DVC and Prefect all run the same code.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from barkgpt.checkpoint import load_model
from barkgpt.errors import BarkError
from barkgpt.export import llama_log
from barkgpt.export import parity as P
from barkgpt.export.checksums import file_record, verify_recorded
from barkgpt.export.gguf_file import write_gguf
from barkgpt.export.quantize import quantize, tensor_report
from barkgpt.fileio import write_json
from barkgpt.layout import Layout
from barkgpt.params import ExportParams


class GateError(BarkError):
    """The quality gate failed for the deploy file; the report names what failed."""


def export_files(lay: Layout, p: ExportParams) -> dict:
    """Write <name>-f32.gguf (+ f16) and hf/ from the trained checkpoint; record each GGUF's sha256."""
    model, tok = load_model(lay.checkpoint)
    name = f"barkgpt-{lay.pipeline}"
    out = {"f32": str(write_gguf(model, tok, lay.gguf("f32"), "f32", name=name))}
    if p.f16:
        out["f16"] = str(write_gguf(model, tok, lay.gguf("f16"), "f16", name=name))
    else:  # the folder is one DVC output: it holds exactly what params ask for
        lay.gguf("f16").unlink(missing_ok=True)
    write_json(lay.export_report, {variant: file_record(Path(path)) for variant, path in out.items()})
    if p.hf:
        from barkgpt.export.hf import write_hf

        out["hf"] = str(write_hf(model, tok, lay.hf))
    else:
        shutil.rmtree(lay.hf, ignore_errors=True)
    return out


def quantize_files(lay: Layout, p: ExportParams) -> dict:
    """llama.cpp quantizations of the F32 file, and per-tensor types actually used.

    llama.cpp's warnings (a line per tensor that falls back to another type) go into the report
    under each quantization's `llama_cpp_warnings`; the log gets one line."""
    src, report_path = lay.gguf("f32"), lay.quantization_report
    verify_recorded(lay, src)  # quantize what the export wrote, not a file damaged since
    report, out, warned_all = {}, {}, []
    for stale in lay.quantized_exports.glob("*.gguf"):  # only what params ask for: the folder is one output
        stale.unlink()
    for q in p.quantizations:
        with llama_log.captured() as warned:
            dst = quantize(src, lay.gguf(q), q, threads=p.threads)
        report[q] = {**file_record(dst), **tensor_report(dst, q), "llama_cpp_warnings": llama_log.summary(warned)}
        out[q] = str(dst)
        warned_all += warned
    write_json(report_path, report)
    print(llama_log.one_line(f"quantize {lay.pipeline} ({', '.join(p.quantizations)})", warned_all, str(report_path)),
          flush=True)
    return {**out, "report": str(report_path)}


def _prompts(tok, val_lines: list[str], block_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(logit prompts, greedy prompts): fixed, derived from the validation text."""
    if getattr(tok, "kind", None) == "word":
        from barkgpt.evaluate import CONTRACT_PROMPT, multi_turn_prompts

        greedy = [CONTRACT_PROMPT, "User: woof Assistant:", "Assistant:"] + multi_turn_prompts(val_lines, 5)
        greedy_ids = [tok.encode(g) for g in greedy]
    else:
        greedy_ids = [ids[: block_size // 4] for ids in (tok.encode(line) for line in val_lines[:32]) if len(ids) > 1][:8]
    logit_ids = [ids[:block_size] for ids in (tok.encode(line) for line in val_lines[:8]) if ids] + greedy_ids
    return logit_ids, [g for g in greedy_ids if 0 < len(g) < block_size]


def _bpb_data(tok, val_lines: list[str], max_tokens: int) -> tuple[np.ndarray, int]:
    """Validation tokens (lines joined by EOS, as the text is modelled) and their UTF-8 bytes."""
    ids, n_bytes = [], 0
    for line in val_lines:
        ids += tok.encode(line) + [tok.eos_id]
        n_bytes += len(line.encode("utf-8")) + 1
        if len(ids) >= max_tokens:
            break
    return np.array(ids[:max_tokens], dtype=np.int64), n_bytes * min(1.0, max_tokens / max(1, len(ids)))


def _quality(llm, model, tok, val_lines, p: ExportParams, seed: int) -> dict:
    n_ctx = model.cfg.block_size
    if getattr(tok, "kind", None) == "word":
        from barkgpt.evaluate import CONTRACT_PROMPT

        acc = P.llama_contract_accuracy(llm, tok, CONTRACT_PROMPT, p.contract_samples, p.greedy_max_new_tokens,
                                        1.0, seed, n_ctx)
        return {"metric": "contract_accuracy", "value": acc}
    ids, n_bytes = _bpb_data(tok, val_lines, p.bpb_tokens)
    return {"metric": "val_bpb", "value": P.llama_bits_per_byte(llm, ids, int(n_bytes), n_ctx)}


def _gate(metric: str, value: float, base: float, quant: str, p: ExportParams) -> tuple[bool, str]:
    if metric == "contract_accuracy":
        ok = value >= p.min_contract_accuracy
        return ok, f"contract accuracy {value:.3f} {'>=' if ok else '<'} {p.min_contract_accuracy}"
    limit = p.max_bpb_delta.get(quant)
    rel = (value - base) / base
    if limit is None:
        return True, f"bpb delta {rel:+.2%}; no threshold configured for {quant}"
    ok = rel <= limit
    return ok, f"bpb delta {rel:+.2%} {'<=' if ok else '>'} {limit:.2%}"


def parity_report(lay: Layout, val_lines: list[str], p: ExportParams, seed: int = 0) -> dict:
    """Compare every exported file with PyTorch; gate the quantizations; write the JSON report.

    Raises GateError (after writing the report) when F32 parity fails or the deploy
    quantization is rejected.
    """
    import llama_cpp

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    checkpoint, name, report_path = lay.checkpoint, lay.pipeline, lay.parity_report
    model, tok = load_model(checkpoint)
    n_ctx = model.cfg.block_size
    logit_prompts, greedy_prompts = _prompts(tok, val_lines, n_ctx)
    files = {"f32": lay.gguf("f32")}
    if p.f16:
        files["f16"] = lay.gguf("f16")
    for q in p.quantizations:
        files[q] = lay.gguf(q)
    missing = [str(f) for f in files.values() if not f.exists()]
    if missing:
        raise BarkError(f"exported files are missing: {missing}; run the export and quantize stages first")

    report: dict = {"model": name, "checkpoint": str(checkpoint), "llama_cpp_python": llama_cpp.__version__,
                    "tokenizer": getattr(tok, "kind", type(tok).__name__), "files": {}, "quantizations": {}}
    f32_size = files["f32"].stat().st_size
    base_quality = None
    warned: list[str] = []  # llama.cpp's warnings while opening the files: into the report, not the log
    # judge the files the stages wrote (their recorded sha256), not copies damaged since
    digests = {variant: verify_recorded(lay, path) for variant, path in files.items()}
    for variant, path in files.items():
        llm = P.open_llama(path, n_ctx, p.threads, warned)
        try:
            entry = {"path": str(path), "bytes": path.stat().st_size, "sha256": digests[variant],
                     "size_ratio_vs_f32": path.stat().st_size / f32_size,
                     "tokenization": P.tokenization_parity(llm, tok, val_lines),
                     "logits": P.logits_parity(llm, model, logit_prompts),
                     "greedy": P.greedy_parity(llm, model, greedy_prompts, tok.eos_id, p.greedy_max_new_tokens)}
            entry["quality"] = _quality(llm, model, tok, val_lines, p, seed)
        finally:
            P.close_llama(llm)
        report["files"][variant] = entry
        if variant == "f32":
            base_quality = entry["quality"]["value"]

    f32 = report["files"]["f32"]
    f32_ok = (f32["tokenization"]["agreement"] == 1.0 and f32["tokenization"]["detokenize_round_trip"] == 1.0
              and f32["logits"]["max_abs_diff"] <= p.logits_tolerance and f32["greedy"]["all_identical"])
    report["f32_parity"] = {
        "passed": f32_ok,
        "tokenization_agreement": f32["tokenization"]["agreement"],
        "detokenize_round_trip": f32["tokenization"]["detokenize_round_trip"],
        "validation_lines": f32["tokenization"]["lines"],
        "logits_max_abs_diff": f32["logits"]["max_abs_diff"],
        "logits_tolerance": p.logits_tolerance,
        "greedy_identical": f"{f32['greedy']['identical']}/{f32['greedy']['prompts']}",
    }
    quant_types = _read_quant_report(lay.quantization_report)
    for q in p.quantizations:
        e = report["files"][q]
        metric, value = e["quality"]["metric"], e["quality"]["value"]
        ok, why = _gate(metric, value, base_quality, q, p)
        ok = ok and e["tokenization"]["agreement"] == 1.0
        report["quantizations"][q] = {
            "size_ratio_vs_f32": e["size_ratio_vs_f32"], "bytes": e["bytes"], "metric": metric, "value": value,
            "f32_value": base_quality, "delta": value - base_quality,
            "relative_delta": (value - base_quality) / base_quality if base_quality else None,
            "logits_max_abs_diff_vs_pytorch": e["logits"]["max_abs_diff"],
            "greedy_identical": f"{e['greedy']['identical']}/{e['greedy']['prompts']}",
            "status": "accepted" if ok else "rejected", "reason": why,
            "fallbacks": quant_types.get(q, {}).get("fallbacks", []),
            "tensor_types": {k: v["type"] for k, v in quant_types.get(q, {}).get("tensors", {}).items()},
        }
    deploy = report["quantizations"][p.deploy_quantization]
    report["gate"] = {
        "f32_parity_passed": f32_ok,
        "deploy_quantization": p.deploy_quantization,
        "deploy_file": str(files[p.deploy_quantization]),
        "deploy_passed": f32_ok and deploy["status"] == "accepted",
        "rejected": [q for q, e in report["quantizations"].items() if e["status"] == "rejected"],
    }
    report["llama_cpp_warnings"] = llama_log.summary(warned)
    write_json(report_path, report)
    print(llama_log.one_line(f"parity {name}", warned, str(report_path)), flush=True)
    if not f32_ok:
        raise GateError(f"F32 GGUF parity failed ({report['f32_parity']}); see {report_path}. The export does not "
                        "reproduce the PyTorch model; fix the exporter before deploying")
    if not report["gate"]["deploy_passed"]:
        raise GateError(f"deploy quantization {p.deploy_quantization} was rejected: {deploy['reason']} (see "
                        f"{report_path}); choose another export.deploy_quantization or retrain")
    return report


def _read_quant_report(path: Path) -> dict:
    from barkgpt.fileio import read_json

    return read_json(path) if Path(path).exists() else {}
