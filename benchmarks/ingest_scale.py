"""Ingest + tokenize throughput (MB/s) and peak memory on a generated 1 GB corpus: the streaming path
(barkgpt.data.webtext.ingest, then stages.encode_split in worker processes into shards) side by side
with the in-memory path the project had before (the whole corpus as a list of lines, every token
id in one array; replicated below from that code).

The corpus: lines of words drawn from WikiText-2's vocabulary with its word frequencies (every line
different, 1% repeated lines, 5% blank lines), so cleaning and deduplication have work to do.
The tokenizer: the byte-level BPE (vocab 2048) trained on ../shared/data/wikitext-2-valid.txt
(or on the corpus's first 10 MB), trained before timing: tokenizer training is not ingestion.

Each path runs in its own process; the parent samples the resident memory of that process and
all its children (psutil, every 50 ms) and reports the peak of the sum. Both paths must produce
the same token stream (checked).

    python benchmarks/ingest_scale.py                      # 1 GB, both paths (~10 minutes on 2 cores)
    python benchmarks/ingest_scale.py --size-mb 50         # a quick check
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-valid.txt"


# --- the corpus -----------------------------------------------------------------------------------

def generate(path: Path, size_mb: int, seed: int = 0) -> None:
    words = WIKITEXT.read_text(encoding="utf-8").split() if WIKITEXT.exists() else \
        "the of and in to a was is for on as by with he at from his that it an were".split()
    counts = Counter(words)
    vocab = list(counts)
    weights = np.array([counts[w] for w in vocab], dtype=np.float64)
    rng = np.random.default_rng(seed)
    draw = random.Random(seed)
    target, written, recent = size_mb * 1_000_000, 0, []
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            picks = rng.choice(len(vocab), size=200_000, p=weights / weights.sum())
            at = 0
            while at < len(picks) - 200:
                roll = draw.random()
                if roll < 0.05:
                    line = " "
                elif roll < 0.06 and recent:
                    line = draw.choice(recent)
                else:
                    n = draw.randint(8, 120)
                    line = " ".join(vocab[i] for i in picks[at : at + n])
                    at += n
                    if len(recent) < 1000:
                        recent.append(line)
                f.write(line + "\n")
                written += len(line) + 1


# --- the two paths (each run in a child process) -----------------------------------------------------

def run_streaming(corpus: Path, out: Path, tokenizer: Path, workers: int) -> dict:
    from barkgpt.data.webtext import ingest
    from barkgpt.layout import Layout
    from barkgpt.pipelines.webtext import WebtextPipeline
    from barkgpt.stages import encode_split
    from barkgpt.tokenizer import load_tokenizer

    paths = Layout("webtext", out)
    t0 = time.perf_counter()
    report = ingest(WebtextPipeline(source=str(corpus)), paths.train_text, paths.val_text)
    t1 = time.perf_counter()
    tok = load_tokenizer(tokenizer)
    tokens = sum(encode_split(paths, split, tok, True, workers=workers)["tokens"] for split in ("train", "val"))
    t2 = time.perf_counter()
    digest = hashlib.sha256()
    for split in ("train", "val"):
        for f in paths.token_shard_files(split):
            digest.update(f.read_bytes())
    return {"ingest_s": t1 - t0, "tokenize_s": t2 - t1, "tokens": tokens, "train_lines": report["train_lines"],
            "sha256": digest.hexdigest()}


def run_in_memory(corpus: Path, out: Path, tokenizer: Path, workers: int) -> dict:
    """The path before streaming: load_corpus -> split_corpus -> write_text; read_lines ->
    encode_lines (tiktoken threads) -> write_shard. Same cleaning rules, same defaults."""
    from barkgpt.pipelines.webtext import WebtextPipeline
    from barkgpt.tokenizer import load_tokenizer

    p = WebtextPipeline(source=str(corpus))
    t0 = time.perf_counter()
    lines = corpus.read_bytes().decode("utf-8").splitlines()
    cut = int(len(lines) * (1 - p.split.val_fraction))
    seen: set[str] = set()

    def clean(part):
        kept = []
        for line in part:
            line = line.strip()
            if p.clean.min_line_chars <= len(line) <= p.clean.max_line_chars and line not in seen:
                seen.add(line)
                kept.append(line)
        return kept

    splits = {"train": clean(lines[:cut]), "val": clean(lines[cut:])}
    del lines
    out.mkdir(parents=True, exist_ok=True)
    for split, kept in splits.items():
        (out / f"{split}.txt").write_text("\n".join(kept) + "\n", encoding="utf-8")
    train_lines = len(splits["train"])
    del splits, seen
    t1 = time.perf_counter()
    tok = load_tokenizer(tokenizer)
    digest, tokens = hashlib.sha256(), 0
    for split in ("train", "val"):
        lines = [x for x in (out / f"{split}.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
        parts, eos = [], np.array([tok.eos_id], dtype=np.int64)
        for i in range(0, len(lines), 8192):
            for ids in tok.encode_batch(lines[i : i + 8192], workers):
                parts += [np.asarray(ids, dtype=np.int64), eos]
        ids = np.concatenate(parts)
        ids.astype(np.uint16).tofile(out / f"{split}.bin")
        digest.update((out / f"{split}.bin").read_bytes())
        tokens += ids.size
        del lines, parts, ids
    t2 = time.perf_counter()
    return {"ingest_s": t1 - t0, "tokenize_s": t2 - t1, "tokens": tokens, "train_lines": train_lines,
            "sha256": digest.hexdigest()}


def measure(path_name: str, corpus: Path, out: Path, tokenizer: Path, workers: int) -> dict:
    """Run one path in a child process; sample the RSS of its whole process tree."""
    import psutil

    child = subprocess.Popen([sys.executable, __file__, "--run", path_name, "--corpus", str(corpus), "--out", str(out),
                              "--tokenizer", str(tokenizer), "--workers", str(workers)],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    proc, peak, start = psutil.Process(child.pid), 0, time.perf_counter()
    while child.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"{path_name} failed with exit code {child.returncode}")
    return {**json.loads(child.stdout.read().strip().splitlines()[-1]), "wall_s": seconds, "peak_rss": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2, help="encoding processes (streaming) / threads (in-memory)")
    ap.add_argument("--paths", default="streaming,in-memory")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed at the end)")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        fn = run_streaming if args.run == "streaming" else run_in_memory
        print(json.dumps(fn(Path(args.corpus), Path(args.out), Path(args.tokenizer), args.workers)))
        return

    from barkgpt.tokenizer import save_tokenizer, train_bpe

    with tempfile.TemporaryDirectory(prefix="ingest-scale-", dir=args.dir) as work:
        work = Path(work)
        corpus = work / "corpus.txt"
        t = time.perf_counter()
        generate(corpus, args.size_mb)
        mb = corpus.stat().st_size / 1e6
        print(f"corpus: {mb:,.0f} MB in {time.perf_counter() - t:.0f} s", flush=True)
        sample = WIKITEXT.read_text(encoding="utf-8").splitlines() if WIKITEXT.exists() else \
            corpus.open(encoding="utf-8").read(10_000_000).splitlines()
        tokenizer = work / "tokenizer.json"
        save_tokenizer(train_bpe(sample, 2048), tokenizer)
        results = {}
        for name in args.paths.split(","):
            results[name] = r = measure(name, corpus, work / name, tokenizer, args.workers)
            print(f"{name:>10}: ingest {r['ingest_s']:6.1f} s + tokenize {r['tokenize_s']:6.1f} s = "
                  f"{r['wall_s']:6.1f} s wall -> {mb / r['wall_s']:5.1f} MB/s; peak RSS {r['peak_rss'] / 2**20:,.0f} MiB; "
                  f"{r['tokens']:,} tokens", flush=True)
        if len(results) == 2:
            a, b = results.values()
            same = a["sha256"] == b["sha256"] and a["tokens"] == b["tokens"]
            print(f"same token stream from both paths: {same}")
            if not same:
                raise SystemExit(1)


if __name__ == "__main__":
    main()
