"""Great Expectations suites for the WebText-2 pipeline: the text splits after ingestion and the
token shards after tokenization. Real WikiText-2 passes; corrupted files fail with line numbers."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from barkgpt.config import load_params
from barkgpt.errors import BarkError
from barkgpt.pipelines import run_stage

from conftest import ROOT, make_project


@pytest.fixture(scope="module")
def tokenized(wikitext_path, tmp_path_factory) -> Path:
    """Ingested and tokenized (small BPE) wikitext; validated once here, copied by each test."""
    root = make_project(tmp_path_factory.mktemp("webtext_gx"), {
        "webtext": {"source": str(wikitext_path), "tokenizer": {"vocab_size": 300}}})
    params = load_params(root / "params.yaml")
    run_stage(params, "webtext", "ingest", root)
    run_stage(params, "webtext", "tokenizer", root)
    run_stage(params, "webtext", "tokenize", root)
    return root


@pytest.fixture
def project(tokenized, tmp_path) -> Path:
    root = tmp_path / "p"
    shutil.copytree(tokenized, root)
    return root


def test_wikitext_passes_text_and_token_suites(project):
    params = load_params(project / "params.yaml")
    report = run_stage(params, "webtext", "validate", project)
    assert report["success"] and report["failed"] == 0 and report["expectations"] == 10
    names = {c["expectation"] for s in report["suites"] for c in s["checks"]}
    assert {"expect_column_values_to_not_be_null", "expect_column_values_to_be_between",
            "expect_column_values_to_be_in_set"} <= names
    coverage = {s["suite"]: s["coverage"] for s in report["suites"]}
    assert coverage["webtext.val.text"] == "every line"  # fewer lines than validation.sample_rows
    assert coverage["webtext.train.stats"].startswith("counts streamed over all") and "exact" in coverage["webtext.train.stats"]
    saved = json.loads((project / "reports/webtext/validation.json").read_text())
    assert saved["success"] and (project / "reports/webtext/validation/index.html").exists()
    assert all(Path(s["page"]).exists() for s in saved["suites"])  # GX's Data Docs page per suite
    tokens = run_stage(params, "webtext", "validate-tokens", project)
    assert tokens["success"] and tokens["expectations"] == 10
    assert json.loads((project / "reports/webtext/validation_tokens.json").read_text())["success"]


def test_row_checks_run_on_a_bounded_sample_plus_every_flagged_line(project):
    """With sample_rows 100, the text suite sees 100 sampled lines plus the broken ones, wherever they are."""
    train = project / "data/webtext/train.txt"
    lines = train.read_bytes().split(b"\n")[:-1]
    empty, broken = len(lines) // 2, len(lines) - 3  # 0-based; reported 1-based
    lines[empty] = b""
    lines[broken] = b"\xff broken"
    train.write_bytes(b"\n".join(lines) + b"\n")
    params = load_params(project / "params.yaml", {"webtext": {"validation": {"sample_rows": 100}}})
    with pytest.raises(BarkError) as err:
        run_stage(params, "webtext", "validate", project)
    assert f"not_be_null(text) failed; line {empty + 1}" in str(err.value)
    assert f"in_set(valid_utf8) failed; line {broken + 1}" in str(err.value)
    suite = next(s for s in json.loads((project / "reports/webtext/validation.json").read_text())["suites"]
                 if s["suite"] == "webtext.train.text")
    assert suite["rows"] == 102 and f"102 of {len(lines):,} lines" in suite["coverage"]


def test_corrupted_text_fails_naming_expectations_and_lines(project):
    train = project / "data/webtext/train.txt"
    lines = train.read_bytes().split(b"\n")[:20]
    lines[2] = b"caf\xc3 broken \xff bytes"  # line 3: not UTF-8
    lines[4] = b""  # line 5: empty
    lines[6] = b"x" * 20001  # line 7: over max_line_chars
    train.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(BarkError) as err:
        run_stage(load_params(project / "params.yaml"), "webtext", "validate", project)
    msg = str(err.value)
    assert "webtext.train.text: expect_column_values_to_be_in_set(valid_utf8) failed; line 3" in msg
    assert "expect_column_values_to_not_be_null(text) failed; line 5" in msg
    assert "expect_column_values_to_be_between(chars) failed; line 5, 7" in msg
    assert "webtext.val" not in msg  # the val split is untouched and passes
    report = json.loads((project / "reports/webtext/validation.json").read_text())
    assert not report["success"] and report["failed"] == 3


def test_duplicates_and_non_prose_fail(project):
    train = project / "data/webtext/train.txt"
    lines = train.read_text(encoding="utf-8").splitlines()[:100]
    train.write_text("\n".join(lines + lines[:5]) + "\n", encoding="utf-8")  # 5 of 105 repeated
    val = project / "data/webtext/val.txt"
    val.write_text("\n".join(f"{i} , {i * 7} . {i % 3}" for i in range(50)) + "\n", encoding="utf-8")
    with pytest.raises(BarkError) as err:
        run_stage(load_params(project / "params.yaml"), "webtext", "validate", project)
    msg = str(err.value)
    assert "webtext.train.stats: expect_column_values_to_be_between(duplicate_share) failed" in msg
    assert "webtext.val.stats: expect_column_values_to_be_between(mean_letter_share) failed" in msg
    raised = load_params(project / "params.yaml", {"webtext": {"validation": {
        "max_duplicate_rate": 0.1, "min_letter_share": 0.0}}})
    assert run_stage(raised, "webtext", "validate", project)["success"]  # the thresholds are the params


def test_shard_with_wrong_count_or_id_fails(project):
    params = load_params(project / "params.yaml")
    tokens = project / "data/webtext/tokens"
    manifest = json.loads((tokens / "val.json").read_text())
    manifest["files"][0]["tokens"] += 1
    (tokens / "val.json").write_text(json.dumps(manifest))
    ids = np.fromfile(tokens / "train-000000.bin", dtype=manifest["dtype"])
    ids[[10, 42]] = 300  # == vocab size: out of range
    ids.tofile(tokens / "train-000000.bin")
    with pytest.raises(BarkError) as err:
        run_stage(params, "webtext", "validate-tokens", project)
    msg = str(err.value)
    assert "webtext.train.token_ids: expect_column_values_to_be_between(id) failed; position 10, 42" in msg
    assert "webtext.shards.files: expect_column_values_to_be_between(out_of_vocab) failed; file train/train-000000.bin" in msg
    assert "webtext.shards.files: expect_column_pair_values_to_be_equal(file_tokens,manifest_tokens) failed; file val/val-000000.bin" in msg
    assert "barkgpt tokenize webtext" in msg
    assert (project / "reports/webtext/validation_tokens.json").exists()


def test_shard_from_another_tokenizer_fails(project):
    manifest_file = project / "data/webtext/tokens/train.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "tokenizer_hash": "0" * 64}))
    with pytest.raises(BarkError, match=r"to_be_equal\(manifest_hash,tokenizer_hash\) failed; split train"):
        run_stage(load_params(project / "params.yaml"), "webtext", "validate-tokens", project)


def test_cli_validate_webtext_exits_2_on_bad_data(project):
    def validate(command="validate"):
        return subprocess.run([sys.executable, "-m", "barkgpt", command, "webtext"], cwd=project,
                              capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "BARKGPT_WARM": "0", "PATH": ""})

    ok = validate("validate-tokens")
    assert ok.returncode == 0 and "all 10 expectations passed" in ok.stdout
    assert "validation_tokens/index.html" in ok.stdout
    (project / "data/webtext/val.txt").write_bytes(b"fine line\n\xff\xfe\n")
    bad = validate()
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "webtext.val.text: expect_column_values_to_be_in_set(valid_utf8) failed; line 2" in bad.stderr
