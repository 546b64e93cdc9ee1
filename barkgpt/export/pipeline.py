"""The export stages' work: GGUF + HF files and llama.cpp quantizations (parity: export/parity.py).

`barkgpt.stages` calls these with the paths of one pipeline (bark, webtext); everything here is a
plain function so the CLI, DVC and Prefect all run the same code.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from barkgpt.checkpoint import load_model
from barkgpt.export import llama_log
from barkgpt.export.checksums import file_record, verify_recorded
from barkgpt.export.gguf_file import write_gguf
from barkgpt.export.quantize import quantize, tensor_report
from barkgpt.fileio import write_json
from barkgpt.layout import Layout
from barkgpt.params import ExportParams


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
    source = {"path": str(src), "sha256": verify_recorded(lay, src)}  # what the export wrote, not a copy damaged since
    report, out, warned_all = {}, {}, []
    for stale in lay.quantized_exports.glob("*.gguf"):  # only what params ask for: the folder is one output
        stale.unlink()
    for q in p.quantizations:
        with llama_log.captured() as warned:
            dst = quantize(src, lay.gguf(q), q, threads=p.threads)
        report[q] = {**file_record(dst), "source": source, **tensor_report(dst, q),
                     "llama_cpp_warnings": llama_log.summary(warned)}
        out[q] = str(dst)
        warned_all += warned
    write_json(report_path, report)
    print(llama_log.one_line(f"quantize {lay.pipeline} ({', '.join(p.quantizations)})", warned_all, str(report_path)),
          flush=True)
    return {**out, "report": str(report_path)}
