"""The bark pipeline: vocabulary, data, training, resume, evaluation, bad input, the CLI."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from barkgpt.checkpoint import load_checkpoint, load_model, seal
from barkgpt.config import load_params, parse_params
from barkgpt.data.bark import generate
from barkgpt.errors import BarkError
from barkgpt.layout import layout
from barkgpt.pipelines import run_stage
from barkgpt.pipelines.bark import BarkDataParams
from barkgpt.runs import latest_interrupted
from barkgpt.tokenizer import BARK_VOCAB, WordTokenizer

from conftest import ROOT, make_project


def test_vocabulary_is_the_products():
    assert list(BARK_VOCAB) == ["<PAD>", "<EOS>", "woof", "arf", "ruff", "grrr", "User:", "Assistant:", "speak"]


def test_tokenizer_round_trip():
    tok = WordTokenizer()
    text = "User: speak Assistant: woof arf <EOS> User: speak Assistant: grrr <EOS>"
    ids = tok.encode(text)
    assert len(ids) == 11 and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text


def test_unknown_word_is_named():
    with pytest.raises(BarkError, match="'hey' is not in the bark vocabulary"):
        WordTokenizer().encode("User: hey Assistant:")


@pytest.mark.parametrize("vocab, difference", [
    ([*BARK_VOCAB, "meow"], r"extra word \['meow'\]"),
    ([w for w in BARK_VOCAB if w != "grrr"], r"missing \['grrr'\]"),
    (["<PAD>", "<EOS>", "arf", "woof", *BARK_VOCAB[4:]], r"the same words at other ids: 'woof' is id 3 \(contract: 2\)"),
])
def test_a_tokenizer_file_off_the_vocabulary_contract_is_named(tmp_path, vocab, difference):
    """An edited data/bark/tokenizer.json (an extra word, a missing one, swapped ids) is refused
    wherever it is read: the file, what differs and how to regenerate it."""
    from barkgpt.model import GPT
    from barkgpt.params import ModelParams
    from barkgpt.checkpoint import save_checkpoint
    from barkgpt.tokenizer import load_tokenizer

    path = tmp_path / "data/bark/tokenizer.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"kind": "word", "vocab": vocab}))
    with pytest.raises(BarkError, match=rf"{path}: the bark vocabulary is fixed .*{difference}.*dvc repro bark-tokenize"):
        load_tokenizer(path)
    # A model trained on such a file (evaluate, export and serve read the checkpoint's copy).
    ckpt = tmp_path / "best.pt"
    save_checkpoint(ckpt, model=GPT(ModelParams(n_layer=1, n_head=1, n_embd=32, block_size=8), len(vocab)),
                    tokenizer=WordTokenizer(vocab), params={}, step=1)
    with pytest.raises(BarkError, match=rf"best.pt \(its tokenizer\): .*{difference}.*re-train"):
        load_model(ckpt)
    path.write_text(json.dumps({"kind": "word", "vocab": list(BARK_VOCAB)}))
    assert load_tokenizer(path).vocab == list(BARK_VOCAB)  # the contract itself loads


def test_generator_is_deterministic_and_keeps_the_contract():
    p = BarkDataParams(max_barks=3, multi_turn_share=0.5)
    a, b = generate(p, seed=1, count=300), generate(p, seed=1, count=300)
    assert a == b
    assert a != generate(p, seed=2, count=300)
    tok = WordTokenizer()
    for line in a:
        turns = line.split(" <EOS>")[:-1]
        assert line.endswith("<EOS>") and 1 <= len(turns) <= p.max_turns
        for turn in turns:
            words = turn.split()
            assert words[:3] == ["User:", "speak", "Assistant:"]
            assert 1 <= len(words[3:]) <= 3 and set(words[3:]) <= {"woof", "arf", "ruff", "grrr"}
        tok.encode(line)
    assert any(line.count("<EOS>") > 1 for line in a)  # multi-turn conversations exist


def test_bark_mix_is_followed():
    p = BarkDataParams(bark_mix={"woof": 0.75, "grrr": 0.25})
    words = " ".join(generate(p, seed=0, count=2000)).split()
    woof, grrr = words.count("woof"), words.count("grrr")
    assert words.count("arf") == 0 and 0.70 < woof / (woof + grrr) < 0.80


@pytest.mark.parametrize("raw, message", [
    ({"bark": {"model": {"n_embd": -64}}}, "bark.model.n_embd"),
    ({"bark": {"model": {"n_embd": 96, "n_head": 5}}}, "n_head (5) must divide n_embd (96)"),
    ({"bark": {"model": {"n_embd": 50}}}, "multiple of 32"),
    ({"bark": {"train": {"learnig_rate": 0.1}}}, "bark.train.learnig_rate: unknown key"),
    ({"bark": {"train": {"dtype": "float16"}}}, "bark.train.dtype"),
    ({"bark": {"data": {"bark_mix": {"meow": 1.0}}}}, "unknown barks ['meow']"),
])
def test_invalid_params_name_the_key(raw, message):
    with pytest.raises(BarkError) as err:
        parse_params(raw)
    assert message in str(err.value)


def test_training_lowers_the_loss(bark_project):
    history = json.loads((bark_project / "reports/bark/train.json").read_text())
    log = (bark_project / "reports/bark/train_log.csv").read_text().splitlines()
    first_loss = float(log[1].split(",")[1])
    assert history["step"] == load_params(bark_project / "params.yaml").bark.train.max_steps
    assert history["train_loss"] < first_loss  # still falling after the first logged window
    chance = math.log(len(json.loads((bark_project / "data/bark/tokenizer.json").read_text())["vocab"]))
    assert history["train_loss"] < chance / 2  # a uniform guess over the vocabulary scores ln(V)
    assert history["best_val_loss"] < 0.9  # ln(9)=2.2 at chance; the bark entropy floor is ~0.7


def test_default_model_keeps_the_contract(bark_project):
    metrics = json.loads((bark_project / "reports/bark/metrics.json").read_text())
    assert metrics["contract_accuracy"] >= 0.99
    assert metrics["contract_accuracy_multi_turn"] >= 0.99
    assert metrics["gate_passed"] is True
    assert set(metrics["ood_contract_rate"]) == set(load_params(bark_project / "params.yaml").bark.eval.ood_prompts)


def test_resume_is_exact(tmp_path):
    """Train 12 steps straight == crash after step 5's checkpoint, resume to 12: identical weights."""
    over = {"bark": {"data": {"train_conversations": 300, "val_conversations": 50},
                     "train": {"max_steps": 12, "checkpoint_every": 5, "eval_every": 5, "log_every": 5,
                               "warmup_steps": 3}}}
    straight = make_project(tmp_path / "a", over)
    params = load_params(straight / "params.yaml")
    run_stage(params, "bark", "data", straight)
    run_stage(params, "bark", "tokenize", straight)
    run_stage(params, "bark", "train", straight, progress=False)

    class Crash(Exception):
        pass

    def crash_at_5(step, _metrics):
        if step == 5:
            raise Crash

    split = make_project(tmp_path / "b", over)
    run_stage(params, "bark", "data", split)
    run_stage(params, "bark", "tokenize", split)
    with pytest.raises(Crash):
        run_stage(params, "bark", "train", split, on_log=crash_at_5, progress=False)
    interrupted = latest_interrupted(layout("bark", split))  # the crashed run's own folder
    assert load_checkpoint(interrupted.last)["step"] == 5
    assert not (split / "models/bark").exists()  # an unfinished run promotes nothing
    run_stage(params, "bark", "train", split, resume=True, progress=False)

    a = load_checkpoint(straight / "models/bark/last.pt")
    b = load_checkpoint(split / "models/bark/last.pt")
    assert a["step"] == b["step"] == 12
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_bf16_training_runs(tmp_path):
    over = {"bark": {"data": {"train_conversations": 200, "val_conversations": 50},
                     "train": {"max_steps": 5, "dtype": "bfloat16"}}}
    root = make_project(tmp_path, over)
    params = load_params(root / "params.yaml")
    run_stage(params, "bark", "data", root)
    run_stage(params, "bark", "tokenize", root)
    summary = run_stage(params, "bark", "train", root, progress=False)
    assert summary["step"] == 5 and summary["train_loss"] < 3.0
    assert load_checkpoint(root / "models/bark/last.pt")["model"]["tok_emb.weight"].dtype == torch.float32


def test_tampered_and_truncated_checkpoints_are_refused(bark_copy):
    ckpt = bark_copy / "models/bark/best.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(BarkError, match="checksum mismatch"):
        load_model(ckpt)
    ckpt.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(BarkError, match="truncated or was modified"):
        load_model(ckpt)
    with pytest.raises(BarkError, match="checkpoint not found"):
        load_model(bark_copy / "models/bark/nothing.pt")


def test_pickled_code_never_runs(tmp_path):
    """A checkpoint carrying a pickle payload whose checksum file was forged still fails to load."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": Exploit()}, ckpt)
    seal(ckpt)  # a valid integrity trailer: the checksum alone does not make a file safe
    with pytest.raises(BarkError, match="not a loadable BarkGPT checkpoint"):
        load_model(ckpt)
    assert not marker.exists()


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "barkgpt", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_pipeline_end_to_end(tmp_path):
    root = make_project(tmp_path, {"bark": {"train": {"max_steps": 150}}})
    for args in (["data", "bark"], ["tokenize", "bark"], ["train", "bark", "--quiet"], ["evaluate", "bark"]):
        result = run_cli(*args, cwd=root)
        assert result.returncode == 0, result.stderr
    metrics = json.loads((root / "reports/bark/metrics.json").read_text())
    assert metrics["contract_accuracy"] >= 0.95
    out = run_cli("generate", "--seed", "3", "-n", "3", cwd=root)
    assert out.returncode == 0, out.stderr
    for line in out.stdout.splitlines():
        words = line.split()
        assert words[:3] == ["User:", "speak", "Assistant:"] and len(words) >= 4
        assert set(words[3:]) <= {"woof", "arf", "ruff", "grrr"}


def test_cli_bad_input_exits_2_with_a_clear_message(bark_copy):
    out = run_cli("generate", "--prompt", "User: hey Assistant:", cwd=bark_copy)
    assert out.returncode == 2
    assert "'hey' is not in the bark vocabulary" in out.stderr and "Traceback" not in out.stderr
    (bark_copy / "params.yaml").write_text("bark:\n  model:\n    n_head: 3\n")
    out = run_cli("train", "bark", cwd=bark_copy)
    assert out.returncode == 2 and "bark.model" in out.stderr and "Traceback" not in out.stderr
    ckpt = bark_copy / "models/bark/best.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    out = run_cli("generate", cwd=bark_copy)
    assert out.returncode == 2 and "checksum mismatch" in out.stderr and "Traceback" not in out.stderr
