"""Where every file of a pipeline lives. The one module that spells a path.

A leaf: it imports nothing from barkgpt, so serving, deployment and the Lambda handler can ask
where a model is without importing the stages (or torch). Paths are relative to the project root.

    data/<p>/        train.txt, val.txt, tokenizer.json,
                     tokens/{train,val}.json (shard manifests) + tokens/<split>-NNNNNN.bin (fixed-size shards)
    models/<p>/      best.pt (the pipeline's current model), last.pt (resume), mlflow_run.json
    runs/<p>/<id>/   one training run's own files until it is promoted (never a DVC output)
    sweeps/<p>/<study>/  a sweep's trial logs, trials.csv, trials.png, summary.json (never a DVC output)
    exports/<p>/     full/ (<p>-f32.gguf, <p>-f16.gguf, hf/), quantized/ (<p>-<quant>.gguf)
    reports/<p>/     one JSON per stage (validation, train, metrics, export, quantization, parity, deploy);
                     validation/: Great Expectations' Data Docs
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """One training's own folder, runs/<p>/<run id>/: models/<p>/'s files until it is promoted."""

    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def train_log(self) -> Path:
        return self.path / "train_log.csv"

    @property
    def run_record(self) -> Path:
        """The run's MLflow run id (promotion copies it to models/<p>/mlflow_run.json)."""
        return self.path / "mlflow_run.json"

    @property
    def info(self) -> Path:
        """The run's status: running, diverged or promoted (barkgpt/runs.py)."""
        return self.path / "run.json"


@dataclass(frozen=True)
class Layout:
    pipeline: str
    root: Path = Path(".")

    # --- data ---------------------------------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.root / "data" / self.pipeline

    @property
    def train_text(self) -> Path:
        return self.data / "train.txt"

    @property
    def val_text(self) -> Path:
        return self.data / "val.txt"

    def text(self, split: str) -> Path:
        return self.data / f"{split}.txt"

    @property
    def tokenizer(self) -> Path:
        return self.data / "tokenizer.json"

    @property
    def tokens(self) -> Path:
        return self.data / "tokens"

    def token_manifest(self, split: str) -> Path:
        """The split's shard manifest: dtype, vocabulary, tokenizer hash and the shard files in order."""
        return self.tokens / f"{split}.json"

    def token_shard(self, split: str, index: int) -> Path:
        return self.tokens / f"{split}-{index:06d}.bin"

    def token_shard_files(self, split: str) -> list[Path]:
        """The split's shard files on disk now (its manifest says which belong to the current encoding)."""
        return sorted(self.tokens.glob(f"{split}-{'[0-9]' * 6}.bin"))

    # --- models ---------------------------------------------------------------------------------
    @property
    def models(self) -> Path:
        return self.root / "models" / self.pipeline

    @property
    def checkpoint(self) -> Path:
        """The pipeline's current model: what evaluation, export and serving read."""
        return self.models / "best.pt"

    @property
    def last_checkpoint(self) -> Path:
        """The newest step of the latest training, for --resume."""
        return self.models / "last.pt"

    @property
    def run_record(self) -> Path:
        """The MLflow run that trained the current model (read by evaluate, parity and deploy)."""
        return self.models / "mlflow_run.json"

    # --- training runs (barkgpt/runs.py) ----------------------------------------------------------
    @property
    def runs(self) -> Path:
        """Each training writes here first; models/<p>/ changes only when a run is promoted."""
        return self.root / "runs" / self.pipeline

    def run_folder(self, run_id: str) -> RunLayout:
        return RunLayout(self.runs / run_id)

    @property
    def writer_lock(self) -> Path:
        """flock'ed by the process writing this pipeline's model (one writer at a time)."""
        return self.runs / "writer.lock"

    @property
    def release_snapshots(self) -> Path:
        """Deploy copies the judged files here (a temporary folder each) and uploads the copies."""
        return self.root / ".deploy-staging" / "snapshots"

    # --- sweeps (barkgpt/sweep/) -----------------------------------------------------------------
    def sweep_folder(self, study: str) -> Path:
        """One sweep's trial logs, table, plot and summary (the trials themselves are DVC experiments)."""
        return self.root / "sweeps" / self.pipeline / study

    def sweep_trial_log(self, study: str, number: int) -> Path:
        return self.sweep_folder(study) / f"trial-{number:03d}.log"

    # --- exports --------------------------------------------------------------------------------
    @property
    def exports(self) -> Path:
        return self.root / "exports" / self.pipeline

    @property
    def full_exports(self) -> Path:
        """What the export stage writes (one DVC output, whichever formats params ask for)."""
        return self.exports / "full"

    @property
    def quantized_exports(self) -> Path:
        """What the quantize stage writes (one DVC output, whichever quantizations params ask for)."""
        return self.exports / "quantized"

    def gguf(self, variant: str) -> Path:
        """variant: f32, f16 or a quantization (q8_0, q4_0, q4_k_m)."""
        variant = variant.lower()
        folder = self.full_exports if variant in ("f32", "f16") else self.quantized_exports
        return folder / f"{self.pipeline}-{variant}.gguf"

    @property
    def hf(self) -> Path:
        return self.full_exports / "hf"

    # --- reports --------------------------------------------------------------------------------
    @property
    def reports(self) -> Path:
        return self.root / "reports" / self.pipeline

    def report(self, stage: str) -> Path:
        return self.reports / f"{stage}.json"

    @property
    def ingest_report(self) -> Path:
        return self.report("ingest")

    @property
    def tokenizer_report(self) -> Path:
        return self.report("tokenizer")

    @property
    def validation_report(self) -> Path:
        return self.report("validation")

    @property
    def validation_docs(self) -> Path:
        """Great Expectations Data Docs of the text suites (a folder; index.html)."""
        return self.reports / "validation"

    @property
    def token_validation_report(self) -> Path:
        return self.report("validation_tokens")

    @property
    def token_validation_docs(self) -> Path:
        return self.reports / "validation_tokens"

    @property
    def train_summary(self) -> Path:
        return self.report("train")

    @property
    def train_log(self) -> Path:
        return self.reports / "train_log.csv"

    @property
    def loss_curve(self) -> Path:
        return self.reports / "loss_curve.png"

    @property
    def metrics(self) -> Path:
        return self.report("metrics")

    @property
    def summary(self) -> Path:
        """The headline numbers of the evaluation: what `dvc metrics show` lists."""
        return self.report("summary")

    @property
    def samples(self) -> Path:
        return self.report("samples")

    @property
    def export_report(self) -> Path:
        """sha256 of each file the export stage wrote (checked before quantize, parity, serving)."""
        return self.report("export")

    @property
    def quantization_report(self) -> Path:
        return self.report("quantization")

    @property
    def parity_report(self) -> Path:
        return self.report("parity")

    @property
    def parity_summary(self) -> Path:
        """The verdict and a number per file, for `dvc metrics show` (parity.json has the details)."""
        return self.reports / "parity_summary.json"

    @property
    def deploy_report(self) -> Path:
        return self.report("deploy")

    @property
    def report_page(self) -> Path:
        """The run on one page (`barkgpt report`), regenerated from the other reports."""
        return self.reports / "report.md"

    # --- DVC ------------------------------------------------------------------------------------
    @property
    def is_default(self) -> bool:
        """The default pipeline's stages are the root dvc.yaml's (what a plain `dvc repro` runs)."""
        return self.pipeline == DEFAULT_PIPELINE

    @property
    def dvc_file(self) -> Path:
        """Where the pipeline's DVC stages are: the root dvc.yaml, or pipelines/<p>/dvc.yaml."""
        return self.root / ("dvc.yaml" if self.is_default else f"pipelines/{self.pipeline}/dvc.yaml")

    @property
    def dvc_lock(self) -> Path:
        """What DVC recorded of the last run of those stages (beside the dvc.yaml, as DVC puts it)."""
        return self.dvc_file.with_name("dvc.lock")

    @property
    def repro_command(self) -> str:
        """The DVC command that runs the pipeline's stages."""
        return "dvc repro" if self.is_default else f"dvc repro {self.dvc_file.relative_to(self.root).as_posix()}"


# The pipeline whose stages the root dvc.yaml holds (what a plain `dvc repro` runs); every other
# pipeline's are in pipelines/<name>/dvc.yaml (barkgpt.pipelines.base.Pipeline.default reads this).
DEFAULT_PIPELINE = "bark"


def dvc_file(pipeline: str) -> str:
    """Where a pipeline's DVC stages live, relative to the project root."""
    return "dvc.yaml" if pipeline == DEFAULT_PIPELINE else f"pipelines/{pipeline}/dvc.yaml"


def repro_command(pipeline: str) -> str:
    """The DVC command that runs a pipeline's stages."""
    return Layout(pipeline or DEFAULT_PIPELINE).repro_command


def layout(pipeline: str, root: str | Path = ".") -> Layout:
    return Layout(pipeline, Path(root))


# --- per machine, outside any project ----------------------------------------------------------

def machine_cache() -> Path:
    """~/.cache/barkgpt (or $XDG_CACHE_HOME/barkgpt): what one machine keeps across projects."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "barkgpt"


def compile_cache() -> Path:
    """torch.compile's kernels and graphs: a cold compile is paid once per machine, not per run."""
    return machine_cache() / "torch-compile"
