"""The model and trainer on a CUDA GPU. Skipped where there is none (CI); `bash
benchmarks/gpu_checks.sh` runs this file on a GPU machine (with --noconftest: it needs no
project fixtures, so no MLflow or Great Expectations on a bare GPU image)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from barkgpt.device import autocast, resolve_device
from barkgpt.model import GPT
from barkgpt.params import ModelParams, TrainParams
from barkgpt.tokenizer import WordTokenizer
from barkgpt.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

CFG = ModelParams(n_layer=2, n_head=4, n_embd=64, block_size=32, n_kv_head=2)


def test_auto_picks_the_gpu_and_fp32_logits_match_the_cpu():
    device = resolve_device("auto")
    assert device.type == "cuda"
    torch.manual_seed(0)
    model = GPT(CFG, 97).eval()
    idx = torch.randint(0, 97, (3, CFG.block_size))
    with torch.no_grad():
        on_cpu = model(idx)
        torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 for the comparison
        on_gpu = model.to(device)(idx.to(device)).cpu()
    assert (on_gpu - on_cpu).abs().max().item() < 1e-4


def test_bf16_autocast_feeds_attention_bf16_on_cuda(monkeypatch):
    """RoPE tables follow the autocast dtype of the device the tokens are on, so q and k stay bf16
    (they were promoted to fp32 on CUDA when the tables followed the CPU's autocast state)."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = GPT(CFG, 97).cuda()
    with autocast("bfloat16", "cuda"):
        logits, loss = model(torch.randint(0, 97, (2, 16), device="cuda"), torch.randint(0, 97, (2, 16), device="cuda"))
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)


def test_the_trainer_learns_bark_sequences_on_cuda_bf16_compiled(tmp_path):
    """The training loop on the GPU with everything the CPU path skips: pinned non-blocking copies,
    fused AdamW, bf16 autocast, torch.compile; it writes checkpoints that load on the CPU."""
    tok = WordTokenizer()
    ids = tok.encode("User: speak Assistant: woof arf <EOS> " * 400)
    data = np.array(ids, dtype=np.uint16)
    p = TrainParams(max_steps=60, batch_size=16, learning_rate=0.01, warmup_steps=5, log_every=20,
                    eval_every=60, checkpoint_every=60, dtype="bfloat16", compile=True, device="cuda")
    result = train(model_params=CFG, p=p, tokenizer=tok, train_ids=data, val_ids=data[:2000],
                   out_dir=tmp_path, log_path=tmp_path / "log.csv", params_dict={}, progress=False,
                   device="cuda")  # a bare "cuda", as a library caller may pass it
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < 0.25 * first, (first, last)  # a 5-token cycle is easy: the loss collapses
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    assert state is not None and (tmp_path / "best.pt").exists()
