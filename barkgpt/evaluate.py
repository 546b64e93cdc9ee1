"""Evaluation of the bark model: validation loss, perplexity, prompt-contract accuracy, OOD probe.

The contract: after `... Assistant:` the model answers one or more barks, then <EOS>, nothing
else. Accuracy is measured on samples at temperature 1.0, so it reflects the model's whole
distribution, not just its most likely answer.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace

import numpy as np

from barkgpt.engine import Sampling, generate_batch
from barkgpt.model import GPT
from barkgpt.params import BARKS, BarkEvalParams
from barkgpt.tokenizer import ASSISTANT, WordTokenizer
from barkgpt.train import mean_loss

CONTRACT_PROMPT = "User: speak Assistant:"


def is_contract(ids: list[int], tok: WordTokenizer) -> bool:
    bark_ids = {tok.ids[b] for b in BARKS}
    return len(ids) >= 2 and ids[-1] == tok.eos_id and all(i in bark_ids for i in ids[:-1])


def contract_rate(model: GPT, tok: WordTokenizer, prompts: list[str], s: Sampling) -> tuple[float, list[str]]:
    """Share of completions that keep the contract; prompts are batched by token length."""
    by_len: dict[int, list[list[int]]] = defaultdict(list)
    for prompt in prompts:
        ids = tok.encode(prompt)
        by_len[len(ids)].append(ids)
    ok, completions = 0, []
    for i, group in enumerate(by_len.values()):
        outs = generate_batch(model, group, replace(s, seed=(s.seed or 0) + i), tok.eos_id)
        ok += sum(is_contract(o, tok) for o in outs)
        completions += [tok.decode(o) for o in outs]
    return ok / len(prompts), completions


def multi_turn_prompts(val_lines: list[str], limit: int) -> list[str]:
    """The conversation up to its last `Assistant:`, for conversations of two or more turns."""
    prompts = []
    for line in val_lines:
        if line.count(ASSISTANT) >= 2:
            prompts.append(line[: line.rindex(ASSISTANT) + len(ASSISTANT)])
        if len(prompts) == limit:
            break
    return prompts


def evaluate_bark(model: GPT, tok: WordTokenizer, val_ids: np.ndarray, val_lines: list[str],
                  p: BarkEvalParams, dtype: str = "float32") -> tuple[dict, dict]:
    """Return (metrics, samples): numbers for DVC/MLflow, and the texts a person wants to read."""
    s = Sampling(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                 max_new_tokens=p.max_new_tokens, seed=p.seed)
    val_loss = mean_loss(model, val_ids, model.cfg.block_size, 32, p.val_batches, dtype)
    acc, completions = contract_rate(model, tok, [CONTRACT_PROMPT] * p.contract_samples, s)
    multi = multi_turn_prompts(val_lines, p.contract_samples)
    multi_acc, _ = contract_rate(model, tok, multi, s) if multi else (float("nan"), [])
    ood_metrics, ood_samples = {}, {}
    for prompt in p.ood_prompts:
        rate, outs = contract_rate(model, tok, [prompt] * 20, s)
        ood_metrics[prompt] = rate
        ood_samples[prompt] = outs[:3]
    metrics = {
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss),
        "contract_accuracy": acc,
        "contract_samples": p.contract_samples,
        "contract_accuracy_multi_turn": multi_acc,
        "ood_contract_rate": ood_metrics,
    }
    samples = {"prompt": CONTRACT_PROMPT, "completions": completions[:20], "ood": ood_samples}
    return metrics, samples
