"""Where training runs: `train.device` (auto, cpu, cuda, mps) resolved once, and what each device wants.

On CUDA: TF32 matmuls, bf16 autocast when `dtype: bfloat16`, fused AdamW, batches copied from
pinned memory without blocking. torch.compile keeps its compiled kernels in a per-machine cache
(barkgpt.layout.compile_cache), so a cold compile is paid once per machine. The CPU path is what it
always was: deterministic for a given seed and thread count.
"""
from __future__ import annotations

import contextlib
import os

import torch

from barkgpt.errors import BarkError


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """The torch device for `train.device`; a GPU that is asked for and absent stops here, before any work."""
    if choice == "auto":
        if torch.cuda.is_available():
            choice = "cuda"
        elif torch.backends.mps.is_available():
            choice = "mps"
        else:
            choice = "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise BarkError(f"train.device is cuda but no CUDA GPU is visible (torch {torch.__version__}, {built}); "
                            "set train.device: auto or cpu in params.yaml, or run on a machine with an NVIDIA GPU "
                            "and a CUDA build of torch")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise BarkError(f"process {local_rank} needs its own GPU but only {count} are visible; "
                            f"set train.nproc (or --nproc / --nproc-per-node) to at most {count}")
        return torch.device("cuda", local_rank)
    if choice == "mps":
        if not torch.backends.mps.is_available():
            raise BarkError("train.device is mps but Apple's Metal backend is not available here; "
                            "set train.device: auto or cpu in params.yaml")
        return torch.device("mps")
    return torch.device("cpu")


def prepare(device: torch.device, compile_model: bool) -> None:
    """Process-wide settings for the device: TF32 on CUDA; the compile cache when compiling."""
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)  # a bare "cuda" means the first GPU (torch wants an index)
        torch.set_float32_matmul_precision("high")  # TF32: fp32 matmuls on tensor cores (10-bit mantissa inputs)
        torch.backends.cudnn.allow_tf32 = True
    if compile_model:
        from barkgpt.layout import compile_cache

        # Read by inductor when it first compiles; a user's own setting wins.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache()))
        os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def autocast(dtype: str, device_type: str = "cpu"):
    """bf16 autocast (weights and optimizer stay fp32) on any device; float32 is a no-op;
    auto is whichever of the two `compute_dtype` picks for the device."""
    if compute_dtype(dtype, device_type) == "bfloat16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_dtype(dtype: str, device_type: str = "cpu") -> str:
    """A guess for `auto` where nothing was measured (benchmarks that time one dtype): bfloat16 on
    CUDA GPUs with bf16 and CPUs with AMX, else float32. Training never uses it: its `auto` is
    measured on the machine (barkgpt/calibrate.py), because the flags mislead: without AMX, bf16
    trained at 0.67x fp32 on one AVX512_BF16 CPU (issue 14) and about 2x on another (issue 23)."""
    if dtype != "auto":
        return dtype
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device_type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        return "bfloat16" if amx() else "float32"
    return "float32"


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch -> device. On CUDA from pinned memory and non-blocking: the copy overlaps compute."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def fused_adamw_supported(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda", "mps")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (timings; nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
