"""GGUF files: write a BarkGPT model as llama.cpp's `llama` architecture, and pre-flight any file.

The model is a Llama already (model.py): export renames tensors and splits the fused projections
(wqkv -> attn_q/attn_k/attn_v, w13 -> ffn_gate/ffn_up). Rotary pairs are adjacent (Meta's layout,
llama.cpp's normal rope for `llama`), so unlike convert_hf_to_gguf.py no q/k permutation is needed.
With tied embeddings no `output.weight` is written; llama.cpp then reuses `token_embd.weight`.

`preflight` reads a file with gguf.GGUFReader, every read bounds-checked (magic, version,
key/values, tensor table, every tensor's bytes inside the file), so a truncated, corrupted or
foreign file gives a BarkError here instead of undefined behaviour inside llama.cpp. It imports
no torch: serving a GGUF checks it too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from barkgpt.errors import BarkError
from barkgpt.fileio import atomic_path

if TYPE_CHECKING:
    import torch

DTYPES = {"f32": np.float32, "f16": np.float16}


def gguf_tensors(model) -> dict:
    """llama.cpp tensor names -> weights (PyTorch (out, in) layout; gguf reverses to ggml's ne)."""
    cfg = model.cfg
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.kv_heads
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["tok_emb.weight"]}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        q, k, v = sd[p + "attn.wqkv.weight"].split([nh * hd, nkv * hd, nkv * hd], dim=0)
        gate, up = sd[p + "ffn.w13.weight"].split(cfg.hidden_dim, dim=0)
        out |= {
            f"blk.{i}.attn_norm.weight": sd[p + "attn_norm.weight"],
            f"blk.{i}.attn_q.weight": q,
            f"blk.{i}.attn_k.weight": k,
            f"blk.{i}.attn_v.weight": v,
            f"blk.{i}.attn_output.weight": sd[p + "attn.wo.weight"],
            f"blk.{i}.ffn_norm.weight": sd[p + "ffn_norm.weight"],
            f"blk.{i}.ffn_gate.weight": gate,
            f"blk.{i}.ffn_up.weight": up,
            f"blk.{i}.ffn_down.weight": sd[p + "ffn.w2.weight"],
        }
    out["output_norm.weight"] = sd["norm.weight"]
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    return out


def write_gguf(model, tok, path: Path, dtype: str = "f32", name: str = "barkgpt") -> Path:
    """Write `model` + `tok` as a GGUF file llama.cpp loads natively; atomic."""
    import gguf

    from barkgpt.export.vocab import add_tokenizer

    if dtype not in DTYPES:
        raise BarkError(f"GGUF dtype {dtype!r} is not supported; choose one of {list(DTYPES)}")
    cfg = model.cfg
    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(name)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.kv_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(model.vocab_size)
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        add_tokenizer(w, tok)
        for tname, t in gguf_tensors(model).items():
            # norms (1-D) stay F32: llama.cpp expects them so, and they are tiny
            arr = t.numpy().astype(np.float32 if t.ndim == 1 else DTYPES[dtype])
            w.add_tensor(tname, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


# --- pre-flight ---------------------------------------------------------------------------------

MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses more


@dataclass(frozen=True)
class GGUFInfo:
    tensors: dict[str, dict]  # name -> {type, shape, offset (from the data start), nbytes}
    data_offset: int
    file_size: int


class _PastEnd(Exception):
    pass


def _bounded_reader():
    from gguf import GGUFReader

    class BoundedReader(GGUFReader):
        """GGUFReader reads past the end of a truncated file as empty arrays, and a corrupted array
        length then loops for up to 2**64 elements: here every read must lie inside the file."""

        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > self.data.size:
                raise _PastEnd(f"needs bytes {int(offset)}..{end}, the file has {self.data.size}")
            return super()._get(offset, dtype, count, override_order)

    return BoundedReader


def preflight(path: str | Path) -> GGUFInfo:
    """Check a GGUF file with gguf.GGUFReader before llama.cpp touches it: a truncated, corrupted or
    foreign file is a BarkError naming the problem, never undefined behaviour inside llama.cpp."""
    path = Path(path)
    if not path.is_file():
        from barkgpt.layout import repro_command

        raise BarkError(f"{path}: GGUF file not found; run the export stage first "
                        f"({repro_command(Path(path).parent.name)})")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise BarkError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF'); "
                        "pass a file written by `barkgpt export` or llama.cpp's tools")
    try:
        reader = _bounded_reader()(path)
        tensors = {t.name: {"type": t.tensor_type.name, "shape": [int(d) for d in t.shape],
                            "offset": t.data_offset - reader.data_offset, "nbytes": int(t.n_bytes)}
                   for t in reader.tensors}
        data_offset, alignment = reader.data_offset, int(reader.alignment)
        del reader  # closes the memory map
    except (_PastEnd, ValueError, KeyError, IndexError, OverflowError, TypeError) as err:
        raise BarkError(f"{path}: the GGUF file is truncated or corrupted ({type(err).__name__}: {err}); "
                        "re-export it (barkgpt export / quantize) or re-download it") from None
    for name, t in tensors.items():
        start = data_offset + t["offset"]
        if not 1 <= len(t["shape"]) <= MAX_DIMS or t["offset"] % alignment or start + t["nbytes"] > size:
            raise BarkError(f"{path}: tensor {name!r} (shape {t['shape']}, bytes {start}..{start + t['nbytes']}) "
                            f"does not fit a {size}-byte file aligned to {alignment}; the file is corrupted, "
                            "re-export it")
    return GGUFInfo(tensors, data_offset, size)
