"""Checkpoints: tensors and plain data only, one file, written atomically, checked before loading.

A checkpoint is one file: torch.save of a dict of tensors, numbers, strings and lists, followed
by an 80-byte trailer line `BARKGPT-SHA256 <hex>\n` holding the sha256 of everything before it.
Being one file, it is replaced in a single atomic rename (barkgpt.fileio), so a crash at any
moment leaves the old checkpoint or the new one, never a pair out of step. The trailer lets a
truncated or modified file be refused with a clear message before torch reads it, and the file is
loaded with weights_only=True so no pickled code ever runs (torch's zip reader ignores the trailer).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from barkgpt.errors import BarkError
from barkgpt.fileio import atomic_path
from barkgpt.model import GPT
from barkgpt.params import ModelParams
from barkgpt.tokenizer import Tokenizer, check_bark_vocab, tokenizer_from_dict

TRAILER_TAG = b"BARKGPT-SHA256 "
TRAILER_SIZE = len(TRAILER_TAG) + 64 + 1  # tag, hex digest, newline
REQUIRED = ("model", "model_params", "vocab_size", "tokenizer", "step")


def save_checkpoint(path: Path, *, model: GPT, tokenizer: Tokenizer, params: dict, step: int,
                    optimizer: torch.optim.Optimizer | None = None, rng: dict | None = None,
                    extra: dict | None = None) -> None:
    state = {
        "format": 1,
        "model": model.state_dict(),
        "model_params": model.cfg.model_dump(),
        "vocab_size": model.vocab_size,
        "tokenizer": tokenizer.to_dict(),
        "params": params,
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng,
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        seal(tmp)


def seal(path: Path) -> None:
    """Append the integrity trailer (the sha256 of the file as it is) to `path`."""
    digest = _sha256_prefix(path, os.path.getsize(path))
    with open(path, "ab") as f:
        f.write(TRAILER_TAG + digest.encode() + b"\n")


def _sha256_prefix(path: Path, size: int, chunk: int = 1 << 20) -> str:
    digest, left = hashlib.sha256(), size
    with open(path, "rb") as f:
        while left > 0 and (block := f.read(min(chunk, left))):
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def verify(path: Path) -> None:
    """BarkError unless `path` ends with a trailer whose sha256 matches the bytes before it."""
    size = path.stat().st_size
    trailer = b""
    if size > TRAILER_SIZE:
        with open(path, "rb") as f:
            f.seek(size - TRAILER_SIZE)
            trailer = f.read()
    if not (trailer.startswith(TRAILER_TAG) and trailer.endswith(b"\n")):
        raise BarkError(f"{path}: checksum mismatch (no integrity trailer); the file is truncated or was modified "
                        "(or predates single-file checkpoints); re-train or restore it")
    expected = trailer[len(TRAILER_TAG):-1].decode("ascii", "replace")
    actual = _sha256_prefix(path, size - TRAILER_SIZE)
    if actual != expected:
        raise BarkError(
            f"{path}: checksum mismatch (sha256 {actual[:12]}..., expected {expected[:12]}...); "
            "the file is truncated or was modified; re-train or restore it"
        )


def load_checkpoint(path: Path) -> dict:
    """Return the checkpoint dict; BarkError if it is missing, truncated, tampered or foreign."""
    path = Path(path)
    if not path.is_file():
        from barkgpt.layout import repro_command

        pipeline = Path(path).parent.name or "bark"
        raise BarkError(f"{path}: checkpoint not found; train first (barkgpt train {pipeline} or "
                        f"{repro_command(pipeline)})")
    verify(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad files; none should reach the user raw
        raise BarkError(f"{path}: not a loadable BarkGPT checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != 1:
        raise BarkError(f"{path}: not a BarkGPT checkpoint (unknown format)")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise BarkError(f"{path}: not a BarkGPT checkpoint (missing {missing}); re-train or restore it")
    return state


def model_from_checkpoint(state: dict) -> tuple[GPT, Tokenizer]:
    cfg = ModelParams(**state["model_params"])
    model = GPT(cfg, state["vocab_size"])
    model.load_state_dict(state["model"])
    model.eval()
    return model, tokenizer_from_dict(state["tokenizer"])


def load_model(path: Path) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer of a checkpoint; BarkError when its trailer is valid but its contents
    do not make a model (wrong shapes, unknown keys, a bad tokenizer)."""
    state = load_checkpoint(path)
    spec = state.get("tokenizer")
    if isinstance(spec, dict) and spec.get("kind") == "word" and isinstance(spec.get("vocab"), list):
        # A bark model (the one word-vocabulary pipeline) was trained on the fixed vocabulary.
        check_bark_vocab(spec["vocab"], f"{path} (its tokenizer)",
                         "it was trained on another vocabulary: re-train it (`dvc repro bark-train`) on the "
                         "tokenizer `dvc repro bark-tokenize` writes")
    try:
        return model_from_checkpoint(state)
    except BarkError as err:
        raise BarkError(f"{path}: {err}") from None
    except (RuntimeError, ValueError, TypeError, KeyError) as err:  # load_state_dict, pydantic, the tokenizer
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise BarkError(f"{path}: its weights do not fit the model it describes ({first}); re-train "
                        "or restore it") from None
