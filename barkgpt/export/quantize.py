"""Quantization with llama.cpp's own quantizer (llama_model_quantize through llama-cpp-python).

llama.cpp picks each tensor's type itself: 1-D norms stay F32, Q4_K_M mixes in Q6_K for some
tensors, and a tensor whose rows do not fill whole quantization blocks (K-quants need 256 values
per row) falls back to another type. `tensor_report` reads the result back with gguf.GGUFReader and
says, per tensor, what was asked, what was used, and why they differ.
"""
from __future__ import annotations

from pathlib import Path

from barkgpt.errors import BarkError
from barkgpt.export import llama_log
from barkgpt.export.gguf_file import preflight
from barkgpt.fileio import atomic_path

# name in params.yaml -> (llama_ftype constant name, ggml type of the bulk of the weights)
QUANTS = {
    "q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", "Q8_0"),
    "q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_0"),
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K"),
}


def quantize(src: Path, dst: Path, quant: str, threads: int = 2) -> Path:
    """Quantize the F32/F16 GGUF `src` into `dst` (atomic); BarkError if llama.cpp refuses.

    llama.cpp's warnings go to stderr, or into the list of an enclosing `llama_log.captured()`."""
    import llama_cpp

    if quant not in QUANTS:
        raise BarkError(f"unknown quantization {quant!r}; choose from {list(QUANTS)}")
    preflight(src)  # llama.cpp must never see a damaged input
    llama_log.install()  # info-level chatter (a line per tensor) nowhere; warnings as the caller decides
    qp = llama_cpp.llama_model_quantize_default_params()
    qp.ftype = getattr(llama_cpp, QUANTS[quant][0])
    qp.nthread = threads
    with atomic_path(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), qp)
        if rc != 0:
            raise BarkError(f"llama.cpp could not quantize {src} to {quant} (code {rc}); see its errors above")
    preflight(dst)
    return Path(dst)


def tensor_types(path: Path) -> dict[str, dict]:
    """Tensor name -> {type, shape (ggml order: row length first)} as stored in the file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {t.name: {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape]} for t in reader.tensors}


def tensor_report(path: Path, quant: str) -> dict:
    """Per tensor: requested vs actual type and the reason for any difference; plus fallbacks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    wanted = QUANTS[quant][1]
    block = GGML_QUANT_SIZES[GGMLQuantizationType[wanted]][0]
    rows, fallbacks = {}, []
    for name, t in tensor_types(path).items():
        actual, row = t["type"], t["shape"][0]
        if len(t["shape"]) == 1:
            why = "1-D tensor: llama.cpp keeps norms in F32"
        elif actual == wanted:
            why = "as requested"
        elif row % block:
            why = (f"fallback: rows of {row} values are not a multiple of the {block}-value {wanted} block, "
                   f"so llama.cpp used {actual}")
            fallbacks.append({"tensor": name, "requested": wanted, "used": actual, "row": row, "block": block})
        else:
            why = f"llama.cpp's {quant.upper()} mix keeps this tensor at {actual}"
        rows[name] = {"requested": wanted, "type": actual, "shape": t["shape"], "note": why}
    return {"tensors": rows, "fallbacks": fallbacks}
