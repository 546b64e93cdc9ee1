"""Seeded synthetic conversations under the prompt contract.

One conversation per line. Each turn is `User: speak Assistant: <1..max_barks barks> <EOS>`;
a multi-turn conversation is 2..max_turns such turns on one line. `p` is the bark section's
`data` params (BarkDataParams, declared beside the pipeline in barkgpt/pipelines/bark.py, which
imports this module: so it is not imported here).
"""
from __future__ import annotations

import random
from pathlib import Path

from barkgpt.fileio import write_text
from barkgpt.tokenizer import ASSISTANT, EOS, SPEAK, USER

PROMPT = f"{USER} {SPEAK} {ASSISTANT}"


def conversation(rng: random.Random, p) -> str:
    barks, weights = zip(*sorted(p.bark_mix.items()))
    multi = p.max_turns > 1 and rng.random() < p.multi_turn_share
    turns = rng.randint(2, p.max_turns) if multi else 1
    parts = []
    for _ in range(turns):
        n = rng.randint(1, p.max_barks)
        parts.append(" ".join([PROMPT, *rng.choices(barks, weights, k=n), EOS]))
    return " ".join(parts)


def generate(p, seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [conversation(rng, p) for _ in range(count)]


def write_bark_data(p, seed: int, out_dir: Path) -> dict[str, Path]:
    """Write train.txt and val.txt; the splits use different seeds so they are independent."""
    out = {"train": Path(out_dir) / "train.txt", "val": Path(out_dir) / "val.txt"}
    write_text(out["train"], "\n".join(generate(p, seed, p.train_conversations)) + "\n")
    write_text(out["val"], "\n".join(generate(p, seed + 1, p.val_conversations)) + "\n")
    return out
