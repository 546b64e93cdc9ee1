"""GGUF / HF export, llama.cpp parity, quantization gate and pre-flight checks on a trained bark model."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from barkgpt.config import load_params
from barkgpt.errors import BarkError
from barkgpt.export.gguf_file import preflight, write_gguf
from barkgpt.gates import GateError
from barkgpt.layout import Layout
from barkgpt.pipelines import run_stage
from conftest import copy_project

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def exported(bark_project, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the trained bark project after export -> quantize -> parity."""
    root = copy_project(bark_project, tmp_path_factory.mktemp("export") / "project")
    params = load_params(root / "params.yaml")
    run_stage(params, "bark", "export", root)
    run_stage(params, "bark", "quantize", root)
    run_stage(params, "bark", "parity", root)
    return root, json.loads((root / "reports/bark/parity.json").read_text())


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "BARKGPT_WARM": "0", "PATH": "/usr/bin:/bin"})


def test_parity_report_f32(exported):
    _, report = exported
    f32 = report["f32_parity"]
    assert f32["passed"]
    assert f32["tokenization_agreement"] == 1.0 and f32["validation_lines"] >= 100
    assert f32["detokenize_round_trip"] == 1.0
    assert f32["logits_max_abs_diff"] <= 1e-3
    greedy = report["files"]["f32"]["greedy"]
    assert greedy["all_identical"] and greedy["prompts"] >= 3
    # The deploy file is also judged as served (flash attention on), and that check gates it.
    served = report["served"]
    quantized = report["files"]["q8_0"]["logits"]["max_abs_diff"]  # Q8_0's own error, then flash attention's
    assert served["flash_attn"] and served["file"] == "q8_0" and served["logits"]["max_abs_diff"] < quantized + 0.05
    assert {"name": "served.quality", "passed": True} in [
        {"name": c["name"], "passed": c["passed"]} for c in report["gate"]["checks"]]
    assert report["files"]["f16"]["logits"]["max_abs_diff"] < 0.05  # half precision: close, not exact


def test_parity_is_one_evaluation_on_both_backends_bound_to_the_files_it_judged(exported):
    from barkgpt.fileio import sha256_file
    from barkgpt.gates import verify_judged

    root, report = exported
    ref, q8 = report["reference"], report["files"]["q8_0"]["quality"]
    assert ref["backend"] == "torch" and ref["contract_samples"] == q8["contract_samples"] == 1000
    assert q8["contract_failures"] <= 13 and report["quantizations"]["q8_0"]["pytorch_value"] == ref["contract_accuracy"]
    files = {"checkpoint": root / "models/bark/best.pt", "tokenizer": root / "data/bark/tokenizer.json",
             "f32": root / "exports/bark/full/bark-f32.gguf", "q8_0": root / "exports/bark/quantized/bark-q8_0.gguf"}
    assert {role: report["judged"][role]["sha256"] for role in files} == {r: sha256_file(f) for r, f in files.items()}
    verify_judged(root / "reports/bark/parity.json", files)
    quant = json.loads((root / "reports/bark/quantization.json").read_text())["q8_0"]  # made from, and made
    assert quant["source"]["sha256"] == sha256_file(files["f32"]) and quant["sha256"] == sha256_file(files["q8_0"])
    summary = json.loads((root / "reports/bark/parity_summary.json").read_text())  # what `dvc metrics show` reads
    assert summary == {"parity_passed": True, **{q: e["value"] for q, e in report["quantizations"].items()}}


def test_quantizations_and_tensor_types(exported):
    root, report = exported
    q = report["quantizations"]
    assert set(q) == {"q8_0", "q4_0", "q4_k_m"}
    assert q["q4_0"]["size_ratio_vs_f32"] < q["q8_0"]["size_ratio_vs_f32"] < 0.35
    assert all(e["status"] == "accepted" and e["value"] >= 0.99 for e in q.values()), q
    assert report["gate"]["deploy_passed"] and report["gate"]["rejected"] == []
    assert q["q8_0"]["tensor_types"]["blk.0.attn_q.weight"] == "Q8_0"
    assert q["q8_0"]["tensor_types"]["blk.0.attn_norm.weight"] == "F32"
    assert q["q8_0"]["fallbacks"] == [] and q["q4_0"]["fallbacks"] == []
    # n_embd 64 rows cannot fill K-quant super-blocks of 256: llama.cpp falls back, and we say so
    fb = q["q4_k_m"]["fallbacks"]
    assert fb and all(f["block"] == 256 and f["row"] % 256 and f["used"] != "Q4_K" for f in fb)
    quant_report = json.loads((root / "reports/bark/quantization.json").read_text())
    assert "multiple of the 256-value" in quant_report["q4_k_m"]["tensors"][fb[0]["tensor"]]["note"]


def test_quantize_collects_llama_cpp_warnings_into_the_report(exported, tmp_path):
    """llama.cpp's ~35 warning lines (a fallback per tensor of Q4_K_M) go into quantization.json;
    the command prints one summary line and no llama.cpp line reaches the terminal."""
    root = tmp_path / "project"
    shutil.copytree(exported[0], root)
    out = subprocess.run([sys.executable, "-m", "barkgpt", "quantize", "bark"], cwd=root, capture_output=True,
                         text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "BARKGPT_WARM": "0", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    log = out.stdout + out.stderr
    summary = [line for line in log.splitlines() if "llama.cpp warning" in line]
    rest = "\n".join(line for line in log.splitlines() if line not in summary)
    assert "falling back" not in rest and "llama_model_quantize_impl" not in rest and "warning" not in rest, log
    assert len(summary) == 1 and "reports/bark/quantization.json" in summary[0], log
    report = json.loads((root / "reports/bark/quantization.json").read_text())
    warned = {q: sum(k["count"] for k in report[q]["llama_cpp_warnings"]) for q in report}
    fallbacks = report["q4_k_m"]["llama_cpp_warnings"][0]
    fell_back = {f["tensor"] for f in report["q4_k_m"]["fallbacks"]}
    assert all("falling back to" in line and line.split()[1] in fell_back for line in fallbacks["lines"])
    assert warned["q8_0"] == 0 and warned["q4_k_m"] >= 14
    assert all(k.get("explained") for q in report for k in report[q]["llama_cpp_warnings"])
    assert f"{sum(warned.values())} llama.cpp warnings" in summary[0]


def test_parity_collects_context_warnings(exported):
    _, report = exported
    kinds = {k["kind"]: k["count"] for k in report["llama_cpp_warnings"]}
    # llama.cpp pads the context to 256 tokens and warns once per file opened (5 files, and the
    # deploy file once more, as served)
    assert kinds.get("llama_context: n_ctx_seq (N) > n_ctx_train (N) -- possible training context overflow") == 6
    # Each warning the bark model always gives says why it is harmless; an unknown one would not.
    assert all(k.get("explained") for k in report["llama_cpp_warnings"]), report["llama_cpp_warnings"]
    from barkgpt.export.llama_log import summary

    assert "explained" not in summary(["llama_model_load: something new went wrong"])[0]


def test_llama_tokenizer_matches_word_tokenizer(exported):
    from barkgpt.checkpoint import load_model
    from barkgpt.lm.llama_lm import LlamaLM

    root, _ = exported
    _, tok = load_model(root / "models/bark/best.pt")
    lm = LlamaLM(root / "exports/bark/full/bark-f32.gguf")
    try:
        assert lm.tokenizer.kind == "word" and lm.tokenizer.vocab == tok.vocab and lm.n_ctx == 64
        for text in ["User: speak Assistant:", "  User:\tspeak \n Assistant:  woof <EOS>  ", "woof", "", "   "]:
            ids = lm.tokenizer.encode(text)
            assert ids == tok.encode(text), text
            assert lm.tokenizer.decode(ids) == tok.decode(ids)
        assert lm.tokenizer.eos_id == tok.eos_id and lm.is_end(tok.eos_id) and not lm.is_end(tok.ids["woof"])
        with pytest.raises(BarkError, match="'hey' is not in the bark vocabulary"):
            lm.tokenizer.encode("User: hey Assistant:")
        chat = lm.llm.create_chat_completion([{"role": "user", "content": "speak"}], max_tokens=8, temperature=0)
        words = chat["choices"][0]["message"]["content"].split()
        assert words and set(words) <= {"woof", "arf", "ruff", "grrr"}
    finally:
        lm.close()


def test_stock_llama_cpp_completion_barks(exported):
    """No BarkGPT code: llama-cpp-python alone loads the Q8_0 file, tokenizes and completes."""
    root, _ = exported
    gguf = root / "exports/bark/quantized/bark-q8_0.gguf"
    out = _run(f"""
        import llama_cpp
        llm = llama_cpp.Llama(model_path={str(gguf)!r}, verbose=False, seed=1)
        out = llm.create_completion("User: speak Assistant:", max_tokens=16)
        print(repr(out["choices"][0]["text"]), out["choices"][0]["finish_reason"])
        llm.close()
    """, root)
    assert out.returncode == 0, out.stderr[-2000:]
    text, reason = out.stdout.rsplit(" ", 1)
    words = eval(text).split()  # noqa: S307 - our own repr
    assert words and set(words) <= {"woof", "arf", "ruff", "grrr"}, out.stdout
    assert reason.strip() == "stop"  # ended by <EOS>, recognised as end of generation


def test_gate_rejects_damaged_quantization(exported, tmp_path):
    import torch

    from barkgpt.checkpoint import load_model

    src, _ = exported
    root = tmp_path / "p"
    shutil.copytree(src, root)
    model, tok = load_model(root / "models/bark/best.pt")
    with torch.no_grad():  # a "quantization" that destroyed the embeddings
        model.tok_emb.weight.copy_(torch.randn_like(model.tok_emb.weight))
    write_gguf(model, tok, root / "exports/bark/quantized/bark-q4_0.gguf", "f32")
    record_as_quantized(root, "q4_0")  # as if llama.cpp's quantizer itself had written it
    params = load_params(root / "params.yaml")
    out = run_stage(params, "bark", "parity", root)  # deploy q8_0 still passes
    assert out["quantizations"]["q4_0"]["status"] == "rejected"
    assert out["gate"]["rejected"] == ["q4_0"] and out["gate"]["deploy_passed"]
    # deploying the damaged file: the stage fails (CLI exit 2) after writing the report
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["export"]["deploy_quantization"] = "q4_0"
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    cli = subprocess.run([sys.executable, "-m", "barkgpt", "parity", "bark"], cwd=root, capture_output=True,
                         text=True, env={"PYTHONPATH": str(ROOT), "BARKGPT_WARM": "0", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert cli.returncode == 2, cli.stderr[-2000:]
    assert "q4_0 was rejected" in cli.stderr and "Traceback" not in cli.stderr
    report = json.loads((root / "reports/bark/parity.json").read_text())
    assert report["gate"]["deploy_passed"] is False and report["quantizations"]["q4_0"]["status"] == "rejected"
    assert issubclass(GateError, BarkError)


def record_as_quantized(root: Path, quant: str) -> None:
    from barkgpt.export.checksums import file_record

    path = root / "reports/bark/quantization.json"
    report = json.loads(path.read_text())
    report[quant].update(file_record(Layout("bark", root).gguf(quant)))
    path.write_text(json.dumps(report))


def test_a_flipped_byte_is_neither_judged_nor_served(exported, tmp_path):
    """One flipped weight byte leaves a valid GGUF; only the sha256 the quantize stage recorded tells.
    Parity refuses to judge it and `barkgpt serve` refuses to serve it (exit 2, no traceback)."""
    src, _ = exported
    root = tmp_path / "p"
    shutil.copytree(src, root)
    lay = Layout("bark", root)
    gguf = lay.gguf("q8_0")
    data = bytearray(gguf.read_bytes())
    data[-64] ^= 0x01  # inside the last tensor's data
    gguf.write_bytes(bytes(data))
    preflight(gguf)  # structurally still a fine GGUF
    env = {"PYTHONPATH": str(ROOT), "BARKGPT_WARM": "0", "PATH": "/usr/bin:/bin"}
    for cmd in (["parity", "bark"], ["serve", "--port", "1"]):
        cli = subprocess.run([sys.executable, "-m", "barkgpt", *cmd], cwd=root, capture_output=True, text=True,
                             env=env, timeout=300)
        assert cli.returncode == 2, cli.stderr[-2000:]
        assert "bark-q8_0.gguf: sha256" in cli.stderr and "reports/bark/quantization.json" in cli.stderr
        assert "Traceback" not in cli.stderr
    assert json.loads((root / "reports/bark/parity.json").read_text()) == exported[1]  # nothing was judged
    gguf.write_bytes(Layout("bark", src).gguf("q8_0").read_bytes())
    lay.gguf("f32").write_bytes(b"GGUF")  # the export's own file, replaced
    with pytest.raises(BarkError, match="bark-f32.gguf: sha256 .* recorded in .*export.json"):
        run_stage(load_params(root / "params.yaml"), "bark", "quantize", root)


def _damaged(good: Path, tmp: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {
        "text": b"this is not a model\n" * 10,
        "empty": b"",
        "truncated_data": data[: len(data) // 2],
        "truncated_header": data[:200],
        "bad_version": data[:4] + (99).to_bytes(4, "little") + data[8:],
        "huge_tensor_count": data[:8] + (2**40).to_bytes(8, "little") + data[16:],
    }
    # move the last tensor's data offset past the end of the file
    info = preflight(good)
    raw = bytearray(data)
    name = max(info.tensors, key=lambda n: info.tensors[n]["offset"]).encode()
    at = raw.rfind(struct_len(name) + name)
    dims = int.from_bytes(raw[at + 8 + len(name) : at + 12 + len(name)], "little")
    off_at = at + 12 + len(name) + 8 * dims + 4
    raw[off_at : off_at + 8] = (len(data) * 4 // 32 * 32).to_bytes(8, "little")
    files["offset_past_end"] = bytes(raw)
    # an array length of 2**40: a reader that returns short reads past the end would loop for ever
    raw = bytearray(data)
    key = b"tokenizer.ggml.scores"
    at = raw.find(struct_len(key) + key) + 8 + len(key) + 4 + 4  # past the key, its type, the item type
    raw[at : at + 8] = (2**40).to_bytes(8, "little")
    files["huge_array_length"] = bytes(raw)
    out = {}
    for name, blob in files.items():
        out[name] = tmp / f"{name}.gguf"
        out[name].write_bytes(blob)
    return out


def struct_len(name: bytes) -> bytes:
    return len(name).to_bytes(8, "little")


def test_bad_gguf_files_rejected_without_crash(exported, tmp_path):
    root, _ = exported
    bad = _damaged(root / "exports/bark/full/bark-f32.gguf", tmp_path)
    for name, path in bad.items():
        start = time.monotonic()
        with pytest.raises(BarkError) as err:
            preflight(path)
        assert str(path) in str(err.value) and "Traceback" not in str(err.value), name
        assert time.monotonic() - start < 10, name
    with pytest.raises(BarkError, match="not found"):
        preflight(tmp_path / "missing.gguf")
    # the loader in a child process: a clean BarkError exit, never a signal
    paths = [str(p) for p in bad.values()]
    out = _run(f"""
        import sys
        from barkgpt.errors import BarkError
        from barkgpt.lm.llama_lm import LlamaLM
        for path in {paths!r}:
            try:
                LlamaLM(path, 64)
            except BarkError as err:
                print("refused", path)
            else:
                sys.exit("loaded a damaged file: " + path)
    """, root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("refused") == len(paths)


def test_hf_export_round_trip(exported):
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from barkgpt.checkpoint import load_model
    from barkgpt.lm import Sampling
    from barkgpt.lm.torch_lm import TorchLM
    from barkgpt.stages import read_lines

    root, _ = exported
    model, tok = load_model(root / "models/bark/best.pt")
    hf_model = AutoModelForCausalLM.from_pretrained(root / "exports/bark/full/hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(root / "exports/bark/full/hf")
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    for line in read_lines(root / "data/bark/val.txt")[:50]:
        assert hf_tok(line)["input_ids"] == tok.encode(line)
    for prompt in ["User: speak Assistant:", "User: speak Assistant: woof <EOS> User: speak Assistant:"]:
        ids = tok.encode(prompt)
        with torch.no_grad():
            diff = (hf_model(torch.tensor([ids])).logits[0] - model(torch.tensor([ids]))[0]).abs().max()
            gen = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                                    attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        assert float(diff) < 1e-4
        ours = list(TorchLM(model, tok).generate(ids, Sampling(temperature=0, max_new_tokens=12)))
        assert gen[0, len(ids):].tolist() == ours
        assert hf_tok.decode(ours) == tok.decode(ours)


def test_bpe_gguf_parity(wikitext_path, tmp_path):
    """A byte-level BPE trained on real text: llama.cpp's gpt2 tokenizer gives the same ids."""
    import torch

    from barkgpt.export.parity import logits_parity, tokenization_parity
    from barkgpt.lm.llama_lm import LlamaLM
    from barkgpt.lm.torch_lm import TorchLM
    from barkgpt.model import GPT
    from barkgpt.params import ModelParams
    from barkgpt.tokenizer import train_bpe

    lines = [line for line in wikitext_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    tok = train_bpe(lines[:1500], 512)
    torch.manual_seed(0)
    model = GPT(ModelParams(n_embd=64, n_head=2, n_layer=2, block_size=128), tok.vocab_size).eval()
    path = write_gguf(model, tok, tmp_path / "bpe.gguf")
    lm = LlamaLM(path, 128, all_logits=True)
    try:
        tp = tokenization_parity(lm.tokenizer, tok, lines)  # every line, including the ones BPE never saw
        assert tp["agreement"] == 1.0, tp["first_mismatch"]
        assert tp["detokenize_round_trip"] == 1.0
        prompts = [tok.encode(x)[:128] for x in lines[:6]]
        assert logits_parity(TorchLM(model, tok), lm, prompts)["max_abs_diff"] <= 1e-3
        assert lm.tokenizer.eos_id == tok.eos_id and lm.tokenizer.kind == "bpe"
        # a literal "<|endoftext|>" is ordinary text for BarkGPT and for llama.cpp alike
        text = "end <|endoftext|> here"
        assert lm.tokenizer.encode(text) == tok.encode(text)
    finally:
        lm.close()
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from barkgpt.export.hf import write_hf

    write_hf(model, tok, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for line in lines[:300]:
        assert hf_tok(line)["input_ids"] == tok.encode(line)
        assert hf_tok.decode(tok.encode(line)) == line
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = tok.encode(lines[0])[:64]
    with torch.no_grad():
        assert float((hf_model(torch.tensor([ids])).logits[0] - model(torch.tensor([ids]))[0]).abs().max()) < 1e-4


def test_gguf_files_and_parity_report_are_in_the_mlflow_run(exported):
    """The parity stage attaches the GGUFs and its report to the training run and tags the
    registered model version with the gate verdict and the deploy file's sha256."""
    import mlflow

    from barkgpt.fileio import sha256_file

    root, report = exported
    run_id = json.loads((root / "models/bark/mlflow_run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    gguf = {Path(a.path).name for a in client.list_artifacts(run_id, "gguf")}
    assert {"bark-f32.gguf", "bark-q8_0.gguf", "bark-q4_k_m.gguf"} <= gguf
    assert "reports/parity.json" in {a.path for a in client.list_artifacts(run_id, "reports")}
    assert client.get_run(run_id).data.metrics["parity.logits_max_abs_diff"] <= 1e-3
    (version,) = client.search_model_versions(f"run_id='{run_id}'")
    deploy_file = root / report["gate"]["deploy_file"]
    assert version.tags["gguf.deploy_sha256"] == sha256_file(deploy_file)
    assert version.tags["parity.deploy_passed"] == "true"


def test_serving_with_flash_attention_matches_the_judged_path(exported):
    """The server opens GGUFs with llama.cpp's flash attention; parity and the gates judge them
    without it. llama.cpp's CPU flash attention works in half precision (about 0.02 apart in the
    logits here), so the bound is the F16 file's (0.05); the greedy replies are the same, and the
    contract holds on the serving path too."""
    from barkgpt.export.parity import greedy_parity, logits_parity
    from barkgpt.lm import Sampling
    from barkgpt.lm.llama_lm import LlamaLM
    from barkgpt.tokenizer import load_tokenizer

    root, _ = exported
    params = load_params(root / "params.yaml")
    gguf = root / "exports/bark/quantized" / f"bark-{params.export.deploy_quantization}.gguf"
    judged = LlamaLM(gguf, all_logits=True)
    served = LlamaLM(gguf, all_logits=True, flash_attn=True)
    tok = load_tokenizer(root / "data/bark/tokenizer.json")
    prompts = [tok.encode(p) for p in ("User: speak Assistant:", "User: speak Assistant: woof <EOS> User: speak Assistant:",
                                       "User: speak Assistant: arf arf <EOS> User: speak Assistant: ruff <EOS> "
                                       "User: speak Assistant:")]
    assert logits_parity(judged, served, prompts)["max_abs_diff"] < 0.05
    assert greedy_parity(judged, served, prompts, max_new=12)["all_identical"]
    barks, eos = {tok.ids[w] for w in ("woof", "arf", "ruff", "grrr")}, tok.eos_id
    for seed in range(20):
        reply = list(served.generate(prompts[0], Sampling(temperature=1.0, max_new_tokens=12, seed=seed)))
        assert reply and reply[-1] == eos and set(reply[:-1]) <= barks, tok.decode(reply)
