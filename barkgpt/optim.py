"""Optimizers and the learning-rate schedule of the trainer.

`optimizer: adamw`: AdamW for every parameter (decay on matrices only, nanoGPT's rule).
`optimizer: muon`: Muon (`torch.optim.Muon`: momentum orthogonalised by a Newton-Schulz
iteration, as in modded-nanogpt and nanochat) for the hidden weight matrices of the blocks, AdamW
for the rest: the embedding (tied to the output head), which Muon does not suit, and the norms'
gains, which are vectors. Muon takes much larger steps per matrix than AdamW can at the same
stability, so a small model reaches a given loss in fewer steps.

The schedule is a multiplier of each group's own peak rate (Muon's and AdamW's differ):
linear warm-up, then either cosine decay to `min_lr_ratio` or warmup-stable-decay (constant, then
a linear decay over the last `decay_fraction` of the run), the schedule Muon is usually run with.
"""
from __future__ import annotations

import math

import torch

from barkgpt.errors import BarkError
from barkgpt.params import TrainParams

PEAK = "peak_lr"  # each param group's own peak learning rate, kept in the group (and checkpoint)


class Optimizers:
    """Several torch optimizers stepped as one: what the trainer and the checkpoints see."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != set(self.optimizers):
            raise BarkError("the checkpoint's optimizer state is for another optimizer than train.optimizer; "
                            "train from scratch (drop --resume) or set train.optimizer back")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def hidden_matrices(model: torch.nn.Module) -> tuple[list, list]:
    """(the blocks' 2-D weights, everything else): Muon's share and AdamW's share."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = getattr(model, "lm_head", None)
    if head is not None:
        embeddings.add(id(head.weight))
    matrices, rest, seen = [], [], set()
    for p in model.parameters():  # parameters() yields a tied weight once
        if id(p) in seen:
            continue
        seen.add(id(p))
        (matrices if p.dim() == 2 and id(p) not in embeddings else rest).append(p)
    return matrices, rest


def make_optimizer(model: torch.nn.Module, p: TrainParams) -> Optimizers:
    adamw_args = dict(lr=p.learning_rate, betas=(p.beta1, p.beta2), fused=True)  # fused: one kernel for all
    if p.optimizer == "adamw":
        decay = [q for q in model.parameters() if q.dim() >= 2]
        no_decay = [q for q in model.parameters() if q.dim() < 2]
        groups = [{"params": decay, "weight_decay": p.weight_decay, PEAK: p.learning_rate},
                  {"params": no_decay, "weight_decay": 0.0, PEAK: p.learning_rate}]
        return Optimizers(adamw=torch.optim.AdamW(groups, **adamw_args))
    matrices, rest = hidden_matrices(model)
    embeddings = [q for q in rest if q.dim() >= 2]
    gains = [q for q in rest if q.dim() < 2]
    adamw = torch.optim.AdamW([{"params": embeddings, "weight_decay": p.weight_decay, PEAK: p.learning_rate},
                               {"params": gains, "weight_decay": 0.0, PEAK: p.learning_rate}], **adamw_args)
    # adjust_lr_fn="original": Keller Jordan's scaling by sqrt(max(1, rows/cols)) per matrix.
    muon = torch.optim.Muon([{"params": matrices, PEAK: p.muon_lr}], lr=p.muon_lr,
                            momentum=p.muon_momentum, weight_decay=p.muon_weight_decay, nesterov=True,
                            adjust_lr_fn="original")
    return Optimizers(adamw=adamw, muon=muon)


def lr_factor(step: int, progress: float, p: TrainParams) -> float:
    """The schedule as a multiplier of each group's peak rate; `progress` runs 0 -> 1 over the budget
    (steps, tokens or seconds, whichever ends first)."""
    if step < p.warmup_steps:
        return (step + 1) / p.warmup_steps
    progress = min(progress, 1.0)
    if p.schedule == "wsd":
        start = 1.0 - p.decay_fraction
        if progress <= start:
            return 1.0
        return 1.0 - (1.0 - p.min_lr_ratio) * (progress - start) / p.decay_fraction
    return p.min_lr_ratio + (1.0 - p.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at(step: int, progress: float, p: TrainParams) -> float:
    """The AdamW peak rate times the schedule: the rate the trainer logs."""
    return p.learning_rate * lr_factor(step, progress, p)


def set_lr(optimizer: Optimizers, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group[PEAK] * factor
