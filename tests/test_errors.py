"""Bad input ends with one clear message and exit 2, never a traceback (the newcomer's table:
scripts/bad_inputs.py prints it for 30 inputs)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from barkgpt.errors import BarkError
from tests.conftest import ROOT, make_project


def barkgpt(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "barkgpt", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"})


def assert_clear(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 2, out.stdout[-1000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr and out.stderr.startswith("error: "), out.stderr[-2000:]
    for w in words:
        assert w in out.stderr, out.stderr


def test_version():
    out = barkgpt(["--version"], ROOT)
    from barkgpt import __version__

    assert out.returncode == 0 and out.stdout.startswith(f"barkgpt {__version__} (torch 2.13.0")


@pytest.mark.parametrize("content, words", [
    (b"[]", ["holds a JSON list", "barkgpt tokenize bark"]),
    (b"{}", ["unknown tokenizer kind", "barkgpt tokenize bark"]),
    (b'{"kind": "word"}', ["not a valid 'word' tokenizer", "barkgpt tokenize bark"]),
    (b"woof", ["not a tokenizer JSON file"]),
])
def test_broken_tokenizer_file_is_named_with_the_fix(tmp_path, content, words):
    root = make_project(tmp_path)
    tok = root / "data/bark/tokenizer.json"
    tok.parent.mkdir(parents=True)
    tok.write_bytes(content)
    assert_clear(barkgpt(["train", "bark"], root), "data/bark/tokenizer.json", *words)


@pytest.mark.parametrize("overrides, words", [
    ({"bark": {"model": {"n_embd": 100000000}}}, ["bark.model.n_embd", "less than or equal to 4096"]),
    ({"bark": {"train": {"batch_size": 10**9}}}, ["bark.train.batch_size", "4096"]),
    ({"bark": {"train": {"threads": 100000}}}, ["bark.train.threads", "256"]),
    ({"bark": {"train": {"learning_rate": float("inf")}}}, ["bark.train.learning_rate", "finite"]),
    ({"serve": {"threads": 100000}}, ["serve.threads"]),
    # each size within its bound, together far past the machine: refused before any allocation
    ({"bark": {"model": {"n_layer": 64, "n_embd": 4096, "n_head": 32}}}, ["GiB of memory", "bark.train.batch_size"]),
])
def test_sizes_past_sane_maxima_are_refused(tmp_path, overrides, words):
    root = make_project(tmp_path, overrides)
    tok = root / "data/bark/tokenizer.json"
    tok.parent.mkdir(parents=True)
    from barkgpt.tokenizer import WordTokenizer, save_tokenizer

    save_tokenizer(WordTokenizer(), tok)
    assert_clear(barkgpt(["train", "bark"], root), *words)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (needs root, as in CI): a real full disk, not a simulated one."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_full_says_so_and_where(tiny_disk):
    root = make_project(tiny_disk / "project", {"bark": {"data": {"train_conversations": 20000}}})
    out = barkgpt(["data", "bark"], root)
    assert_clear(out, "disk full", "data/bark/train.txt", str(tiny_disk))
    assert not list((root / "data/bark").glob(".*.tmp"))  # no half-written temp file left behind


def test_disk_full_inside_a_library_write(tiny_disk):
    """torch.save reports a short write in its own words ("... requested and ... written")."""
    import torch

    from barkgpt.fileio import atomic_path

    with pytest.raises(BarkError, match="disk full: could not write .*big.pt"):
        with atomic_path(tiny_disk / "big.pt") as tmp:
            torch.save({"w": torch.zeros(100_000)}, tmp)
    assert list(tiny_disk.iterdir()) == []


def test_a_broken_mlflow_store_is_named_with_the_fix(tmp_path):
    """A store that cannot be opened (here: tables of nothing MLflow made, as a first run killed
    mid-migration by an older BarkGPT left it) stops training before it starts, with the fix."""
    import sqlite3

    root = make_project(tmp_path / "project", {"bark": {"data": {"train_conversations": 100, "val_conversations": 20},
                                                        "train": {"max_steps": 5}}})
    for cmd in (["data", "bark"], ["tokenize", "bark"]):
        assert barkgpt(cmd, root).returncode == 0
    with sqlite3.connect(root / "mlflow.db") as db:
        db.execute("CREATE TABLE experiments (name TEXT)")
    out = barkgpt(["train", "bark", "--quiet"], root)
    assert_clear(out, f"MLflow store {root / 'mlflow.db'} cannot be opened", f"mv {root / 'mlflow.db'}")
    assert not (root / "models" / "bark").exists()
