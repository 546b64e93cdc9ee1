"""Deployment against a real moto server process on loopback: S3 release, Lambda function,
alias moves, rollback, the handler with real events, the CloudFormation template, DVC over S3."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from barkgpt.deploy.api_key import ENV_API_KEY_SECRET, read_api_key, store_api_key
from barkgpt.deploy.aws import LOCAL_KEYS, aws_target, connect
from barkgpt.deploy.deployer import deploy_pipeline
from barkgpt.deploy.events import api_gateway_v1_event, function_url_event, response_json
from barkgpt.deploy.lambda_handler import ENV_MANIFEST, ENV_MANIFEST_SHA, ENV_MODEL_DIR, LambdaApp
from barkgpt.deploy.smoke import SmokeTestFailed
from barkgpt.deploy.release import (ChecksumMismatch, TransferSettings, build_manifest, ensure_bucket,
                                    upload_release, verify_object)
from barkgpt.checkpoint import load_checkpoint
from barkgpt.config import load_params
from barkgpt.errors import BarkError
from barkgpt.layout import Layout

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BARKS = {"woof", "arf", "ruff", "grrr"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(env_extra: dict | None = None):
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env_extra or {})})
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("moto_server exited at start")
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("moto_server did not start in 30 s")


@pytest.fixture(scope="module")
def moto_endpoint():
    proc, endpoint = _start_moto()
    yield endpoint
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def target(moto_endpoint):
    return connect(moto_endpoint, "us-east-1", local=True, credentials=LOCAL_KEYS)


@pytest.fixture
def names():
    """Unique bucket and function names: tests share one moto server."""
    tag = uuid.uuid4().hex[:8]
    return {"bucket": f"barkgpt-test-{tag}", "function_name": f"barkgpt-{{pipeline}}-{tag}"}


def deploy_params(root: Path, names: dict, **extra):
    return load_params(root / "params.yaml", {"deploy": {"artifact": "checkpoint", **names, **extra}})


def broken_app(files, manifest, env):
    """A release whose server starts but cannot answer: what the smoke test must catch."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/ready")
    def ready():
        return {"status": "ready"}

    @app.post("/v1/model/generate")
    def generate():
        raise RuntimeError("model produced garbage")

    return app


def recorder(client) -> list[tuple[str, str]]:
    """(operation, key) of every S3 call the client makes, in order."""
    calls: list[tuple[str, str]] = []

    def record(params, model, **_):
        calls.append((model.name, params.get("Key", "")))

    client.meta.events.register("provide-client-params.s3.*", record)
    return calls


# --- S3 release --------------------------------------------------------------------------------

def test_release_multipart_checksums_and_manifest_last(target, tmp_path, names):
    model = tmp_path / "model.gguf"
    model.write_bytes(os.urandom(11 * 1024 * 1024))  # > threshold: 3 parts of 5 MiB (S3 minimum)
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"kind": "word"}')
    transfer = TransferSettings(multipart_threshold=1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    s3 = target.client("s3", max_pool_connections=10)
    calls = recorder(s3)
    ensure_bucket(s3, names["bucket"], target.region)
    files = {"model": model, "tokenizer": tok}
    manifest = build_manifest(files, pipeline="bark", backend="llama_cpp", bucket=names["bucket"],
                              prefix="releases", provenance={"git": {"commit": "abc"}})
    out = upload_release(s3, manifest, files, transfer, log=lambda *_: None)
    assert out["status"] == "uploaded"
    ops = [op for op, _ in calls]
    assert "CreateMultipartUpload" in ops and ops.count("UploadPart") == 3
    writes = [(op, key) for op, key in calls if op in ("PutObject", "CompleteMultipartUpload")]
    assert writes[-1] == ("PutObject", f"{manifest['prefix']}/manifest.json")  # manifest strictly last
    stored = json.loads(s3.get_object(Bucket=names["bucket"], Key=f"{manifest['prefix']}/manifest.json")["Body"].read())
    assert hashlib.sha256(s3.get_object(Bucket=names["bucket"], Key=f"{manifest['prefix']}/manifest.json")["Body"].read()).hexdigest() == out["manifest_sha256"]
    for role, path in files.items():
        entry = stored["files"][role]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["size"] == path.stat().st_size
        body = s3.get_object(Bucket=names["bucket"], Key=entry["key"])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]
    # S3's own checksums were used (composite for the multipart object), not a re-download.
    assert verify_object(s3, names["bucket"], stored["files"]["model"], transfer, model) == "s3-composite-checksum"
    assert verify_object(s3, names["bucket"], stored["files"]["tokenizer"], transfer, tok) == "s3-checksum"
    # The same files again: nothing is uploaded.
    calls.clear()
    again = upload_release(s3, build_manifest(files, pipeline="bark", backend="llama_cpp", bucket=names["bucket"],
                                              prefix="releases"), files, transfer, log=lambda *_: None)
    assert again["status"] == "unchanged" and again["manifest_sha256"] == out["manifest_sha256"]
    assert not [op for op, _ in calls if op in ("PutObject", "UploadPart", "CreateMultipartUpload")]


def _fail_upload_part(s3, part_number: int, times: int | None):
    """Make UploadPart `part_number` fail with a connection error (`times` times; None = always)."""
    from botocore.exceptions import EndpointConnectionError

    seen = {"failures": 0, "calls": 0}

    def fail(request, **_):
        if f"partNumber={part_number}&" in request.url or request.url.endswith(f"partNumber={part_number}"):
            seen["calls"] += 1
            if times is None or seen["failures"] < times:
                seen["failures"] += 1
                raise EndpointConnectionError(endpoint_url=request.url)

    s3.meta.events.register("before-send.s3.UploadPart", fail)
    return seen


def test_upload_failing_midway_is_retried(target, tmp_path, names):
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(11 * 1024 * 1024))
    transfer = TransferSettings(multipart_threshold=1024 * 1024, multipart_chunksize=5 * 1024 * 1024,
                                backoff_s=0.01, max_concurrency=1)
    s3 = target.client("s3", retries={"max_attempts": 1, "mode": "standard"})  # our retry, not botocore's
    seen = _fail_upload_part(s3, 2, times=1)
    ensure_bucket(s3, names["bucket"], target.region)
    manifest = build_manifest({"model": model}, pipeline="bark", backend="torch", bucket=names["bucket"],
                              prefix="r")
    out = upload_release(s3, manifest, {"model": model}, transfer, log=lambda *_: None)
    assert out["status"] == "uploaded" and seen["failures"] == 1 and seen["calls"] >= 2
    body = s3.get_object(Bucket=names["bucket"], Key=manifest["files"]["model"]["key"])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == manifest["files"]["model"]["sha256"]


def test_upload_failing_always_leaves_no_manifest(target, tmp_path, names):
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(11 * 1024 * 1024))
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    transfer = TransferSettings(multipart_threshold=1024 * 1024, multipart_chunksize=5 * 1024 * 1024,
                                backoff_s=0.01, attempts=3, max_concurrency=1)
    s3 = target.client("s3", retries={"max_attempts": 1, "mode": "standard"})
    calls = recorder(s3)
    _fail_upload_part(s3, 2, times=None)
    ensure_bucket(s3, names["bucket"], target.region)
    files = {"model": model, "tokenizer": tok}
    manifest = build_manifest(files, pipeline="bark", backend="torch", bucket=names["bucket"], prefix="r")
    with pytest.raises(BarkError, match="failed after 3 attempts.*no manifest"):
        upload_release(s3, manifest, files, transfer, log=lambda *_: None)
    assert [op for op, _ in calls].count("CreateMultipartUpload") == 3  # retried
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=names["bucket"]).get("Contents", [])]
    assert not any(k.endswith("manifest.json") for k in keys)
    assert not s3.list_multipart_uploads(Bucket=names["bucket"]).get("Uploads")  # parts aborted


def test_verification_detects_changed_object(target, tmp_path, names):
    f = tmp_path / "tokenizer.json"
    f.write_text('{"a": 1}')
    s3 = target.client("s3")
    ensure_bucket(s3, names["bucket"], target.region)
    manifest = build_manifest({"tokenizer": f}, pipeline="bark", backend="torch", bucket=names["bucket"], prefix="r")
    upload_release(s3, manifest, {"tokenizer": f}, TransferSettings(), log=lambda *_: None)
    entry = manifest["files"]["tokenizer"]
    s3.put_object(Bucket=names["bucket"], Key=entry["key"], Body=b'{"a": 2}')  # same size, other bytes
    with pytest.raises(ChecksumMismatch):
        verify_object(s3, names["bucket"], entry, TransferSettings(), f)


# --- credentials and the embedded default -------------------------------------------------------

def test_no_aws_configuration_starts_local_server(monkeypatch, tmp_path):
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path))
    with aws_target("auto") as tgt:
        assert tgt.local and tgt.endpoint_url.startswith("http://127.0.0.1:")
        tgt.client("s3").create_bucket(Bucket="local-check")
        assert [b["Name"] for b in tgt.client("s3").list_buckets()["Buckets"]] == ["local-check"]
        port = int(tgt.endpoint_url.rsplit(":", 1)[1])
    with pytest.raises(OSError):  # stopped with the stage
        socket.create_connection(("127.0.0.1", port), 0.5).close()


def test_missing_credentials_fail_before_upload(monkeypatch, tmp_path, bark_copy, names):
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_REGION", "eu-west-1")  # configured, but no credentials
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    params = deploy_params(bark_copy, names)
    with pytest.raises(BarkError, match="no AWS credentials"):
        deploy_pipeline(params, "bark", bark_copy, log=lambda *_: None)
    assert not (bark_copy / "reports" / "bark" / "deploy.json").exists()


def test_invalid_credentials_rejected():
    proc, endpoint = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # moto validating keys
    try:
        with pytest.raises(BarkError, match="AWS rejected the credentials"):
            connect(endpoint, "us-east-1", credentials={"aws_access_key_id": "AKIAWRONG",
                                                        "aws_secret_access_key": "wrong"})
    finally:
        proc.terminate()
        proc.wait(10)


# --- Lambda function ---------------------------------------------------------------------------

def test_deploy_idempotent_versions_and_alias(target, bark_copy, names):
    params = deploy_params(bark_copy, names)
    first = deploy_pipeline(params, "bark", bark_copy, target=target, log=lambda *_: None)
    fn = first["function"]
    assert fn["changed"] == ["created"] and fn["version"] == "1" and fn["previous_version"] is None
    assert set(first["smoke"]["reply"].split()) <= BARKS and first["smoke"]["reply"]
    assert first["smoke"]["requests"][0]["status"] == 200
    assert not [t for t in threading.enumerate() if t.name == "barkgpt-model" and t.is_alive()]  # smoke app closed
    lam, s3 = target.client("lambda"), target.client("s3")
    assert lam.get_alias(FunctionName=fn["name"], Name="live")["FunctionVersion"] == "1"
    url = lam.get_function_url_config(FunctionName=fn["name"], Qualifier="live")
    assert url["AuthType"] == "AWS_IAM" and url["FunctionUrl"] == fn["url"]
    cfg = lam.get_function_configuration(FunctionName=fn["name"], Qualifier="1")
    env = cfg["Environment"]["Variables"]
    assert env[ENV_MANIFEST] == first["release"]["manifest_uri"] and cfg["MemorySize"] == 1024
    manifest = json.loads(s3.get_object(Bucket=names["bucket"], Key=first["release"]["manifest_uri"].split("/", 3)[3])["Body"].read())
    assert manifest["files"]["model"]["sha256"] == hashlib.sha256((bark_copy / "models/bark/best.pt").read_bytes()).hexdigest()
    assert manifest["provenance"]["gates"]["eval"]["gate_passed"] is True

    # The same release again: nothing changes (no upload, no new version, same code and config).
    again = deploy_pipeline(params, "bark", bark_copy, target=target, log=lambda *_: None)
    assert again["release"]["status"] == "unchanged" and again["function"]["changed"] == []
    assert again["function"]["version"] == "1" and again["smoke"] is None
    assert again["function"]["code_sha256"] == fn["code_sha256"]
    versions = [v["Version"] for v in lam.list_versions_by_function(FunctionName=fn["name"])["Versions"]]
    assert versions == ["$LATEST", "1"]

    # A new artifact: a new release, the configuration points at it, version 2, alias moves.
    from barkgpt.checkpoint import load_checkpoint, save_checkpoint, model_from_checkpoint

    ckpt = bark_copy / "models/bark/best.pt"
    model, tok = model_from_checkpoint(load_checkpoint(ckpt))
    save_checkpoint(ckpt, model=model, tokenizer=tok, params={}, step=999)
    from barkgpt.pipelines import run_stage

    run_stage(params, "bark", "evaluate", bark_copy)  # the gate judges these bytes (a stale report is refused)
    new = deploy_pipeline(params, "bark", bark_copy, target=target, log=lambda *_: None)
    assert new["release"]["id"] != first["release"]["id"]
    assert new["function"]["version"] == "2" and new["function"]["previous_version"] == "1"
    assert "config:Environment" in new["function"]["changed"]
    assert lam.get_alias(FunctionName=fn["name"], Name="live")["FunctionVersion"] == "2"

    # New memory from params: configuration update, version 3.
    bigger = deploy_params(bark_copy, names, memory_mb=2048)
    third = deploy_pipeline(bigger, "bark", bark_copy, target=target, log=lambda *_: None)
    assert third["function"]["changed"] == ["config:MemorySize"] and third["function"]["version"] == "3"
    assert lam.get_function_configuration(FunctionName=fn["name"], Qualifier="live")["MemorySize"] == 2048


def test_failing_smoke_test_rolls_alias_back(target, bark_copy, names):
    params = deploy_params(bark_copy, names)
    good = deploy_pipeline(params, "bark", bark_copy, target=target, log=lambda *_: None)
    name = good["function"]["name"]
    bad = deploy_params(bark_copy, names, memory_mb=1536)  # any change -> a new version
    with pytest.raises(SmokeTestFailed, match="alias live not moved .still on version 1.*answered 500"):
        deploy_pipeline(bad, "bark", bark_copy, target=target, app_factory=broken_app, log=lambda *_: None)
    lam = target.client("lambda")
    assert lam.get_alias(FunctionName=name, Name="live")["FunctionVersion"] == "1"
    assert [v["Version"] for v in lam.list_versions_by_function(FunctionName=name)["Versions"]] == ["$LATEST", "1", "2"]


def test_smoke_test_failing_with_a_bark_error_rolls_alias_back(target, bark_copy, names):
    """Not an HTTP error: the server cannot even start (its settings are invalid), a BarkError."""
    params = deploy_params(bark_copy, names)
    good = deploy_pipeline(params, "bark", bark_copy, target=target, log=lambda *_: None)
    name = good["function"]["name"]
    bad = deploy_params(bark_copy, names, environment={"BARKGPT_SERVE_PORT": "notaport"})
    with pytest.raises(SmokeTestFailed, match="alias live not moved .still on version 1.*BARKGPT_SERVE_PORT"):
        deploy_pipeline(bad, "bark", bark_copy, target=target, log=lambda *_: None)
    lam = target.client("lambda")
    assert lam.get_alias(FunctionName=name, Name="live")["FunctionVersion"] == "1"
    assert [v["Version"] for v in lam.list_versions_by_function(FunctionName=name)["Versions"]] == ["$LATEST", "1", "2"]


def test_secret_in_deploy_environment_is_refused(bark_copy, names):
    key = f"bk-{uuid.uuid4().hex}"
    with pytest.raises(BarkError, match=r"deploy.environment: .*BARKGPT_API_KEY.*deploy.api_key_secret") as err:
        deploy_params(bark_copy, names, environment={"BARKGPT_API_KEY": key})
    assert key not in str(err.value)


def test_keyed_deploy_authenticates_and_the_key_is_nowhere(target, bark_copy, names, monkeypatch):
    """The key goes through Secrets Manager: the smoke test authenticates (and sees a keyless request
    refused), and afterwards the key is in no file of the project (checkpoints, reports, MLflow's
    store), no MLflow param, no S3 object and not in the function's configuration."""
    import mlflow

    key = f"bk-{uuid.uuid4().hex}"
    monkeypatch.setenv("BARKGPT_API_KEY", key)  # where the operator has it; deploy stores it in the secret
    secret = f"barkgpt/{names['bucket']}/api-key"
    params = deploy_params(bark_copy, names, api_key_secret=secret)
    report = deploy_pipeline(params, "bark", bark_copy, target=target, log=lambda *_: None)
    smoke = report["smoke"]
    assert smoke["authenticated"] and set(smoke["reply"].split()) <= BARKS
    assert [r["status"] for r in smoke["requests"]] == [200, 401, 200]  # /ready, no key, with key
    assert read_api_key(secret, target.client) == key
    # The same params train a model (they are copied into its checkpoints and its MLflow run).
    from barkgpt.pipelines import run_stage

    run_stage(load_params(bark_copy / "params.yaml", {"deploy": {"api_key_secret": secret},
                                                      "bark": {"train": {"max_steps": 2}}}),
              "bark", "train", bark_copy, progress=False)
    needle = key.encode()
    leaked = [str(p) for p in bark_copy.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert leaked == []
    assert load_checkpoint(bark_copy / "models/bark/best.pt")["params"]["deploy"]["api_key_secret"] == secret
    client = mlflow.MlflowClient(f"sqlite:///{bark_copy / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and not [(r.info.run_id, k) for r in runs for k, v in r.data.params.items() if key in v]
    s3, lam = target.client("s3"), target.client("lambda")
    for obj in s3.list_objects_v2(Bucket=names["bucket"]).get("Contents", []):
        assert needle not in s3.get_object(Bucket=names["bucket"], Key=obj["Key"])["Body"].read()
    env = lam.get_function_configuration(FunctionName=report["function"]["name"])["Environment"]["Variables"]
    assert env[ENV_API_KEY_SECRET] == secret and key not in json.dumps(env)


def test_api_key_secret_in_ssm_parameter_store(target, names):
    ref = f"ssm:/barkgpt/{names['bucket']}/api-key"
    with pytest.raises(BarkError, match="cannot read the API key from ssm:"):
        read_api_key(ref, target.client)
    store_api_key(ref, "first", target.client, log=lambda *_: None)
    store_api_key(ref, "second", target.client, log=lambda *_: None)
    assert read_api_key(ref, target.client) == "second"


def test_failing_first_deploy_leaves_no_alias(target, bark_copy, names):
    params = deploy_params(bark_copy, names)
    with pytest.raises(SmokeTestFailed, match="alias live not moved .there is none yet"):
        deploy_pipeline(params, "bark", bark_copy, target=target, app_factory=broken_app, log=lambda *_: None)
    lam = target.client("lambda")
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError):
        lam.get_alias(FunctionName=params.deploy.function_name.replace("{pipeline}", "bark"), Name="live")


def test_gates_must_pass(target, bark_copy, names):
    metrics = bark_copy / "reports/bark/metrics.json"
    original = metrics.read_text()
    metrics.write_text(json.dumps({**json.loads(original), "contract_failures": 100}))  # the gate re-judges
    with pytest.raises(BarkError, match="evaluation gate did not pass"):
        deploy_pipeline(deploy_params(bark_copy, names), "bark", bark_copy, target=target, log=lambda *_: None)
    metrics.write_text(original)
    gguf = load_params(bark_copy / "params.yaml", {"deploy": names})  # artifact gguf needs the parity gate
    with pytest.raises(BarkError, match="parity.json: not found"):
        deploy_pipeline(gguf, "bark", bark_copy, target=target, log=lambda *_: None)
    assert names["bucket"] not in [b["Name"] for b in target.client("s3").list_buckets()["Buckets"]]


# --- the handler -------------------------------------------------------------------------------

@pytest.fixture
def released(target, bark_copy, names):
    """A release on S3 and the function environment pointing at it."""
    s3 = target.client("s3")
    ensure_bucket(s3, names["bucket"], target.region)
    files = {"model": bark_copy / "models/bark/best.pt", "tokenizer": bark_copy / "data/bark/tokenizer.json"}
    manifest = build_manifest(files, pipeline="bark", backend="torch", bucket=names["bucket"], prefix="releases")
    out = upload_release(s3, manifest, files, TransferSettings(), log=lambda *_: None)
    env = {ENV_MANIFEST: out["manifest_uri"], ENV_MANIFEST_SHA: out["manifest_sha256"]}
    return s3, manifest, env


def test_handler_function_url_and_api_gateway_events(released, tmp_path):
    s3, manifest, env = released
    app = LambdaApp({**env, ENV_MODEL_DIR: str(tmp_path)}, s3=s3)
    body = {"prompt": "speak"}
    cold = app(function_url_event("POST", "/v1/model/generate", body))
    assert cold["statusCode"] == 200
    reply = response_json(cold)["message"]
    assert reply and set(reply.split()) <= BARKS
    assert app.timings["cold_start_s"] > 0 and (tmp_path / manifest["release_id"] / "best.pt").exists()
    loaded, timings = app.asgi, dict(app.timings)
    v1 = app(api_gateway_v1_event("POST", "/v1/model/generate", body))
    assert v1["statusCode"] == 200 and set(response_json(v1)["message"].split()) <= BARKS
    health = app(function_url_event("GET", "/health"))
    assert health["statusCode"] == 200 and response_json(health) == {"status": "ok"}
    chat = app(function_url_event("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "speak"}]}))
    assert chat["statusCode"] == 200
    assert set(response_json(chat)["choices"][0]["message"]["content"].split()) <= BARKS
    assert app.asgi is loaded and app.timings == timings  # warm: loaded once, reused
    missing = app(function_url_event("GET", "/no-such-route"))
    assert missing["statusCode"] == 404
    app.close()  # what the in-process smoke test does: the server's worker thread stops
    assert not app.app.state.worker.thread.is_alive()


def test_handler_refuses_tampered_model(released, tmp_path):
    s3, manifest, env = released
    entry = manifest["files"]["model"]
    body = bytearray(s3.get_object(Bucket=manifest["bucket"], Key=entry["key"])["Body"].read())
    body[-1] ^= 0xFF
    s3.put_object(Bucket=manifest["bucket"], Key=entry["key"], Body=bytes(body))
    app = LambdaApp({**env, ENV_MODEL_DIR: str(tmp_path)}, s3=s3)
    for _ in range(2):  # refused at cold start and on every later request
        out = app(function_url_event("POST", "/v1/model/generate", {"prompt": "speak"}))
        assert out["statusCode"] == 503
        err = response_json(out)["error"]
        assert err["type"] == "model_refused" and "best.pt" in err["message"] and "sha256" in err["message"]
    assert app.asgi is None
    assert not (tmp_path / manifest["release_id"] / "best.pt").exists()  # bad bytes not kept


def test_handler_refuses_changed_manifest(released, tmp_path):
    s3, manifest, env = released
    app = LambdaApp({**env, ENV_MANIFEST_SHA: "0" * 64, ENV_MODEL_DIR: str(tmp_path)}, s3=s3)
    out = app(function_url_event("GET", "/health"))
    assert out["statusCode"] == 503 and "manifest sha256 differs" in response_json(out)["error"]["message"]


def test_handler_refuses_to_start_without_manifest_hash(released, tmp_path):
    s3, manifest, env = released
    models = tmp_path / "function-tmp"
    app = LambdaApp({ENV_MANIFEST: env[ENV_MANIFEST], ENV_MODEL_DIR: str(models)}, s3=s3)
    for _ in range(2):
        out = app(function_url_event("POST", "/v1/model/generate", {"prompt": "speak"}))
        assert out["statusCode"] == 503
        assert "BARKGPT_MANIFEST_SHA256 is not set" in response_json(out)["error"]["message"]
    assert app.asgi is None and not models.exists()  # nothing downloaded, nothing served


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "..", "a/../../x"])
def test_handler_refuses_file_names_leaving_its_folder(released, tmp_path, name):
    s3, manifest, _ = released
    evil = json.loads(json.dumps(manifest))
    evil["files"]["model"]["name"] = name
    body = json.dumps(evil).encode()
    key = f"{manifest['prefix']}/evil-manifest.json"
    s3.put_object(Bucket=manifest["bucket"], Key=key, Body=body)
    sandbox = tmp_path / "sandbox"  # the function's /tmp; the model folder is two levels down
    models = sandbox / "barkgpt"
    app = LambdaApp({ENV_MANIFEST: f"s3://{manifest['bucket']}/{key}",
                     ENV_MANIFEST_SHA: hashlib.sha256(body).hexdigest(), ENV_MODEL_DIR: str(models)}, s3=s3)
    out = app(function_url_event("GET", "/health"))
    assert out["statusCode"] == 503 and "not a plain file name" in response_json(out)["error"]["message"]
    written = sorted(str(p.relative_to(sandbox)) for p in sandbox.rglob("*"))
    assert written == ["barkgpt", f"barkgpt/{manifest['release_id']}"]


# --- template and DVC --------------------------------------------------------------------------

def test_cloudformation_template_passes_cfn_lint(tmp_path):
    template = ROOT / "deploy" / "template.yaml"
    ok = subprocess.run([str(BIN / "cfn-lint"), str(template)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "broken.yaml"  # the check can fail: a wrong property name is caught
    broken.write_text(template.read_text().replace("MemorySize: !Ref MemorySize", "MemorySizeMB: !Ref MemorySize"))
    bad = subprocess.run([str(BIN / "cfn-lint"), str(broken)], capture_output=True, text=True)
    assert bad.returncode != 0 and "MemorySizeMB" in bad.stdout


def test_dvc_push_pull_round_trip_on_s3(moto_endpoint, tmp_path):
    env = {**os.environ, **{k.upper(): v for k, v in LOCAL_KEYS.items()}, "AWS_REGION": "us-east-1"}
    # dvc-s3 is a dependency (the `team` extra), installed beside the venv's boto3 (requirements.lock)
    repo = tmp_path / "repo"
    repo.mkdir()
    run = lambda *cmd: subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=True)  # noqa: E731
    target = connect(moto_endpoint, "us-east-1", local=True, credentials=LOCAL_KEYS)
    target.client("s3").create_bucket(Bucket="barkgpt-dvc")
    run("git", "init", "-q")
    run(str(BIN / "dvc"), "init", "-q")
    run(str(BIN / "dvc"), "remote", "add", "-d", "s3", "s3://barkgpt-dvc/store")
    run(str(BIN / "dvc"), "remote", "modify", "s3", "endpointurl", moto_endpoint)
    (repo / "data.txt").write_text("woof arf\n" * 100)
    run(str(BIN / "dvc"), "add", "data.txt")
    run(str(BIN / "dvc"), "push")
    (repo / "data.txt").unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    run(str(BIN / "dvc"), "pull")
    assert (repo / "data.txt").read_text() == "woof arf\n" * 100


# --- the whole step through the CLI, embedded default, GGUF through llama.cpp -------------------

def _gguf_release(root: Path, gguf: Path, status: str = "accepted") -> None:
    """Put the Q8_0 GGUF where export writes it, and a parity report (the shape
    barkgpt.export.parity writes, bound to these files) whose q8_0 measurement passes the gate or not;
    test_export and test_gates cover how parity measures and judges."""
    from barkgpt.gates import judged_files, measurement_settings
    from barkgpt.pipelines import get as get_pipeline

    dest = Layout("bark", root).gguf("q8_0")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(gguf, dest)
    tok = {"agreement": 1.0, "detokenize_round_trip": 1.0, "lines": 400}
    f32 = {"tokenization": tok, "logits": {"max_abs_diff": 1e-5}, "greedy": {"identical": 8, "prompts": 8}}
    failures = 0 if status == "accepted" else 200
    q8 = {**f32, "quality": {"contract_samples": 1000, "contract_failures": failures}}
    (root / "reports" / "bark" / "parity.json").write_text(json.dumps({
        "stage": "parity", "pipeline": "bark", "metric": "contract", "files": {"f32": f32, "q8_0": q8},
        "served": {"file": "q8_0", "flash_attn": True, "quality": q8["quality"]},
        "quantizations": {"q8_0": {"status": status, "metric": "contract_accuracy", "value": 1 - failures / 1000,
                                   "reason": "test fixture", "tensor_types": {"x": "q8_0"}}},
        "gate": {"f32_parity_passed": True, "deploy_quantization": "q8_0", "deploy_passed": status == "accepted"},
        "judged": judged_files(root, {"checkpoint": root / "models/bark/best.pt", "q8_0": dest}),
        "measured_under": measurement_settings(load_params(root / "params.yaml"), get_pipeline("bark"),
                                               get_pipeline("bark").stage("parity"))}))


def _no_aws_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}


def test_cli_deploy_gguf_to_local_aws_api(bark_copy, bark_gguf, tmp_path):
    _gguf_release(bark_copy, bark_gguf)
    run = subprocess.run([sys.executable, "-m", "barkgpt", "deploy", "bark"], cwd=bark_copy,
                         env=_no_aws_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((bark_copy / "reports/bark/deploy.json").read_text())
    assert report["local"] and report["endpoint_url"].startswith("http://127.0.0.1:")
    fn, rel = report["function"], report["release"]
    assert fn["alias"] == "live" and fn["version"] == "1" and fn["changed"] == ["created"]
    assert fn["url"].startswith("https://") and fn["url_auth_type"] == "AWS_IAM"
    prefix = rel["manifest_uri"].split("/", 3)[3].rsplit("/", 1)[0]
    assert rel["objects"] == sorted([f"{prefix}/bark-q8_0.gguf", f"{prefix}/tokenizer.json", f"{prefix}/manifest.json"])
    assert rel["files"]["model"]["sha256"] == hashlib.sha256((bark_copy / "exports/bark/quantized/bark-q8_0.gguf").read_bytes()).hexdigest()
    assert report["provenance"]["parity"]["deploy_quantization"]["q8_0"]["status"] == "accepted"
    assert "tensor_types" not in report["provenance"]["parity"]["deploy_quantization"]["q8_0"]
    smoke = report["smoke"]
    assert smoke["mode"] == "in_process" and [r["status"] for r in smoke["requests"]] == [200, 200]
    assert smoke["reply"] and set(smoke["reply"].split()) <= BARKS  # barks from llama.cpp in the handler
    assert smoke["cold_start"]["cold_start_s"] > 0
    assert "release" in run.stdout and "version 1" in run.stdout


def test_cli_refuses_rejected_quantization(bark_copy, bark_gguf, tmp_path):
    _gguf_release(bark_copy, bark_gguf, status="rejected")
    run = subprocess.run([sys.executable, "-m", "barkgpt", "deploy", "bark"], cwd=bark_copy,
                         env=_no_aws_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "q8_0 did not pass its gate" in run.stderr and "Traceback" not in run.stderr


# --- MLflow registry: provenance, hashes, re-deploying a registered version -----------------------

def test_redeploy_registered_version_matches_registry(target, bark_copy, names):
    from barkgpt.deploy.registry import redeploy_model_version

    params = deploy_params(bark_copy, names)
    if not (bark_copy / "models/bark/mlflow_run.json").exists():
        pytest.skip("the bark_project fixture was trained without MLflow tracking")
    report = redeploy_model_version(params, "bark", bark_copy, alias="champion", target=target, log=lambda *_: None)
    reg = report["registered"]
    assert reg["registered_model"] == "barkgpt-bark" and reg["version"] >= 1
    mlflow = report["provenance"]["mlflow"]
    assert mlflow["version"] == reg["version"] and "champion" in mlflow["aliases"] and "error" not in mlflow
    # The released files are byte-identical to the registered model version's artifacts.
    assert report["registry_matches"] == {"best.pt": True, "tokenizer.json": True}
    assert report["function"]["version"] == "1" and report["smoke"]["reply"]
    assert json.loads((bark_copy / "reports/bark/deploy.json").read_text())["registered"] == reg


def test_bark_deploy_flow_in_process(bark_copy, names, monkeypatch, tmp_path):
    """The `bark-deploy` Prefect flow on Prefect's local API, with the embedded local AWS API."""
    if not (bark_copy / "models/bark/mlflow_run.json").exists():
        pytest.skip("the bark_project fixture was trained without MLflow tracking")
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    from flows.bark_deploy import bark_deploy

    out = bark_deploy(root=str(bark_copy), params_file=str(bark_copy / "params.yaml"),
                      overrides={"deploy": names})
    assert out["alias"] == "live" and out["version"] == "1" and set(out["smoke_reply"].split()) <= BARKS
    assert out["registry_matches"] == {"best.pt": True, "tokenizer.json": True}
