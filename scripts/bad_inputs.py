#!/usr/bin/env python
"""Run the `barkgpt` command on bad inputs and print a Markdown table: input, exit code, message.

Every row is a real run in a throw-away project (a small bark model trained once, ~30 s), so the
table shows what a user sees today. A row whose output holds a Python traceback is marked: those
are the places where a clear error (exit 2, naming the file and the fix) still has to be written.
Commands run with the default settings, the warm server included (its own, in a private runtime
folder, stopped at the end); the script exits 1 when any row printed a traceback.

    python scripts/bad_inputs.py            # the table on stdout
    python scripts/bad_inputs.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SMALL = {"bark": {"data": {"train_conversations": 300, "val_conversations": 60},
                  "train": {"max_steps": 60, "threads": 1, "eval_every": 30, "checkpoint_every": 30},
                  "gates": {"contract_samples": 20}},
         "tracking": {"enabled": False}}


RUNTIME = Path(tempfile.mkdtemp(prefix="bw"))  # this script's warm servers, apart from everyone else's


def barkgpt(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "XDG_RUNTIME_DIR": str(RUNTIME)}
    return subprocess.run([sys.executable, "-m", "barkgpt", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_params(root: Path, overrides: dict) -> None:
    from barkgpt.params import deep_merge

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(deep_merge(deep_merge(base, SMALL), overrides)))


def trained_project(folder: Path) -> Path:
    root = folder / "trained"
    root.mkdir(parents=True)
    write_params(root, {})
    for cmd in (["data", "bark"], ["tokenize", "bark"], ["train", "bark", "--quiet"]):
        out = barkgpt(cmd, root)
        if out.returncode:
            raise SystemExit(f"could not prepare the project ({cmd}): {out.stderr[-2000:]}")
    return root


def copy_of(base: Path, folder: Path, name: str) -> Path:
    dest = folder / name
    shutil.copytree(base, dest)
    return dest


def tiny_filesystem(folder: Path, kib: int) -> Path | None:
    """A tmpfs of `kib` KiB (needs root); None where it cannot be mounted."""
    mnt = folder / f"tmpfs-{kib}k-{len(os.listdir(folder))}"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(mnt)], capture_output=True)
    return mnt if ok.returncode == 0 else None


def cases(base: Path, folder: Path):
    """(label, setup -> (args, cwd)); each setup prepares its own copy of the trained project."""

    def params_case(overrides: dict, args: list[str]):
        def setup():
            root = copy_of(base, folder, f"p{len(os.listdir(folder))}")
            write_params(root, overrides)
            return args, root
        return setup

    def file_case(rel: str, content: bytes, args: list[str]):
        def setup():
            root = copy_of(base, folder, f"p{len(os.listdir(folder))}")
            (root / rel).write_bytes(content)
            return args, root
        return setup

    def raw_params(text: str, args: list[str]):
        def setup():
            root = copy_of(base, folder, f"p{len(os.listdir(folder))}")
            (root / "params.yaml").write_text(text)
            return args, root
        return setup

    def truncated(rel: str, keep: int, args: list[str]):
        def setup():
            root = copy_of(base, folder, f"p{len(os.listdir(folder))}")
            data = (root / rel).read_bytes()
            (root / rel).write_bytes(data[:keep])
            return args, root
        return setup

    def empty_project(args: list[str], overrides: dict | None = None):
        def setup():
            root = folder / f"e{len(os.listdir(folder))}"
            root.mkdir()
            write_params(root, overrides or {})
            return args, root
        return setup

    def wrong_shapes(args: list[str]):
        """A checkpoint whose trailer is valid (the bytes are intact) but whose weights do not fit
        the model it describes."""
        def setup():
            import torch

            from barkgpt.checkpoint import load_checkpoint, seal

            root = copy_of(base, folder, f"p{len(os.listdir(folder))}")
            path = root / "models/bark/best.pt"
            state = load_checkpoint(path)
            state["model_params"]["n_embd"] *= 2
            torch.save(state, path)
            seal(path)
            return args, root
        return setup

    def params_path(make, args: list[str]):
        def setup():
            root = copy_of(base, folder, f"p{len(os.listdir(folder))}")
            make(root)
            return args, root
        return setup

    def disk_full():
        mnt = tiny_filesystem(folder, 64)
        if mnt is None:
            return None
        root = mnt / "project"
        root.mkdir()
        write_params(root, {"bark": {"data": {"train_conversations": 20000}}})
        return ["data", "bark"], root

    def mlflow_disk_full(args: list[str], trainings: int, room_kib: int = 16):
        """The project on a 32 MiB tmpfs with MLflow tracking on, `trainings` tracked trainings
        done while there was room (0: no store yet), then filled to the last `room_kib` KiB, so
        the command's MLflow writes fail. The model that was there must stay, byte for byte."""
        def setup():
            import hashlib

            mnt = tiny_filesystem(folder, 32 * 1024)
            if mnt is None:
                return None
            root = mnt / "project"
            shutil.copytree(base, root)
            write_params(root, {"tracking": {"enabled": True}})
            for _ in range(trainings):
                out = barkgpt(["train", "bark", "--quiet"], root)
                if out.returncode:
                    raise SystemExit(f"could not prepare a tracked training: {out.stderr[-2000:]}")
            best = root / "models/bark/best.pt"
            before = hashlib.sha256(best.read_bytes()).hexdigest()
            with open(mnt / "filler", "wb") as f:  # what an almost full disk leaves
                f.write(b"\0" * max(0, shutil.disk_usage(mnt).free - room_kib * 1024))

            def kept() -> str:
                from barkgpt.checkpoint import load_model
                from barkgpt.errors import BarkError

                try:
                    load_model(best)
                except BarkError as err:
                    return f"LOST: best.pt no longer loads ({err})"
                same = hashlib.sha256(best.read_bytes()).hexdigest() == before
                return "the last good best.pt kept" if same else "LOST: best.pt was replaced"
            return args, root, kept
        return setup

    yield "params.yaml: bark.model.n_embd: 100000000", params_case({"bark": {"model": {"n_embd": 100000000}}},
                                                                   ["train", "bark", "--quiet"])
    yield "params.yaml: bark.train.batch_size: 1000000000", params_case({"bark": {"train": {"batch_size": 10**9}}},
                                                                        ["train", "bark", "--quiet"])
    yield "params.yaml: bark.train.threads: 100000", params_case({"bark": {"train": {"threads": 100000}}},
                                                                 ["train", "bark", "--quiet"])
    yield "params.yaml: n_layer 64, n_embd 4096, n_head 32 (each within bounds)", params_case(
        {"bark": {"model": {"n_layer": 64, "n_embd": 4096, "n_head": 32}}}, ["train", "bark", "--quiet"])
    yield "params.yaml: bark.train.learning_rate: .inf", params_case({"bark": {"train": {"learning_rate": float("inf")}}},
                                                                     ["train", "bark", "--quiet"])
    yield "params.yaml: bark.model.n_head: 3", params_case({"bark": {"model": {"n_head": 3}}}, ["train", "bark"])
    yield "params.yaml: unknown key bark.model.n_embdd", params_case({"bark": {"model": {"n_embdd": 64}}},
                                                                     ["train", "bark"])
    yield "params.yaml: export.deploy_quantization: q2_k", params_case({"export": {"deploy_quantization": "q2_k"}},
                                                                       ["quantize", "bark"])
    yield "params.yaml: serve.threads: 100000", params_case({"serve": {"threads": 100000}}, ["serve"])
    yield "params.yaml: not YAML (`bark: [`)", raw_params("bark: [\n", ["train", "bark"])
    yield "--params missing.yaml", params_case({}, ["--params", "missing.yaml", "train", "bark"])
    yield "data/bark/tokenizer.json holding []", file_case("data/bark/tokenizer.json", b"[]", ["train", "bark"])
    yield "data/bark/tokenizer.json holding {}", file_case("data/bark/tokenizer.json", b"{}", ["train", "bark"])
    yield 'data/bark/tokenizer.json: {"kind": "word"} (no vocab)', file_case(
        "data/bark/tokenizer.json", b'{"kind": "word"}', ["train", "bark"])
    yield "data/bark/tokenizer.json: not JSON", file_case("data/bark/tokenizer.json", b"woof", ["train", "bark"])
    yield "models/bark/best.pt truncated to 1000 bytes", truncated("models/bark/best.pt", 1000, ["evaluate", "bark"])
    yield "models/bark/best.pt holding []", file_case("models/bark/best.pt", b"[]", ["evaluate", "bark"])
    yield "data/bark/tokens/train-000000.bin of odd size", file_case(
        "data/bark/tokens/train-000000.bin", b"\x01\x02\x03", ["train", "bark"])
    yield "data/bark/tokens/train.json holding {}", file_case("data/bark/tokens/train.json", b"{}", ["train", "bark"])
    yield "data/bark/val.txt: a row 'User: speak Assistant: meow <EOS>'", file_case(
        "data/bark/val.txt", b"User: speak Assistant: meow <EOS>\n", ["validate", "bark"])
    yield "generate --prompt 'User: hey Assistant:'", params_case({}, ["generate", "--prompt", "User: hey Assistant:"])
    yield "generate --temperature 1e-300", params_case({}, ["generate", "--temperature", "1e-300", "--seed", "0"])
    yield "generate --checkpoint missing.pt", params_case({}, ["generate", "--checkpoint", "missing.pt"])
    yield "train bark before any data (empty project)", empty_project(["train", "bark"])
    yield "evaluate bark with no checkpoint", empty_project(["evaluate", "bark"])
    yield "parity bark before export", params_case({}, ["parity", "bark"])
    yield "serve --model missing.gguf", params_case({}, ["serve", "--model", "missing.gguf"])
    yield "serve --model data/bark/val.txt (not a model)", params_case({}, ["serve", "--model", "data/bark/val.txt"])
    yield "ingest webtext, source: missing.txt", empty_project(["ingest", "webtext"], {"webtext": {"source": "missing.txt"}})
    yield "deploy bark before evaluation", params_case({}, ["deploy", "bark"])
    yield "disk full (64 KiB tmpfs) during data bark", disk_full
    # Point 7 of issue 21: what used to end in a traceback.
    yield "models/bark/best.pt: valid trailer, wrong shapes (evaluate)", wrong_shapes(["evaluate", "bark"])
    yield "models/bark/best.pt: valid trailer, wrong shapes (export)", wrong_shapes(["export", "bark"])
    yield "dvc.lock empty (a kill during DVC's write)", file_case("dvc.lock", b"", ["deploy", "bark"])
    yield "dvc.lock not YAML", file_case("dvc.lock", b"stages: [oops\n", ["deploy", "bark"])
    yield "dvc.lock a list", file_case("dvc.lock", b"- a\n- b\n", ["deploy", "bark"])
    yield "dvc.lock binary", file_case("dvc.lock", b"\xff\xfe\x00\x01binary", ["deploy", "bark"])
    yield "params.yaml not UTF-8", file_case("params.yaml", b"seed: 1\nbark:\n  x: \xff\n", ["train", "bark"])
    yield "params.yaml: an integer of 4,301 digits", file_case("params.yaml", b"seed: " + b"9" * 4301 + b"\n",
                                                               ["train", "bark"])
    yield "params.yaml: 1 KB of nested YAML aliases", file_case("params.yaml", b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n".encode() for i in range(9)), ["train", "bark"])
    yield "params.yaml: a duplicate key", file_case("params.yaml", b"seed: 1\nseed: 2\n", ["train", "bark"])
    yield "params.yaml empty", file_case("params.yaml", b"", ["train", "bark"])
    yield "params.yaml a directory (--params DIR)", params_path(lambda root: (root / "conf").mkdir(),
                                                                ["--params", "conf", "train", "bark"])
    yield "disk full while MLflow creates its store (train, tracking on)", mlflow_disk_full(["train", "bark", "--quiet"], 0)
    yield "disk full while MLflow writes a second training's run (train twice)", mlflow_disk_full(
        ["train", "bark", "--quiet"], 1)
    yield "disk full while MLflow logs the evaluation (evaluate, tracking on)", mlflow_disk_full(["evaluate", "bark"], 1, 160)
    yield "data/bark/tokenizer.json: an extra word ('meow') in the vocabulary", file_case(
        "data/bark/tokenizer.json", b'{"kind": "word", "vocab": ["<PAD>", "<EOS>", "woof", "arf", "ruff", "grrr", '
        b'"User:", "Assistant:", "speak", "meow"]}', ["train", "bark"])
    yield "data/bark/tokenizer.json: 'woof' and 'arf' swapped (evaluate)", file_case(
        "data/bark/tokenizer.json", b'{"kind": "word", "vocab": ["<PAD>", "<EOS>", "arf", "woof", "ruff", "grrr", '
        b'"User:", "Assistant:", "speak"]}', ["evaluate", "bark"])


def first_message(out: subprocess.CompletedProcess) -> str:
    text = (out.stderr or "") + (out.stdout or "")
    if "Traceback (most recent call last)" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        return f"TRACEBACK: {last.strip()[:160]}"
    lines = [line.strip() for line in (out.stderr or out.stdout or "").splitlines() if line.strip()]
    shown = " ".join(lines[:3])
    return shown[:220] + ("..." if len(shown) > 220 else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument("--only", help="run only the rows whose input contains this text")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="barkgpt-bad-") as tmp:
        folder = Path(tmp)
        RUNTIME.chmod(0o700)
        mounts = []
        try:
            base = trained_project(folder)
            cases_dir = folder / "cases"
            cases_dir.mkdir()
            for label, setup in cases(base, cases_dir):
                if args.only and args.only not in label:
                    continue
                prepared = setup()
                if prepared is None:
                    rows.append({"input": label, "exit": None, "message": "skipped: cannot mount a tmpfs (needs root)"})
                    continue
                argv, cwd, *after = prepared
                if "tmpfs" in str(cwd):
                    mounts.append(cwd.parent)
                out = barkgpt(argv, cwd, timeout=60 if argv[0] == "serve" else 300)
                message = first_message(out)
                if after:  # what must survive the failure
                    message += f" [{after[0]()}]"
                rows.append({"input": label, "command": "barkgpt " + " ".join(argv), "exit": out.returncode,
                             "message": message})
                print(f"{out.returncode:>4}  {label}", file=sys.stderr)
        finally:
            # The warm server first: a stage it forked in the tmpfs keeps that mount busy until it stops.
            subprocess.run([sys.executable, "-m", "barkgpt.warm", "stop"], capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(REPO), "XDG_RUNTIME_DIR": str(RUNTIME)})
            for mnt in mounts:
                for _ in range(50):  # the servers exit on SIGTERM within moments
                    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                        break
                    time.sleep(0.1)
                else:
                    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
            shutil.rmtree(RUNTIME, ignore_errors=True)
    print("| # | input | command | exit | message |\n|---|---|---|---|---|")
    for i, r in enumerate(rows, 1):
        msg = r["message"].replace("|", "\\|")
        print(f"| {i} | {r['input']} | `{r.get('command', '')}` | {r['exit']} | {msg} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    tracebacks = sum(r["message"].startswith("TRACEBACK") for r in rows)
    lost = sum("[LOST" in r["message"] for r in rows)
    print(f"\n{len(rows)} inputs, {tracebacks} tracebacks, {lost} lost a model", file=sys.stderr)
    return 1 if tracebacks or lost else 0


if __name__ == "__main__":
    sys.exit(main())
