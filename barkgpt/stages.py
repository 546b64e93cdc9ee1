"""Pipeline stages: one plain function per step, `(params, paths) -> outputs on disk`.

The CLI, dvc.yaml and the Prefect tasks all call these functions; none re-implements a step.
Each stage returns a small dict describing what it wrote, for whichever door called it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from barkgpt import tracking
from barkgpt.checkpoint import load_model
from barkgpt.data.bark import write_bark_data
from barkgpt.data.shards import load_shard, write_shard
from barkgpt.errors import BarkError
from barkgpt.fileio import read_json, sha256_file, write_json
from barkgpt.gates import judge, judged_files
from barkgpt.layout import Layout
from barkgpt.params import PIPELINES, Params
from barkgpt.tokenizer import WordTokenizer, load_tokenizer, save_tokenizer, tokenizer_hash
from barkgpt.train import LogFn, train as train_loop



Paths = Layout  # the stage functions' name for a pipeline's file layout


def paths_for(name: str, root: Path | str = ".") -> Layout:
    if name not in PIPELINES:
        raise BarkError(f"unknown pipeline {name!r}; choose one of {list(PIPELINES)}")
    return Layout(name, Path(root))


def read_lines(path: Path) -> list[str]:
    if not path.exists():
        raise BarkError(f"{path}: not found; run the data stage first (dvc repro)")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- stages ------------------------------------------------------------------------------------

def bark_data(params: Params, root: Path | str = ".") -> dict:
    paths = paths_for("bark", root)
    out = write_bark_data(params.bark.data, params.seed, paths.data)
    return {name: str(path) for name, path in out.items()}


def validate(params: Params, name: str, root: Path | str = ".", tokens: bool = False) -> dict:
    """Great Expectations suites over the pipeline's data (tokens=True: its token shards);
    BarkError (before training) on failure."""
    from barkgpt.validation import validate_pipeline  # GX import (~3 s) only in this stage

    return validate_pipeline(params, name, paths_for(name, root), tokens=tokens)


def tokenize(params: Params, name: str, root: Path | str = ".") -> dict:
    """Text splits -> token shards (+ the tokenizer itself, for the bark word vocabulary)."""
    paths = paths_for(name, root)
    if name != "bark":
        return tokenize_text(params, name, root)
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
    token_bytes = np.array(tok.token_bytes())
    run = tracking.start_training_run(params, name, paths, tags, resume)  # before training: fail fast
    log_fn = _both(run.log_step if run else None, on_log)  # record the step before a callback can raise
    try:
        result = train_loop(
            model_params=cfg.model, p=cfg.train, tokenizer=tok, train_ids=train_ids, val_ids=val_ids,
            out_dir=paths.models, log_path=paths.train_log, params_dict=params.model_dump(),
            resume=resume, on_log=log_fn, progress=progress, token_bytes=token_bytes,
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
    """Evaluate the trained model, log the metrics to its MLflow run and register it (champion
    alias only when the pipeline's gate passes)."""
    paths = paths_for(name, root)
    if not paths.checkpoint.exists():  # before touching MLflow: no run for a model that is not there
        load_model(paths.checkpoint)
    run = tracking.reopen_run(params, name, paths, tags)
    try:
        metrics = evaluate_model(params, name, root)
    except BaseException:
        if run:
            run.fail()
        raise
    registry = tracking.finish_evaluation(run, metrics, metrics["gate_passed"])
    return {**metrics, "mlflow": registry}


def evaluate_model(params: Params, name: str, root: Path | str = ".") -> dict:
    """The checkpoint through barkgpt.evaluate, judged by the pipeline's gate -> reports/<name>/metrics.json
    (with the sha256 of every file it judged), samples.json and a small summary for `dvc metrics show`."""
    from barkgpt.evaluate import evaluate_bark, evaluate_text
    from barkgpt.lm.torch_lm import TorchLM

    paths = paths_for(name, root)
    cfg = pipeline_params(params, name)
    lm = TorchLM.load(paths.checkpoint, cfg.train.threads)
    val_ids, manifest = load_shard(paths.shard("val"))
    if manifest.get("tokenizer_hash") != tokenizer_hash(lm.tokenizer):
        raise BarkError(f"{paths.shard('val')}: was encoded with another tokenizer than {paths.checkpoint}; "
                        "re-run the tokenize and train stages (dvc repro)")
    token_bytes = lm.tokenizer.token_bytes()
    if name == "bark":
        metrics, samples = evaluate_bark(lm, val_ids, read_lines(paths.val_text), token_bytes, cfg.eval, cfg.gates)
    else:
        metrics, samples = evaluate_text(lm, val_ids, token_bytes, cfg.eval)
    report = {"pipeline": name, "stage": "evaluate", **metrics}
    verdict = judge(report, params)
    report |= {"gate_passed": verdict.passed, "gate": verdict.as_dict(),
               "judged": judged_files(root, {"checkpoint": paths.checkpoint, "tokenizer": paths.tokenizer,
                                             "val_text": paths.val_text, "val_shard": paths.shard("val")})}
    if "contract_failures" in report:
        from barkgpt.gates import contract_test

        report["gate"]["test"] = contract_test(cfg.gates).__dict__
    write_json(paths.metrics, report)
    write_json(paths.samples, samples)
    write_json(paths.metrics_summary, {k: report[k] for k in ("val_bpb", "contract_accuracy", "gate_passed")
                                       if k in report})
    return report


# --- export (barkgpt/export/) -------------------------------------------------------------------

def export(params: Params, name: str, root: Path | str = ".") -> dict:
    """Checkpoint -> F32 (+F16) GGUF files and a Hugging Face folder under exports/<name>/."""
    from barkgpt.export.pipeline import export_files

    paths = paths_for(name, root)
    return export_files(paths, params.export)


def quantize(params: Params, name: str, root: Path | str = ".") -> dict:
    """F32 GGUF -> llama.cpp quantizations; per-tensor types in reports/<name>/quantization.json."""
    from barkgpt.export.pipeline import quantize_files

    paths = paths_for(name, root)
    return quantize_files(paths, params.export)


def parity(params: Params, name: str, root: Path | str = ".") -> dict:
    """The evaluation on every exported file through llama.cpp, diffed with PyTorch, judged ->
    reports/<name>/parity.json (+ parity_summary.json). Raises GateError (a BarkError) when F32
    parity or the deploy quantization fails."""
    from barkgpt.export.parity import parity_report

    paths = paths_for(name, root)
    stale = paths.parity_report.stat().st_mtime_ns if paths.parity_report.exists() else None
    try:
        report = parity_report(paths, params, read_lines(paths.val_text))
    finally:  # the report is worth keeping with the run, also (above all) when the gate failed
        if paths.parity_report.exists() and paths.parity_report.stat().st_mtime_ns != stale:
            tracking.log_export(params, name, paths, sorted(paths.exports.glob("*.gguf")),
                                read_json(paths.parity_report))
    return {"report": str(paths.parity_report), "gate": {k: v for k, v in report["gate"].items() if k != "checks"},
            "deploy_file": report["gate"]["deploy_file"], "f32_parity": report["f32_parity"],
            "quantizations": {q: {k: e[k] for k in ("status", "metric", "value", "delta", "size_ratio_vs_f32")}
                              for q, e in report["quantizations"].items()}}


# --- webtext: real text with a byte-level BPE ------------------------------------------------------

def webtext_ingest(params: Params, root: Path | str = ".") -> dict:
    """Source (hub id or local file/folder) -> cleaned data/webtext/{train,val}.txt."""
    from barkgpt.data.webtext import ingest

    paths = paths_for("webtext", root)
    report = ingest(params.webtext, paths.train_text, paths.val_text)
    write_json(paths.ingest_report, report)
    return report


def webtext_tokenizer(params: Params, root: Path | str = ".") -> dict:
    """Train the byte-level BPE on the training split (or load tiktoken's gpt2); save it with its hash."""
    from barkgpt.tokenizer import BPETokenizer, train_bpe

    paths = paths_for("webtext", root)
    p = params.webtext.tokenizer
    if p.kind == "tiktoken":
        tok = BPETokenizer.from_tiktoken(p.name)
    else:
        tok = train_bpe(read_lines(paths.train_text), p.vocab_size, p.min_frequency)
    save_tokenizer(tok, paths.tokenizer)
    val_lines = read_lines(paths.val_text)
    val_tokens = sum(len(ids) + 1 for ids in tok.encode_batch(val_lines, p.threads))  # +1: the EOS per line
    val_bytes = sum(len(line.encode("utf-8")) + 1 for line in val_lines)  # +1: the newline the EOS stands for
    report = {
        "kind": tok.kind, "name": tok.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
        "tokenizer_hash": tokenizer_hash(tok), "val_tokens": val_tokens, "val_bytes": val_bytes,
        "val_bytes_per_token": val_bytes / max(val_tokens, 1),
    }
    write_json(paths.tokenizer_report, report)
    return report


def encode_lines(tok, lines: list[str], threads: int = 2, chunk: int = 8192, desc: str = "encode") -> np.ndarray:
    """Each line's ids followed by the EOS, concatenated; encoded in parallel by tiktoken's threads."""
    from tqdm import tqdm

    parts = []
    eos = np.array([tok.eos_id], dtype=np.int64)
    with tqdm(total=len(lines), desc=desc, unit="line", disable=len(lines) < 4 * chunk) as bar:
        for i in range(0, len(lines), chunk):
            for ids in tok.encode_batch(lines[i : i + chunk], threads):
                parts += [np.asarray(ids, dtype=np.int64), eos]
            bar.update(min(chunk, len(lines) - i))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def tokenize_text(params: Params, name: str, root: Path | str = ".") -> dict:
    """Encode the text splits with the saved tokenizer into shards (uint16, uint32 past 65,536 ids)."""
    paths = paths_for(name, root)
    cfg = pipeline_params(params, name)
    tok = load_tokenizer(paths.tokenizer)
    meta = {"tokenizer_hash": tokenizer_hash(tok)}
    out = {}
    for split, text in (("train", paths.train_text), ("val", paths.val_text)):
        lines = read_lines(text)
        ids = encode_lines(tok, lines, cfg.tokenizer.threads, desc=f"encode {split}")
        text_bytes = sum(len(line.encode("utf-8")) + 1 for line in lines)
        out[split] = write_shard(paths.shard(split), ids, tok.vocab_size, {
            **meta, "source_sha256": sha256_file(text), "lines": len(lines), "text_bytes": text_bytes,
            "bytes_per_token": text_bytes / max(len(ids), 1),
        })
    return out


# --- deploy (barkgpt/deploy/) -------------------------------------------------------------------

def deploy(params: Params, name: str, root: Path | str = ".", **options) -> dict:
    """Release the gated model to S3 and serve it from AWS Lambda (local AWS API by default).

    options: target, provenance (MLflow run id / model version), app_factory, transfer, log;
    see barkgpt.deploy.deployer.deploy_pipeline. Imported late: boto3/moto cost import time.
    """
    from barkgpt.deploy.deployer import deploy_pipeline

    paths_for(name, root)  # validates the pipeline name
    return deploy_pipeline(params, name, root, **options)
