"""The trainer both models share: random windows from token shards, AdamW, warm-up then cosine.

One process or many (DDP under torchrun), on the CPU, a CUDA GPU or Apple's MPS. The windows of
micro-batch j of step s come from a generator seeded by (seed, s, j), and process r trains
micro-batches r*grad_accum ... (r+1)*grad_accum - 1 of each step. Hence:
- resume is exact with no data-RNG state: the step counter says which windows come next;
- N processes with grad_accum A train on exactly the windows of one process with grad_accum N*A,
  and DDP's gradient mean equals that process's accumulated mean (up to summation order).
Deterministic on CPU for a given seed and thread count. Only rank 0 writes checkpoints, logs and
reports; checkpoints hold what resuming needs (weights, optimizer, step, metric history).
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from barkgpt import calibrate
from barkgpt.checkpoint import load_checkpoint, save_checkpoint
from barkgpt.data.shards import random_windows, window_rng
from barkgpt.device import autocast, prepare, synchronize, to_device
from barkgpt.distributed import SINGLE, Dist, from_main, mean_across, object_from_main
from barkgpt.errors import BarkError
from barkgpt.fileio import write_text
from barkgpt.lm.torch_lm import TorchLM
from barkgpt.loss_eval import eval_windows, evaluate_bpb
from barkgpt.model import GPT
from barkgpt.optim import lr_at, lr_factor, make_optimizer, set_lr
from barkgpt.params import ModelParams, TrainParams
from barkgpt.runs import TrainingDiverged
from barkgpt.tokenizer import Tokenizer

LogFn = Callable[[int, dict], None]
log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 10.0  # a progress line at least this often when no progress bar is shown

__all__ = ["autocast", "lr_at", "make_optimizer", "set_threads", "train", "TrainResult"]


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
    # What trained and where the time went: the resolved dtype/compile/threads and why (calibrate.py);
    # seconds compiling and calibrating (before the budget's clock starts) and inside training steps.
    settings: dict = field(default_factory=dict)
    compile_seconds: float = 0.0
    calibration_seconds: float = 0.0
    step_seconds: float = 0.0


def require_finite(what: str, value: float, step: int) -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(f"training diverged at step {step}: {what} is {value}; stopped early "
                               "(lower learning_rate, add warmup_steps or grad_clip)")


def set_threads(threads: int | str | None) -> None:
    """An explicit thread count, at most the cores this process may use (a sweep's trial is pinned
    to its share): threads past them only wait for one another."""
    if isinstance(threads, int):
        from barkgpt.calibrate import usable_cores

        torch.set_num_threads(min(threads, usable_cores()))


class Progress:
    """A tqdm bar on a terminal; elsewhere (DVC, Prefect, a log file) a plain log line at least
    every PROGRESS_EVERY_S seconds: step, loss, tokens/s, elapsed and ETA. Rank 0 only."""

    def __init__(self, p: TrainParams, step: int, fraction: float, active: bool, bar: bool):
        self.p, self.active, self.first_step, self.first_fraction = p, active, step, fraction
        # With a time or token budget the bar counts percent of whichever budget ends the run first.
        self.steps_only = not (p.max_seconds or p.max_tokens)
        total, initial = (p.max_steps, step) if self.steps_only else (100, int(100 * fraction))
        self.bar = tqdm(total=total, initial=initial, unit="step" if self.steps_only else "%", dynamic_ncols=True) \
            if active and bar and sys.stderr.isatty() else None
        self.start = self.last = time.perf_counter()
        self.last_tokens = None

    def update(self, step: int, loss: float, tokens: int, fraction: float, done: bool, budget: str = "") -> None:
        if not self.active:
            return
        if self.bar is not None:
            if self.steps_only:
                self.bar.update(1)
            else:
                self.bar.update(min(100, int(100 * fraction)) - self.bar.n)
            if step % self.p.log_every == 0 or done:
                self.bar.set_postfix_str(f"{budget}, loss {loss:.4f}" if budget else f"loss {loss:.4f}")
            return
        now = time.perf_counter()
        if not (step == self.first_step + 1 or done or now - self.last >= PROGRESS_EVERY_S):
            return
        tps = "-" if self.last_tokens is None else f"{(tokens - self.last_tokens) / max(now - self.last, 1e-9):,.0f}"
        self.last, self.last_tokens = now, tokens
        spent, gained = now - self.start, fraction - self.first_fraction
        eta = spent * (1 - fraction) / gained if gained > 0 and not done else 0.0
        log.info("%s (%.0f%%) loss %.4f | %s tok/s | elapsed %s | ETA %s", budget or f"step {step}/{self.p.max_steps}",
                 100 * min(fraction, 1.0), loss, tps, _clock(spent), _clock(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def budget_text(p: TrainParams, step: int, seconds: float, tokens: int) -> str:
    """Progress against the budget nearest its end, which is the one that will stop the run:
    'step 40/100', 'step 40 | 0:42 of 1:00 time budget' or 'step 40 | 1.2M of 4.0M tokens'."""
    parts = [(step / p.max_steps, f"step {step}/{p.max_steps}")]
    if p.max_seconds:
        parts.append((seconds / p.max_seconds, f"step {step} | {_clock(seconds)} of {_clock(p.max_seconds)} time budget"))
    if p.max_tokens:
        parts.append((tokens / p.max_tokens, f"step {step} | {tokens / 1e6:.1f}M of {p.max_tokens / 1e6:.1f}M tokens"))
    return max(parts, key=lambda part: part[0])[1]


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


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
    device: torch.device | str = "cpu",
    dist: Dist = SINGLE,
) -> TrainResult:
    """Train; rank 0 writes `out_dir/last.pt`, `out_dir/best.pt` (lowest validation loss) and the log CSV.
    Under torchrun (`dist.enabled`) the process group must already be initialized."""
    device = torch.device(device)
    out_dir = Path(out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    # `auto` settings measured before the seed is set: calibration leaves the run's numbers untouched.
    choice = resolve_settings(model_params, p, tokenizer.vocab_size, train_ids, device, dist)
    p = p.model_copy(update={"dtype": choice.dtype, "compile": choice.compile, "threads": choice.threads})
    if dist.is_main and choice.chosen_by and "measured" in choice.chosen_by.values():
        log.info("%s", choice.note)
    set_threads(p.threads)
    prepare(device, p.compile)
    torch.manual_seed(p.seed)
    model = GPT(model_params, tokenizer.vocab_size).to(device)
    optimizer = make_optimizer(model, p)
    step, tokens, elapsed_before, history, best_val = 0, 0, 0.0, [], None

    if resume and last_path.exists():
        state = load_checkpoint(last_path)
        if state["model_params"] != model_params.model_dump():
            raise BarkError(f"{last_path}: was trained with other model parameters; remove it or drop --resume")
        if not state.get("optimizer") or "history" not in state.get("extra", {}):
            raise BarkError(f"{last_path}: holds no training state (optimizer, history); drop --resume to start afresh")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["extra"]["history"]
        tokens, elapsed_before = state["extra"]["tokens"], state["extra"]["seconds"]
        best_val = state["extra"]["best_val"]
        saved_world = state["extra"].get("world_size", 1)
        if saved_world != dist.world_size and dist.is_main:
            log.warning("%s was written by %d processes, resuming with %d: training continues, but on other "
                        "windows than an uninterrupted run would see", last_path, saved_world, dist.world_size)
    elif resume and dist.is_main:
        log.info("no checkpoint at %s; starting from scratch", last_path)

    step_fn = torch.compile(model) if p.compile else model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        step_fn = DistributedDataParallel(step_fn, device_ids=[device.index] if device.type == "cuda" else None)
    last_bpb = [None]
    block, micro_steps = model_params.block_size, p.grad_accum
    tokens_per_step = p.batch_size * micro_steps * block * dist.world_size
    compile_seconds = 0.0
    if p.compile and step < p.max_steps:
        # Compile before the clock starts, so a time budget buys training steps and the compile time
        # is reported apart: a forward and backward on the first batch, gradients then dropped.
        t0 = time.perf_counter()
        x, y = random_windows(train_ids, p.batch_size, block, window_rng(p.seed, step, dist.rank * micro_steps))
        with autocast(p.dtype, device.type):
            _, loss = step_fn(to_device(x, device), to_device(y, device))
        loss.backward()
        optimizer.zero_grad(set_to_none=True)
        compile_seconds = time.perf_counter() - t0
        if dist.is_main:
            log.info("compiled the model in %.1f s (not counted in the training budget)", compile_seconds)
    step_seconds = 0.0
    start = time.perf_counter()

    def elapsed() -> float:
        # Rank 0's clock on every process when a wall-clock budget decides the schedule and the stop.
        seconds = elapsed_before + time.perf_counter() - start
        return from_main(seconds, dist, device) if p.max_seconds else seconds

    def progress_fraction(seconds: float) -> float:
        parts = [step / p.max_steps]
        if p.max_seconds:
            parts.append(seconds / p.max_seconds)
        if p.max_tokens:
            parts.append(tokens / p.max_tokens)
        return max(parts)

    def checkpoint(path: Path) -> None:
        save_checkpoint(
            path, model=model, tokenizer=tokenizer, params=params_dict, step=step, optimizer=optimizer,
            extra={"history": history, "tokens": tokens, "seconds": elapsed_before + time.perf_counter() - start,
                   "best_val": best_val, "world_size": dist.world_size},
        )

    def evaluate_now() -> float | None:
        nonlocal best_val
        if val_ids is None:
            return None
        # The evaluate stage's metric on the same windows, in float32 whatever the training dtype
        windows = eval_windows(val_ids, block, p.batch_size, tokenizer.eos_id, p.eval_batches)
        result = evaluate_bpb(TorchLM(model, tokenizer), windows, token_bytes)
        val, last_bpb[0] = result["loss"], result["bpb"]
        require_finite("validation loss", val, step)
        if best_val is None or val < best_val:
            best_val = val
            checkpoint(best_path)
        return val

    model.train()
    # A resumed run that had already reached its end reports what it ended with.
    loss_value = history[-1]["loss"] if history else float("nan")
    val = next((r["val_loss"] for r in reversed(history) if r.get("val_loss") is not None), None)
    last_bpb[0] = next((r["val_bpb"] for r in reversed(history) if r.get("val_bpb") is not None), None)
    window_start, window_tokens = time.perf_counter(), 0
    fraction = progress_fraction(elapsed())
    report = Progress(p, step, fraction, active=dist.is_main, bar=progress)
    while step < p.max_steps and fraction < 1.0:
        step_start = time.perf_counter()
        factor = lr_factor(step, fraction, p)
        set_lr(optimizer, factor)  # each param group's own peak rate times the schedule
        lr = lr_at(step, fraction, p)  # the rate logged: the one definition of it (optim.py)
        loss_sum = torch.zeros((), device=device)
        for a in range(micro_steps):
            rng = window_rng(p.seed, step, dist.rank * micro_steps + a)
            x, y = random_windows(train_ids, p.batch_size, block, rng)
            if model_params.dropout > 0:  # dropout masks follow the same counters as the windows
                torch.manual_seed(int(rng.integers(2**62)))
            # DDP all-reduces gradients on the last micro-step only; the others just accumulate.
            sync = not dist.enabled or a == micro_steps - 1
            with contextlib.nullcontext() if sync else step_fn.no_sync():
                with autocast(p.dtype, device.type):
                    _, loss = step_fn(to_device(x, device), to_device(y, device))
                (loss / micro_steps).backward()
            loss_sum += loss.detach()
        if p.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds += time.perf_counter() - step_start
        step += 1
        tokens += tokens_per_step
        window_tokens += tokens_per_step
        loss_value = float(loss_sum) / micro_steps
        require_finite("train loss", loss_value, step)  # before this step's checkpoint: no NaN is saved
        now_s = elapsed()
        fraction = progress_fraction(now_s)
        last_step = step >= p.max_steps or fraction >= 1.0
        report.update(step, loss_value, tokens, fraction, last_step, budget_text(p, step, now_s, tokens))

        row = None
        if step % p.log_every == 0 or last_step:
            loss_value = mean_across(loss_value, dist, device)  # the global batch's loss, as one process sees it
        if dist.is_main and (step % p.log_every == 0 or last_step):
            now = time.perf_counter()
            tps = window_tokens / max(now - window_start, 1e-9)
            window_start, window_tokens = now, 0
            row = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tps, "tokens": tokens,
                   "seconds": round(elapsed_before + now - start, 3)}  # wall clock, evaluations included
            if step % p.eval_every == 0 or last_step:
                val = evaluate_now()
                row["val_loss"] = val
                if token_bytes is not None:
                    row["val_bpb"] = last_bpb[0]
            history.append(row)
        # Checkpoint before reporting: whatever a logger does (or a crash does) after this point,
        # the step is already safe on disk and --resume continues from it exactly.
        if dist.is_main and (step % p.checkpoint_every == 0 or last_step):
            checkpoint(last_path)
        if row is not None and on_log:
            on_log(step, {k: v for k, v in row.items() if v is not None and k != "step"})
    report.close()
    if dist.is_main and (step == 0 or not last_path.exists()):
        checkpoint(last_path)
    if dist.is_main:
        write_history(log_path, history)
    seconds = elapsed_before + time.perf_counter() - start
    return TrainResult(
        step=step, tokens=tokens, seconds=seconds, tokens_per_s=tokens / max(seconds, 1e-9),
        train_loss=loss_value, val_loss=val, best_val_loss=best_val, val_bpb=last_bpb[0], history=history,
        settings={"dtype": p.dtype, "compile": p.compile, "threads": p.threads, "chosen_by": choice.chosen_by,
                  "measured_tokens_per_s": choice.tokens_per_s, "note": choice.note},
        compile_seconds=round(compile_seconds, 2), calibration_seconds=choice.calibration_seconds,
        step_seconds=round(step_seconds, 3),
    )


def resolve_settings(model_params: ModelParams, p: TrainParams, vocab_size: int, train_ids: np.ndarray,
                     device: torch.device, dist: Dist = SINGLE) -> calibrate.Choice:
    """dtype, compile and threads for this run: explicit ones as set, `auto` ones measured on this
    machine (barkgpt/calibrate.py). Under DDP rank 0 measures and every process takes its choice."""
    if "auto" not in (p.dtype, p.compile, p.threads):
        return calibrate.Choice(dtype=p.dtype, compile=p.compile, threads=p.threads,
                                chosen_by=dict.fromkeys(("dtype", "compile", "threads"), "explicit"))
    block = model_params.block_size
    micro_tokens = p.batch_size * block

    def run_seconds(tokens_per_s: float) -> float:
        """How long this run trains at that speed (per process): the budget that ends it first."""
        limits = [p.max_steps * p.grad_accum * micro_tokens / tokens_per_s]
        if p.max_seconds:
            limits.append(p.max_seconds)
        if p.max_tokens:
            limits.append(p.max_tokens / (tokens_per_s * dist.world_size))
        return min(limits)

    def make_step(setting: calibrate.Setting):
        """One micro-batch's forward, backward and optimizer step of a fresh copy of the model."""
        threads = setting.threads or calibrate.usable_cores()
        torch.set_num_threads(threads)
        if setting.compile:
            prepare(device, True)
        model = GPT(model_params, vocab_size).to(device)
        fn = torch.compile(model) if setting.compile else model
        optimizer = make_optimizer(model, p)
        x, y = random_windows(train_ids, p.batch_size, block, np.random.default_rng(0))
        x, y = to_device(x, device), to_device(y, device)

        def step() -> None:
            torch.set_num_threads(threads)
            with autocast(setting.dtype, device.type):
                _, loss = fn(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
        return step

    choice = None
    if dist.is_main:
        before = torch.get_num_threads()
        shape = {"model": model_params.model_dump(), "vocab": vocab_size, "batch_size": p.batch_size,
                 "optimizer": p.optimizer}
        choice = calibrate.choose(dtype=p.dtype, compile=p.compile, threads=p.threads, device=device, shape=shape,
                                  tokens_per_step=micro_tokens, run_seconds=run_seconds, make_step=make_step,
                                  world_size=dist.world_size)
        torch.set_num_threads(before)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return object_from_main(choice, dist)


def write_history(path: Path, history: list[dict]) -> None:
    columns = ["step", "loss", "val_loss", "val_bpb", "lr", "tokens_per_s", "tokens", "seconds"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    write_text(path, buf.getvalue())
