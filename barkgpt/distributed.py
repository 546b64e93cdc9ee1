"""Data-parallel training under torchrun: which process this is, its process group, and the launcher.

`torchrun --nproc-per-node N -m barkgpt train <pipeline>` starts N copies of the CLI with RANK,
LOCAL_RANK and WORLD_SIZE set; each trains its own micro-batches and DDP averages the gradients
(gloo on CPU, NCCL on CUDA). `barkgpt train <pipeline> --nproc N` (or `train.nproc: N`) starts the
same thing through `launch`, which runs torchrun's agent and turns a worker's exit code 2 (a
BarkError, already printed by the worker) into the launcher's exit code 2.

Usage of this module as a program: python -m barkgpt.distributed --nproc N -- <barkgpt arguments>
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import uuid
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, logs and MLflow."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = Dist()


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def from_env() -> Dist:
    if not under_torchrun():
        return SINGLE
    return Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))


@contextlib.contextmanager
def process_group(dist: Dist, device: torch.device):
    """Join the process group for the run's duration (nothing to join for one process)."""
    if not dist.enabled:
        yield
        return
    import torch.distributed as td

    if device.type == "cuda":
        td.init_process_group("nccl", device_id=device)
    else:
        td.init_process_group("gloo")
    try:
        yield
    finally:
        td.destroy_process_group()


def mean_across(value: float, dist: Dist, device: torch.device) -> float:
    """The mean of a number over all processes (every process must call it at the same step)."""
    if not dist.enabled:
        return value
    import torch.distributed as td

    t = torch.tensor([value], dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
    td.all_reduce(t)
    return float(t) / dist.world_size


def from_main(value: float, dist: Dist, device: torch.device) -> float:
    """Rank 0's value of a number, on every process: decisions (stop, learning rate) must agree."""
    if not dist.enabled:
        return value
    import torch.distributed as td

    t = torch.tensor([value], dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
    td.broadcast(t, 0)
    return float(t)


def object_from_main(obj, dist: Dist):
    """Rank 0's object (picklable, small) on every process: e.g. the measured training settings."""
    if not dist.enabled:
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


# --- the launcher -------------------------------------------------------------------------------

def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m barkgpt ARGV` in `nproc` processes on this machine under torchrun's agent
    (`torchrun --standalone`). Returns 0, 2 when a worker stopped on a BarkError, else 1."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent logs each worker failure as an error with a summary block; the worker said why.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "barkgpt", *argv)
    except ChildFailedError as err:
        codes = sorted({f.exitcode for f in err.failures.values()})
        if 2 in codes:
            return 2
        print(f"error: a training process failed (exit codes {codes}); its output above says why", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m barkgpt.distributed",
                                     description="run the barkgpt CLI in N data-parallel processes")
    parser.add_argument("--nproc", type=int, required=True, help="processes on this machine")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the barkgpt arguments")
    args = parser.parse_args(argv)
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    return launch(args.nproc, rest)


if __name__ == "__main__":
    sys.exit(main())
