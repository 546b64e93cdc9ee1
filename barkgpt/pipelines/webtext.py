"""The WebText-2 pipeline: real text (the hub, or local files), a byte-level BPE trained on the
training split, and validation bits per byte as the metric. Any text pipeline reuses its stages
(see localtext.py): only the params section differs."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from barkgpt.layout import Layout
from barkgpt.params import ModelParams, Strict, TrainParams
from barkgpt.pipelines import common
from barkgpt.pipelines.base import Pipeline, Stage

# --- its params section (`webtext:` in params.yaml; a text pipeline's section extends it) ----------

class WebtextCleanParams(Strict):
    min_line_chars: int = Field(1, ge=1, description="drop lines shorter than this after stripping")
    max_line_chars: int = Field(20000, ge=1, description="drop lines longer than this (runaway lines)")
    dedup: bool = Field(True, description="drop exact duplicate lines, keeping the first occurrence")


class WebtextValidationParams(Strict):
    """Great Expectations suite settings for the webtext text splits (barkgpt/validation.py)."""

    max_duplicate_rate: float = Field(0.01, ge=0, le=1, description="max share of repeated lines per split")
    min_letter_share: float = Field(0.3, ge=0, le=1,
                                    description="min mean share of letters among non-space characters")
    sample_rows: int = Field(50_000, ge=100, description="row-level checks run on at most this many lines "
                             "per split (a seeded sample); counts and means stream over every line")


class WebtextSplitParams(Strict):
    mode: Literal["head", "random"] = Field(
        "head", description="head: first lines train, last val_fraction val (file order); random: seeded by line")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 1337


class WebtextTokenizerParams(Strict):
    kind: Literal["bpe", "tiktoken"] = "bpe"
    vocab_size: int = Field(2048, ge=258, le=262_144, description="bpe: 256 bytes + merges + <|endoftext|>, at most 262,144")
    min_frequency: int = Field(2, ge=1, description="bpe: a pair must occur this often to be merged")
    name: str = Field("gpt2", description="tiktoken: the encoding name (needs its files in tiktoken's cache)")
    threads: int = Field(2, ge=1, le=256, description="encoding threads (tokenizer stage), at most 256")
    workers: int = Field(2, ge=1, le=256, description="tokenize stage: encoding processes (1 = in-process)")
    shard_tokens: int = Field(2**24, ge=1024, description="tokens per shard file (the last one is shorter)")


class WebtextEvalParams(Strict):
    batch_size: int = Field(16, ge=1, le=4096)
    max_batches: int | None = Field(None, ge=1, description="None = the whole validation split")
    prompts: list[str] = Field(
        default_factory=lambda: ["The history of", "In 1998 , the", "The game was", "= = Reception = ="])
    temperature: float = Field(0.8, ge=0)
    top_k: int | None = Field(50, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    max_new_tokens: int = Field(48, ge=1, le=8192)
    seed: int = 0


class WebtextGates(Strict):
    max_val_bpb: float = Field(2.5, gt=0, description="evaluation gate: validation bits per byte")

    def quality_checks(self, prefix: str, measured: dict) -> list:
        """Validation bits per byte under the ceiling (what gates.judge asks)."""
        from barkgpt.gates import Check

        bpb = measured.get("val_bpb")
        ok = bpb is not None and bpb <= self.max_val_bpb
        return [Check(prefix + "val_bpb", ok, f"{bpb} {'<=' if ok else '>'} {self.max_val_bpb}")]


def _webtext_model() -> ModelParams:
    return ModelParams(n_layer=4, n_head=4, n_embd=256, block_size=256, dropout=0.1)


def _webtext_train() -> TrainParams:
    return TrainParams(max_steps=100000, batch_size=16, learning_rate=3e-3, warmup_steps=50,
                       dtype="auto", compile=True, threads=2, eval_every=100, eval_batches=10,
                       checkpoint_every=200, max_seconds=300)


class WebtextPipeline(Strict):
    source: str = Field("Raziel1234/WebText-2",
                        description="Hugging Face hub id, or a local .txt/.jsonl/.parquet file or folder")
    text_field: str = Field("text", description="column holding the text (jsonl, parquet, hub)")
    hub_timeout_s: float = Field(20.0, gt=0, description="give up on the hub after this long")
    clean: WebtextCleanParams = WebtextCleanParams()
    validation: WebtextValidationParams = WebtextValidationParams()
    split: WebtextSplitParams = WebtextSplitParams()
    tokenizer: WebtextTokenizerParams = WebtextTokenizerParams()
    model: ModelParams = Field(default_factory=_webtext_model)
    train: TrainParams = Field(default_factory=_webtext_train)
    eval: WebtextEvalParams = WebtextEvalParams()
    gates: WebtextGates = WebtextGates()


# --- its stages and hooks -------------------------------------------------------------------------


def ingest(params, pipe, lay: Layout) -> dict:
    """Source (hub id or local file/folder) -> cleaned data/<pipeline>/{train,val}.txt."""
    from barkgpt.data.webtext import ingest as ingest_corpus
    from barkgpt.fileio import write_json

    report = ingest_corpus(pipe.params(params), lay.train_text, lay.val_text)
    write_json(lay.ingest_report, report)
    return report


def train_tokenizer(params, pipe, lay: Layout) -> dict:
    """Train the byte-level BPE on the training split (or load tiktoken's gpt2); save it with its hash.
    Both splits are streamed: the trainer keeps word counts, not the text."""
    from barkgpt.data.encode import TextStats, encode_chunk, line_chunks
    from barkgpt.fileio import write_json
    from barkgpt.tokenizer import BPETokenizer, save_tokenizer, tokenizer_hash, train_bpe

    p = pipe.params(params).tokenizer
    if p.kind == "tiktoken":
        tok = BPETokenizer.from_tiktoken(p.name)
    else:
        tok = train_bpe(line_chunks(lay.train_text, TextStats()), p.vocab_size, p.min_frequency)
    save_tokenizer(tok, lay.tokenizer)
    val = TextStats()  # +1 per line in both counts: the EOS, and the newline it stands for
    val_tokens = sum(len(encode_chunk(tok, lines, True, p.threads)) for lines in line_chunks(lay.val_text, val))
    report = {
        "kind": tok.kind, "name": tok.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
        "tokenizer_hash": tokenizer_hash(tok), "val_tokens": val_tokens, "val_bytes": val.text_bytes,
        "val_bytes_per_token": val.text_bytes / max(val_tokens, 1),
    }
    write_json(lay.tokenizer_report, report)
    return report


def corpus_read(out: dict) -> str:
    return (f"{out['source']}: {out['train_lines']:,} train lines, {out['val_lines']:,} val lines "
            f"({out['clean_duplicates']:,} duplicates, {out['clean_empty_or_short']:,} empty/short, "
            f"{out['clean_too_long']:,} over-long dropped)")


def tokenizer_trained(out: dict) -> str:
    return (f"tokenizer {out['kind']} vocab {out['vocab_size']:,} hash {out['tokenizer_hash']}: "
            f"{out['val_bytes_per_token']:.3f} bytes/token on the validation split")


def saved_tokenizer(params, lay: Layout):
    from barkgpt.tokenizer import load_tokenizer

    return load_tokenizer(lay.tokenizer)


def evaluate(params, pipe, lay: Layout) -> tuple[dict, dict]:
    """Validation bits per byte and perplexity over the validation split, plus samples."""
    from barkgpt.evaluate import evaluate_text, open_for_evaluation

    cfg = pipe.params(params)
    lm, val_ids, token_bytes = open_for_evaluation(lay, cfg.train.threads)
    return evaluate_text(lm, val_ids, token_bytes, cfg.eval)


def suites(params, lay):
    from barkgpt.validation import webtext_suites

    return webtext_suites(params, lay)


def token_suites(params, lay):
    from barkgpt.validation import token_suites as shard_suites

    return shard_suites(params, lay)


def greedy_prompts(tok, val_lines: list[str], n_ctx: int) -> list[list[int]]:
    """The first quarter-context of up to 8 validation lines: plain continuation."""
    return [ids[: n_ctx // 4] for ids in (tok.encode(line) for line in val_lines[:32]) if len(ids) > 1][:8]


def input_example(section) -> str:
    return (section.eval.prompts or ["The"])[0]


def modelfile(section) -> list[str]:
    lines = ['TEMPLATE """{{ .Prompt }}"""', 'PARAMETER stop "<|endoftext|>"',
             f"PARAMETER temperature {section.eval.temperature:g}"]
    return lines + ([f"PARAMETER top_k {section.eval.top_k}"] if section.eval.top_k else [])


def text_stages(name: str, local_source: bool) -> tuple[Stage, ...]:
    """ingest -> validate -> tokenizer -> tokenize -> validate-tokens -> train -> ... -> parity.
    `local_source`: the source is always a local file or folder, so DVC watches it (a dependency
    named by the params value, which DVC interpolates from params.yaml)."""
    source = (lambda lay: [Path(f"${{{name}.source}}")]) if local_source else (lambda lay: [])
    return (
        Stage("ingest", ingest, "read, clean and split the corpus (<pipeline>.source)",
              deps=source,
              params=("{p}.source", "{p}.text_field", "{p}.clean", "{p}.split"),
              outs=lambda lay: [lay.train_text, lay.val_text], reports=lambda lay: [lay.ingest_report],
              describe=corpus_read),
        common.validate_stage(),
        Stage("tokenizer", train_tokenizer, "train the byte-level BPE on the training split",
              deps=lambda lay: [lay.validation_report, lay.train_text, lay.val_text],
              params=("{p}.tokenizer.kind", "{p}.tokenizer.vocab_size", "{p}.tokenizer.min_frequency",
                      "{p}.tokenizer.name"),
              outs=lambda lay: [lay.tokenizer], reports=lambda lay: [lay.tokenizer_report],
              describe=tokenizer_trained),
        common.tokenize_stage(after=lambda lay: [lay.tokenizer], params=("{p}.tokenizer.shard_tokens",)),
        common.validate_tokens_stage(),
        *common.model_stages(train_after=lambda lay: [lay.token_validation_report]),
    )


def text_pipeline(name: str, description: str, params_class: type[WebtextPipeline] = WebtextPipeline,
                  local_source: bool = False, **fields) -> Pipeline:
    """A text pipeline: the WebText stages over `params_class`, its section (`<name>:` in params.yaml)."""
    return Pipeline(
        name=name, description=description, params_class=params_class, section=lambda params: getattr(params, name),
        stages=text_stages(name, local_source), metric="val_bpb", higher_is_better=False, evaluate=evaluate,
        summary=(("val_bpb", "val_bpb"), ("gate_passed", "gate_passed")),
        suites=suites, token_suites=token_suites, greedy_prompts=greedy_prompts,
        input_example=input_example, modelfile=modelfile, tokens=saved_tokenizer, **fields)


PIPELINE = text_pipeline("webtext", "WebText-2: real text, a byte-level BPE, bits per byte")
