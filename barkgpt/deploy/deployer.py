"""The deploy step: gates -> S3 release (manifest last) -> Lambda function, version, `live` alias,
URL -> smoke test of the new version -> rollback of the alias if it fails.

`deploy_pipeline` is what the stage function, the CLI and the Prefect task call.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import yaml

from barkgpt.deploy.aws import AwsTarget, aws_target
from barkgpt.deploy.events import function_url_event, response_json
from barkgpt.deploy.lambda_fn import (FunctionSpec, alias_version, ensure_function, ensure_role, ensure_url,
                                      move_alias, publish, published_versions)
from barkgpt.deploy.lambda_handler import ENV_MANIFEST, ENV_MANIFEST_SHA, ENV_MODEL_DIR, AppFactory, LambdaApp
from barkgpt.deploy.release import MIB, TransferSettings, build_manifest, ensure_bucket, upload_release
from barkgpt.errors import BarkError
from barkgpt.fileio import read_json, write_json
from barkgpt.gates import deploy_quantization
from barkgpt.layout import layout
from barkgpt.params import DeployParams, Params

# What goes into the function image; its hash tags the image so new code means a new image.
IMAGE_SOURCES = ("barkgpt/**/*", "pyproject.toml", "constraints.txt", "scripts/install.sh", "deploy/Dockerfile")


class SmokeTestFailed(BarkError):
    """The new version did not answer correctly; the alias was rolled back."""


# --- inputs ------------------------------------------------------------------------------------

def release_files(params: Params, name: str, root: Path) -> tuple[dict[str, Path], str]:
    """{role: path} of what ships, and the serving backend (barkgpt.serve) that reads it."""
    paths = layout(name, root)
    if params.deploy.artifact == "gguf":
        return {"model": paths.gguf(deploy_quantization(params)),
                "tokenizer": paths.tokenizer}, "llama"
    # PyTorch checkpoint: the weights, their checksum file (checked at load) and the tokenizer.
    return {"model": paths.checkpoint, "model_sha256": Path(str(paths.checkpoint) + ".json"),
            "tokenizer": paths.tokenizer}, "torch"


def check_gates(params: Params, name: str, root: Path) -> dict:
    """The evaluation gate (and the parity gate for GGUF) must pass, on reports that judged these
    exact files (barkgpt.gates.check_release)."""
    from barkgpt.gates import check_release

    if not params.deploy.require_gates:
        return {}
    return check_release(params, name, Path(root), params.deploy.artifact)


def parity_summary(root: Path, name: str, quant: str) -> dict | None:
    path = layout(name, root).parity_report
    if not path.exists():
        return None
    parity = read_json(path)
    keep = {k: v for k, v in parity.items() if isinstance(v, (int, float, bool, str))}
    keep.update({k: parity[k] for k in ("summary", "gate", "f32_parity") if k in parity})
    quants = parity.get("quantizations")
    if isinstance(quants, dict) and quant in quants:  # per-tensor types stay in parity.json
        keep["deploy_quantization"] = {quant: {k: v for k, v in quants[quant].items() if k != "tensor_types"}}
    return keep


def git_commit(root: Path) -> dict | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def dvc_data_hash(root: Path, name: str) -> dict | None:
    """The md5s dvc.lock records for data/<name>/ outputs, and one hash over them (no DVC import)."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    outs = {o["path"]: o.get("md5") for st in stages.values() for o in st.get("outs", [])
            if str(o.get("path", "")).startswith(f"data/{name}/")}
    if not outs:
        return None
    combined = hashlib.md5(json.dumps(sorted(outs.items())).encode()).hexdigest()
    return {"hash": combined, "outs": outs}


def mlflow_provenance(root: Path, name: str) -> dict | None:
    """The MLflow run that trained the model (models/<name>/mlflow_run.json, written by the train
    stage) and the registered model version made from it, with the sha256 of that version's files,
    so the manifest can be checked against the registry. None when the run was not tracked."""
    run_file = layout(name, root).run_record
    if not run_file.exists():
        return None
    info = read_json(run_file)
    out = {"run_id": info.get("run_id"), "tracking_uri": info.get("tracking_uri")}
    try:
        import mlflow
        from mlflow.artifacts import download_artifacts

        client = mlflow.MlflowClient(tracking_uri=info.get("tracking_uri"), registry_uri=info.get("tracking_uri"))
        versions = client.search_model_versions(f"run_id = '{info['run_id']}'")
        if not versions:
            return out
        v = max(versions, key=lambda mv: int(mv.version))
        model = client.get_registered_model(v.name)
        out.update({"registered_model": v.name, "version": int(v.version),
                    "aliases": sorted(a for a, ver in (model.aliases or {}).items() if str(ver) == str(v.version))})
        with tempfile.TemporaryDirectory() as tmp:
            # The version's own location, not "models:/...": that form resolves against the
            # process-wide registry URI, which need not be this project's store.
            local = Path(download_artifacts(artifact_uri=client.get_model_version_download_uri(v.name, v.version),
                                            dst_path=tmp, tracking_uri=info.get("tracking_uri")))
            from barkgpt.fileio import sha256_file

            out["artifact_sha256"] = {p.name: sha256_file(p) for p in sorted(local.rglob("*"))
                                      if p.is_file() and p.parent.name == "artifacts"}
    except Exception as err:  # provenance is a record, not a gate: note what failed and go on
        out["error"] = f"{type(err).__name__}: {err}"[:300]
    return out


def registry_matches(manifest: dict) -> dict[str, bool]:
    """For each released file that is also a file of the MLflow model version: same sha256?"""
    registered = ((manifest.get("provenance") or {}).get("mlflow") or {}).get("artifact_sha256") or {}
    return {f["name"]: registered[f["name"]] == f["sha256"] for f in manifest["files"].values()
            if f["name"] in registered}


def code_hash(root: Path | None = None) -> str:
    """sha256 over the image's source files (path + bytes), for a content-addressed image tag.

    The sources are those of the running barkgpt (its checkout), not of the data project root."""
    import barkgpt

    root = root or Path(barkgpt.__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for pattern in IMAGE_SOURCES:
        for path in sorted(root.glob(pattern)):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def image_uri(cfg: DeployParams, target: AwsTarget) -> str:
    if cfg.image_uri:
        return cfg.image_uri
    return f"{target.account_id}.dkr.ecr.{target.region}.amazonaws.com/{cfg.image_repository}:{code_hash()}"


def check_image(target: AwsTarget, uri: str) -> None:
    """On real AWS the image must already be in ECR (built by deploy/Dockerfile and pushed)."""
    if target.local or "@" in uri or ".dkr.ecr." not in uri:
        return  # the local API does not run images; digests and foreign registries are taken as given
    repo, tag = uri.split("/", 1)[1].rsplit(":", 1)
    try:
        target.client("ecr").describe_images(repositoryName=repo, imageIds=[{"imageTag": tag}])
    except Exception as err:
        raise BarkError(f"image {uri} is not in ECR ({type(err).__name__}); build and push it first:\n"
                        f"  docker build -f deploy/Dockerfile -t {uri} .\n  docker push {uri}\n"
                        "(docs/deploy.md, 'Build the image')") from None


# --- smoke test --------------------------------------------------------------------------------

def smoke_test(target: AwsTarget, name: str, version: str, cfg: DeployParams, mode: str,
               app_factory: AppFactory | None = None, log=print) -> dict:
    """Send function-URL events (payload 2.0) to the new version; raise SmokeTestFailed on a bad answer."""
    lam = target.client("lambda")
    events = [("GET /ready", function_url_event("GET", "/ready", region=target.region,
                                                 account_id=target.account_id)),
              ("POST /v1/model/generate", function_url_event(
                  "POST", "/v1/model/generate", {"prompt": cfg.smoke_prompt}, region=target.region,
                  account_id=target.account_id))]
    results, container = [], None
    with tempfile.TemporaryDirectory(prefix="barkgpt-smoke-") as tmp:
        if mode == "in_process":
            # The local AWS API cannot run Lambda code: run the same handler here, with the
            # environment of the published version and the S3 of the target.
            env = lam.get_function_configuration(FunctionName=name, Qualifier=version).get(
                "Environment", {}).get("Variables", {})
            container = LambdaApp({**env, ENV_MODEL_DIR: tmp}, s3=target.client("s3"), app_factory=app_factory)
        try:
            for label, event in events:
                results.append(_smoke_request(container, lam, name, version, label, event))
        finally:
            if container is not None:
                container.close()  # stop the in-process server's worker thread
        reply = (results[-1]["body"] or {}).get("message") if isinstance(results[-1]["body"], dict) else None
        if not reply or not str(reply).strip():
            raise SmokeTestFailed(f"POST /v1/model/generate on version {version} returned no message: "
                                  f"{str(results[-1]['body'])[:300]}")
    log(f"smoke test passed on version {version} ({mode}): {cfg.smoke_prompt!r} -> {reply!r}")
    return {"mode": mode, "version": version, "requests": results, "reply": reply,
            "cold_start": container.timings if container else None}


def _smoke_request(container, lam, name: str, version: str, label: str, event: dict) -> dict:
    started = time.perf_counter()
    try:
        response = container(event) if container else _invoke_remote(lam, name, version, event)
    except BarkError:
        raise
    except Exception as err:  # the handler crashed: that is the smoke test's answer
        raise SmokeTestFailed(f"{label} on version {version} raised {type(err).__name__}: {err}") from None
    seconds = time.perf_counter() - started
    status = response.get("statusCode")
    body = _safe_json(response)
    if status != 200:
        raise SmokeTestFailed(f"{label} on version {version} answered {status}: {str(body)[:300]}")
    return {"request": label, "status": status, "seconds": round(seconds, 4), "body": body}


def _invoke_remote(lam, name: str, version: str, event: dict) -> dict:
    out = lam.invoke(FunctionName=name, Qualifier=version, Payload=json.dumps(event).encode())
    payload = json.loads(out["Payload"].read() or b"null")
    if out.get("FunctionError"):
        raise SmokeTestFailed(f"the function raised {out['FunctionError']}: {str(payload)[:300]}")
    return payload


def _safe_json(response: dict):
    try:
        return response_json(response)
    except (ValueError, TypeError):
        return response.get("body")


# --- the step ----------------------------------------------------------------------------------

def deploy_pipeline(params: Params, name: str, root: Path | str = ".", *, target: AwsTarget | None = None,
                    provenance: dict | None = None, app_factory: AppFactory | None = None,
                    transfer: TransferSettings | None = None, log=print) -> dict:
    """Release the pipeline's model to S3 and serve it from Lambda; writes reports/<name>/deploy.json."""
    root = Path(root)
    cfg = params.deploy
    started = time.perf_counter()
    gates = check_gates(params, name, root)
    files, backend = release_files(params, name, root)
    prov = {"git": git_commit(root), "dvc_data": dvc_data_hash(root, name),
            "parity": parity_summary(root, name, deploy_quantization(params)) if cfg.artifact == "gguf" else None,
            "gates": gates, "mlflow": mlflow_provenance(root, name), **(provenance or {})}
    transfer = transfer or TransferSettings(
        multipart_threshold=int(cfg.multipart_threshold_mb * MIB),
        multipart_chunksize=int(cfg.multipart_chunk_mb * MIB), attempts=cfg.upload_attempts)
    fn_name = cfg.function_name.replace("{pipeline}", name)
    with (nullcontext(target) if target else aws_target(cfg.target, cfg.region)) as tgt:
        log(f"deploying {name} to {tgt.describe()}")
        s3, lam = tgt.client("s3"), tgt.client("lambda")
        ensure_bucket(s3, cfg.bucket, tgt.region)
        manifest = build_manifest(files, pipeline=name, backend=backend, bucket=cfg.bucket, prefix=cfg.prefix,
                                  provenance=prov)
        upload = upload_release(s3, manifest, files, transfer, log)
        manifest = upload["manifest"]
        role = cfg.role_arn or ensure_role(tgt.client("iam"), f"barkgpt-lambda-{name}", cfg.bucket,
                                           cfg.prefix, log)
        uri = image_uri(cfg, tgt)
        check_image(tgt, uri)
        spec = FunctionSpec(
            name=fn_name, role_arn=role, image_uri=uri, memory_mb=cfg.memory_mb, timeout_s=cfg.timeout_s,
            ephemeral_mb=cfg.ephemeral_storage_mb, architecture=cfg.architecture,
            environment={**cfg.environment, ENV_MANIFEST: upload["manifest_uri"],
                         ENV_MANIFEST_SHA: upload["manifest_sha256"]},
            alias=cfg.alias, url_auth_type=cfg.url_auth_type,
            description=f"BarkGPT {name} release {manifest['release_id']}")
        changed = ensure_function(lam, spec, log)
        versions = published_versions(lam, fn_name)
        live = alias_version(lam, fn_name, cfg.alias)
        smoke = None
        if not changed and versions and live == versions[-1]:
            version, previous = live, live
            log(f"function {fn_name} already serves release {manifest['release_id']} as version {live}; "
                "nothing changed")
        else:
            version = publish(lam, fn_name, spec.description)
            previous = move_alias(lam, fn_name, cfg.alias, version, log)
            mode = cfg.smoke if cfg.smoke != "auto" else ("in_process" if tgt.local or tgt.endpoint_url else "remote")
            try:
                smoke = smoke_test(tgt, fn_name, version, cfg, mode, app_factory, log)
            except SmokeTestFailed as err:
                move_alias(lam, fn_name, cfg.alias, previous, log)
                back = f"version {previous}" if previous else "no version (alias removed)"
                raise SmokeTestFailed(f"smoke test failed, alias {cfg.alias} rolled back to {back}: {err}") from None
        url = ensure_url(lam, fn_name, cfg.alias, cfg.url_auth_type, log)
        fn = lam.get_function_configuration(FunctionName=fn_name, Qualifier=version)
        listing = sorted(o["Key"] for o in s3.list_objects_v2(
            Bucket=cfg.bucket, Prefix=manifest["prefix"] + "/").get("Contents", []))
        report = {
            "pipeline": name, "target": tgt.describe(), "local": tgt.local, "endpoint_url": tgt.endpoint_url,
            "region": tgt.region, "account_id": tgt.account_id,
            "release": {"id": manifest["release_id"], "status": upload["status"], "manifest_uri": upload["manifest_uri"],
                        "manifest_sha256": upload["manifest_sha256"], "objects": listing,
                        "uploaded": upload["uploaded"], "files": manifest["files"]},
            "function": {"name": fn_name, "arn": fn["FunctionArn"], "version": version,
                         "previous_version": previous, "alias": cfg.alias, "changed": changed,
                         "image_uri": uri, "code_sha256": fn["CodeSha256"], "url": url,
                         "url_auth_type": cfg.url_auth_type, "memory_mb": fn["MemorySize"],
                         "timeout_s": fn["Timeout"]},
            "smoke": smoke, "provenance": manifest["provenance"], "registry_matches": registry_matches(manifest),
            "seconds": round(time.perf_counter() - started, 3),
        }
    write_json(layout(name, root).deploy_report, report)
    return report
