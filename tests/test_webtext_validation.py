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

from barkgpt.pipelines import run_stage
from barkgpt.data.shards import manifest_path
from barkgpt.errors import BarkError
from barkgpt.params import load_params

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
            "expect_column_proportion_of_unique_values_to_be_between",
            "expect_column_mean_to_be_between"} <= names
    saved = json.loads((project / "reports/webtext/validation.json").read_text())
    assert saved["success"] and (project / "reports/webtext/validation.html").exists()
    tokens = run_stage(params, "webtext", "validate-tokens", project)
    assert tokens["success"] and tokens["expectations"] == 5
    assert json.loads((project / "reports/webtext/validation_tokens.json").read_text())["success"]


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
    assert "webtext.train.text: expect_column_proportion_of_unique_values_to_be_between(text) failed" in msg
    assert "webtext.val.text: expect_column_mean_to_be_between(letter_share) failed" in msg
    raised = load_params(project / "params.yaml", {"webtext": {"validation": {
        "max_duplicate_rate": 0.1, "min_letter_share": 0.0}}})
    assert run_stage(raised, "webtext", "validate", project)["success"]  # the thresholds are the params


def test_shard_with_wrong_count_or_id_fails(project):
    params = load_params(project / "params.yaml")
    shard = project / "data/webtext/tokens/val.bin"
    manifest = json.loads(manifest_path(shard).read_text())
    manifest_path(shard).write_text(json.dumps({**manifest, "tokens": manifest["tokens"] + 1}))
    ids = np.fromfile(project / "data/webtext/tokens/train.bin", dtype=manifest["dtype"])
    ids[[10, 42]] = 300  # == vocab size: out of range
    ids.tofile(project / "data/webtext/tokens/train.bin")
    with pytest.raises(BarkError) as err:
        run_stage(params, "webtext", "validate-tokens", project)
    msg = str(err.value)
    assert "webtext.train.token_ids: expect_column_values_to_be_between(id) failed; position 10, 42" in msg
    assert "webtext.shards.manifest: expect_column_pair_values_to_be_equal(file_tokens,manifest_tokens) failed; split val" in msg
    assert "barkgpt tokenize webtext" in msg
    assert (project / "reports/webtext/validation_tokens.json").exists()


def test_shard_from_another_tokenizer_fails(project):
    shard = project / "data/webtext/tokens/train.bin"
    manifest = json.loads(manifest_path(shard).read_text())
    manifest_path(shard).write_text(json.dumps({**manifest, "tokenizer_hash": "0" * 64}))
    with pytest.raises(BarkError, match=r"to_be_equal\(manifest_hash,tokenizer_hash\) failed; split train"):
        run_stage(load_params(project / "params.yaml"), "webtext", "validate-tokens", project)


def test_cli_validate_webtext_exits_2_on_bad_data(project):
    def validate(command="validate"):
        return subprocess.run([sys.executable, "-m", "barkgpt", command, "webtext"], cwd=project,
                              capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})

    ok = validate("validate-tokens")
    assert ok.returncode == 0 and "all 5 expectations passed" in ok.stdout and "validation_tokens.html" in ok.stdout
    (project / "data/webtext/val.txt").write_bytes(b"fine line\n\xff\xfe\n")
    bad = validate()
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "webtext.val.text: expect_column_values_to_be_in_set(valid_utf8) failed; line 2" in bad.stderr
