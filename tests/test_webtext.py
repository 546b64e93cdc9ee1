"""WebText-2 pipeline on real English text (the WikiText-2 sample standing in for WebText-2):
ingestion, the BPE tokenizer, token shards, training measured in bits per byte, bad input."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from barkgpt.cli import build_parser
from barkgpt.config import load_params
from barkgpt.data.shards import load_tokens, write_tokens
from barkgpt.data.webtext import ingest, open_source, split_lines
from barkgpt.errors import BarkError
from barkgpt.fileio import sha256_file
from barkgpt.layout import Layout
from barkgpt.lm.torch_lm import TorchLM
from barkgpt.loss_eval import eval_windows, evaluate_bpb
from barkgpt.params import ModelParams
from barkgpt.pipelines import run_stage
from barkgpt.pipelines import REGISTRY
from barkgpt.stages import encode_split
from barkgpt.tokenizer import ENDOFTEXT, BPETokenizer, load_tokenizer, tokenizer_from_dict, tokenizer_hash, train_bpe

from conftest import ROOT, make_project

TINY = {
    "tokenizer": {"vocab_size": 512},
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "dropout": 0.0},
    "train": {"max_steps": 150, "max_seconds": None, "batch_size": 16, "learning_rate": 0.01, "warmup_steps": 10,
              "eval_every": 50, "eval_batches": 4, "checkpoint_every": 50, "dtype": "float32",
              "threads": 1},  # tiny matrices: a second thread costs more than it gives
    "eval": {"max_new_tokens": 8},
}


def project(folder: Path, source: Path | str, **webtext) -> Path:
    return make_project(folder, {"webtext": {"source": str(source), **TINY, **webtext}})


@pytest.fixture(scope="module")
def webtext_project(wikitext_path, tmp_path_factory) -> Path:
    """The whole webtext pipeline through the stage functions, on a tiny model."""
    root = project(tmp_path_factory.mktemp("webtext"), wikitext_path)
    params = load_params(root / "params.yaml")
    run_stage(params, "webtext", "ingest", root)
    run_stage(params, "webtext", "tokenizer", root)
    run_stage(params, "webtext", "tokenize", root)
    run_stage(params, "webtext", "train", root, progress=False)
    run_stage(params, "webtext", "evaluate", root)
    return root


# --- ingestion ---------------------------------------------------------------------------------

def test_head_split_is_first_90_percent_of_lines(webtext_project, wikitext_path):
    raw = wikitext_path.read_text(encoding="utf-8").splitlines()
    cut = int(len(raw) * 0.9)
    train = (webtext_project / "data/webtext/train.txt").read_text(encoding="utf-8").splitlines()
    val = (webtext_project / "data/webtext/val.txt").read_text(encoding="utf-8").splitlines()
    head = [line.strip() for line in raw[:cut] if line.strip()]
    tail = [line.strip() for line in raw[cut:] if line.strip()]
    assert train == list(dict.fromkeys(head))  # cleaned, deduplicated, in file order
    assert set(val) <= set(tail) and not set(val) & set(train)
    assert all(line == line.strip() and line for line in train + val)
    report = json.loads((webtext_project / "reports/webtext/ingest.json").read_text())
    assert report["train_lines"] == len(train) and report["val_lines"] == len(val)
    assert report["clean_duplicates"] > 0 and report["clean_empty_or_short"] > 0


def test_ingestion_is_deterministic_and_seeded(wikitext_path, tmp_path):
    lines = list(open_source(str(wikitext_path)).lines())
    params = load_params(project(tmp_path, wikitext_path, split={"mode": "random", "seed": 1})
                         / "params.yaml").webtext

    def split(p):
        out = {"train": [], "val": []}
        for name, line in split_lines(iter(lines), len(lines), params.clean, p):
            out[name].append(line)
        return out["train"], out["val"]

    a, b = split(params.split), split(params.split)
    assert a == b
    other = split(params.split.model_copy(update={"seed": 2}))
    assert other[1] != a[1] and sorted(other[0] + other[1]) == sorted(a[0] + a[1])
    kept = len(a[0]) + len(a[1])
    assert abs(len(a[1]) / kept - 0.1) < 3 * math.sqrt(0.1 * 0.9 / kept)  # Bernoulli(0.1) per line: 3 sigma
    # the stage writes byte-identical files when run twice
    root = project(tmp_path / "p", wikitext_path)
    params = load_params(root / "params.yaml")
    run_stage(params, "webtext", "ingest", root)
    first = (root / "data/webtext/val.txt").read_bytes()
    run_stage(params, "webtext", "ingest", root)
    assert (root / "data/webtext/val.txt").read_bytes() == first


def test_streaming_ingest_matches_the_in_memory_rule(tmp_path):
    """Odd line breaks (CRLF, form feed, a final line with no newline) are split as str.splitlines
    splits the whole text, and the head cut is at the source line number."""
    text = "alpha\r\nbeta\n\ngamma\x0cdelta\nalpha\n  epsilon  \nzeta\neta\ntheta\niota"
    source = tmp_path / "odd.txt"
    source.write_bytes(text.encode("utf-8"))
    assert list(open_source(str(source)).lines()) == text.splitlines()
    p = load_params(project(tmp_path / "p", source, split={"mode": "head", "val_fraction": 0.3}) / "params.yaml").webtext
    report = ingest(p, tmp_path / "train.txt", tmp_path / "val.txt")
    raw = text.splitlines()
    cut = int(len(raw) * 0.7)
    head = list(dict.fromkeys(x.strip() for x in raw[:cut] if x.strip()))
    tail = [x.strip() for x in raw[cut:] if x.strip() and x.strip() not in head]
    assert (tmp_path / "train.txt").read_text().splitlines() == head
    assert (tmp_path / "val.txt").read_text().splitlines() == tail
    assert report["source_lines"] == len(raw) and report["clean_duplicates"] == 1


def test_jsonl_parquet_and_folder_sources_read_the_same_text(tmp_path):
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["first line\nsecond line", "third line", "", "fourth line"]
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n")
    pq.write_table(pa.table({"text": texts}), folder / "b.parquet")
    expected = ["first line", "second line", "third line", "fourth line"]

    def read(path, **kw):
        return [x for x in open_source(str(path), **kw).lines() if x]

    assert read(folder / "a.jsonl") == expected
    assert read(folder / "b.parquet") == expected
    assert read(folder) == expected * 2
    with pytest.raises(BarkError, match="no column 'body'"):
        read(folder / "a.jsonl", text_field="body")
    # the stage spools table rows to text for its second pass and cleans them like text
    p = load_params(project(tmp_path / "p", folder, clean={"dedup": False}) / "params.yaml").webtext
    report = ingest(p, tmp_path / "train.txt", tmp_path / "val.txt")
    assert report["source_lines"] == 8 and (report["train_lines"], report["val_lines"]) == (7, 1)
    assert (tmp_path / "train.txt").read_text().splitlines() == expected + expected[:3]
    assert not list(tmp_path.glob(".ingest-*"))  # the spool is gone


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"),
    (b"", "empty"),
    (b"   \n\n  \n", "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    ("caf\u00e9 au lait\n".encode("latin-1"), "not valid UTF-8"),
])
def test_bad_sources_fail_before_any_work(tmp_path, content, problem):
    source = tmp_path / "corpus.txt"
    if content is not None:
        source.write_bytes(content)
    p = load_params(ROOT / "params.yaml").webtext.model_copy(update={"source": str(source)})
    with pytest.raises(BarkError, match=problem) as err:
        ingest(p, tmp_path / "out" / "train.txt", tmp_path / "out" / "val.txt")
    assert str(source) in str(err.value)
    assert not (tmp_path / "out" / "train.txt").exists()


def test_unreachable_hub_fails_fast_with_a_local_file_hint(monkeypatch):
    from barkgpt.data import webtext

    if webtext.hub_reachable(timeout_s=3):
        pytest.skip("the Hugging Face hub is reachable from here; the offline error path cannot be shown")
    import time

    start = time.perf_counter()
    with pytest.raises(BarkError, match="hub is unreachable.*webtext.source"):
        list(open_source("barkgpt-test/no-such-dataset", hub_timeout_s=3).lines())
    assert time.perf_counter() - start < 90  # bounded: the probe is <= 3 s; the rest is importing datasets


def test_cli_error_exit_code_and_pipeline_choices(tmp_path):
    choices = build_parser()._subparsers._group_actions[0].choices["train"]._actions[1].choices
    assert tuple(choices) == tuple(REGISTRY) == ("bark", "webtext", "localtext")
    root = project(tmp_path, tmp_path / "missing.txt")
    run = subprocess.run([sys.executable, "-m", "barkgpt", "--params", str(root / "params.yaml"), "ingest", "webtext"],
                         cwd=root, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "BARKGPT_WARM": "0", "PATH": ""})
    assert run.returncode == 2 and "no such file" in run.stderr and "Traceback" not in run.stderr


# --- tokenizer ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe(webtext_project) -> BPETokenizer:
    return load_tokenizer(webtext_project / "data/webtext/tokenizer.json")


def test_bpe_round_trips_every_line_and_any_text(bpe, wikitext_path):
    for line in wikitext_path.read_text(encoding="utf-8").splitlines():
        assert bpe.decode(bpe.encode(line)) == line
    for text in ["", " ", "héllo wörld ☃ 🐕 中文", "\t\ttabs\r\nand CRLF", ENDOFTEXT, "x" * 5000, "  a  b  "]:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text and all(i != bpe.eos_id for i in ids)


def test_bpe_layout_and_saved_form(bpe, webtext_project):
    assert bpe.kind == "bpe" and bpe.vocab_size == 512 and bpe.eos_id == 511
    assert bpe.special_tokens == {ENDOFTEXT: 511} and bpe.encoding.n_vocab == 512
    assert all(bpe.mergeable_ranks[bytes([b])] == b for b in range(256))
    spec = json.loads((webtext_project / "data/webtext/tokenizer.json").read_text())
    again = tokenizer_from_dict(spec)
    assert again.mergeable_ranks == bpe.mergeable_ranks and again.pattern == bpe.pattern
    report = json.loads((webtext_project / "reports/webtext/tokenizer.json").read_text())
    assert report["tokenizer_hash"] and 1.5 < report["val_bytes_per_token"] < 4


def test_ranks_reproduce_the_trained_merges(wikitext_path):
    """tiktoken with our ranks == the Rust trainer's own BPE == a BPE given the derived merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from barkgpt.tokenizer import bytes_to_unicode

    lines = [x.strip() for x in wikitext_path.read_text(encoding="utf-8").splitlines() if x.strip()]
    train, val = lines[:2000], lines[2000:]
    tok = train_bpe(train, 600)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.train_from_iterator(train, trainers.BpeTrainer(
        vocab_size=599, min_frequency=2, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spell = bytes_to_unicode()
    to_bytes = {ch: b for b, ch in spell.items()}
    trained = [tuple(bytes(to_bytes[c] for c in part) for part in m) for m in json.loads(hf.to_str())["model"]["merges"]]
    assert tok.merges() == trained
    hf_id_to_ours = {i: tok.mergeable_ranks[bytes(to_bytes[c] for c in s)] for s, i in hf.get_vocab().items()}
    for line in val:
        assert [hf_id_to_ours[i] for i in hf.encode(line).ids] == tok.encode(line)


def test_vocab_too_large_for_the_corpus_is_a_clear_error():
    with pytest.raises(BarkError, match="too large for this corpus"):
        train_bpe(["a tiny corpus", "with few pairs"], 4096)


def test_tiktoken_gpt2_option():
    from barkgpt import tokenizer

    if tokenizer._gpt2_cached():
        tok = BPETokenizer.from_tiktoken("gpt2")
        assert tok.vocab_size == 50257 and tok.eos_id == 50256 and tok.decode(tok.encode("Hello world")) == "Hello world"
        assert tok.to_dict() == {"kind": "tiktoken", "name": "gpt2"}
    elif tokenizer._reachable("openaipublic.blob.core.windows.net", timeout=3):
        pytest.skip("gpt2 files not cached but the network is up; not downloading them in a test")
    else:
        with pytest.raises(BarkError, match="not in its cache.*unreachable"):
            BPETokenizer.from_tiktoken("gpt2")


# --- shards ------------------------------------------------------------------------------------

def test_shard_manifest_matches_data_and_tokenizer(webtext_project, bpe):
    paths = Layout("webtext", webtext_project)
    for split in ("train", "val"):
        ids, manifest = load_tokens(paths.token_manifest(split), bpe)
        ids = np.asarray(ids)
        text = paths.data / f"{split}.txt"
        lines = text.read_text(encoding="utf-8").splitlines()
        files = paths.token_shard_files(split)
        assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == bpe.vocab_size
        assert [f["name"] for f in manifest["files"]] == [f.name for f in files]
        assert manifest["tokens"] == ids.size == sum(f.stat().st_size for f in files) // 2
        assert manifest["tokenizer_hash"] == tokenizer_hash(bpe)
        assert manifest["source_sha256"] == sha256_file(text)
        assert manifest["text_bytes"] == text.stat().st_size
        assert int((ids == bpe.eos_id).sum()) == len(lines) and ids[-1] == bpe.eos_id
        assert int(ids.max()) < bpe.vocab_size
    assert bpe.decode_bytes(ids.tolist()).replace(b"<|endoftext|>", b"\n") == text.read_bytes()


def test_parallel_encoding_into_many_shards_equals_one_process(webtext_project, bpe, tmp_path):
    """2 worker processes and 1,000-token shards: the same ids, in the same order, as in-process."""
    paths = Layout("webtext", webtext_project)
    other = Layout("webtext", tmp_path)
    other.data.mkdir(parents=True)
    (other.data / "val.txt").write_bytes(paths.val_text.read_bytes())
    manifest = encode_split(other, "val", bpe, True, workers=2, shard_tokens=1000)
    assert len(manifest["files"]) == -(-manifest["tokens"] // 1000) > 3
    assert all(f["tokens"] == 1000 for f in manifest["files"][:-1])
    many, _ = load_tokens(other.token_manifest("val"), bpe)
    one, _ = load_tokens(paths.token_manifest("val"), bpe)
    assert np.array_equal(np.asarray(many), np.asarray(one))
    # windows that cross shard boundaries read the same tokens as from one array
    starts = np.array([0, 990, 999, 1000, 2995, len(one) - 65])
    assert np.array_equal(many.windows(starts, 65), np.stack([np.asarray(one)[s : s + 65] for s in starts]))
    # re-encoding into fewer shards leaves no stale shard files behind
    encode_split(other, "val", bpe, True, shard_tokens=1 << 20)
    assert [f.name for f in other.token_shard_files("val")] == ["val-000000.bin"]


def test_wide_vocabularies_get_uint32_shards(tmp_path):
    ids = np.array([0, 70_000, 65_536, 5])
    manifest = write_tokens(tmp_path / "x.json", lambda i: tmp_path / f"x-{i}.bin", ids, 70_001)
    loaded, _ = load_tokens(tmp_path / "x.json")
    assert manifest["dtype"] == "uint32" and np.asarray(loaded).tolist() == ids.tolist()
    with pytest.raises(BarkError, match="outside the vocabulary"):
        write_tokens(tmp_path / "y.json", lambda i: tmp_path / f"y-{i}.bin", ids, 65_536)


# --- training and bits per byte ----------------------------------------------------------------

def test_training_lowers_validation_bpb(webtext_project, bpe):
    from barkgpt.checkpoint import load_model
    from barkgpt.model import GPT

    metrics = json.loads((webtext_project / "reports/webtext/metrics.json").read_text())
    val_ids, _ = load_tokens(webtext_project / "data/webtext/tokens/val.json")
    model, _ = load_model(webtext_project / "models/webtext/best.pt")
    torch.manual_seed(0)
    untrained = TorchLM(GPT(model.cfg, bpe.vocab_size), bpe)
    before = evaluate_bpb(untrained, eval_windows(val_ids, 64, 16, bpe.eos_id), bpe.token_bytes())["bpb"]
    assert before > 3.5  # ~ln(512)/ln(2) bits per token over ~2 bytes per token
    assert metrics["val_bpb"] < before - 0.8
    assert metrics["val_bytes"] == (webtext_project / "data/webtext/val.txt").stat().st_size
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    log = (webtext_project / "reports/webtext/train_log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,val_loss,val_bpb") and len(log) > 3
    seconds = [float(r["seconds"]) for r in csv.DictReader(log)]  # wall clock into training, per row
    assert all(0 < a < b for a, b in zip(seconds, seconds[1:]))
    assert seconds[-1] <= json.loads((webtext_project / "reports/webtext/train.json").read_text())["seconds"]
    samples = json.loads((webtext_project / "reports/webtext/samples.json").read_text())
    assert set(samples) == set(load_params(webtext_project / "params.yaml").webtext.eval.prompts)
    assert metrics["gate_passed"] == (metrics["val_bpb"] <= 2.5)


class UniformLM:
    """Every next token equally likely: bpb has a closed form."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def token_losses(self, inputs, targets):
        return np.full(targets.shape, math.log(self.vocab))


def test_bpb_matches_hand_computation(webtext_project, bpe):
    val_ids, _ = load_tokens(webtext_project / "data/webtext/tokens/val.json")
    ids = np.asarray(val_ids[:300])  # 300 tokens: four full windows of 64 and a short one
    lengths = bpe.token_bytes()
    nbytes_by_hand = sum(1 if t == bpe.eos_id else len(bpe.decode_bytes([int(t)])) for t in ids)
    windows = list(eval_windows(ids, 64, 3, bpe.eos_id))
    assert [x.shape for x, _ in windows] == [(3, 64), (1, 64), (1, 44)]  # the short window alone
    assert np.array_equal(np.concatenate([y.ravel() for _, y in windows]), ids)  # every token once, in order

    # closed form: uniform predictions cost ln(V) nats per token
    out = evaluate_bpb(UniformLM(bpe.vocab_size), windows, lengths)
    assert out["tokens"] == 300 and out["bytes"] == nbytes_by_hand
    assert out["bpb"] == pytest.approx(300 * math.log2(bpe.vocab_size) / nbytes_by_hand, rel=1e-12)

    # a trained model, token by token: -log softmax of each target, windows of 64 from [EOS] + ids
    lm = TorchLM.load(webtext_project / "models/webtext/best.pt")
    stream = [bpe.eos_id] + ids.tolist()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, 64):
            window = stream[start : start + 65]
            logits = lm.model(torch.tensor([window[:-1]]))[0].double()
            for pos, target in enumerate(window[1:]):
                total -= float(F.log_softmax(logits[pos], dim=-1)[target])
    out = evaluate_bpb(lm, eval_windows(ids, 64, 2, bpe.eos_id), lengths)
    assert out["loss"] * 300 == pytest.approx(total, rel=1e-4)
    assert out["bpb"] == pytest.approx(total / math.log(2) / nbytes_by_hand, rel=1e-4)


def test_training_validation_bpb_equals_the_evaluate_stage(webtext_project, tmp_path):
    """The bpb training logged for best.pt and the evaluate stage's bpb of best.pt, on the same windows
    (train.eval_batches x train.batch_size): one function, float32 both times, equal to 1e-6."""
    import csv
    import shutil

    root = tmp_path / "p"
    shutil.copytree(webtext_project, root)
    train = load_params(root / "params.yaml").webtext.train
    params = load_params(root / "params.yaml", {"tracking": {"enabled": False}, "webtext": {"eval": {
        "batch_size": train.batch_size, "max_batches": train.eval_batches}}})
    metrics = run_stage(params, "webtext", "evaluate", root)
    rows = [r for r in csv.DictReader((root / "reports/webtext/train_log.csv").open()) if r["val_loss"]]
    best = min(rows, key=lambda r: float(r["val_loss"]))  # best.pt is saved at the lowest validation loss
    assert len(rows) >= 2 and abs(float(best["val_bpb"]) - metrics["val_bpb"]) < 1e-6, (best, metrics["val_bpb"])
    assert abs(float(best["val_loss"]) - metrics["val_loss"]) < 1e-6
    assert metrics["val_tokens"] == train.eval_batches * train.batch_size * 64


@pytest.fixture(scope="module")
def webtext_f32(webtext_project, tmp_path_factory) -> Path:
    from barkgpt.checkpoint import load_model
    from barkgpt.export.gguf_file import write_gguf

    model, tok = load_model(webtext_project / "models/webtext/best.pt")
    return write_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "webtext-f32.gguf")


def test_greedy_text_is_identical_through_both_backends_the_cli_and_the_server(webtext_project, webtext_f32, bpe):
    """No separator is invented between BPE pieces, by any door: the text after the prompt is the
    tokenizer's own decoding, and PyTorch and llama.cpp (F32) agree on it."""
    import httpx

    from barkgpt.lm import Sampling
    from barkgpt.lm.llama_lm import LlamaLM
    from barkgpt.serve.backends import Backend, GenParams
    from conftest import run_server

    def complete(backend, prompt):
        pieces = backend.complete(prompt, GenParams(max_tokens=24, temperature=0), lambda: False)
        return "".join(p for p in pieces if isinstance(p, str))

    torch_lm, llama_lm = TorchLM.load(webtext_project / "models/webtext/best.pt"), LlamaLM(webtext_f32)
    on_torch, on_llama = Backend(torch_lm, torch_lm.name), Backend(llama_lm, llama_lm.name)
    assert on_torch.format.kind == on_llama.format.kind == "text" and on_llama.lm.tokenizer.kind == "bpe"
    texts = {}
    try:
        # (not a heading such as "= = Reception = =": a heading line ends there, so greedy is just the EOS)
        for prompt in ["The history of", "In 1998 , the", "The game was"]:
            text = texts[prompt] = complete(on_torch, prompt)
            assert complete(on_llama, prompt) == text
            ids = bpe.encode(prompt)
            new = [t for t in torch_lm.generate(ids, Sampling(temperature=0, max_new_tokens=24)) if t != bpe.eos_id]
            assert prompt + text == bpe.decode(ids + new)  # nothing inserted between pieces
            for model in ([], ["--model", str(webtext_f32)]):
                out = subprocess.run([sys.executable, "-m", "barkgpt", "generate", "--pipeline", "webtext", "--prompt",
                                      prompt, "--temperature", "0", "--max-new-tokens", "24", *model],
                                     cwd=webtext_project, capture_output=True, text=True, timeout=300,
                                     env={"PYTHONPATH": str(ROOT), "BARKGPT_WARM": "0", "PATH": "/usr/bin:/bin"})
                assert out.returncode == 0, out.stderr
                assert out.stdout == prompt + text + "\n" and not out.stdout.startswith(prompt + "  ")
        assert any(t.strip() for t in texts.values())  # a tiny model may end a line at once, not always
    finally:
        llama_lm.close()
    with run_server(["serve", "--backend", "torch", "--model", "models/webtext/best.pt"], cwd=webtext_project) as url:
        info = httpx.get(url + "/v1/models").json()["data"][0]
        assert (info["id"], info["kind"], info["backend"]) == ("webtext-best", "text", "torch")
        assert "continues what you type" in info["hears"]
        body = {"prompt": "The history of", "temperature": 0, "max_tokens": 24}
        assert httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["text"] == texts["The history of"]
        chat = httpx.post(url + "/v1/chat/completions", json={"messages": [
            {"role": "user", "content": "The history of"}], "temperature": 0, "max_tokens": 24}).json()
        assert chat["model"] == "webtext-best"
        assert chat["choices"][0]["message"]["content"] == texts["The history of"].strip()
        streamed = httpx.post(url + "/v1/completions", json={**body, "stream": True}).text
        pieces = [json.loads(line[6:])["choices"][0]["text"] for line in streamed.splitlines()
                  if line.startswith("data: {")]
        assert "".join(pieces) == texts["The history of"]


def test_streaming_decode_keeps_characters_split_across_tokens(bpe):
    from barkgpt.lm import TextStream

    text = " naïve café — the dog 🐕 barked: «woof» 中文"
    ids = bpe.encode(text)
    assert any("\ufffd" in bpe.decode([i]) for i in ids)  # some characters span several tokens
    stream = TextStream(bpe, bpe.encode("It said"))
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


# --- model changes made for speed and regularisation ---------------------------------------------

def test_rope_rotates_adjacent_pairs_as_before():
    """The fast RoPE (x*cos + swap(x)*sin, q and k together) equals the reference pair rotation."""
    from barkgpt.model import apply_rope, rope_pairs, rope_tables

    torch.manual_seed(0)
    x = torch.randn(2, 10, 3, 8, dtype=torch.float64)  # (B, T, heads, D)
    cos, sin = rope_tables(8, 10, 10000.0)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos.double()[:, None], sin.double()[:, None]
    expected = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    cos2, sin2 = rope_pairs(cos, sin, torch.float64)
    assert torch.allclose(apply_rope(x, cos2[:, None], sin2[:, None]), expected, atol=1e-6)


def test_dropout_is_training_only():
    from barkgpt.model import GPT

    cfg = ModelParams(n_layer=1, n_head=2, n_embd=64, block_size=16, dropout=0.3)
    torch.manual_seed(0)
    model = GPT(cfg, 50)
    plain = GPT(cfg.model_copy(update={"dropout": 0.0}), 50)
    plain.load_state_dict(model.state_dict())
    x = torch.randint(0, 50, (2, 16))
    model.eval(), plain.eval()
    assert torch.equal(model(x), plain(x))
    model.train()
    assert not torch.allclose(model(x), plain(x))
