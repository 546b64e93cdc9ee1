"""Pipeline stages: one plain function per step, `(params, paths) -> outputs on disk`.

The CLI, dvc.yaml and the Prefect tasks all call these functions; none re-implements a step.
Each stage returns a small dict describing what it wrote, for whichever door called it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from barkgpt import tracking
from barkgpt.checkpoint import load_model
from barkgpt.data.bark import write_bark_data
from barkgpt.data.shards import load_shard, write_shard
from barkgpt.errors import BarkError
from barkgpt.evaluate import evaluate_bark
from barkgpt.fileio import sha256_file, write_json
from barkgpt.params import Params
from barkgpt.tokenizer import WordTokenizer, load_tokenizer, save_tokenizer, tokenizer_hash
from barkgpt.train import LogFn, train as train_loop

PIPELINES = ("bark",)


@dataclass(frozen=True)
class Paths:
    """Where each pipeline's files live, relative to the project root."""

    name: str
    root: Path = Path(".")

    @property
    def data(self) -> Path:
        return self.root / "data" / self.name

    @property
    def train_text(self) -> Path:
        return self.data / "train.txt"

    @property
    def val_text(self) -> Path:
        return self.data / "val.txt"

    @property
    def tokenizer(self) -> Path:
        return self.data / "tokenizer.json"

    @property
    def tokens(self) -> Path:
        return self.data / "tokens"

    def shard(self, split: str) -> Path:
        return self.tokens / f"{split}.bin"

    @property
    def models(self) -> Path:
        return self.root / "models" / self.name

    @property
    def checkpoint(self) -> Path:
        return self.models / "best.pt"

    @property
    def reports(self) -> Path:
        return self.root / "reports" / self.name

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def samples(self) -> Path:
        return self.reports / "samples.json"

    @property
    def train_log(self) -> Path:
        return self.reports / "train_log.csv"

    @property
    def train_summary(self) -> Path:
        return self.reports / "train.json"

    @property
    def validation_report(self) -> Path:
        return self.reports / "validation.json"

    @property
    def validation_html(self) -> Path:
        return self.reports / "validation.html"


def paths_for(name: str, root: Path | str = ".") -> Paths:
    if name not in PIPELINES:
        raise BarkError(f"unknown pipeline {name!r}; choose one of {list(PIPELINES)}")
    return Paths(name, Path(root))


def read_lines(path: Path) -> list[str]:
    if not path.exists():
        raise BarkError(f"{path}: not found; run the data stage first (dvc repro)")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- stages ------------------------------------------------------------------------------------

def bark_data(params: Params, root: Path | str = ".") -> dict:
    paths = paths_for("bark", root)
    out = write_bark_data(params.bark.data, params.seed, paths.data)
    return {name: str(path) for name, path in out.items()}


def validate(params: Params, name: str, root: Path | str = ".") -> dict:
    """Great Expectations suites over the pipeline's data; BarkError (before training) on failure."""
    from barkgpt.validation import validate_pipeline  # GX import (~3 s) only in this stage

    return validate_pipeline(params, name, paths_for(name, root))


def tokenize(params: Params, name: str, root: Path | str = ".") -> dict:
    """Text splits -> token shards (+ the tokenizer itself, for the bark word vocabulary)."""
    paths = paths_for(name, root)
    tok = WordTokenizer()
    save_tokenizer(tok, paths.tokenizer)
    meta = {"tokenizer_hash": tokenizer_hash(tok)}
    out = {}
    for split, text in (("train", paths.train_text), ("val", paths.val_text)):
        ids = np.fromiter((i for line in read_lines(text) for i in tok.encode(line)), dtype=np.int64)
        out[split] = write_shard(paths.shard(split), ids, tok.vocab_size,
                                 {**meta, "source_sha256": sha256_file(text)})
    return out


def pipeline_params(params: Params, name: str):
    return getattr(params, name)


def train(params: Params, name: str, root: Path | str = ".", resume: bool = False,
          on_log: LogFn | None = None, progress: bool = True, tags: dict | None = None) -> dict:
    """`tags` go on the MLflow run (e.g. the Prefect flow run id from the Prefect door)."""
    paths = paths_for(name, root)
    cfg = pipeline_params(params, name)
    tok = load_tokenizer(paths.tokenizer)
    train_ids, _ = load_shard(paths.shard("train"))
    val_ids, _ = load_shard(paths.shard("val"))
    run = tracking.start_training_run(params, name, paths, tags, resume)  # before training: fail fast
    log_fn = _both(run.log_step if run else None, on_log)  # record the step before a callback can raise
    try:
        result = train_loop(
            model_params=cfg.model, p=cfg.train, tokenizer=tok, train_ids=train_ids, val_ids=val_ids,
            out_dir=paths.models, log_path=paths.train_log, params_dict=params.model_dump(),
            resume=resume, on_log=log_fn, progress=progress,
        )
    except BaseException:
        if run:
            run.fail()
        raise
    summary = {k: v for k, v in result.__dict__.items() if k != "history"}
    write_json(paths.train_summary, summary)
    tracking.finish_training(run, summary)
    return {**summary, "mlflow_run_id": run.run_id if run else None}


def _both(*fns):
    fns = [f for f in fns if f]
    return (lambda step, row: [f(step, row) for f in fns]) if fns else None


def evaluate(params: Params, name: str, root: Path | str = ".", tags: dict | None = None) -> dict:
    paths = paths_for(name, root)
    cfg = pipeline_params(params, name)
    model, tok = load_model(paths.checkpoint)
    val_ids, _ = load_shard(paths.shard("val"))
    run = tracking.reopen_run(params, name, paths, tags)
    try:
        metrics, samples = evaluate_bark(model, tok, val_ids, read_lines(paths.val_text), cfg.eval,
                                         cfg.train.dtype)
    except BaseException:
        if run:
            run.fail()
        raise
    metrics["gate_passed"] = metrics["contract_accuracy"] >= cfg.gates.min_contract_accuracy
    write_json(paths.metrics, metrics)
    write_json(paths.samples, samples)
    registry = tracking.finish_evaluation(run, metrics, metrics["gate_passed"])
    return {**metrics, "mlflow": registry}

