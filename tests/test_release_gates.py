"""Gates that many doors, params files and processes cannot fool: a report binds how its numbers
were measured and the bytes it judged, the registry must agree with it, deploy ships the judged
bytes under the pipeline's lock, a broken dvc.lock is refused, `live` moves only after the smoke
test, and the flow's --params cannot make dvc.lock lie. One test per route of the attack run."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from barkgpt.config import load_params
from barkgpt.deploy.deployer import deploy_pipeline
from barkgpt.errors import BarkError
from barkgpt.layout import Layout
from barkgpt.pipelines import run_stage
from conftest import make_project
from test_deploy import deploy_params, moto_endpoint, names, released, target  # noqa: F401 (fixtures)


def quiet(*_):
    pass


def test_a_report_measured_under_other_settings_is_refused(bark_copy):
    """Route 1: greedy decoding makes no contract failures; a report measured that way must not pass
    the gate of params that sample at temperature 1.0."""
    from barkgpt.gates import GateError, check_release

    params = load_params(bark_copy / "params.yaml")
    greedy = load_params(bark_copy / "params.yaml", {"bark": {"eval": {"temperature": 0.0}}})
    run_stage(greedy, "bark", "evaluate", bark_copy)
    with pytest.raises(GateError, match=r"metrics.json was measured under other settings than these params "
                                        r"\(bark.eval.temperature was 0.0, params say 1.0\); re-run the evaluate"):
        check_release(params, "bark", bark_copy, "checkpoint")
    check_release(greedy, "bark", bark_copy, "checkpoint")  # the params it was measured under: judged as usual


def test_the_release_ships_the_judged_bytes_under_the_pipeline_lock(target, bark_copy, names, tmp_path):
    """Route 2: a file replaced after the gate check and before the upload does not ship; export and
    deploy exclude each other."""
    from barkgpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from barkgpt.runs import writer_lock

    params = deploy_params(bark_copy, names)
    lay = Layout("bark", bark_copy)
    judged = json.loads(lay.metrics.read_text())["judged"]["checkpoint"]["sha256"]
    other = tmp_path / "other.pt"
    model, tok = model_from_checkpoint(load_checkpoint(lay.checkpoint))
    save_checkpoint(other, model=model, tokenizer=tok, params={}, step=12345)  # a valid, different model file

    def swap_after_the_gate(message):
        if message.startswith("deploying"):  # gates checked, nothing uploaded yet
            shutil.copyfile(other, lay.checkpoint)

    report = deploy_pipeline(params, "bark", bark_copy, target=target, log=swap_after_the_gate)
    assert hashlib.sha256(lay.checkpoint.read_bytes()).hexdigest() != judged  # the swap happened
    model_entry = report["release"]["files"]["model"]
    assert model_entry["sha256"] == judged
    body = target.client("s3").get_object(Bucket=names["bucket"], Key=model_entry["key"])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == judged
    # Now best.pt is not what was judged: refused before anything is uploaded.
    with pytest.raises(BarkError, match="metrics.json is stale"):
        deploy_pipeline(params, "bark", bark_copy, target=target, log=quiet)

    with writer_lock(lay, "export bark"), pytest.raises(BarkError, match="export bark"):
        deploy_pipeline(params, "bark", bark_copy, target=target, log=quiet)
    with writer_lock(lay, "deploy bark"), pytest.raises(BarkError, match="deploy bark"):
        run_stage(params, "bark", "export", bark_copy)
    # A killed export's temp file is not left in the output folder DVC records.
    leftover = lay.full_exports / ".bark-f32.gguf.killed.tmp"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half a file")
    run_stage(params, "bark", "export", bark_copy)
    assert not list(lay.full_exports.glob(".*.tmp")) and lay.gguf("f32").exists()


def test_report_numbers_edited_by_hand_are_refused(target, bark_copy, names):
    """Route 3: numbers that disagree with the report's own raw count, a report that is not the one
    the stage registered, and a registry version tagged gate_passed=false are all refused."""
    import mlflow

    if not (bark_copy / "models/bark/mlflow_run.json").exists():
        pytest.skip("the bark_project fixture was trained without MLflow tracking")
    params = deploy_params(bark_copy, names)
    metrics = Layout("bark", bark_copy).metrics
    original = metrics.read_text()
    m = json.loads(original)
    n, failures = m["contract_samples"], m["contract_failures"]
    assert failures + 1 <= m["gate"]["test"]["max_failures"]  # one more failure still passes the gate

    metrics.write_text(json.dumps({**m, "contract_accuracy": 1 - (failures + 1) / n}))
    with pytest.raises(BarkError, match=rf"contract_accuracy .* is not 1 - {failures}/{n}"):
        deploy_pipeline(params, "bark", bark_copy, target=target, log=quiet)

    metrics.write_text(json.dumps({**m, "contract_failures": failures + 1, "contract_accuracy": 1 - (failures + 1) / n}))
    with pytest.raises(BarkError, match="is not the report the evaluate stage wrote for barkgpt-bark version"):
        deploy_pipeline(params, "bark", bark_copy, target=target, log=quiet)

    metrics.write_text(original)
    client = mlflow.MlflowClient(f"sqlite:///{bark_copy / 'mlflow.db'}")
    sha = m["judged"]["checkpoint"]["sha256"]
    version = next(v for v in client.search_model_versions("name='barkgpt-bark'") if v.tags.get("sha256.best.pt") == sha)
    client.set_model_version_tag("barkgpt-bark", version.version, "gate_passed", "false")
    with pytest.raises(BarkError, match="the registry tags barkgpt-bark version .* gate_passed=false"):
        deploy_pipeline(params, "bark", bark_copy, target=target, log=quiet)
    assert names["bucket"] not in [b["Name"] for b in target.client("s3").list_buckets()["Buckets"]]


@pytest.mark.parametrize("content", [b"", b"  \n", b"stages: [oops\n", b"- a\n- list\n", b"\xff\xfe\x00binary",
                                     b"schema: '2.0'\nstages:\n  bark-train: 3\n"])
def test_an_empty_or_corrupt_dvc_lock_stops_deploy(target, bark_copy, names, content):
    """Route 4: a dvc.lock that a kill left empty (or any corrupt one) is named with its fix."""
    (bark_copy / "dvc.lock").write_bytes(content)
    with pytest.raises(BarkError, match=r"dvc.lock is (empty|corrupt).*git checkout -- dvc.lock.*dvc repro"):
        deploy_pipeline(deploy_params(bark_copy, names), "bark", bark_copy, target=target, log=quiet)


def test_the_flow_puts_back_the_lock_of_an_interrupted_commit(tmp_path, capsys):
    """Route 4, the flow's side: DVC truncates dvc.lock and then writes it; the flow keeps the lock
    from before its commit and puts it back when a kill cut the write short."""
    from tasks.stages import lock_backup, restore_interrupted_lock

    good = "schema: '2.0'\nstages:\n  bark-data:\n    cmd: barkgpt data bark\n"
    (tmp_path / "dvc.lock").write_text("")  # what DVC's write leaves when killed after the truncate
    lock_backup(tmp_path).parent.mkdir(parents=True)
    lock_backup(tmp_path).write_text(good)
    restore_interrupted_lock(tmp_path)
    assert (tmp_path / "dvc.lock").read_text() == good and not lock_backup(tmp_path).exists()
    assert "restored the lock from before it" in capsys.readouterr().out
    (tmp_path / "dvc.lock").write_text("")  # empty, and no copy kept: named, not trusted
    with pytest.raises(BarkError, match="dvc.lock is empty"):
        restore_interrupted_lock(tmp_path)


def test_live_moves_only_after_the_new_version_passed_its_smoke_test(target, bark_copy, names):
    """Route 5: a kill right after the alias moved must not leave an untested version live."""
    messages: list[str] = []
    params = deploy_params(bark_copy, names)
    deploy_pipeline(params, "bark", bark_copy, target=target, log=messages.append)
    deploy_pipeline(deploy_params(bark_copy, names, memory_mb=1536), "bark", bark_copy, target=target,
                    log=messages.append)  # a second version: the alias moves from 1 to 2
    for version in ("1", "2"):
        tested = next(i for i, m in enumerate(messages) if m.startswith(f"smoke test passed on version {version} "))
        moved = next(i for i, m in enumerate(messages)
                     if "alias live" in m and m.endswith((f"-> version {version}", f"-> {version}")))
        assert tested < moved, messages


def test_the_flow_refuses_a_params_file_that_differs_in_a_tracked_key(tmp_path):
    """Route 6: dvc.lock records params.yaml's values; a run under another file's must not be
    recorded as theirs."""
    from tasks.common import resolve_params

    root = make_project(tmp_path / "project")
    make_project(tmp_path / "worse", {"bark": {"train": {"max_steps": 20}}, "deploy": {"memory_mb": 2048}})
    shutil.copy(tmp_path / "worse" / "params.yaml", root / "worse.yaml")
    steps = load_params(root / "params.yaml").bark.train.max_steps
    with pytest.raises(BarkError, match=rf"worse.yaml differs from params.yaml.* in bark.train.max_steps: 20 "
                                        rf"\(params.yaml: {steps}\); set those values in params.yaml"):
        resolve_params.fn("worse.yaml", None, str(root), "bark")
    # Only an untracked key differs (deploy settings): accepted.
    make_project(tmp_path / "bigger", {"deploy": {"memory_mb": 2048}})
    shutil.copy(tmp_path / "bigger" / "params.yaml", root / "bigger.yaml")
    assert resolve_params.fn("bigger.yaml", None, str(root), "bark")["deploy"]["memory_mb"] == 2048


# --- bad inputs that used to end in a traceback (point 7): one clear error each -----------------------

@pytest.mark.parametrize("content, message", [
    (b"bark:\n  train: \xff\n", "not UTF-8 text"),
    (b"seed: " + b"9" * 4301 + b"\n", "a value cannot be read"),
    (b"a: &a [1, 2]\nb: &b [*a, *a]\nc: [*b, *b]\n", r"aliases \(\*name\) are not allowed"),
    (b"seed: 1\nseed: 2\n", "duplicate key 'seed'"),
    (b"", "is empty; every setting would be a built-in default"),
    (b"- bark\n", "must be a mapping of sections"),
])
def test_bad_params_files_are_named(tmp_path, content, message):
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(BarkError, match=message) as err:
        load_params(path)
    assert len(str(err.value)) < 1000  # an alias bomb must not become a 254 MB message


def test_params_folder_and_bad_set_value_are_named(tmp_path):
    from barkgpt.params import parse_assignments

    with pytest.raises(BarkError, match="is a folder, not a params file"):
        load_params(tmp_path)
    with pytest.raises(BarkError, match=r"--set bark.train.max_steps=\[: the value is not valid YAML"):
        parse_assignments(["bark.train.max_steps=["])


def test_a_sealed_checkpoint_with_the_wrong_shapes_is_named(bark_project, tmp_path):
    import torch

    from barkgpt.checkpoint import load_checkpoint, load_model, seal

    state = load_checkpoint(bark_project / "models/bark/best.pt")
    state["model_params"] = {**state["model_params"], "n_embd": state["model_params"]["n_embd"] * 2}
    path = tmp_path / "best.pt"
    torch.save(state, path)
    seal(path)  # a valid trailer: the bytes are intact, the contents are wrong
    with pytest.raises(BarkError, match="best.pt: its weights do not fit the model it describes"):
        load_model(path)


def test_the_lambda_handler_answers_malformed_events_with_400(released, tmp_path):
    from barkgpt.deploy.events import function_url_event
    from barkgpt.deploy.lambda_handler import ENV_MODEL_DIR, LambdaApp

    s3, _, env = released
    app = LambdaApp({**env, ENV_MODEL_DIR: str(tmp_path)}, s3=s3)
    good = function_url_event("GET", "/ready")
    no_method = {**good, "requestContext": {k: v for k, v in good["requestContext"].items() if k != "http"}}
    bad_base64 = {**function_url_event("POST", "/v1/model/generate", {"prompt": "x"}), "isBase64Encoded": True,
                  "body": "!!not base64"}
    try:
        for event in ({}, None, [1], no_method, bad_base64):
            response = app(event)
            assert response["statusCode"] == 400 and "bad_event" in response["body"], (event, response)
        assert app(good)["statusCode"] == 200  # the container still serves
    finally:
        app.close()


def test_deploy_refuses_a_pipeline_that_dvc_judges_changed(tmp_path):
    """In a DVC project, `dvc status` of the gating stages (with what is upstream) must be clean: a
    report rewritten outside DVC (another door, another params file) is refused."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from barkgpt.deploy.gates import check_dvc_fresh
    from barkgpt.gates import GateError

    root = make_project(tmp_path / "project")
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=root, check=True)
    metrics = root / "reports/bark/metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text('{"contract_failures": 3}')
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"bark-evaluate": {
        "cmd": "barkgpt evaluate bark", "outs": [{"reports/bark/metrics.json": {"cache": False}}]}}}))
    subprocess.run([dvc, "commit", "-f", "-q", "bark-evaluate"], cwd=root, check=True)
    params = load_params(root / "params.yaml", {"deploy": {"artifact": "checkpoint"}})
    check_dvc_fresh(params, "bark", root)  # as dvc.lock records it: nothing to say
    metrics.write_text('{"contract_failures": 0}')
    with pytest.raises(GateError, match="DVC says the pipeline is not what dvc.lock records .bark-evaluate"):
        check_dvc_fresh(params, "bark", root)


def test_a_full_disk_under_mlflow_store_is_one_line_exit_2(monkeypatch, capsys):
    """Point 7: SQLite's "database or disk is full" from MLflow's store (wrapped by SQLAlchemy and
    MLflow) reaches the user as one line, exit 2, without MLflow's logged SQL traceback."""
    import argparse
    import logging
    import sqlite3

    from mlflow.exceptions import MlflowException

    from barkgpt import cli
    from barkgpt.fileio import disk_full_cause
    from barkgpt.tracking.runs import quiet_disk_full

    def write_to_full_store(_args):
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as err:
            logging.getLogger("mlflow.store.db.utils").exception("SQLAlchemy database error")
            raise MlflowException(f"(sqlite3.OperationalError) {err}") from err

    quiet_disk_full(logging.getLogger("mlflow.store.db.utils"))
    parser = argparse.ArgumentParser()
    parser.set_defaults(fn=write_to_full_store)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: disk full: SQLite: database or disk is full (MLflow's store")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert disk_full_cause(OSError(28, "No space left on device", "mlruns/x")) == "No space left on device writing mlruns/x"
    assert disk_full_cause(ValueError("database is locked")) is None
