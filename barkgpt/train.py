"""The trainer both models share: random windows from token shards, AdamW, warm-up then cosine.

Deterministic on CPU for a given seed and thread count; checkpoints hold everything needed to
resume exactly (weights, optimizer, step, RNG states, the metric history).
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from barkgpt.checkpoint import load_checkpoint, save_checkpoint
from barkgpt.data.shards import random_windows, sequential_windows
from barkgpt.errors import BarkError
from barkgpt.fileio import write_text
from barkgpt.model import GPT
from barkgpt.optim import lr_at, lr_factor, make_optimizer, set_lr  # noqa: F401 (lr_at, make_optimizer: API)
from barkgpt.params import ModelParams, TrainParams
from barkgpt.tokenizer import Tokenizer

LogFn = Callable[[int, dict], None]


@dataclass
class TrainResult:
    step: int
    tokens: int
    seconds: float
    tokens_per_s: float
    train_loss: float
    val_loss: float | None
    best_val_loss: float | None
    val_bpb: float | None = None  # on the last evaluation's windows, when token byte lengths are known
    history: list[dict] = field(default_factory=list)


def autocast(dtype: str):
    if dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def mean_loss(model, ids: np.ndarray, block: int, batch: int, max_batches: int | None, dtype: str,
              token_bytes: np.ndarray | None = None):
    """Mean next-token loss over consecutive windows from the start of `ids` (same every call).
    With `token_bytes` (UTF-8 length of each id), returns (loss, bits per byte) instead."""
    was_training = model.training
    model.eval()
    total, count, nbytes = 0.0, 0, 0
    for x, y in sequential_windows(ids, batch, block, max_batches):
        with autocast(dtype):
            _, loss = model(x, y)
        total += float(loss) * y.numel()
        count += y.numel()
        if token_bytes is not None:
            nbytes += int(token_bytes[y.numpy()].sum())
    model.train(was_training)
    if token_bytes is not None:
        return total / count, total / math.log(2) / max(nbytes, 1)
    return total / count


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def train(
    *,
    model_params: ModelParams,
    p: TrainParams,
    tokenizer: Tokenizer,
    train_ids: np.ndarray,
    val_ids: np.ndarray | None,
    out_dir: Path,
    log_path: Path,
    params_dict: dict,
    resume: bool = False,
    on_log: LogFn | None = None,
    progress: bool = True,
    token_bytes: np.ndarray | None = None,
) -> TrainResult:
    """Train; write `out_dir/last.pt`, `out_dir/best.pt` (lowest validation loss) and the log CSV."""
    out_dir = Path(out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    set_threads(p.threads)
    torch.manual_seed(p.seed)
    model = GPT(model_params, tokenizer.vocab_size)
    optimizer = make_optimizer(model, p)
    data_gen = torch.Generator().manual_seed(p.seed)
    step, tokens, elapsed_before, history, best_val = 0, 0, 0.0, [], None

    if resume and last_path.exists():
        state = load_checkpoint(last_path)
        if state["model_params"] != model_params.model_dump():
            raise BarkError(f"{last_path}: was trained with other model parameters; remove it or drop --resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        data_gen.set_state(state["rng"]["data"])
        step, history = state["step"], state["extra"]["history"]
        tokens, elapsed_before = state["extra"]["tokens"], state["extra"]["seconds"]
        best_val = state["extra"]["best_val"]
    elif resume:
        print(f"no checkpoint at {last_path}; starting from scratch")

    step_fn = torch.compile(model) if p.compile else model
    last_bpb = [None]
    tokens_per_step = p.batch_size * p.grad_accum * model_params.block_size
    start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    def progress_fraction() -> float:
        parts = [step / p.max_steps]
        if p.max_seconds:
            parts.append(elapsed() / p.max_seconds)
        if p.max_tokens:
            parts.append(tokens / p.max_tokens)
        return max(parts)

    def checkpoint(path: Path) -> None:
        save_checkpoint(
            path, model=model, tokenizer=tokenizer, params=params_dict, step=step, optimizer=optimizer,
            rng={"torch": torch.get_rng_state(), "data": data_gen.get_state()},
            extra={"history": history, "tokens": tokens, "seconds": elapsed(), "best_val": best_val},
        )

    def evaluate_now() -> float | None:
        nonlocal best_val
        if val_ids is None:
            return None
        val = mean_loss(model, val_ids, model_params.block_size, p.batch_size, p.eval_batches, p.dtype, token_bytes)
        if token_bytes is not None:
            val, last_bpb[0] = val
        if best_val is None or val < best_val:
            best_val = val
            checkpoint(best_path)
        return val

    bar = tqdm(total=p.max_steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    model.train()
    loss_value, val, window_start, window_tokens = float("nan"), None, time.perf_counter(), 0
    while step < p.max_steps and progress_fraction() < 1.0:
        factor = lr_factor(step, progress_fraction(), p)
        set_lr(optimizer, factor)
        lr = p.learning_rate * factor
        loss_sum = 0.0
        for _ in range(p.grad_accum):
            x, y = random_windows(train_ids, p.batch_size, model_params.block_size, data_gen)
            with autocast(p.dtype):
                _, loss = step_fn(x, y)
            (loss / p.grad_accum).backward()
            loss_sum += float(loss.detach())
        if p.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        window_tokens += tokens_per_step
        loss_value = loss_sum / p.grad_accum
        bar.update(1)

        last_step = step >= p.max_steps or progress_fraction() >= 1.0
        row = None
        if step % p.log_every == 0 or last_step:
            now = time.perf_counter()
            tps = window_tokens / max(now - window_start, 1e-9)
            window_start, window_tokens = now, 0
            row = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tps, "tokens": tokens}
            if step % p.eval_every == 0 or last_step:
                val = evaluate_now()
                row["val_loss"] = val
                if token_bytes is not None:
                    row["val_bpb"] = last_bpb[0]
            history.append(row)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:,.0f}")
        # Checkpoint before reporting: whatever a logger does (or a crash does) after this point,
        # the step is already safe on disk and --resume continues from it exactly.
        if step % p.checkpoint_every == 0 or last_step:
            checkpoint(last_path)
        if row is not None and on_log:
            on_log(step, {k: v for k, v in row.items() if v is not None and k != "step"})
    bar.close()
    if step == 0 or not last_path.exists():
        checkpoint(last_path)
    write_history(log_path, history)
    seconds = elapsed()
    return TrainResult(
        step=step, tokens=tokens, seconds=seconds, tokens_per_s=tokens / max(seconds, 1e-9),
        train_loss=loss_value, val_loss=val, best_val_loss=best_val, val_bpb=last_bpb[0], history=history,
    )


def write_history(path: Path, history: list[dict]) -> None:
    columns = ["step", "loss", "val_loss", "val_bpb", "lr", "tokens_per_s", "tokens"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    write_text(path, buf.getvalue())
