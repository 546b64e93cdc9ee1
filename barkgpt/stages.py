"""The stages every pipeline shares: one plain function per step, `(params, pipeline, layout) -> dict`.

Pipeline-specific steps (bark's data generator, WebText's ingestion and BPE) live in the
pipeline's own module (barkgpt/pipelines/); what differs between pipelines here is asked of the
pipeline object (its tokenizer, its evaluation), never switched on its name. Each stage returns a
small dict describing what it wrote, for whichever door called it (CLI, DVC, Prefect).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from barkgpt.data.shards import SHARD_TOKENS
from barkgpt.errors import BarkError
from barkgpt.fileio import read_json, write_json
from barkgpt.layout import Layout
from barkgpt.params import SharedParams


def read_lines(path: Path) -> list[str]:
    if not path.exists():
        raise BarkError(f"{path}: not found; run the pipeline's data stage first")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def validate(params: SharedParams, pipe, lay: Layout) -> dict:
    """Great Expectations suites over the text splits; BarkError (before training) on failure."""
    from barkgpt.validation import validate_pipeline  # GX import (~3 s) only in this stage

    first = pipe.stages[0]
    return validate_pipeline(params, lay, pipe.suites, redo=f"barkgpt {first.name} {pipe.name}")


def validate_tokens(params: SharedParams, pipe, lay: Layout) -> dict:
    """Great Expectations suites over the token shards (ids, counts, the tokenizer's hash)."""
    from barkgpt.validation import validate_pipeline

    return validate_pipeline(params, lay, pipe.token_suites, tokens=True,
                             redo=f"barkgpt tokenize {pipe.name}")


def tokenize(params: SharedParams, pipe, lay: Layout) -> dict:
    """Text splits -> token shards (uint16, uint32 past 65,536 ids), with the pipeline's tokenizer,
    streamed through `tokenizer.workers` encoding processes (in-process for pipelines without one)."""
    tok = pipe.tokens(params, lay)
    p = getattr(pipe.params(params), "tokenizer", None)
    return {split: encode_split(lay, split, tok, pipe.eos_per_line,
                                workers=getattr(p, "workers", 1), threads=getattr(p, "threads", 1),
                                shard_tokens=getattr(p, "shard_tokens", SHARD_TOKENS))
            for split in ("train", "val")}


def encode_split(lay: Layout, split: str, tok, eos_per_line: bool, workers: int = 1, threads: int = 1,
                 shard_tokens: int = SHARD_TOKENS) -> dict:
    """Stream a text split through the tokenizer (in `workers` processes) into fixed-size shards;
    return the manifest. Memory: a few chunks of text and one shard, whatever the file size."""
    from barkgpt.data.encode import encode_file
    from barkgpt.data.shards import ShardWriter
    from barkgpt.tokenizer import tokenizer_hash

    for stale in lay.token_shard_files(split):  # a shorter re-encoding must not leave old shards behind
        stale.unlink()
    writer = ShardWriter(lay.token_manifest(split), lambda i: lay.token_shard(split, i), tok.vocab_size, shard_tokens)
    stats = encode_file(tok, lay.text(split), writer, workers, eos_per_line, threads)
    return writer.close({"split": split, "tokenizer_hash": tokenizer_hash(tok), "source_sha256": stats.sha256,
                         "lines": stats.lines, "text_bytes": stats.text_bytes,
                         "bytes_per_token": stats.text_bytes / max(writer.tokens, 1)})


def load_split(lay: Layout, split: str, tok, redo: str | None = None) -> tuple:
    """A split's token stream and manifest, checked against `tok` (see shards.load_tokens)."""
    from barkgpt.data.shards import load_tokens

    return load_tokens(lay.token_manifest(split), tok,
                       redo or f"re-run the tokenize stage (barkgpt tokenize {lay.pipeline})")


def train(params: SharedParams, pipe, lay: Layout, resume: bool = False, on_log=None, progress: bool = True,
          tags: dict | None = None, nproc: int | None = None) -> dict:
    """Train in a run folder of its own, holding the pipeline's writer lock; promote the run into
    models/<p>/ only if it ends with finite losses and weights (barkgpt/runs.py). `tags` go on the
    MLflow run (e.g. the Prefect flow run id from the Prefect door).

    `nproc` (default: the pipeline's `train.nproc`) > 1, and not already under torchrun: launch
    torchrun with that many processes and return rank 0's summary (`on_log` is then not called:
    it would run in other processes). Under torchrun: this process's share of DDP training."""
    import contextlib
    import os

    from barkgpt import distributed, runs, tracking
    from barkgpt.device import resolve_device
    from barkgpt.memory import check_training_fits
    from barkgpt.tokenizer import load_tokenizer
    from barkgpt.train import train as train_loop

    cfg = pipe.params(params)
    nproc = nproc or cfg.train.nproc
    tags = dict(tags or {})  # a dict from the Prefect door, (key, value) pairs from --tag
    dist = distributed.from_env()
    device = resolve_device(cfg.train.device, dist.local_rank)  # a missing GPU stops here, before any work
    tok = load_tokenizer(lay.tokenizer)
    check_training_fits(pipe.name, cfg.model, cfg.train, tok.vocab_size)  # before any allocation
    train_ids, _ = load_split(lay, "train", tok)  # bad shards stop here, once, before any process starts
    val_ids, _ = load_split(lay, "val", tok)
    if nproc > 1 and not distributed.under_torchrun():
        resolve_device(cfg.train.device, nproc - 1)  # on CUDA: a GPU for every process
        with runs.writer_lock(lay, f"train {pipe.name}"):
            return train_distributed(params, pipe, lay, nproc, runs.open_run(lay, resume), resume, progress, tags)
    token_bytes = np.array(tok.token_bytes())
    launched = os.environ.get(runs.ENV_RUN_FOLDER)  # set by train_distributed, which holds the lock
    with contextlib.ExitStack() as held:
        if dist.is_main and not launched:
            held.enter_context(runs.writer_lock(lay, f"train {pipe.name}"))
        with distributed.process_group(dist, device):
            folder = runs.shared_run_folder(lay, resume, dist, device, launched)
            # Rank 0 alone opens the MLflow run (before training: fail fast) and writes every file.
            run = tracking.start_training_run(params, pipe.name, lay, tags, resume,
                                              record=folder.run_record) if dist.is_main else None
            log_fn = _both(run.log_step if run else None, on_log)  # record the step before a callback can raise
            try:
                result = train_loop(
                    model_params=cfg.model, p=cfg.train, tokenizer=tok, train_ids=train_ids, val_ids=val_ids,
                    out_dir=folder.path, log_path=folder.train_log, params_dict=params.model_dump(),
                    resume=resume, on_log=log_fn, progress=progress, token_bytes=token_bytes,
                    device=device, dist=dist,
                )
                summary = {k: v for k, v in result.__dict__.items() if k != "history"}
                summary.update(device=str(device), nproc=dist.world_size)
                if dist.is_main:
                    runs.promote(lay, folder, summary)
            except runs.TrainingDiverged as err:
                if run:
                    run.fail()
                if dist.is_main:
                    raise runs.discard(lay, folder, err) from None
                raise
            except tracking.TrackingLost as err:  # the run folder stays resumable; name the folder and pipeline
                run.fail()
                raise BarkError(str(err).replace("<pipeline>", pipe.name)
                                + f" (run folder {folder.path})") from None
            except BaseException:  # interrupted: the run folder stays resumable (--resume)
                if run:
                    run.fail()
                raise
        if dist.is_main:
            tracking.finish_training(run, summary)
    return {**summary, "mlflow_run_id": run.run_id if run else None}


def train_distributed(params: SharedParams, pipe, lay: Layout, nproc: int, folder, resume: bool = False,
                      progress: bool = True, tags: dict | None = None) -> dict:
    """`barkgpt train <pipeline>` in `nproc` processes under torchrun, in the project root, writing
    into `folder` (the caller holds the writer lock); rank 0's summary."""
    import os
    import subprocess
    import sys
    import tempfile

    import yaml

    import barkgpt
    from barkgpt import runs, tracking

    with tempfile.TemporaryDirectory(prefix="barkgpt-train-") as scratch:
        params_file = Path(scratch) / "params.yaml"  # the resolved params, overrides included
        params_file.write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
        argv = ["--params", str(params_file), "train", pipe.name, *(["--resume"] if resume else []),
                *([] if progress else ["--quiet"]), *[f"--tag={k}={v}" for k, v in (tags or {}).items()]]
        code_dir = str(Path(barkgpt.__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code_dir, os.environ.get("PYTHONPATH")])),
               runs.ENV_RUN_FOLDER: str(folder.path.resolve())}
        done = subprocess.run([sys.executable, "-m", "barkgpt.distributed", f"--nproc={nproc}", "--", *argv],
                              cwd=lay.root, env=env)
    if done.returncode != 0 or folder.status().get("status") != "promoted":
        raise BarkError(f"training in {nproc} processes under torchrun failed (exit code {done.returncode}); "
                        "the messages above say why")
    run = tracking.run_summary(lay) if params.tracking.enabled else None
    return {**read_json(lay.train_summary), "mlflow_run_id": (run or {}).get("run_id")}


def _both(*fns):
    fns = [f for f in fns if f]
    return (lambda step, row: [f(step, row) for f in fns]) if fns else None


def evaluate(params: SharedParams, pipe, lay: Layout, tags: dict | None = None) -> dict:
    """Evaluate the current model with the pipeline's metric, judge it with the pipeline's gate
    (barkgpt.gates), log it to the model's MLflow run and register it (the champion alias moves only
    when the gate passes). metrics.json records the sha256 of every file it judged."""
    from barkgpt import runs, tracking
    from barkgpt.checkpoint import load_model
    from barkgpt.gates import judge, judged_files, measurement_settings
    from barkgpt.tracking.registry import ranking

    if not lay.checkpoint.exists():  # before touching MLflow: no run for a model that is not there
        load_model(lay.checkpoint)
    if lay.tokenizer.exists():  # it ships with the model and the report judges it: a readable, contract one
        from barkgpt.tokenizer import load_tokenizer

        load_tokenizer(lay.tokenizer)
    with runs.writer_lock(lay, f"evaluate {pipe.name}"):  # the model and its run record stay a pair
        run = tracking.reopen_run(params, pipe.name, lay, tags)
        try:
            measured, samples = pipe.evaluate(params, pipe, lay)
            metrics = {"pipeline": pipe.name, "stage": "evaluate", **measured,
                       "measured_under": measurement_settings(params, pipe, pipe.stage("evaluate"))}
            verdict = judge(metrics, params)
            metrics |= {"gate_passed": verdict.passed, "gate": verdict.as_dict(),
                        "judged": judged_files(lay.root, {"checkpoint": lay.checkpoint, "tokenizer": lay.tokenizer,
                                                          "val_text": lay.val_text, "val_tokens": lay.token_manifest("val")})}
            if test := pipe.gate_test(pipe.params(params).gates):  # the test behind the verdict (bark)
                metrics["gate"]["test"] = test
            write_json(lay.metrics, metrics)
            write_json(lay.samples, samples)
            write_json(lay.summary, {short: metrics[key] for key, short in pipe.summary if key in metrics})
        except BaseException:
            if run:
                run.fail()
            raise
        order = ranking(pipe.metric, pipe.higher_is_better)  # champion: the best by the pipeline's metric
        registry = tracking.finish_evaluation(run, metrics, metrics["gate_passed"], order,
                                              pipe.input_example(pipe.params(params)), pipe.description)
    return {**metrics, "mlflow": registry}


# --- export (barkgpt/export/) -------------------------------------------------------------------

def export(params: SharedParams, pipe, lay: Layout) -> dict:
    """Checkpoint -> F32 (+F16) GGUF files and a Hugging Face folder under exports/<pipeline>/."""
    from barkgpt import runs
    from barkgpt.export.pipeline import export_files

    with runs.writer_lock(lay, f"export {pipe.name}"):  # not while a deploy copies what parity judged
        drop_leftovers(lay.full_exports)
        return export_files(lay, params.export)


def quantize(params: SharedParams, pipe, lay: Layout) -> dict:
    """F32 GGUF -> llama.cpp quantizations; per-tensor types in reports/<pipeline>/quantization.json."""
    from barkgpt import runs
    from barkgpt.export.pipeline import quantize_files

    with runs.writer_lock(lay, f"quantize {pipe.name}"):
        drop_leftovers(lay.quantized_exports)
        return quantize_files(lay, params.export)


def drop_leftovers(folder: Path) -> None:
    """Remove the temp files (fileio.atomic_path's `.*.tmp`) a killed writer left in an output
    folder, so DVC never records them as part of it. The caller holds the writer lock: no live
    writer of this pipeline owns one."""
    if folder.is_dir():
        for leftover in folder.rglob(".*.tmp"):
            leftover.unlink(missing_ok=True)


def parity(params: SharedParams, pipe, lay: Layout) -> dict:
    """The evaluation on every exported file through llama.cpp, diffed with PyTorch and judged ->
    reports/<pipeline>/parity.json (+ parity_summary.json for `dvc metrics show`).

    Raises GateError (a BarkError) when F32 parity or the deploy quantization fails.
    """
    from barkgpt import runs, tracking
    from barkgpt.export.parity import parity_report

    stale = lay.parity_report.stat().st_mtime_ns if lay.parity_report.exists() else None
    with runs.writer_lock(lay, f"parity {pipe.name}"):  # the files it judges stay put while it judges them
        try:
            report = parity_report(lay, params, pipe, read_lines(lay.val_text))
        finally:  # the report is worth keeping with the run, also (above all) when the gate failed
            if lay.parity_report.exists() and lay.parity_report.stat().st_mtime_ns != stale:
                tracking.log_export(params, pipe.name, lay, sorted(lay.exports.glob("**/*.gguf")),
                                    read_json(lay.parity_report))
    return {"report": str(lay.parity_report), "gate": {k: v for k, v in report["gate"].items() if k != "checks"},
            "deploy_file": report["gate"]["deploy_file"], "f32_parity": report["f32_parity"],
            "quantizations": {q: {k: e[k] for k in ("status", "metric", "value", "delta", "size_ratio_vs_f32")}
                              for q, e in report["quantizations"].items()}}


def deploy(params: SharedParams, pipe, lay: Layout, **options) -> dict:
    """Release the gated model to S3 and serve it from AWS Lambda (local AWS API by default).

    options: target, provenance (MLflow run id / model version), app_factory, transfer, log;
    see barkgpt.deploy.deployer.deploy_pipeline. Imported late: boto3/moto cost import time.
    """
    from barkgpt.deploy.deployer import deploy_pipeline

    return deploy_pipeline(params, pipe.name, lay.root, **options)
