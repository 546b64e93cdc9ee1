"""MLflow on the embedded store: what a run records, one model version per trained model, and the
champion on the best gate-passing version (not the newest)."""
from __future__ import annotations

import os

import pytest
import yaml

from barkgpt.config import load_params
from barkgpt.pipelines import run_stage
from barkgpt.tracking.registry import ranking
from tests.conftest import make_project

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
SMALL = {"bark": {"data": {"train_conversations": 300, "val_conversations": 60},
                  "train": {"max_steps": 120, "threads": 1, "eval_every": 60, "checkpoint_every": 60},
                  "gates": {"contract_samples": 30, "contract_accuracy": 0.001}}}  # k = n: every model passes


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Model A (120 steps) trained and evaluated, then evaluated again; then a worse model B (8 steps)."""
    import mlflow

    root = make_project(tmp_path_factory.mktemp("tracking") / "project", SMALL)
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"bark-tokenize": {"outs": [
        {"path": "data/bark/tokens", "md5": "0123456789abcdef0123456789abcdef.dir"}]}}}))
    params = load_params(root / "params.yaml")
    run_stage(params, "bark", "data", root)
    run_stage(params, "bark", "tokenize", root)
    run_stage(params, "bark", "train", root, progress=False)
    first = run_stage(params, "bark", "evaluate", root)
    again = run_stage(params, "bark", "evaluate", root)
    worse_params = load_params(root / "params.yaml", {"bark": {"train": {"max_steps": 8}}})
    run_stage(worse_params, "bark", "train", root, progress=False)
    worse = run_stage(worse_params, "bark", "evaluate", root)
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return {"root": root, "client": client, "first": first, "again": again, "worse": worse}


BARK = ranking("contract_accuracy", True)


def test_one_version_per_trained_model_and_champion_is_the_best(tracked):
    client, first, again, worse = tracked["client"], tracked["first"], tracked["again"], tracked["worse"]
    assert again["mlflow"]["version"] == first["mlflow"]["version"] == 1  # re-evaluated: no second version
    assert worse["mlflow"]["version"] == 2 and worse["gate_passed"]  # B passes the (zero) gate ...
    assert worse["contract_accuracy"] < first["contract_accuracy"] or worse["val_loss"] > first["val_loss"]
    versions = client.search_model_versions("name='barkgpt-bark'")
    assert len(versions) == 2
    champion = client.get_model_version_by_alias("barkgpt-bark", "champion")
    assert str(champion.version) == "1" and worse["mlflow"]["champion"] is False  # ... but A stays champion


def test_versions_carry_file_and_data_hashes(tracked):
    from barkgpt.fileio import sha256_file

    root, client = tracked["root"], tracked["client"]
    v2 = client.get_model_version("barkgpt-bark", "2")
    assert v2.tags["sha256.best.pt"] == sha256_file(root / "models/bark/best.pt")
    assert v2.tags["sha256.tokenizer.json"] == sha256_file(root / "data/bark/tokenizer.json")
    assert v2.tags["dvc.md5.data/bark/tokens"] == "0123456789abcdef0123456789abcdef.dir"
    assert v2.tags["gate_passed"] == "true" and float(v2.tags["eval.contract_accuracy"]) >= 0


def test_run_names_params_inputs_and_experiment_kind(tracked):
    client = tracked["client"]
    exp = client.get_experiment_by_name("barkgpt")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the classic ML page
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    lr = load_params(tracked["root"] / "params.yaml").bark.train.learning_rate
    assert set(runs) == {f"bark 2x64 (ctx 64), 120 steps, lr {lr:g}, seed 1337",
                         f"bark 2x64 (ctx 64), 8 steps, lr {lr:g}, seed 1337"}
    run = runs[f"bark 2x64 (ctx 64), 120 steps, lr {lr:g}, seed 1337"]
    keys = set(run.data.params)
    assert "bark.train.max_steps" in keys and "export.deploy_quantization" in keys and "seed" in keys
    assert not any(k.startswith(("serve.", "deploy.", "tracking.", "webtext.")) for k in keys), keys
    assert len(keys) < 90
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in run.inputs.dataset_inputs}
    assert inputs == {"bark-train-tokens": {"mlflow.data.context": "training"},
                      "bark-val-tokens": {"mlflow.data.context": "validation"}}
    assert "system/cpu_utilization_percentage" in run.data.metrics


def test_run_has_mlflow_standard_tags_one_name_per_metric_and_every_logged_step(tracked):
    client, root = tracked["client"], tracked["root"]
    run = client.get_run(tracked["first"]["mlflow"]["run_id"])
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] and tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"]  # the command that ran: the UI's "Source" column
    metrics = set(run.data.metrics)
    assert not any(k.startswith(("train.", "eval.gate.")) for k in metrics), sorted(metrics)  # no second names
    assert {"loss", "val_loss", "best_val_loss", "eval.gate_passed", "eval.contract_accuracy"} <= metrics
    params = load_params(root / "params.yaml").bark.train
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == list(range(params.log_every, params.max_steps + 1, params.log_every))
    # the committed bark defaults draw the curve with at least 20 points
    bark = load_params().bark.train
    assert bark.max_steps // bark.log_every >= 20


def test_registered_model_and_versions_are_described(tracked):
    client = tracked["client"]
    model = client.get_registered_model("barkgpt-bark")
    assert "champion" in model.description and "models:/barkgpt-bark@champion" in model.description
    v2 = client.get_model_version("barkgpt-bark", "2")
    assert v2.description.startswith("bark 2x64 (ctx 64), 8 steps") and "gate passed" in v2.description


def test_mlflow_ui_opens_the_experiment_on_its_training_runs(tracked, tmp_path):
    """A fresh browser, the MLflow UI on loopback, the link BarkGPT prints: the training runs are
    listed (MLflow 3's UI otherwise opens a fresh browser on its GenAI overview)."""
    import shutil
    import socket
    import sys
    from pathlib import Path

    from barkgpt.tracking.runs import ui_url
    from tests.test_orchestration import start, stop, wait_http

    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed: apt-get install -y chromium")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the Python driver)")
    port = next(p for p in range(18600, 18700) if socket.socket().connect_ex(("127.0.0.1", p)) != 0)
    log = tmp_path / "mlflow.log"
    server = start([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                    "--workers", "1", "--backend-store-uri", f"sqlite:///{tracked['root'] / 'mlflow.db'}"],
                   {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, tmp_path, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", 180, server, log)
        exp = tracked["client"].get_experiment_by_name("barkgpt")
        names = [r.info.run_name for r in tracked["client"].search_runs([exp.experiment_id])]
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                        args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(ui_url(url, exp.experiment_id))
                for name in names:
                    page.get_by_text(name, exact=True).first.wait_for(timeout=60000)
                body = page.inner_text("body")
                page.screenshot(path=str(tmp_path / "mlflow-runs.png"))  # for a person to look at
            finally:
                browser.close()
        assert "/runs" in page.url and "Run Name" in body, page.url
    finally:
        stop(server)


def test_registered_model_has_an_input_example(tracked):
    import mlflow

    client = tracked["client"]
    v1 = client.get_model_version("barkgpt-bark", "1")
    info = mlflow.models.get_model_info(v1.source) if hasattr(mlflow.models, "get_model_info") else None
    assert info is not None and info.saved_input_example_info is not None
    assert info.signature is not None


def test_failing_reevaluation_takes_the_champion_away(tracked, tmp_path):
    """Champion = best gate-passing version: when no version passes, there is none."""
    from barkgpt.tracking.registry import best_version

    class V:
        def __init__(self, version, gate, acc, loss):
            self.version, self.run_id = str(version), f"r{version}"
            self.tags = {"gate_passed": gate, "eval.contract_accuracy": repr(acc), "eval.val_loss": repr(loss)}

    assert best_version([V(1, "true", 1.0, 0.70), V(2, "true", 1.0, 0.69), V(3, "true", 0.98, 0.5)], BARK) == 2
    assert best_version([V(1, "false", 1.0, 0.7), V(2, "true", 0.5, 1.0)], BARK) == 2
    assert best_version([V(1, "false", 1.0, 0.7)], BARK) is None
    assert best_version([V(1, "true", 1.0, 0.7), V(2, "true", 1.0, 0.7)], BARK) == 2  # a tie: newer


def test_ctrl_c_while_mlflow_creates_its_store_leaves_none_or_a_whole_one(tmp_path):
    """MLflow migrates a new mlflow.db in dozens of steps over seconds, on the first run; a Ctrl-C
    then used to leave a half-migrated store that every later run failed on."""
    import signal
    import subprocess
    import sys
    import time

    from barkgpt.tracking.runs import client_for

    root = make_project(tmp_path / "project")
    # Ctrl-C as a terminal's foreground job has it, whatever pytest has (ignored when run in the background)
    first_run = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                 "import sys; from pathlib import Path; from barkgpt.config import load_params; "
                 "from barkgpt.tracking.runs import client_for; root = Path(sys.argv[1]); "
                 "client_for(load_params(root / 'params.yaml'), root)[1].search_experiments()")
    proc = subprocess.Popen([sys.executable, "-c", first_run, str(root)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(root.glob("*mlflow.db*")):  # the store (or its temp file) is being migrated
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    time.sleep(0.5)  # well into the migrations (about 3 s on a 2-core machine)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) != 0, "the first run finished before Ctrl-C: nothing was tested"
    assert "KeyboardInterrupt" in proc.stderr.read()
    assert not list(root.glob(".mlflow.db.*")), "the temp store outlived its Ctrl-C"

    _, client = client_for(load_params(root / "params.yaml"), root)  # the next run starts cleanly
    assert [e.name for e in client.search_experiments()] == ["Default"]


def test_deploy_names_a_broken_store_with_the_fix_too(tmp_path):
    """Deploy opens the registry through the same door as training (barkgpt.tracking.open_store)."""
    import sqlite3

    from barkgpt.deploy.registry import stage_model_version
    from barkgpt.errors import BarkError

    root = make_project(tmp_path / "project")
    with sqlite3.connect(root / "mlflow.db") as db:
        db.execute("CREATE TABLE experiments (name TEXT)")
    with pytest.raises(BarkError, match=r"cannot be opened .*\(mv "):
        stage_model_version(load_params(root / "params.yaml"), "bark", root)


@pytest.mark.parametrize("pipeline", ["bark", "webtext", "localtext"])
def test_every_pipeline_reads_its_own_dvc_lock_for_lineage(tmp_path, pipeline):
    """The layout owns each lock's path (the root's for bark, pipelines/<p>/dvc.lock for the
    others); one reader serves the MLflow run's tags and the release manifest alike."""
    from barkgpt.deploy.provenance import dvc_data_hash
    from barkgpt.layout import Layout
    from barkgpt.tracking.runs import data_tags

    lay = Layout(pipeline, tmp_path)
    decoy = {"schema": "2.0", "stages": {"other-tokenize": {"outs": [
        {"path": f"data/{pipeline}/tokens", "md5": "f" * 32 + ".dir"}]}}}
    for lock in {tmp_path / "dvc.lock", *(tmp_path / "pipelines" / p / "dvc.lock" for p in ("bark", "webtext", "localtext"))}:
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(yaml.safe_dump(decoy))  # every other lock names the same path with another hash
    outs = {f"data/{pipeline}/tokens": "0123456789abcdef0123456789abcdef.dir",
            f"data/{pipeline}/train.txt": "00112233445566778899aabbccddeeff"}
    lay.dvc_lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {f"{pipeline}-tokenize": {
        "cmd": f"barkgpt tokenize {pipeline}", "outs": [{"path": p, "md5": m, "size": 1} for p, m in outs.items()]}}}))
    assert lay.dvc_lock == (tmp_path / "dvc.lock" if pipeline == "bark" else tmp_path / f"pipelines/{pipeline}/dvc.lock")
    assert data_tags(lay)["dvc.data_md5"] == outs[f"data/{pipeline}/tokens"]  # the training run's tag
    release = dvc_data_hash(tmp_path, pipeline)  # what the deploy manifest records
    assert release["outs"] == outs and len(release["hash"]) == 32
