"""GGUF files: write a BarkGPT model as llama.cpp's `llama` architecture, and pre-flight any file.

The model is a Llama already (model.py): export renames tensors and splits the fused projections
(wqkv -> attn_q/attn_k/attn_v, w13 -> ffn_gate/ffn_up). Rotary pairs are adjacent (Meta's layout,
llama.cpp's normal rope for `llama`), so unlike convert_hf_to_gguf.py no q/k permutation is needed.
With tied embeddings no `output.weight` is written; llama.cpp then reuses `token_embd.weight`.

`preflight` parses a GGUF header in pure Python with bounds checks (magic, version, key/values,
tensor table, every tensor's bytes inside the file) so a truncated, corrupted or foreign file
gives a BarkError here instead of undefined behaviour inside llama.cpp.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from barkgpt.errors import BarkError
from barkgpt.fileio import atomic_path

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

GGUF_MAGIC = b"GGUF"
# gguf value types: size of fixed-size scalars (8 = string, 9 = array handled separately)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
MAX_DIMS = 4


@dataclass
class GGUFInfo:
    version: int
    n_tensors: int
    metadata: dict
    tensors: dict[str, dict]  # name -> {shape, type, offset, nbytes}
    data_offset: int
    file_size: int


class _Cursor:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise BarkError(f"{self.path}: GGUF header is truncated or corrupted (needs {n} bytes at offset "
                            f"{self.pos}, file has {len(self.data)}); re-export or re-download the file")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = self.take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BarkError(f"{self.path}: GGUF header holds a string that is not UTF-8 (offset {self.pos - n}); "
                            "the file is corrupted") from None

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9 and depth == 0:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if etype in _SCALAR:  # read numeric arrays in one go, bounds-checked by take()
                size = struct.calcsize(_SCALAR[etype])
                return np.frombuffer(self.take(n * size), dtype=np.dtype(_SCALAR[etype]))
            if n > len(self.data):  # every element needs at least one byte
                raise BarkError(f"{self.path}: GGUF array length {n} exceeds the file size; the file is corrupted")
            return [self.value(etype, depth + 1) for _ in range(n)]
        raise BarkError(f"{self.path}: unknown GGUF value type {vtype}; the file is corrupted or from a newer GGUF")


def preflight(path: str | Path, max_header_bytes: int = 1 << 28) -> GGUFInfo:
    """Check a GGUF file before llama.cpp touches it; BarkError naming the problem otherwise."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    if not path.is_file():
        raise BarkError(f"{path}: GGUF file not found; run the export stage first (dvc repro)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(min(size, max_header_bytes))
    if head[:4] != GGUF_MAGIC:
        raise BarkError(f"{path}: not a GGUF file (starts with {head[:4]!r}, expected b'GGUF'); "
                        "pass a file written by `barkgpt export` or llama.cpp's tools")
    cur = _Cursor(head, path)
    cur.take(4)
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise BarkError(f"{path}: GGUF version {version} is not supported (2 or 3); the file is corrupted "
                        "or written by an incompatible tool")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    if n_tensors > size // 24 or n_kv > size // 12:  # each entry needs at least that many bytes
        raise BarkError(f"{path}: GGUF header claims {n_tensors} tensors and {n_kv} keys, more than "
                        f"a {size}-byte file can hold; the file is corrupted")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    tensors = {}
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise BarkError(f"{path}: tensor {name!r} has {n_dims} dimensions; the file is corrupted")
        shape = [cur.unpack("<Q") for _ in range(n_dims)]
        ttype, offset = cur.unpack("<I"), cur.unpack("<Q")
        try:
            qtype = GGMLQuantizationType(ttype)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise BarkError(f"{path}: tensor {name!r} has unknown type id {ttype}; the file is corrupted "
                            "or needs a newer llama.cpp") from None
        n = int(np.prod(shape, dtype=np.float64))
        if shape[0] % block:
            raise BarkError(f"{path}: tensor {name!r} row of {shape[0]} values does not fit {qtype.name} "
                            f"blocks of {block}; the file is corrupted")
        tensors[name] = {"shape": shape, "type": qtype.name, "offset": offset, "nbytes": n // block * block_bytes}
    alignment = int(metadata.get("general.alignment", 32))
    if alignment <= 0 or alignment & (alignment - 1):
        raise BarkError(f"{path}: general.alignment {alignment} is not a power of two; the file is corrupted")
    data_offset = -(-cur.pos // alignment) * alignment
    for name, t in tensors.items():
        start = data_offset + t["offset"]
        if t["offset"] % alignment or start + t["nbytes"] > size:
            raise BarkError(f"{path}: tensor {name!r} needs bytes {start}..{start + t['nbytes']} but the file has "
                            f"{size} bytes; the file is truncated or corrupted, re-export it")
    return GGUFInfo(version, n_tensors, metadata, tensors, data_offset, size)
