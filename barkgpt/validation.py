"""Data validation with Great Expectations: expectation suites over a pipeline's data, before training.

A suite is a pandas frame plus GX expectations plus the column that names an offending row
(`line`, 1-based in the text file). `validate_pipeline` runs the suites a pipeline declares (a
builder function `(params, layout) -> list[Suite]`, see barkgpt/pipelines/), writes
`reports/<pipeline>/validation.json` and GX's own Data Docs (`reports/<pipeline>/validation/`, one
page per suite), and raises BarkError listing each failed expectation with its offending rows.
GX runs in an ephemeral (in-memory) context with usage analytics off: nothing leaves the machine.
(Data Docs pages load their styles from CDNs; offline they are unstyled but complete, while the
index's table needs those scripts, so the report and the error name each suite's page itself.)
"""
from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from barkgpt.errors import BarkError
from barkgpt.fileio import write_json
from barkgpt.params import BARKS, SharedParams
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


def bark_suites(params: SharedParams, paths) -> list[Suite]:
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


def webtext_suites(params: SharedParams, paths) -> list[Suite]:
    """Text suites per split: what webtext-ingest promises and what the tokenizer and model need.

    One streaming pass per split: row-level checks (not empty, valid UTF-8, length) run on a seeded
    sample of at most `validation.sample_rows` lines plus every line the pass flagged (up to
    FLAGGED_ROWS_KEPT per rule); the duplicate share and the mean letter share stream over every
    line. Each suite's `coverage` says which."""
    import random

    import pandas as pd

    _, gxe = _gx()
    cfg = getattr(params, paths.pipeline)  # any text pipeline's section (webtext, localtext, ...)
    clean, v = cfg.clean, cfg.validation
    suites = []
    for split, path in (("train", paths.train_text), ("val", paths.val_text)):
        if not path.exists():
            raise BarkError(f"{path}: not found; run the ingest stage first (barkgpt ingest {paths.pipeline})")
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
        suites.append(Suite(f"{paths.pipeline}.{split}.text", frame, [
            gxe.ExpectColumnValuesToNotBeNull(column="text"),
            gxe.ExpectColumnValuesToBeInSet(column="valid_utf8", value_set=[True]),
            gxe.ExpectColumnValuesToBeBetween(column="chars", min_value=clean.min_line_chars,
                                              max_value=clean.max_line_chars),
        ], coverage=coverage))
        stats = pd.DataFrame({"split": [split], "lines": [total],
                              "duplicate_share": [duplicates.share()],
                              "mean_letter_share": [letters / max(total, 1)]})
        suites.append(Suite(f"{paths.pipeline}.{split}.stats", stats, [
            # ingest deduplicates, so the share is normally 0.0
            gxe.ExpectColumnValuesToBeBetween(column="duplicate_share", min_value=0.0, max_value=v.max_duplicate_rate),
            # over the corpus, not per line: headings ("= = Reception = =") and score lines are fine
            gxe.ExpectColumnValuesToBeBetween(column="mean_letter_share", min_value=v.min_letter_share),
        ], index_column="split", coverage=f"counts streamed over all {total:,} lines; duplicate share "
           + ("exact" if duplicates.exact else "estimated from a hash-range sample of the lines")))
    return suites


# --- token shards (every pipeline) -----------------------------------------------------------------

def token_suites(params: SharedParams, paths) -> list[Suite]:
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
                        f"(barkgpt {'tokenize' if name == 'bark' else 'tokenizer'} {name})")
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


SuiteBuilder = Callable[[SharedParams, object], list[Suite]]  # (params, layout) -> suites; a pipeline declares its own


# --- running suites -----------------------------------------------------------------------------

DOCS_SITE = "barkgpt"


def gx_context(docs: Path | None = None):
    """An in-memory GX context; with `docs`, its one Data Docs site is that folder."""
    gx, _ = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # quiet stage logs
    for site in list(context.get_site_names()):  # the default site writes to a temporary folder
        context.delete_data_docs_site(site)
    if docs is not None:
        context.add_data_docs_site(DOCS_SITE, {
            "class_name": "SiteBuilder", "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
    return context


def run_suite(suite: Suite, context) -> dict:
    """Run one suite (its result kept in the context for Data Docs); return a plain-dict summary of
    each expectation (JSON for reports)."""
    gx, _ = _gx()
    source = context.data_sources.add_pandas(suite.name)
    batch = source.add_dataframe_asset("frame").add_batch_definition_whole_dataframe("all")
    gx_suite = context.suites.add(gx.ExpectationSuite(name=suite.name))
    for expectation in suite.expectations:
        gx_suite.add_expectation(expectation)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=suite.name, data=batch,
                                                                            suite=gx_suite))
    result = definition.run(batch_parameters={"dataframe": suite.frame}, result_format={
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
    import numpy as np

    return value.item() if isinstance(value, np.generic) else value


def _short(value, limit: int = 120):
    value = _plain(value)
    if value is None or (isinstance(value, float) and value != value):
        return "<empty row>"
    text = value if isinstance(value, (int, float)) or value is None else str(value)
    return text[:limit] + "..." if isinstance(text, str) and len(text) > limit else text


RUN_TIME = re.compile(r"\d{8}T\d{6}\.\d+Z")  # GX's run-time folder names


def stable_page_paths(docs: Path) -> None:
    """GX files each result page under its run time (validations/<suite>/<run>/<20261202T152209.6Z>/);
    the folder holds one run, so that folder becomes `latest` and the links follow. The report's
    page paths then depend on the data alone: a stage run again on the same data (a forced DVC
    experiment) writes the same validation.json, and no hash column appears in `dvc exp show`.
    The pages still show when they ran."""
    stamped = {d for d in (docs / "validations").rglob("*") if d.is_dir() and RUN_TIME.fullmatch(d.name)}
    for d in stamped:
        d.rename(d.with_name("latest"))
    for page in docs.rglob("*.html"):
        text = page.read_text()
        new = text
        for d in {d.name for d in stamped}:
            new = new.replace(f"/{d}/", "/latest/")
        if new != text:
            page.write_text(new)


def validate_pipeline(params: SharedParams, paths, builder: SuiteBuilder, tokens: bool = False,
                      redo: str = "dvc repro") -> dict:
    """Run the suites `builder` makes (text, or with tokens=True the token shards, reported as
    validation_tokens*): the JSON report and GX's Data Docs (one page per suite; `page` in the
    report names it); BarkError naming each failed expectation and its rows. `redo` is the command
    that regenerates the data, for the message."""
    name = paths.pipeline
    docs = paths.token_validation_docs if tokens else paths.validation_docs
    suites = builder(params, paths)
    building = docs.with_name(f".{docs.name}.building")  # then swapped in: only this run's pages, whole
    shutil.rmtree(building, ignore_errors=True)
    context = gx_context(building)
    results = [run_suite(s, context) for s in suites]
    context.build_data_docs(site_names=[DOCS_SITE])
    stable_page_paths(building)
    shutil.rmtree(docs, ignore_errors=True)
    building.rename(docs)
    for r in results:
        pages = sorted((docs / "validations" / r["suite"].replace(".", "/")).rglob("*.html"))
        r["page"] = str(pages[-1]) if pages else None
    report = {"pipeline": name, "success": all(r["success"] for r in results),
              "expectations": sum(len(r["checks"]) for r in results),
              "failed": sum(not c["success"] for r in results for c in r["checks"]),
              "data_docs": str(docs / "index.html"), "suites": results}
    write_json(paths.token_validation_report if tokens else paths.validation_report, report)
    if not report["success"]:
        raise BarkError(failure_message(report, redo))
    return report


def failure_message(report: dict, redo: str) -> str:
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
    failed = next(s["page"] for s in report["suites"] if not s["success"])
    lines.append(f"fix or regenerate the data ({redo}); the failed suite's page: {failed} "
                 f"(all: {report['data_docs']})")
    return "\n".join(lines)
