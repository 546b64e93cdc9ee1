"""Checkpoints: tensors and plain data only, written atomically, checked before loading.

A checkpoint is `<name>.pt` (torch.save of a dict of tensors, numbers, strings and lists, loaded
with weights_only=True so no pickled code ever runs) and `<name>.pt.json` holding its sha256,
so a truncated or tampered file is refused with a clear message before torch reads it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from barkgpt.errors import BarkError
from barkgpt.fileio import atomic_path, read_json, sha256_file, write_json
from barkgpt.model import GPT
from barkgpt.params import ModelParams
from barkgpt.tokenizer import Tokenizer, tokenizer_from_dict


def save_checkpoint(path: Path, *, model: GPT, tokenizer: Tokenizer, params: dict, step: int,
                    optimizer: torch.optim.Optimizer | None = None, rng: dict | None = None,
                    extra: dict | None = None) -> None:
    path = Path(path)
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
    meta_path = _meta_path(path)
    old = _read_meta(meta_path) if path.exists() else {}
    # Two files cannot be replaced at once. Until the new .pt is in place the sidecar also accepts
    # the digests the old .pt may have, so a kill -9 between the two renames leaves a loadable pair.
    previous = ([old["sha256"]] if old.get("sha256") else []) + list(old.get("previous", []))[:7]
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        digest = sha256_file(tmp)
        write_json(meta_path, {"sha256": digest, "step": step, "previous": previous})
    write_json(meta_path, {"sha256": digest, "step": step})


def _meta_path(path: Path) -> Path:
    return Path(str(path) + ".json")


def _read_meta(meta_path: Path) -> dict:
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def load_checkpoint(path: Path) -> dict:
    """Return the checkpoint dict; BarkError if it is missing, truncated, tampered or foreign."""
    path = Path(path)
    if not path.exists():
        from barkgpt.layout import repro_command

        raise BarkError(f"{path}: checkpoint not found; train first (barkgpt train {Path(path).parent.name} or "
                        f"{repro_command(Path(path).parent.name)})")
    meta_path = _meta_path(path)
    if not meta_path.exists():
        raise BarkError(f"{path}: its checksum file {meta_path.name} is missing; re-train or restore both")
    meta = _read_meta(meta_path)
    expected = meta.get("sha256")
    actual = sha256_file(path)
    if actual != expected and actual not in meta.get("previous", []):
        raise BarkError(
            f"{path}: checksum mismatch (sha256 {actual[:12]}..., expected {str(expected)[:12]}...); "
            "the file is truncated or was modified; re-train or restore it"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad files; none should reach the user raw
        raise BarkError(f"{path}: not a loadable BarkGPT checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != 1:
        raise BarkError(f"{path}: not a BarkGPT checkpoint (unknown format)")
    return state


def model_from_checkpoint(state: dict) -> tuple[GPT, Tokenizer]:
    cfg = ModelParams(**state["model_params"])
    model = GPT(cfg, state["vocab_size"])
    model.load_state_dict(state["model"])
    model.eval()
    return model, tokenizer_from_dict(state["tokenizer"])


def load_model(path: Path) -> tuple[GPT, Tokenizer]:
    return model_from_checkpoint(load_checkpoint(path))
