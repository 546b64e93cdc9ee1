"""Evaluation through the model interface (barkgpt.lm): the same functions judge the PyTorch
checkpoint (the evaluate stage) and every GGUF through llama.cpp (the parity stage).

- bits per byte and loss over the validation token stream (barkgpt.loss_eval), every pipeline;
- bark: prompt-contract failures among sampled completions (the gate's binomial test), plus the
  multi-turn and out-of-distribution rates. The contract: after `... Assistant:` the model answers
  one or more barks, then <EOS>, nothing else. Completions are sampled at eval.temperature (1.0),
  so the rate reflects the model's whole distribution, not just its most likely answer;
- text: completions of fixed prompts, for a person to read.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from barkgpt.lm import LM, Sampling, generate_text
from barkgpt.loss_eval import eval_windows, evaluate_bpb
from barkgpt.params import BARKS
from barkgpt.tokenizer import ASSISTANT

CONTRACT_PROMPT = "User: speak Assistant:"


def sampling(p) -> Sampling:
    return Sampling(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, max_new_tokens=p.max_new_tokens,
                    seed=p.seed)


def open_for_evaluation(lay, threads: int | str | None = None):
    """(the checkpoint as a TorchLM, the validation tokens, byte lengths per id), the tokens checked
    against the checkpoint's tokenizer."""
    from barkgpt.data.shards import load_tokens
    from barkgpt.lm.torch_lm import TorchLM

    lm = TorchLM.load(lay.checkpoint, threads if isinstance(threads, int) else None)  # train.threads may be auto
    val_ids, _ = load_tokens(lay.token_manifest("val"), lm.tokenizer, f"the model {lay.checkpoint} and the shards "
                             f"disagree: re-run the tokenize and train stages (barkgpt tokenize {lay.pipeline}; "
                             f"barkgpt train {lay.pipeline})")
    return lm, val_ids, lm.tokenizer.token_bytes()


def validation_loss(lm: LM, val_ids: np.ndarray, token_bytes, batch: int, max_batches: int | None) -> dict:
    """val_loss, val_bpb, perplexity: the windows training's validation uses (barkgpt.loss_eval)."""
    out = evaluate_bpb(lm, eval_windows(val_ids, lm.n_ctx, batch, lm.tokenizer.eos_id, max_batches), token_bytes)
    return {"val_loss": out["loss"], "val_bpb": out["bpb"], "val_perplexity": math.exp(out["loss"]),
            "val_tokens": out["tokens"], "val_bytes": out["bytes"]}


def contract_failures(lm: LM, prompts: list[str], s: Sampling) -> tuple[int, list[str]]:
    """(how many sampled completions break the contract, the completions' text)."""
    tok = lm.tokenizer
    barks = set(tok.encode(" ".join(BARKS)))
    outs = lm.generate_batch([tok.encode(p) for p in prompts], s)
    kept = [len(o) >= 2 and o[-1] == tok.eos_id and all(i in barks for i in o[:-1]) for o in outs]
    return kept.count(False), [tok.decode(o) for o in outs]


def contract_quality(lm: LM, gates, p) -> dict:
    """The measurement the contract gate judges: `gates.contract_samples` completions of the prompt."""
    n = gates.contract_samples
    failures, completions = contract_failures(lm, [CONTRACT_PROMPT] * n, sampling(p))
    return {"contract_samples": n, "contract_failures": failures, "contract_accuracy": 1 - failures / n,
            "completions": completions[:20]}


def multi_turn_prompts(val_lines: list[str], limit: int) -> list[str]:
    """The conversation up to its last `Assistant:`, for conversations of two or more turns."""
    prompts = []
    for line in val_lines:
        if line.count(ASSISTANT) >= 2:
            prompts.append(line[: line.rindex(ASSISTANT) + len(ASSISTANT)])
        if len(prompts) == limit:
            break
    return prompts


def evaluate_bark(lm: LM, val_ids: np.ndarray, val_lines: list[str], token_bytes, p, gates) -> tuple[dict, dict]:
    """(metrics, samples): numbers for the gate, DVC and MLflow; texts a person wants to read."""
    s = sampling(p)
    contract = contract_quality(lm, gates, p)
    multi = multi_turn_prompts(val_lines, gates.contract_samples)
    multi_failures = contract_failures(lm, multi, replace(s, seed=s.seed + 1))[0] if multi else None
    ood_metrics, ood_samples = {}, {}
    for i, prompt in enumerate(p.ood_prompts):
        failures, outs = contract_failures(lm, [prompt] * 20, replace(s, seed=s.seed + 2 + i))
        ood_metrics[prompt] = 1 - failures / 20
        ood_samples[prompt] = outs[:3]
    metrics = {
        **validation_loss(lm, val_ids, token_bytes, p.batch_size, p.max_batches),
        **{k: v for k, v in contract.items() if k != "completions"},
        "contract_accuracy_multi_turn": 1 - multi_failures / len(multi) if multi else float("nan"),
        "ood_contract_rate": ood_metrics,
    }
    samples = {"prompt": CONTRACT_PROMPT, "completions": contract["completions"], "ood": ood_samples}
    return metrics, samples


def evaluate_text(lm: LM, val_ids: np.ndarray, token_bytes, p) -> tuple[dict, dict]:
    """(metrics, samples) for a text model: bpb, loss, perplexity; completions of fixed prompts."""
    metrics = validation_loss(lm, val_ids, token_bytes, p.batch_size, p.max_batches)
    metrics["bytes_per_token"] = metrics["val_bytes"] / metrics["val_tokens"]
    metrics["vocab_size"] = lm.vocab_size
    s = sampling(p)
    samples = {prompt: generate_text(lm, prompt, replace(s, seed=p.seed + i)) for i, prompt in enumerate(p.prompts)}
    return metrics, samples
