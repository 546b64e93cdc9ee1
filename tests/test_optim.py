"""The trainer's optimizers and schedule (barkgpt/optim.py) and the compute dtype rule."""
from __future__ import annotations

import math

import pytest
import torch

from barkgpt.checkpoint import load_checkpoint
from barkgpt.config import load_params
from barkgpt.device import compute_dtype
from barkgpt.errors import BarkError
from barkgpt.model import GPT
from barkgpt.optim import lr_factor, make_optimizer
from barkgpt.params import ModelParams, TrainParams
from barkgpt.pipelines import run_stage
from conftest import make_project


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = GPT(ModelParams(n_layer=2, n_head=2, n_embd=64, block_size=32), 9)
    opt = make_optimizer(model, TrainParams(optimizer="muon", threads=1))
    muon = {id(p) for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
    blocks = {id(p) for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert muon == blocks and len(blocks) == 2 * 4  # wqkv, wo, w13, w2 per layer
    assert id(model.tok_emb.weight) in adamw and model.lm_head.weight is model.tok_emb.weight  # tied: AdamW once
    assert muon.isdisjoint(adamw) and muon | adamw == {id(p) for p in model.parameters()}
    peaks = {g["peak_lr"] for g in opt.param_groups}
    assert peaks == {TrainParams().muon_lr, TrainParams().learning_rate}


def test_schedules_warm_up_then_decay_to_the_floor():
    cos = TrainParams(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 0.0, cos) == pytest.approx(0.1) and lr_factor(9, 0.0, cos) == pytest.approx(1.0)
    assert lr_factor(50, 0.5, cos) == pytest.approx(0.55) and lr_factor(99, 1.0, cos) == pytest.approx(0.1)
    wsd = TrainParams(warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.4)
    assert lr_factor(20, 0.3, wsd) == 1.0 and lr_factor(50, 0.6, wsd) == 1.0  # stable until 60%
    assert lr_factor(70, 0.8, wsd) == pytest.approx(0.5) and lr_factor(99, 1.0, wsd) == pytest.approx(0.0)
    assert all(math.isfinite(lr_factor(s, s / 100, wsd)) for s in range(100))


def _bark(root, train: dict):
    over = {"bark": {"data": {"train_conversations": 300, "val_conversations": 50},
                     "train": {"max_steps": 12, "checkpoint_every": 5, "eval_every": 5, "log_every": 5,
                               "warmup_steps": 3, "threads": 1, **train}},
            "tracking": {"enabled": False}}  # the optimizer is under test, not MLflow
    project = make_project(root, over)
    params = load_params(project / "params.yaml")
    run_stage(params, "bark", "data", project)
    run_stage(params, "bark", "tokenize", project)
    return params, project


def test_muon_trains_and_resumes_exactly(tmp_path):
    """Muon's momentum buffers are in the checkpoint: crash after step 5 + resume == straight run."""
    params, straight = _bark(tmp_path / "a", {"optimizer": "muon", "schedule": "wsd"})
    summary = run_stage(params, "bark", "train", straight, progress=False)
    assert summary["train_loss"] < math.log(9)  # below a uniform guess over the nine words

    class Crash(Exception):
        pass

    def crash_at_5(step, _row):
        if step == 5:
            raise Crash

    _, split = _bark(tmp_path / "b", {"optimizer": "muon", "schedule": "wsd"})
    with pytest.raises(Crash):
        run_stage(params, "bark", "train", split, on_log=crash_at_5, progress=False)
    run_stage(params, "bark", "train", split, resume=True, progress=False)
    a, b = load_checkpoint(straight / "models/bark/last.pt"), load_checkpoint(split / "models/bark/last.pt")
    assert a["step"] == b["step"] == 12 and set(a["optimizer"]) == {"adamw", "muon"}
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_resume_with_another_optimizer_is_refused(tmp_path):
    params, project = _bark(tmp_path, {"max_steps": 3})
    run_stage(params, "bark", "train", project, progress=False)
    muon = load_params(make_project(project, {"bark": {"train": {"optimizer": "muon"}}}) / "params.yaml")
    with pytest.raises(BarkError, match="another optimizer"):
        run_stage(muon, "bark", "train", project, resume=True, progress=False)


def test_auto_dtype_is_bf16_only_where_bf16_matmuls_are_fast():
    assert compute_dtype("float32") == "float32" and compute_dtype("bfloat16") == "bfloat16"
    amx = torch.cpu._is_amx_tile_supported()
    assert compute_dtype("auto", "cpu") == ("bfloat16" if amx else "float32")
    assert compute_dtype("auto", "mps") == "float32"
