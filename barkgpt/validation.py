"""Data validation with Great Expectations: expectation suites over a pipeline's data, before training.

A suite is a pandas frame plus GX expectations plus the column that names an offending row
(`line`, 1-based in the text file). `validate_pipeline` runs the suites a pipeline declares (a
builder function `(params, layout) -> list[Suite]`, see barkgpt/pipelines/), writes
`reports/<pipeline>/validation.json` and a readable `validation.html`, and raises BarkError
listing each failed expectation with its offending rows.
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
            raise BarkError(f"{path}: not found; run the data stage first (barkgpt data bark, or dvc repro)")
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

def letter_share(line: str) -> float:
    """Letters over non-space characters: prose is mostly letters; markup, tables and numbers are not."""
    chars = [c for c in line if not c.isspace()]
    return sum(c.isalpha() for c in chars) / len(chars) if chars else 0.0


def read_text_rows(path: Path) -> list[tuple[str, bool]]:
    """(text, valid UTF-8) per line. Decoded line by line so one bad line is reported, not fatal."""
    raw = path.read_bytes().split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()  # the final newline ends the last row
    rows = []
    for line in raw:
        try:
            rows.append((line.decode("utf-8"), True))
        except UnicodeDecodeError:
            rows.append((line.decode("utf-8", errors="replace"), False))
    return rows


def webtext_suites(params: Params, paths) -> list[Suite]:
    """Text suites per split: what the ingest stage promises and what the tokenizer and model need."""
    import pandas as pd

    _, gxe = _gx()
    cfg = getattr(params, paths.pipeline)  # any text pipeline's section (webtext, localtext, ...)
    clean, v = cfg.clean, cfg.validation
    suites = []
    for split, path in (("train", paths.train_text), ("val", paths.val_text)):
        if not path.exists():
            raise BarkError(f"{path}: not found; run the ingest stage first (barkgpt ingest {paths.pipeline})")
        rows = read_text_rows(path)
        frame = pd.DataFrame({
            "line": range(1, len(rows) + 1),
            "text": [text if text.strip() else None for text, _ in rows],
            "chars": [len(text) for text, _ in rows],
            "valid_utf8": [ok for _, ok in rows],
            "letter_share": [letter_share(text) for text, _ in rows],
        })
        suites.append(Suite(f"{paths.pipeline}.{split}.text", frame, [
            gxe.ExpectColumnValuesToNotBeNull(column="text"),
            gxe.ExpectColumnValuesToBeInSet(column="valid_utf8", value_set=[True]),
            gxe.ExpectColumnValuesToBeBetween(column="chars", min_value=clean.min_line_chars,
                                              max_value=clean.max_line_chars),
            # unique share >= 1 - max duplicate rate (ingest deduplicates, so this is normally 1.0)
            gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(column="text",
                                                                min_value=1.0 - v.max_duplicate_rate),
            # over the corpus, not per line: headings ("= = Reception = =") and score lines are fine
            gxe.ExpectColumnMeanToBeBetween(column="letter_share", min_value=v.min_letter_share),
        ]))
    return suites


def webtext_token_suites(params: Params, paths) -> list[Suite]:
    """Shard suites: ids below the vocabulary, counts matching the manifest, the tokenizer's hash."""
    import numpy as np
    import pandas as pd

    from barkgpt.data.shards import manifest_path
    from barkgpt.fileio import read_json
    from barkgpt.tokenizer import load_tokenizer, tokenizer_hash

    _, gxe = _gx()
    if not paths.tokenizer.exists():
        raise BarkError(f"{paths.tokenizer}: not found; run the tokenizer stage first "
                        f"(barkgpt tokenizer {paths.pipeline})")
    tok = load_tokenizer(paths.tokenizer)
    expected_hash = tokenizer_hash(tok)
    suites, manifests = [], []
    for split in ("train", "val"):
        shard = paths.shard(split)
        if not shard.exists() or not manifest_path(shard).exists():
            raise BarkError(f"{shard}: token shard or its manifest is missing; run barkgpt tokenize {paths.pipeline}")
        manifest = read_json(manifest_path(shard))
        ids = np.fromfile(shard, dtype=np.dtype(manifest["dtype"]))  # not load_shard: it stops at a bad count
        manifests.append({"split": split, "file_tokens": int(ids.size), "manifest_tokens": manifest["tokens"],
                          "manifest_vocab_size": manifest["vocab_size"], "tokenizer_vocab_size": tok.vocab_size,
                          "manifest_hash": manifest.get("tokenizer_hash"), "tokenizer_hash": expected_hash})
        frame = pd.DataFrame({"position": np.arange(ids.size), "id": ids.astype(np.int64)})
        suites.append(Suite(f"{paths.pipeline}.{split}.token_ids", frame, [
            gxe.ExpectColumnValuesToBeBetween(column="id", min_value=0, max_value=tok.vocab_size - 1),
        ], index_column="position"))
    suites.append(Suite(f"{paths.pipeline}.shards.manifest", pd.DataFrame(manifests), [
        gxe.ExpectColumnPairValuesToBeEqual(column_A="file_tokens", column_B="manifest_tokens"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="manifest_vocab_size", column_B="tokenizer_vocab_size"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="manifest_hash", column_B="tokenizer_hash"),
    ], index_column="split"))
    return suites


SuiteBuilder = Callable[[Params, object], list[Suite]]  # (params, layout) -> suites; a pipeline declares its own


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
            "success": bool(result.success), "checks": checks}


def _plain(value):
    """numpy scalars -> Python numbers, so the report is JSON."""
    return value.item() if hasattr(value, "item") else value


def _short(value, limit: int = 120):
    value = _plain(value)
    if value is None or (isinstance(value, float) and value != value):
        return "<empty row>"
    text = value if isinstance(value, (int, float)) or value is None else str(value)
    return text[:limit] + "..." if isinstance(text, str) and len(text) > limit else text


def validate_pipeline(params: Params, paths, builder: SuiteBuilder, tokens: bool = False,
                      redo: str = "dvc repro") -> dict:
    """Run the suites `builder` makes (text, or with tokens=True the token shards, reported as
    validation_tokens.*); BarkError naming each failed expectation and its rows. `redo` is the
    command that regenerates the data, for the message."""
    name = paths.pipeline
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
        raise BarkError(failure_message(report, html_path, redo))
    return report


def failure_message(report: dict, html_path: Path, redo: str) -> str:
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
