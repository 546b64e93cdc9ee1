"""`auto` training settings (train.dtype, train.compile, train.threads) chosen by measurement.

Like FFTW's wisdom or cuDNN's benchmark mode: each candidate runs the real model's training step
(forward, backward, optimizer) for a moment on the machine that trains, and the fastest wins. A
flag is a poor guide: on an AVX-512 CPU without AMX, bf16 matmuls ran 4.6x fp32 on one Zen 4 and
0.67x on another machine (issues 14 and 23). The measurements are kept per machine (CPU model and
flags, or GPU name), model shape, batch, device and torch version in a JSON file under the user's
cache dir, so later runs pay nothing. An explicit setting in params.yaml is never measured over.

Compile is chosen only when its own compile time is repaid within the run: with compile time C,
eager step time t_e and compiled step time t_c over a run of L seconds, when C < L * (1 - t_c/t_e),
i.e. the compiled run, compile included, trains more tokens in the same wall-clock time.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from barkgpt.fileio import read_json, write_json

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SECONDS_PER_CANDIDATE = 0.3  # timed steps per candidate and round (at least one, after an untimed warm-up)
ROUNDS = 2  # candidates alternate, so a burst of load elsewhere slows all of them, not one
# A cold torch.compile of even the 2-layer bark model takes 10-40 s on 2 cores; a run shorter than
# this cannot repay it at any plausible speed-up, so compile is not even tried (measured once).
COMPILE_TRIAL_MIN_RUN_S = 120.0
CPU_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_fp16", "avx512f", "avx512_vnni",
             "avx2", "fma", "asimd", "sve", "bf16")  # what decides fast matmul kernels


@dataclass(frozen=True)
class Setting:
    dtype: str
    threads: int | None  # None: torch's default (all cores)
    compile: bool = False

    @property
    def label(self) -> str:
        return f"{self.dtype}, {self.threads or 'all'} threads" + (", compiled" if self.compile else "")


@dataclass
class Choice:
    """The settings a run trains with, and why."""

    dtype: str
    compile: bool
    threads: int | None
    chosen_by: dict[str, str] = field(default_factory=dict)  # dtype/compile/threads -> explicit|measured|...
    tokens_per_s: dict[str, float] = field(default_factory=dict)  # setting label -> measured tok/s
    compile_seconds: float | None = None  # measured compile time, when compile was tried
    calibration_seconds: float = 0.0  # spent measuring in this run (0 when all came from the cache)
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_flags() -> list[str]:
    """The CPU features that decide which matmul kernels run (AMX, AVX512_BF16, AVX2, ...)."""
    found: set[str] = set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    found |= set(line.split(":", 1)[1].split())
                    break
    if not found and platform.system() == "Darwin":
        found.add("asimd")  # Apple silicon: NEON always, no AVX
    return [flag for flag in CPU_FLAGS if flag in found]


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine(device: torch.device) -> dict:
    """What the measurements depend on besides the model: the processor, its flags, torch."""
    info = {"cpu": cpu_name(), "flags": cpu_flags(), "cores": usable_cores(), "torch": torch.__version__,
            "device": device.type}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def dtype_candidates(device: torch.device) -> list[str]:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return ["float32"]
    return ["float32", "bfloat16"]


def thread_candidates(device: torch.device, world_size: int = 1) -> list[int | None]:
    """1, half and all of this process's share of the cores; one candidate off the CPU."""
    cores = max(1, usable_cores() // world_size)
    if device.type != "cpu":
        return [cores]
    return sorted({1, max(1, cores // 2), cores})


def time_steps(step: Callable[[], None], seconds: float, min_steps: int = 1) -> float:
    """Seconds of the fastest of the steps run for `seconds`: interference from other processes
    only ever adds time, so the minimum is the step's own cost (as timeit argues)."""
    best, spent, n = float("inf"), 0.0, 0
    while n < min_steps or spent < seconds:
        t0 = time.perf_counter()
        step()
        took = time.perf_counter() - t0
        best, spent, n = min(best, took), spent + took, n + 1
    return best


def measure(settings: list[Setting], make_step: Callable[[Setting], Callable[[], None]], tokens_per_step: int,
            seconds: float = SECONDS_PER_CANDIDATE, rounds: int = ROUNDS) -> dict[str, float]:
    """tokens/s of each setting: `make_step(setting)` returns a callable that runs one training
    step in it (untimed once, to warm up); the rounds alternate the settings."""
    steps, unsupported = {}, {}
    for s in settings:
        try:
            steps[s.label] = make_step(s)
            steps[s.label]()  # warm-up: first-call allocations, oneDNN primitive creation
        except (RuntimeError, NotImplementedError) as err:  # e.g. bf16 autocast on a backend without it
            log.info("calibration: %s does not run here (%s)", s.label, str(err).splitlines()[0][:200])
            steps.pop(s.label, None)
            unsupported[s.label] = 0.0
    best = {label: float("inf") for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            best[label] = min(best[label], time_steps(step, seconds))
    return {**unsupported, **{label: tokens_per_step / t for label, t in best.items()}}


def load_per_core() -> float:
    """Runnable processes per core (1-minute load average): how busy the machine was while measuring."""
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0] / usable_cores(), 2)
    return 0.0


def stale(entry: dict) -> bool:
    """Figures taken on a busy machine (more runnable processes than cores) are taken again once it
    is half as busy: under contention fewer threads win, which is no guide for a quiet machine."""
    then = entry.get("load_per_core", 0.0)
    return then > 1.0 and load_per_core() < then / 2


def cache_path():
    from barkgpt.layout import machine_cache

    return machine_cache() / "calibration.json"


def step_code() -> str:
    """The source the measured step runs (the model and the training step): a faster model is a new
    measurement, not the old model's choice reused."""
    h = hashlib.sha256()
    for name in ("model.py", "optim.py", "train.py"):  # by file: train imports this module
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


def cache_key(device: torch.device, shape: dict) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "machine": machine(device), "shape": shape, "code": step_code()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_cache() -> dict:
    try:
        data = read_json(cache_path())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # absent or unreadable: measure again, and write a whole new one


def write_cache(key: str, entry: dict) -> None:
    data = read_cache()
    data[key] = entry
    try:
        write_json(cache_path(), data)  # atomic: a crash leaves the old file or the new one
    except OSError as err:  # a read-only home: the run goes on, the next one measures again
        log.warning("could not save the calibration to %s (%s)", cache_path(), err)


@contextlib.contextmanager
def threads_set(threads: int | None):
    before = torch.get_num_threads()
    torch.set_num_threads(threads or usable_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def choose(*, dtype: str, compile: bool | str, threads: int | None | str, device: torch.device,
           shape: dict, tokens_per_step: int, run_seconds: Callable[[float], float],
           make_step: Callable[[Setting], Callable[[], None]], world_size: int = 1,
           use_cache: bool = True) -> Choice:
    """Resolve the `auto` settings; explicit ones stay as given.

    `shape` is everything about the step besides the machine (model params, vocab, batch);
    `run_seconds(tokens_per_s)` is how long the run will train at that speed (its budget);
    `make_step(setting)` returns one training step's callable in that setting (`measure`)."""
    dtypes = dtype_candidates(device) if dtype == "auto" else [dtype]
    thread_opts = thread_candidates(device, world_size) if threads == "auto" else [threads]
    if world_size > 1 and threads == "auto":
        thread_opts = thread_opts[-1:]  # processes share the cores: each takes its share, unmeasured
    eager = [Setting(d, t) for d in dtypes for t in thread_opts]
    chosen_by = {"dtype": "measured" if len(dtypes) > 1 else ("explicit" if dtype != "auto" else "only choice"),
                 "threads": "measured" if len(thread_opts) > 1 else ("explicit" if threads != "auto" else "share of cores"),
                 "compile": "explicit" if compile != "auto" else "measured"}
    key = cache_key(device, shape)
    entry = read_cache().get(key, {}) if use_cache else {}
    if stale(entry):
        entry = {}
    tps: dict[str, float] = dict(entry.get("tokens_per_s", {}))
    spent, start = 0.0, time.perf_counter()

    missing = [s for s in eager if s.label not in tps] if len(eager) > 1 else []
    if missing:
        tps.update(measure(missing, make_step, tokens_per_step))
    best = max(eager, key=lambda s: tps.get(s.label, 0.0)) if len(eager) > 1 else eager[0]

    compile_on, compile_s = bool(compile) if compile != "auto" else False, entry.get("compile_seconds", {}).get(best.label)
    if compile == "auto":
        compiled = Setting(best.dtype, best.threads, compile=True)
        if best.label not in tps:  # one setting only: its speed is still needed to judge compile
            tps.update(measure([best], make_step, tokens_per_step, rounds=1))
        run_s = run_seconds(tps[best.label])
        if compiled.label not in tps and run_s >= COMPILE_TRIAL_MIN_RUN_S:
            t0 = time.perf_counter()
            step = make_step(compiled)
            step()  # the first call compiles forward and backward
            compile_s = time.perf_counter() - t0
            tps[compiled.label] = tokens_per_step / time_steps(step, SECONDS_PER_CANDIDATE * ROUNDS)
        if compiled.label in tps and compile_s is not None:
            gain = 1 - tps[best.label] / tps[compiled.label]  # 1 - t_c / t_e
            compile_on = compile_s < run_s * gain
    spent = time.perf_counter() - start
    if use_cache and (missing or spent > 0.05):
        compile_times = dict(entry.get("compile_seconds", {}))
        if compile_s is not None and compile == "auto":
            compile_times[best.label] = round(compile_s, 2)
        write_cache(key, {"machine": machine(device), "shape": shape, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                          "load_per_core": load_per_core(),
                          "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
                          "compile_seconds": compile_times})
    choice = Choice(dtype=best.dtype, compile=compile_on, threads=best.threads, chosen_by=chosen_by,
                    tokens_per_s={k: round(v) for k, v in tps.items()},
                    compile_seconds=None if compile_s is None else round(compile_s, 2),
                    calibration_seconds=round(spent, 2))
    choice.note = describe(choice, best, eager)
    return choice


def describe(choice: Choice, best: Setting, eager: list[Setting]) -> str:
    """'chosen by measurement: bfloat16, 2 threads, no compile; measured 9,100 tok/s vs 4,700 (float32, 2 threads)'."""
    measured = [k for k, how in choice.chosen_by.items() if how == "measured"]
    if not measured:
        return "explicit settings: " + best.label + (", compiled" if choice.compile else "")
    tps = choice.tokens_per_s
    others = [s.label for s in eager if s != best and s.label in tps]
    compiled = Setting(best.dtype, best.threads, compile=True).label
    parts = [f"chosen by measurement: {best.label}, {'compiled' if choice.compile else 'no compile'}"]
    if best.label in tps:
        vs = ", ".join(f"{tps[o]:,.0f} ({o})" for o in others)
        parts.append(f"measured {tps[best.label]:,.0f} tok/s" + (f" vs {vs}" if vs else ""))
    if choice.chosen_by.get("compile") == "measured":
        if compiled in tps and choice.compile_seconds is not None:
            parts.append(f"compiled {tps[compiled]:,.0f} tok/s after {choice.compile_seconds:.1f} s of compiling")
        else:
            parts.append(f"compile not tried: the run is shorter than {COMPILE_TRIAL_MIN_RUN_S:.0f} s")
    return "; ".join(parts)
