"""The stages every pipeline shares: one plain function per step, `(params, pipeline, layout) -> dict`.

Pipeline-specific steps (bark's data generator, WebText's ingestion and BPE) live in the
pipeline's own module (barkgpt/pipelines/); what differs between pipelines here is asked of the
pipeline object (its tokenizer, its evaluation), never switched on its name. Each stage returns a
small dict describing what it wrote, for whichever door called it (CLI, DVC, Prefect).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from barkgpt.errors import BarkError
from barkgpt.fileio import read_json, sha256_file, write_json
from barkgpt.layout import Layout
from barkgpt.params import Params


def read_lines(path: Path) -> list[str]:
    if not path.exists():
        raise BarkError(f"{path}: not found; run the pipeline's data stage first")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def validate(params: Params, pipe, lay: Layout) -> dict:
    """Great Expectations suites over the text splits; BarkError (before training) on failure."""
    from barkgpt.validation import validate_pipeline  # GX import (~3 s) only in this stage

    first = pipe.stages[0]
    return validate_pipeline(params, lay, pipe.extra["suites"], redo=f"barkgpt {first.name} {pipe.name}")


def validate_tokens(params: Params, pipe, lay: Layout) -> dict:
    """Great Expectations suites over the token shards (ids, counts, the tokenizer's hash)."""
    from barkgpt.validation import validate_pipeline

    return validate_pipeline(params, lay, pipe.extra["token_suites"], tokens=True,
                             redo=f"barkgpt tokenize {pipe.name}")


def encode_lines(tok, lines: list[str], threads: int = 2, eos: bool = True, chunk: int = 8192,
                 desc: str = "encode") -> np.ndarray:
    """Each line's ids (followed by the EOS when `eos`), concatenated; encoded in parallel."""
    from tqdm import tqdm

    parts = []
    eos_ids = np.array([tok.eos_id] if eos else [], dtype=np.int64)
    with tqdm(total=len(lines), desc=desc, unit="line", disable=len(lines) < 4 * chunk) as bar:
        for i in range(0, len(lines), chunk):
            for ids in tok.encode_batch(lines[i : i + chunk], threads):
                parts += [np.asarray(ids, dtype=np.int64), eos_ids]
            bar.update(min(chunk, len(lines) - i))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def tokenize(params: Params, pipe, lay: Layout) -> dict:
    """Text splits -> token shards (uint16, uint32 past 65,536 ids), with the pipeline's tokenizer."""
    from barkgpt.data.shards import write_shard
    from barkgpt.tokenizer import tokenizer_hash

    tok = pipe.tokens(params, lay)
    threads = getattr(getattr(pipe.params(params), "tokenizer", None), "threads", 2)
    meta = {"tokenizer_hash": tokenizer_hash(tok)}
    out = {}
    for split in ("train", "val"):
        text = lay.text(split)
        lines = read_lines(text)
        ids = encode_lines(tok, lines, threads, eos=pipe.extra.get("eos_per_line", True), desc=f"encode {split}")
        text_bytes = sum(len(line.encode("utf-8")) + 1 for line in lines)
        out[split] = write_shard(lay.shard(split), ids, tok.vocab_size, {
            **meta, "source_sha256": sha256_file(text), "lines": len(lines), "text_bytes": text_bytes,
            "bytes_per_token": text_bytes / max(len(ids), 1),
        })
    return out


def train(params: Params, pipe, lay: Layout, resume: bool = False, on_log=None, progress: bool = True,
          tags: dict | None = None) -> dict:
    """`tags` go on the MLflow run (e.g. the Prefect flow run id from the Prefect door)."""
    from barkgpt import tracking
    from barkgpt.data.shards import load_shard
    from barkgpt.tokenizer import load_tokenizer
    from barkgpt.train import train as train_loop

    cfg = pipe.params(params)
    tok = load_tokenizer(lay.tokenizer)
    train_ids, _ = load_shard(lay.shard("train"))
    val_ids, _ = load_shard(lay.shard("val"))
    token_bytes = np.array(tok.token_bytes()) if hasattr(tok, "token_bytes") else None
    run = tracking.start_training_run(params, pipe.name, lay, tags, resume)  # before training: fail fast
    log_fn = _both(run.log_step if run else None, on_log)  # record the step before a callback can raise
    try:
        result = train_loop(
            model_params=cfg.model, p=cfg.train, tokenizer=tok, train_ids=train_ids, val_ids=val_ids,
            out_dir=lay.models, log_path=lay.train_log, params_dict=params.model_dump(),
            resume=resume, on_log=log_fn, progress=progress, token_bytes=token_bytes,
        )
    except BaseException:
        if run:
            run.fail()
        raise
    summary = {k: v for k, v in result.__dict__.items() if k != "history"}
    write_json(lay.train_summary, summary)
    tracking.finish_training(run, summary)
    return {**summary, "mlflow_run_id": run.run_id if run else None}


def _both(*fns):
    fns = [f for f in fns if f]
    return (lambda step, row: [f(step, row) for f in fns]) if fns else None


def evaluate(params: Params, pipe, lay: Layout, tags: dict | None = None) -> dict:
    """Evaluate the current model with the pipeline's metric, log it to the model's MLflow run and
    register it (the champion alias moves only when the pipeline's gate passes)."""
    from barkgpt import tracking
    from barkgpt.checkpoint import load_model

    if not lay.checkpoint.exists():  # before touching MLflow: no run for a model that is not there
        load_model(lay.checkpoint)
    run = tracking.reopen_run(params, pipe.name, lay, tags)
    try:
        metrics, samples = pipe.evaluate(params, pipe, lay)
        write_json(lay.metrics, metrics)
        write_json(lay.samples, samples)
        write_json(lay.summary, {short: metrics[key] for key, short in pipe.summary if key in metrics})
    except BaseException:
        if run:
            run.fail()
        raise
    registry = tracking.finish_evaluation(run, metrics, metrics["gate_passed"])
    return {**metrics, "mlflow": registry}


# --- export (barkgpt/export/) -------------------------------------------------------------------

def export(params: Params, pipe, lay: Layout) -> dict:
    """Checkpoint -> F32 (+F16) GGUF files and a Hugging Face folder under exports/<pipeline>/."""
    from barkgpt.export.pipeline import export_files

    return export_files(lay, params.export)


def quantize(params: Params, pipe, lay: Layout) -> dict:
    """F32 GGUF -> llama.cpp quantizations; per-tensor types in reports/<pipeline>/quantization.json."""
    from barkgpt.export.pipeline import quantize_files

    return quantize_files(lay, params.export)


def parity(params: Params, pipe, lay: Layout) -> dict:
    """llama.cpp vs PyTorch on every exported file + quality gate -> reports/<pipeline>/parity.json.

    Raises GateError (a BarkError) when F32 parity or the deploy quantization fails.
    """
    from barkgpt import tracking
    from barkgpt.export.pipeline import parity_report

    stale = lay.parity_report.stat().st_mtime_ns if lay.parity_report.exists() else None
    try:
        report = parity_report(lay, read_lines(lay.val_text), params.export, seed=params.seed)
    finally:  # the report is worth keeping with the run, also (above all) when the gate failed
        if lay.parity_report.exists() and lay.parity_report.stat().st_mtime_ns != stale:
            tracking.log_export(params, pipe.name, lay, sorted(lay.exports.glob("*.gguf")),
                                read_json(lay.parity_report))
    return {"report": str(lay.parity_report), "gate": report["gate"],
            "deploy_file": report["gate"]["deploy_file"], "f32_parity": report["f32_parity"],
            "quantizations": {q: {k: e[k] for k in ("status", "metric", "value", "delta", "size_ratio_vs_f32")}
                              for q, e in report["quantizations"].items()}}


def deploy(params: Params, pipe, lay: Layout, **options) -> dict:
    """Release the gated model to S3 and serve it from AWS Lambda (local AWS API by default).

    options: target, provenance (MLflow run id / model version), app_factory, transfer, log;
    see barkgpt.deploy.deployer.deploy_pipeline. Imported late: boto3/moto cost import time.
    """
    from barkgpt.deploy.deployer import deploy_pipeline

    return deploy_pipeline(params, pipe.name, lay.root, **options)
