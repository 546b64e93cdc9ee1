"""`auto` training settings are chosen by measurement (barkgpt/calibrate.py): stub steps with a
known cost stand in for the model, so the test knows which setting is faster."""
from __future__ import annotations

import json
import time

import torch

from barkgpt import calibrate
from barkgpt.calibrate import Setting
from barkgpt.params import TrainParams
from barkgpt.train import budget_text

CPU = torch.device("cpu")
SHAPE = {"model": "stub", "batch_size": 1}


def stub_steps(cost: dict, calls: list, compile_cost: float = 0.0):
    """make_step for calibrate.choose: a step in `setting` sleeps cost[(dtype, compiled)] seconds;
    a compiled one pays `compile_cost` once, on its first call, as torch.compile does."""
    def make_step(setting: Setting):
        calls.append(setting)
        first = [setting.compile]

        def step():
            if first[0]:
                time.sleep(compile_cost)
                first[0] = False
            time.sleep(cost[(setting.dtype, setting.compile)])
        return step
    return make_step


def choose(make_step, dtype="auto", compile=False, threads=1, run_s=10.0, cache=False):
    return calibrate.choose(dtype=dtype, compile=compile, threads=threads, device=CPU, shape=SHAPE,
                            tokens_per_step=1000, run_seconds=lambda tps: run_s, make_step=make_step,
                            use_cache=cache)


def test_calibration_picks_the_faster_dtype_whichever_it_is():
    calls = []
    slow_fp32 = choose(stub_steps({("float32", False): 0.03, ("bfloat16", False): 0.01}, calls))
    assert slow_fp32.dtype == "bfloat16" and slow_fp32.chosen_by["dtype"] == "measured"
    assert {s.dtype for s in calls} == {"float32", "bfloat16"}
    tps = slow_fp32.tokens_per_s
    assert tps["bfloat16, 1 threads"] > 1.5 * tps["float32, 1 threads"]  # 1000 tokens per 10 ms vs per 30 ms
    assert slow_fp32.note.startswith("chosen by measurement: bfloat16, 1 threads, no compile; measured")
    assert "vs" in slow_fp32.note and "(float32, 1 threads)" in slow_fp32.note

    slow_bf16 = choose(stub_steps({("float32", False): 0.01, ("bfloat16", False): 0.03}, []))
    assert slow_bf16.dtype == "float32"


def test_an_explicit_dtype_wins_and_is_not_measured():
    calls = []
    choice = choose(stub_steps({("float32", False): 0.03, ("bfloat16", False): 0.01}, calls), dtype="float32")
    assert choice.dtype == "float32" and choice.chosen_by["dtype"] == "explicit"
    assert calls == []  # nothing left to decide, nothing measured
    assert not choice.note.startswith("chosen by measurement")


def test_compile_only_when_its_compile_time_is_repaid_within_the_run(monkeypatch):
    cost = {("float32", False): 0.02, ("float32", True): 0.01}  # compiled: twice the speed
    # Compiling costs 0.3 s; a 200 s run gains ~100 s from it, so it compiles.
    long_run = choose(stub_steps(cost, [], compile_cost=0.3), dtype="float32", compile="auto", run_s=200.0)
    assert long_run.compile is True and 0.3 <= long_run.compile_seconds < 10  # 10: a busy machine
    assert "compiled" in long_run.note and "of compiling" in long_run.note
    # A run too short to repay any compile is not even tried.
    calls = []
    short = choose(stub_steps(cost, calls), dtype="float32", compile="auto", run_s=5.0)
    assert short.compile is False and not any(s.compile for s in calls) and "not tried" in short.note
    # Tried (the floor lowered), twice as fast, but 0.3 s of compiling is more than a 0.4 s run wins back (0.2 s).
    monkeypatch.setattr(calibrate, "COMPILE_TRIAL_MIN_RUN_S", 0.0)
    calls = []
    unpaid = choose(stub_steps(cost, calls, compile_cost=0.3), dtype="float32", compile="auto", run_s=0.4)
    assert any(s.compile for s in calls) and unpaid.compile is False and unpaid.compile_seconds >= 0.3


def test_measurements_are_cached_per_machine_and_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cost = {("float32", False): 0.03, ("bfloat16", False): 0.01}
    first_calls, second_calls = [], []
    first = choose(stub_steps(cost, first_calls), cache=True)
    second = choose(stub_steps(cost, second_calls), cache=True)
    assert first_calls and second_calls == [] and second.dtype == first.dtype == "bfloat16"
    assert second.calibration_seconds < first.calibration_seconds
    cached = json.loads((tmp_path / "barkgpt" / "calibration.json").read_text())
    (entry,) = cached.values()
    assert entry["machine"]["torch"] == torch.__version__ and entry["machine"]["cpu"] and "flags" in entry["machine"]
    assert set(entry["tokens_per_s"]) == {"float32, 1 threads", "bfloat16, 1 threads"}


def test_the_progress_line_names_the_budget_that_ends_the_run():
    timed = TrainParams(max_steps=100_000, max_seconds=60)
    assert budget_text(timed, 1, 12.4, 4096) == "step 1 | 0:12 of 1:00 time budget"
    stepped = TrainParams(max_steps=100, max_seconds=600)
    assert budget_text(stepped, 50, 10.0, 4096) == "step 50/100"
    tokens = TrainParams(max_steps=100_000, max_tokens=4_000_000)
    assert budget_text(tokens, 9, 1.0, 1_200_000) == "step 9 | 1.2M of 4.0M tokens"


def test_auto_settings_validate():
    p = TrainParams(dtype="auto", compile="auto", threads="auto")
    assert (p.dtype, p.compile, p.threads) == ("auto", "auto", "auto")
    assert TrainParams(compile=True, threads=2).threads == 2


def test_figures_from_a_busy_machine_are_retaken_when_it_is_quiet(monkeypatch):
    monkeypatch.setattr(calibrate, "load_per_core", lambda: 0.7)  # now: 0.7 runnable processes per core
    assert calibrate.stale({"load_per_core": 8.0})  # measured on a machine 8x oversubscribed
    assert not calibrate.stale({"load_per_core": 0.9})  # measured on a machine with a core to spare
    assert not calibrate.stale({"load_per_core": 1.2})  # busy then, but not twice as busy as now


def test_a_setting_that_cannot_run_here_is_skipped():
    def make_step(setting):
        if setting.dtype == "bfloat16":
            raise RuntimeError("bf16 autocast is not supported on this backend")
        return lambda: time.sleep(0.01)
    choice = choose(make_step)
    assert choice.dtype == "float32" and choice.tokens_per_s["bfloat16, 1 threads"] == 0
