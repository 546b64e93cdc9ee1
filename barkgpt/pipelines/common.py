"""Declarations of the stages every pipeline shares (tokenize, train, evaluate, export, quantize,
parity, and the Great Expectations checks). A pipeline module lists them after its own source
stages; the functions are in barkgpt/stages.py."""
from __future__ import annotations

from barkgpt import stages
from barkgpt.pipelines.base import Option, Stage


def _splits(lay):
    return [lay.train_text, lay.val_text]


def files_written(out: dict) -> str:
    return "\n".join(f"{kind}: {path}" for kind, path in out.items())


def expectations_passed(out: dict) -> str:
    return f"{out['pipeline']}: all {out['expectations']} expectations passed; Data Docs: {out['data_docs']}"


def tokens_per_split(out: dict) -> str:
    return "\n".join(f"{split}: {m['tokens']:,} tokens" for split, m in out.items())


def training_done(out: dict) -> str:
    bpb = f", val bpb {out['val_bpb']:.4f}" if out.get("val_bpb") is not None else ""
    return (f"trained {out['step']} steps, {out['tokens']:,} tokens in {out['seconds']:.1f}s "
            f"({out['tokens_per_s']:,.0f} tok/s); val loss {out['best_val_loss']:.4f}{bpb}")


def validate_stage(params: tuple[str, ...] = ("{p}.validation", "{p}.clean")) -> Stage:
    return Stage(
        "validate", stages.validate, "check the text splits with Great Expectations suites",
        deps=_splits, params=params,
        outs=lambda lay: [lay.validation_docs],  # GX Data Docs: a folder of pages, cached
        reports=lambda lay: [lay.validation_report], describe=expectations_passed)


def tokenize_stage(after=lambda lay: [lay.validation_report], writes_tokenizer: bool = False,
                   params: tuple[str, ...] = ()) -> Stage:
    """`after`: what must exist first (the passed validation report, the trained tokenizer).
    `writes_tokenizer`: a fixed vocabulary saved by this stage (bark) rather than trained before it."""
    return Stage(
        "tokenize", stages.tokenize, "encode the text splits into token shards (streaming, in worker processes)",
        deps=lambda lay: [*after(lay), *_splits(lay)], params=params,
        outs=lambda lay: [lay.tokenizer, lay.tokens] if writes_tokenizer else [lay.tokens],
        describe=tokens_per_split)


def validate_tokens_stage() -> Stage:
    return Stage(
        "validate-tokens", stages.validate_tokens,
        "check the token shards (sizes, counts, ids, tokenizer hash) with Great Expectations",
        deps=lambda lay: [lay.tokenizer, lay.tokens],
        outs=lambda lay: [lay.token_validation_docs],
        reports=lambda lay: [lay.token_validation_report], describe=expectations_passed)


def _tag(text: str) -> tuple[str, str]:
    import argparse

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def train_stage(after=lambda lay: [], curve: str = "val_bpb") -> Stage:
    """`curve`: the train_log.csv column `dvc plots show` draws over steps."""
    return Stage(
        "train", stages.train, "train the pipeline's model",
        deps=lambda lay: [*after(lay), lay.tokenizer, lay.tokens],
        params=("{p}.model", "{p}.train"),
        outs=lambda lay: [lay.models], persist=True,  # a failed run must not delete the last good model
        reports=lambda lay: [lay.train_summary],
        plots=lambda lay: {lay.train_log: {"x": "step", "y": curve}},
        options=(Option(("--resume",), "resume", "continue the interrupted run in runs/<pipeline>/, else train "
                        "models/<pipeline>/last.pt further",
                        {"action": "store_true"}),
                 Option(("--quiet",), "progress",
                        "no progress bar: a progress line every 10 s instead (as when stderr is not a terminal)",
                        {"action": "store_false"}),
                 Option(("--nproc",), "nproc", "data-parallel processes, launched with torchrun "
                        "(default: <pipeline>.train.nproc)", {"type": int, "metavar": "N"}),
                 Option(("--tag",), "tags", "an extra tag on the MLflow run (repeatable)",
                        {"action": "append", "type": _tag, "metavar": "KEY=VALUE"})),
        dvc_flags=("--quiet",), describe=training_done)


def evaluate_stage() -> Stage:
    return Stage(
        "evaluate", stages.evaluate, "evaluate the current model with the pipeline's metric and gate",
        deps=lambda lay: [lay.checkpoint, lay.val_text, lay.tokens],
        params=("{p}.eval", "{p}.gates"),
        metrics=lambda lay: [lay.summary], reports=lambda lay: [lay.metrics, lay.samples])


def export_stage() -> Stage:
    return Stage(
        "export", stages.export, "write GGUF (F32, F16) and Hugging Face files",
        deps=lambda lay: [lay.checkpoint], params=("export.f16", "export.hf"),
        outs=lambda lay: [lay.full_exports],
        reports=lambda lay: [lay.export_report],  # each GGUF's sha256, checked before it is used
        describe=files_written)


def quantize_stage() -> Stage:
    return Stage(
        "quantize", stages.quantize, "quantize the F32 GGUF with llama.cpp (Q8_0, Q4_0, Q4_K_M)",
        deps=lambda lay: [lay.gguf("f32"), lay.export_report],
        params=("export.quantizations",),
        outs=lambda lay: [lay.quantized_exports],
        reports=lambda lay: [lay.quantization_report], describe=files_written)


def parity_stage(params: tuple[str, ...] = ()) -> Stage:
    """`params`: what the pipeline's quality measure reads besides export (bark: its eval and gates)."""
    return Stage(
        "parity", stages.parity, "compare llama.cpp with PyTorch and gate the quantizations",
        deps=lambda lay: [lay.checkpoint, lay.val_text, lay.tokens, lay.full_exports, lay.quantized_exports,
                          lay.export_report, lay.quantization_report],
        params=("seed", "export", *params),
        metrics=lambda lay: [lay.parity_summary], reports=lambda lay: [lay.parity_report])


def model_stages(train_after=lambda lay: [], parity_params: tuple[str, ...] = (),
                 curve: str = "val_bpb") -> tuple[Stage, ...]:
    """train -> evaluate -> export -> quantize -> parity: the same for every pipeline. `curve` is what
    `dvc plots show` draws: validation bits per byte for text (what compares across tokenizers)."""
    return (train_stage(train_after, curve), evaluate_stage(), export_stage(), quantize_stage(),
            parity_stage(parity_params))
