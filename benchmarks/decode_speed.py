"""Decode speed: PyTorch (KV cache) vs llama.cpp F32 / Q8_0 / Q4_K_M on the same prompts, same run.

Greedy decoding of `--new-tokens` tokens per prompt (EOS does not stop it, so every backend decodes
the same number of tokens). Time to first token = prompt processing + the first token's logits.
Decode tokens/s = tokens after the first / time after the first.

    python benchmarks/decode_speed.py --pipeline bark --prompts 4 --new-tokens 32 --repeats 3
    python benchmarks/decode_speed.py --pipeline webtext --prompts 4 --new-tokens 128 --threads 2

Run the pipeline (export + quantize stages) first; the files come from exports/<pipeline>/.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from barkgpt.checkpoint import load_model  # noqa: E402
from barkgpt.lm.llama_lm import LlamaLM  # noqa: E402
from barkgpt.model import KVCache  # noqa: E402
from barkgpt.stages import paths_for, read_lines  # noqa: E402


@torch.inference_mode()
def run_torch(model, ids: list[int], new: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    cache = KVCache(model.cfg, batch=1)
    logits = model(torch.tensor([ids]), cache=cache, last_only=True)
    nxt = logits[0, -1].argmax()
    t1 = time.perf_counter()
    for _ in range(new - 1):
        logits = model(nxt.view(1, 1), cache=cache)
        nxt = logits[0, -1].argmax()
    return t1 - t0, time.perf_counter() - t1


def run_llama(llm, ids: list[int], new: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    llm.reset()
    llm.eval(ids)
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t1 = time.perf_counter()
    for _ in range(new - 1):
        llm.eval([nxt])
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="bark")
    ap.add_argument("--root", default=".")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="f32,q8_0,q4_k_m")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    paths = paths_for(args.pipeline, args.root)
    model, tok = load_model(paths.checkpoint)
    n_ctx = model.cfg.block_size
    new = min(args.new_tokens, n_ctx // 2)
    prompts = [tok.encode(line)[: n_ctx - new] for line in read_lines(paths.val_text)[: args.prompts]]
    prompts = [p for p in prompts if p]
    backends = {"pytorch (KV cache)": lambda ids: run_torch(model, ids, new)}
    llms = {}
    for v in args.variants.split(","):
        llms[v] = LlamaLM(paths.gguf(v), n_ctx, threads=args.threads, all_logits=True)
        backends[f"llama.cpp {v.upper()}"] = (lambda llm: lambda ids: run_llama(llm, ids, new))(llms[v].llm)
    print(f"{args.pipeline}: {len(prompts)} prompts (mean {statistics.mean(map(len, prompts)):.0f} tokens), "
          f"{new} new tokens, {args.repeats} repeats, {args.threads} thread(s), torch {torch.__version__}")
    print(f"| backend | time to first token (ms) | decode tokens/s |\n|---|---:|---:|")
    for name, fn in backends.items():
        fn(prompts[0])  # warm-up
        ttft, dec = [], []
        for _ in range(args.repeats):
            for ids in prompts:
                a, b = fn(ids)
                ttft.append(a)
                dec.append((new - 1) / b if b > 0 else float("inf"))
        print(f"| {name} | {1000 * statistics.median(ttft):.2f} | {statistics.median(dec):,.0f} |")
    for lm in llms.values():
        lm.close()


if __name__ == "__main__":
    main()
