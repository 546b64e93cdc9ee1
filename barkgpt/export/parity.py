"""Parity between llama.cpp (running an exported GGUF) and BarkGPT's PyTorch model.

Every file reaches llama.cpp only after `preflight`. Logits are read from llama.cpp's own forward
pass (`logits_all=True`); sampling for contract accuracy happens here with numpy from those logits,
so a quantized file is judged by its distribution, the same rule `evaluate.py` uses for PyTorch.
"""
from __future__ import annotations

import ctypes
import math
from pathlib import Path

import numpy as np
import torch

from barkgpt.engine import Sampling, stream
from barkgpt.export.gguf_file import preflight


def open_llama(path: Path, n_ctx: int, threads: int = 1, warnings: list[str] | None = None):
    """A llama_cpp.Llama for `path` after BarkGPT's own header checks; quiet, all logits kept.
    llama.cpp's warnings while loading (e.g. `n_ctx_seq (256) > n_ctx_train (64)`: it pads the
    context to 256; positions past the trained context are never used) are added to `warnings`.

    The KV cache is F32 (llama.cpp defaults to F16) so F32 parity measures the export, not the
    cache's rounding. One thread: these models are tiny and extra threads only add sync cost.
    """
    import llama_cpp

    preflight(path)
    kwargs = dict(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                  n_threads=threads, n_threads_batch=threads, verbose=False,
                  type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    from barkgpt.export import llama_log

    with llama_log.captured() as warned:
        llm = llama_cpp.Llama(**kwargs)
    if warnings is not None:
        warnings.extend(warned)
    return llm


def close_llama(llm) -> None:
    llm.close()  # free now, not in __del__ at interpreter exit (where llama-cpp-python can fail)


def llama_tokenize(llm, text: str) -> list[int]:
    # special=False: like BarkGPT, text is text; "<|endoftext|>" typed by a user is not the EOS
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def llama_detokenize(llm, ids: list[int]) -> str:
    """llama.cpp's own detokenizer (llama_detokenize), which also drops UGM's leading space.

    llama-cpp-python's `Llama.detokenize` concatenates pieces instead and keeps that space.
    """
    import llama_cpp

    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 64 + 32 * len(ids)
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, size, False, True)
        if n >= 0:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = -n + 1


def llama_text(llm, ids: list[int]) -> str:
    """The text llama.cpp gives for `ids`.

    Word vocabulary (UGM): llama_detokenize, which drops the "▁" space prefix of the first word.
    Byte-level BPE: the concatenated token pieces, as llama.cpp streams them; its whole-sequence
    llama_detokenize also applies GPT-2's clean_up_tokenization_spaces (" ," -> ","), which
    BarkGPT's tiktoken decoding does not (that rate is reported separately).
    """
    if llm.metadata.get("tokenizer.ggml.model") == "t5":
        return llama_detokenize(llm, ids)
    return llm.detokenize(ids, special=True).decode("utf-8", errors="replace")


def tokenization_parity(llm, tok, lines: list[str]) -> dict:
    """Token ids on every line, and detokenize round trips (text equality, then ids again)."""
    same = round_trip = whole = 0
    first_mismatch = None
    for line in lines:
        ours = tok.encode(line)
        theirs = llama_tokenize(llm, line)
        if ours == theirs:
            same += 1
        elif first_mismatch is None:
            first_mismatch = {"line": line[:200], "barkgpt": ours[:32], "llama_cpp": theirs[:32]}
        text = llama_text(llm, theirs)
        if text == tok.decode(ours) and llama_tokenize(llm, text) == theirs:
            round_trip += 1
        whole += llama_detokenize(llm, theirs) == tok.decode(ours)
    n = max(1, len(lines))
    return {"lines": len(lines), "agreement": same / n, "detokenize_round_trip": round_trip / n,
            "llama_detokenize_exact": whole / n, "first_mismatch": first_mismatch}


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@torch.inference_mode()
def logits_parity(llm, model, prompts: list[list[int]]) -> dict:
    worst = 0.0
    for ids in prompts:
        ref = model(torch.tensor([ids]))[0].float().numpy()
        worst = max(worst, float(np.abs(llama_logits(llm, ids) - ref).max()))
    return {"prompts": len(prompts), "max_abs_diff": worst}


def llama_greedy(llm, ids: list[int], max_new: int, eos_id: int, n_ctx: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(min(max_new, n_ctx - len(ids))):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        if nxt == eos_id or len(ids) + len(out) >= n_ctx:
            break
        llm.eval([nxt])
    return out


def greedy_parity(llm, model, prompts: list[list[int]], eos_id: int, max_new: int) -> dict:
    s = Sampling(temperature=0.0, max_new_tokens=max_new)
    same, examples = 0, []
    for ids in prompts:
        ours = list(stream(model, ids, s, eos_id))
        theirs = llama_greedy(llm, ids, max_new, eos_id, model.cfg.block_size)
        same += ours == theirs
        if len(examples) < 4 or ours != theirs:
            examples.append({"prompt": ids, "pytorch": ours, "llama_cpp": theirs})
    return {"prompts": len(prompts), "identical": same, "all_identical": same == len(prompts),
            "examples": examples[:8]}


def llama_contract_accuracy(llm, tok, prompt: str, samples: int, max_new: int, temperature: float,
                            seed: int, n_ctx: int) -> float:
    """Share of temperature samples that keep the bark contract, logits from llama.cpp."""
    from barkgpt.evaluate import is_contract

    rng = np.random.default_rng(seed)
    prompt_ids = tok.encode(prompt)
    ok = 0
    for _ in range(samples):
        llm.reset()
        llm.eval(prompt_ids)
        out = []
        for _ in range(min(max_new, n_ctx - len(prompt_ids))):
            logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                p = np.exp((logits - logits.max()) / temperature)
                nxt = int(rng.choice(len(p), p=p / p.sum()))
            out.append(nxt)
            if nxt == tok.eos_id or llm.n_tokens + 1 >= n_ctx:
                break
            llm.eval([nxt])
        ok += is_contract(out, tok)
    return ok / samples


def llama_bits_per_byte(llm, ids: np.ndarray, n_bytes: int, window: int) -> float:
    """Sum of -log2 p(next token) over `ids` in non-overlapping windows, per byte of text."""
    total = 0.0
    for start in range(0, len(ids) - 1, window):
        chunk = [int(x) for x in ids[start : start + window + 1]]
        if len(chunk) < 2:
            break
        logits = llama_logits(llm, chunk[:-1]).astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += float((logz - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
    return total / math.log(2) / max(1, n_bytes)


def file_size(path: Path) -> int:
    return Path(path).stat().st_size
