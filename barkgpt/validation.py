"""Data validation with Great Expectations: expectation suites over a pipeline's data, before training.

A suite is a pandas frame plus GX expectations plus the column that names an offending row
(`line`, 1-based in the text file). `validate_pipeline` runs every suite a pipeline registers in
SUITE_BUILDERS, writes `reports/<pipeline>/validation.json` and a readable `validation.html`, and
raises BarkError listing each failed expectation with its offending rows. Another pipeline adds
its suites with one builder function `(params, paths) -> list[Suite]` and one SUITE_BUILDERS entry.
GX runs in an ephemeral (in-memory) context with usage analytics off: nothing leaves the machine.
"""
from __future__ import annotations

import html
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from barkgpt.errors import BarkError
from barkgpt.fileio import write_json, write_text
from barkgpt.params import BARKS, Params
from barkgpt.tokenizer import ASSISTANT, BARK_VOCAB, EOS, SPEAK, USER

MAX_ROWS_SHOWN = 10  # offending rows named per expectation in the error and report


@dataclass
class Suite:
    name: str
    frame: object  # pandas.DataFrame
    expectations: list
    index_column: str = "line"
    coverage: str = "every row"  # what the frame holds: all rows, a sample, or counts streamed over all rows


def _gx():
    # Offline: GX must never send usage statistics (read at import and context creation).
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    import great_expectations as gx
    import great_expectations.expectations as gxe

    return gx, gxe


# --- the bark suites --------------------------------------------------------------------------

def bark_row_regex(max_barks: int, max_turns: int) -> str:
    """The prompt contract for one line: 1..max_turns turns of `User: speak Assistant: barks <EOS>`."""
    bark = "(?:" + "|".join(BARKS) + ")"
    turn = f"{re.escape(USER)} {SPEAK} {re.escape(ASSISTANT)}(?: {bark}){{1,{max_barks}}} {re.escape(EOS)}"
    return f"^{turn}(?: {turn}){{0,{max_turns - 1}}}$"


def bark_suites(params: Params, paths) -> list[Suite]:
    import pandas as pd

    _, gxe = _gx()
    data, block = params.bark.data, params.bark.model.block_size
    suites = []
    for split, path in (("train", paths.train_text), ("val", paths.val_text)):
        if not path.exists():
            raise BarkError(f"{path}: not found; run the data stage first (barkgpt bark-data or dvc repro)")
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the file's final newline ends the last row; it is not an empty row
        rows = pd.DataFrame({
            "line": range(1, len(lines) + 1),
            "text": [line if line.strip() else None for line in lines],
            "n_tokens": [len(line.split()) for line in lines],
        })
        suites.append(Suite(f"bark.{split}.rows", rows, [
            gxe.ExpectColumnValuesToNotBeNull(column="text"),
            gxe.ExpectColumnValuesToMatchRegex(column="text", regex=bark_row_regex(data.max_barks, data.max_turns)),
            gxe.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=1, max_value=block),
        ]))
        words = [(i, w) for i, line in enumerate(lines, 1) for w in line.split()]
        tokens = pd.DataFrame({"line": [i for i, _ in words], "token": [w for _, w in words]})
        suites.append(Suite(f"bark.{split}.tokens", tokens, [
            gxe.ExpectColumnValuesToBeInSet(column="token", value_set=list(BARK_VOCAB)),
        ]))
        counts = Counter(w for _, w in words if w in BARKS)
        total_barks = max(sum(counts.values()), 1)
        total_mix = sum(data.bark_mix.values())
        mix = pd.DataFrame({
            "bark": list(BARKS),
            "observed_share": [counts[b] / total_barks for b in BARKS],
            "configured_share": [data.bark_mix.get(b, 0.0) / total_mix for b in BARKS],
        })
        mix["deviation"] = (mix["observed_share"] - mix["configured_share"]).abs()
        suites.append(Suite(f"bark.{split}.bark_mix", mix, [
            gxe.ExpectColumnValuesToBeBetween(column="deviation", min_value=0.0,
                                              max_value=params.bark.validation.mix_tolerance),
        ], index_column="bark"))
    return suites


# --- the webtext suites ---------------------------------------------------------------------------

SAMPLE_ROWS = 50_000  # row-level sample size for pipelines whose params do not set one
FLAGGED_ROWS_KEPT = 100  # per rule: offending lines always reach the row-level checks, up to this many
EXACT_DISTINCT_LINES = 500_000  # duplicates are counted exactly up to this many distinct lines


def letter_share(line: str) -> float:
    """Letters over non-space characters: prose is mostly letters; markup, tables and numbers are not."""
    chars = [c for c in line if not c.isspace()]
    return sum(c.isalpha() for c in chars) / len(chars) if chars else 0.0


def text_rows(path: Path):
    """(line number, text, valid UTF-8) per line, streamed. Decoded line by line so one bad line is
    reported, not fatal; the file's final newline ends the last row (it is not an empty row)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw[:-1] if raw.endswith(b"\n") else raw
            try:
                yield number, line.decode("utf-8"), True
            except UnicodeDecodeError:
                yield number, line.decode("utf-8", errors="replace"), False


class DuplicateShare:
    """Share of non-empty lines that repeat an earlier line, in bounded memory: exact while the
    distinct lines fit EXACT_DISTINCT_LINES; past that, measured on the lines whose 64-bit hash
    falls below a threshold that halves as needed (every copy of a line shares its hash, so the
    share in that hash range estimates the share overall)."""

    def __init__(self, limit: int = EXACT_DISTINCT_LINES):
        self.limit, self.threshold, self.counts = limit, 1 << 64, {}

    def add(self, text: str) -> None:
        import hashlib

        key = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little")
        if key < self.threshold:
            self.counts[key] = self.counts.get(key, 0) + 1
            if len(self.counts) > self.limit:
                self.threshold //= 2
                self.counts = {k: c for k, c in self.counts.items() if k < self.threshold}

    @property
    def exact(self) -> bool:
        return self.threshold == 1 << 64

    def share(self) -> float:
        total = sum(self.counts.values())
        return (total - len(self.counts)) / total if total else 0.0


def webtext_suites(params: Params, paths) -> list[Suite]:
    """Text suites per split: what webtext-ingest promises and what the tokenizer and model need.

    One streaming pass per split: row-level checks (not empty, valid UTF-8, length) run on a seeded
    sample of at most `validation.sample_rows` lines plus every line the pass flagged (up to
    FLAGGED_ROWS_KEPT per rule); the duplicate share and the mean letter share stream over every
    line. Each suite's `coverage` says which."""
    import random

    import pandas as pd

    _, gxe = _gx()
    clean, v = params.webtext.clean, params.webtext.validation
    suites = []
    for split, path in (("train", paths.train_text), ("val", paths.val_text)):
        if not path.exists():
            raise BarkError(f"{path}: not found; run the ingest stage first (barkgpt webtext-ingest)")
        rng = random.Random(f"{params.seed}-{split}")
        sample, flagged = [], {"empty": [], "utf8": [], "chars": []}
        duplicates, letters, total = DuplicateShare(), 0.0, 0
        for number, text, ok in text_rows(path):
            total += 1
            row = (number, text[:200] if text.strip() else None, len(text), ok)
            rules = [("empty", not text.strip()), ("utf8", not ok),
                     ("chars", not clean.min_line_chars <= len(text) <= clean.max_line_chars)]
            kept = False
            for rule, broken in rules:
                if broken and len(flagged[rule]) < FLAGGED_ROWS_KEPT:
                    flagged[rule].append(row)
                    kept = True
            if not kept:  # reservoir sampling (Algorithm R): each unflagged line equally likely
                if len(sample) < v.sample_rows:
                    sample.append(row)
                else:
                    j = rng.randrange(total)
                    if j < v.sample_rows:
                        sample[j] = row
            letters += letter_share(text)
            if text.strip():
                duplicates.add(text)
        rows = sorted({r[0]: r for r in sample + [r for rs in flagged.values() for r in rs]}.values())
        frame = pd.DataFrame({
            "line": [r[0] for r in rows], "text": [r[1] for r in rows],
            "chars": [r[2] for r in rows], "valid_utf8": [r[3] for r in rows],
        })
        coverage = "every line" if len(rows) == total else (
            f"{len(rows):,} of {total:,} lines: a seeded sample plus every line the streaming pass flagged "
            f"(first {FLAGGED_ROWS_KEPT} per rule)")
        suites.append(Suite(f"webtext.{split}.text", frame, [
            gxe.ExpectColumnValuesToNotBeNull(column="text"),
            gxe.ExpectColumnValuesToBeInSet(column="valid_utf8", value_set=[True]),
            gxe.ExpectColumnValuesToBeBetween(column="chars", min_value=clean.min_line_chars,
                                              max_value=clean.max_line_chars),
        ], coverage=coverage))
        stats = pd.DataFrame({"split": [split], "lines": [total],
                              "duplicate_share": [duplicates.share()],
                              "mean_letter_share": [letters / max(total, 1)]})
        suites.append(Suite(f"webtext.{split}.stats", stats, [
            # ingest deduplicates, so the share is normally 0.0
            gxe.ExpectColumnValuesToBeBetween(column="duplicate_share", min_value=0.0, max_value=v.max_duplicate_rate),
            # over the corpus, not per line: headings ("= = Reception = =") and score lines are fine
            gxe.ExpectColumnValuesToBeBetween(column="mean_letter_share", min_value=v.min_letter_share),
        ], index_column="split", coverage=f"counts streamed over all {total:,} lines; duplicate share "
           + ("exact" if duplicates.exact else "estimated from a hash-range sample of the lines")))
    return suites


# --- token shards (every pipeline) -----------------------------------------------------------------

def token_suites(params: Params, paths) -> list[Suite]:
    """Shard suites: every file's size and token count against the manifest, ids below the
    vocabulary (counted by a streaming pass over every shard), the tokenizer's vocabulary and hash;
    plus the ids of a seeded sample of positions, for row-level reports."""
    import numpy as np
    import pandas as pd

    from barkgpt.data.shards import TokenStream, read_manifest
    from barkgpt.tokenizer import load_tokenizer, tokenizer_hash

    _, gxe = _gx()
    name = paths.pipeline
    if not paths.tokenizer.exists():
        raise BarkError(f"{paths.tokenizer}: not found; run the tokenizer stage first "
                        f"({'barkgpt webtext-tokenizer' if name == 'webtext' else f'barkgpt tokenize {name}'})")
    tok = load_tokenizer(paths.tokenizer)
    expected_hash, redo = tokenizer_hash(tok), f"run barkgpt tokenize {name}"
    suites, splits, files = [], [], []
    for split in ("train", "val"):
        manifest_file = paths.token_manifest(split)
        manifest = read_manifest(manifest_file, redo)
        dtype = np.dtype(manifest["dtype"])
        parts, names, split_tokens, flagged = [], [], 0, []
        for entry in manifest["files"]:
            path = manifest_file.parent / entry["name"]
            size = path.stat().st_size if path.exists() else 0
            ids = np.memmap(path, dtype=dtype, mode="r", shape=(size // dtype.itemsize,)) if size >= dtype.itemsize \
                else np.zeros(0, dtype=dtype)
            out_of_vocab = 0
            for i in range(0, len(ids), 2**24):  # chunked: bounded memory whatever the shard size
                bad = np.flatnonzero(ids[i : i + 2**24] >= tok.vocab_size)
                out_of_vocab += len(bad)
                flagged.extend((split_tokens + i + bad[: FLAGGED_ROWS_KEPT - len(flagged)]).tolist())
            files.append({"file": f"{split}/{entry['name']}", "exists": path.exists(), "bytes_remainder": size % dtype.itemsize,
                          "file_tokens": int(ids.size), "manifest_tokens": entry["tokens"], "out_of_vocab": out_of_vocab})
            parts.append(ids)
            names.append(entry["name"])
            split_tokens += int(ids.size)
        splits.append({"split": split, "file_tokens": split_tokens, "manifest_tokens": manifest["tokens"],
                       "manifest_vocab_size": manifest["vocab_size"], "tokenizer_vocab_size": tok.vocab_size,
                       "manifest_hash": manifest.get("tokenizer_hash"), "tokenizer_hash": expected_hash})
        stream = TokenStream(parts, names)
        n, k = len(stream), getattr(getattr(params, name).validation, "sample_rows", SAMPLE_ROWS)
        if n <= k:
            positions = np.arange(n)
        else:  # a seeded sample, plus every position the streaming pass flagged (first FLAGGED_ROWS_KEPT)
            sampled = np.random.default_rng(params.seed).choice(n, k, replace=False)
            positions = np.unique(np.concatenate([sampled, np.array(flagged, dtype=np.int64)]))
        ids = np.asarray(stream, np.int64) if n <= k else np.array([stream[int(i)] for i in positions], np.int64)
        suites.append(Suite(f"{name}.{split}.token_ids", pd.DataFrame({"position": positions, "id": ids}), [
            gxe.ExpectColumnValuesToBeBetween(column="id", min_value=0, max_value=tok.vocab_size - 1),
        ], index_column="position",
            coverage="every token" if n <= k else f"{len(positions):,} of {n:,} token positions: a seeded "
            f"sample plus every position the streaming pass flagged (first {FLAGGED_ROWS_KEPT})"))
    suites.append(Suite(f"{name}.shards.files", pd.DataFrame(files), [
        gxe.ExpectColumnValuesToBeInSet(column="exists", value_set=[True]),
        gxe.ExpectColumnValuesToBeBetween(column="bytes_remainder", min_value=0, max_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="file_tokens", min_value=1),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="file_tokens", column_B="manifest_tokens"),
        gxe.ExpectColumnValuesToBeBetween(column="out_of_vocab", min_value=0, max_value=0),
    ], index_column="file", coverage="counts streamed over every shard file"))
    suites.append(Suite(f"{name}.shards.manifest", pd.DataFrame(splits), [
        gxe.ExpectColumnPairValuesToBeEqual(column_A="file_tokens", column_B="manifest_tokens"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="manifest_vocab_size", column_B="tokenizer_vocab_size"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="manifest_hash", column_B="tokenizer_hash"),
    ], index_column="split"))
    return suites


SUITE_BUILDERS: dict[str, Callable[[Params, object], list[Suite]]] = {
    "bark": bark_suites, "webtext": webtext_suites}
# Suites over token shards, run after the tokenize stage (`barkgpt validate <pipeline> --tokens`).
TOKEN_SUITE_BUILDERS: dict[str, Callable[[Params, object], list[Suite]]] = {"bark": token_suites, "webtext": token_suites}


# --- running suites -----------------------------------------------------------------------------

def gx_context():
    """An in-memory GX context: nothing is written outside the reports we render ourselves."""
    gx, _ = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # quiet stage logs
    return context


def run_suite(suite: Suite, context=None) -> dict:
    """Run one suite; return a plain-dict summary of each expectation (JSON for reports)."""
    gx, _ = _gx()
    context = context or gx_context()
    source = context.data_sources.add_pandas(suite.name)
    batch = source.add_dataframe_asset("frame").add_batch_definition_whole_dataframe("all") \
        .get_batch(batch_parameters={"dataframe": suite.frame})
    gx_suite = context.suites.add(gx.ExpectationSuite(name=suite.name))
    for expectation in suite.expectations:
        gx_suite.add_expectation(expectation)
    result = batch.validate(gx_suite, result_format={
        "result_format": "COMPLETE", "unexpected_index_column_names": [suite.index_column],
        "return_unexpected_index_query": False,
    })
    checks = []
    for r in result.results:
        cfg, res = r.expectation_config, r.result or {}
        rows = [_plain(row.get(suite.index_column) if isinstance(row, dict) else row)
                for row in (res.get("unexpected_index_list") or [])]
        rows = sorted(set(rows), key=rows.index)
        checks.append({
            "expectation": cfg.type,
            # a pair expectation (column_A, column_B) is named by both columns
            "column": cfg.kwargs.get("column") or ",".join(
                str(cfg.kwargs[k]) for k in ("column_A", "column_B") if cfg.kwargs.get(k)) or None,
            "kwargs": {k: v for k, v in cfg.kwargs.items() if k not in ("column", "batch_id")},
            "success": bool(r.success),
            "element_count": res.get("element_count"),
            "unexpected_count": _plain(res.get("unexpected_count", 0 if r.success else None)),
            "unexpected_rows": rows[:100],
            "unexpected_values": [_short(v) for v in (res.get("partial_unexpected_list") or [])[:MAX_ROWS_SHOWN]],
            "exception": (r.exception_info or {}).get("exception_message")
            if isinstance(r.exception_info, dict) and r.exception_info.get("raised_exception") else None,
        })
    return {"suite": suite.name, "index_column": suite.index_column, "rows": len(suite.frame),
            "coverage": suite.coverage, "success": bool(result.success), "checks": checks}


def _plain(value):
    """numpy scalars -> Python numbers, so the report is JSON."""
    return value.item() if hasattr(value, "item") else value


def _short(value, limit: int = 120):
    value = _plain(value)
    if value is None or (isinstance(value, float) and value != value):
        return "<empty row>"
    text = value if isinstance(value, (int, float)) or value is None else str(value)
    return text[:limit] + "..." if isinstance(text, str) and len(text) > limit else text


def validate_pipeline(params: Params, name: str, paths, tokens: bool = False) -> dict:
    """Text suites (or, with tokens=True, token-shard suites, reported as validation_tokens.*)."""
    builders = TOKEN_SUITE_BUILDERS if tokens else SUITE_BUILDERS
    builder = builders.get(name)
    if builder is None:
        raise BarkError(f"no {'token ' if tokens else ''}validation suites for pipeline {name!r}; "
                        f"known: {sorted(builders)}")
    context = gx_context()
    results = [run_suite(s, context) for s in builder(params, paths)]
    report = {"pipeline": name, "success": all(r["success"] for r in results),
              "expectations": sum(len(r["checks"]) for r in results),
              "failed": sum(not c["success"] for r in results for c in r["checks"]),
              "suites": results}
    json_path = paths.token_validation_report if tokens else paths.validation_report
    html_path = paths.token_validation_html if tokens else paths.validation_html
    write_json(json_path, report)
    write_text(html_path, render_html(report))
    if not report["success"]:
        raise BarkError(failure_message(report, html_path, tokens))
    return report


def failure_message(report: dict, html_path: Path, tokens: bool = False) -> str:
    lines = [f"data validation failed for pipeline {report['pipeline']!r} "
             f"({report['failed']} of {report['expectations']} expectations):"]
    for suite in report["suites"]:
        for c in suite["checks"]:
            if c["success"]:
                continue
            where = ""
            if c["unexpected_rows"]:
                shown = ", ".join(map(str, c["unexpected_rows"][:MAX_ROWS_SHOWN]))
                more = len(c["unexpected_rows"]) > MAX_ROWS_SHOWN
                where = f"; {suite['index_column']} {shown}{', ...' if more else ''}"
            detail = f" ({c['exception']})" if c["exception"] else ""
            values = f"; e.g. {c['unexpected_values'][:3]}" if c["unexpected_values"] else ""
            lines.append(f"  {suite['suite']}: {c['expectation']}({c['column']}) failed{detail}"
                         f"{where}{values}")
    redo = {"bark": "barkgpt bark-data", "webtext": "barkgpt webtext-ingest"}.get(report["pipeline"], "dvc repro")
    if tokens:
        redo = f"barkgpt tokenize {report['pipeline']}"
    lines.append(f"fix or regenerate the data ({redo}); full report: {html_path}")
    return "\n".join(lines)


def render_html(report: dict) -> str:
    """A self-contained page: one table per suite, failures first in red with their rows."""
    e = html.escape
    status = "passed" if report["success"] else "FAILED"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>BarkGPT data validation: {e(report['pipeline'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        ".ok{background:#e8f5e9}.bad{background:#ffebee}code{font-size:90%}</style></head><body>",
        f"<h1>Data validation: {e(report['pipeline'])} &mdash; {status}</h1>",
        f"<p>{report['expectations'] - report['failed']} of {report['expectations']} expectations passed "
        "(Great Expectations).</p>",
    ]
    for suite in report["suites"]:
        parts.append(f"<h2>{e(suite['suite'])} ({suite['rows']} rows) &mdash; "
                     f"{'passed' if suite['success'] else 'FAILED'}</h2>")
        parts.append(f"<p>Checked: {e(suite.get('coverage', 'every row'))}.</p>")
        parts.append(f"<table><tr><th>expectation</th><th>column</th><th>arguments</th><th>result</th>"
                     f"<th>unexpected</th><th>offending {e(suite['index_column'])}</th><th>examples</th></tr>")
        for c in sorted(suite["checks"], key=lambda c: c["success"]):
            args = ", ".join(f"{k}={_short(v)!r}" for k, v in c["kwargs"].items() if v is not None)
            parts.append(
                f"<tr class='{'ok' if c['success'] else 'bad'}'><td>{e(c['expectation'])}</td>"
                f"<td>{e(str(c['column']))}</td><td><code>{e(args)}</code></td>"
                f"<td>{'pass' if c['success'] else 'FAIL'}</td><td>{c['unexpected_count']}</td>"
                f"<td>{e(', '.join(map(str, c['unexpected_rows'][:50])))}</td>"
                f"<td>{e('; '.join(map(str, c['unexpected_values'][:5])))}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
