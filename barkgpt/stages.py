"""Pipeline stages: one plain function per step, `(params, paths) -> outputs on disk`.

The CLI, dvc.yaml and the Prefect tasks all call these functions; none re-implements a step.
Each stage returns a small dict describing what it wrote, for whichever door called it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
          on_log: LogFn | None = None, progress: bool = True) -> dict:
    paths = paths_for(name, root)
    cfg = pipeline_params(params, name)
    tok = load_tokenizer(paths.tokenizer)
    train_ids, _ = load_shard(paths.shard("train"))
    val_ids, _ = load_shard(paths.shard("val"))
    result = train_loop(
        model_params=cfg.model, p=cfg.train, tokenizer=tok, train_ids=train_ids, val_ids=val_ids,
        out_dir=paths.models, log_path=paths.train_log, params_dict=params.model_dump(),
        resume=resume, on_log=on_log, progress=progress,
    )
    summary = {k: v for k, v in result.__dict__.items() if k != "history"}
    write_json(paths.train_summary, summary)
    return summary


def evaluate(params: Params, name: str, root: Path | str = ".") -> dict:
    paths = paths_for(name, root)
    cfg = pipeline_params(params, name)
    model, tok = load_model(paths.checkpoint)
    val_ids, _ = load_shard(paths.shard("val"))
    metrics, samples = evaluate_bark(model, tok, val_ids, read_lines(paths.val_text), cfg.eval, cfg.train.dtype)
    metrics["gate_passed"] = metrics["contract_accuracy"] >= cfg.gates.min_contract_accuracy
    write_json(paths.metrics, metrics)
    write_json(paths.samples, samples)
    return metrics



def deploy(params: Params, name: str, root: Path | str = ".", **options) -> dict:
    """Release the gated model to S3 and serve it from AWS Lambda (local AWS API by default).

    options: target, provenance (MLflow run id / model version), app_factory, transfer, log;
    see barkgpt.deploy.deployer.deploy_pipeline. Imported late: boto3/moto cost import time.
    """
    from barkgpt.deploy.deployer import deploy_pipeline

    paths_for(name, root)  # validates the pipeline name
    return deploy_pipeline(params, name, root, **options)
