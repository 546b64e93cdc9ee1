"""The WebText-2 pipeline: real text (the hub, or local files), a byte-level BPE trained on the
training split, and validation bits per byte as the metric. Any text pipeline reuses its stages
(see localtext.py): only the params section differs."""
from __future__ import annotations

from pathlib import Path

from barkgpt.layout import Layout
from barkgpt.pipelines import common
from barkgpt.pipelines.base import Pipeline, Stage


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


def text_pipeline(name: str, description: str, local_source: bool = False, **fields) -> Pipeline:
    return Pipeline(
        name=name, description=description, section=lambda params: getattr(params, name),
        stages=text_stages(name, local_source), metric="val_bpb", higher_is_better=False, evaluate=evaluate,
        summary=(("val_bpb", "val_bpb"), ("gate_passed", "gate_passed")),
        suites=suites, token_suites=token_suites, greedy_prompts=greedy_prompts,
        input_example=input_example, modelfile=modelfile, tokens=saved_tokenizer, **fields)


PIPELINE = text_pipeline("webtext", "WebText-2: real text, a byte-level BPE, bits per byte")
