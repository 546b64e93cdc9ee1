"""The deploy step, orchestrated: gates -> S3 release (manifest last) -> Lambda function, version ->
smoke test of that version by its number -> `live` alias moved to it (never before) -> URL.

`deploy_pipeline` is what the stage function, the CLI and the Prefect task call. The parts live
beside it: gates.py (what must have passed), provenance.py (what the manifest records),
image.py (the function image), api_key.py (the serving key's secret), smoke.py (the smoke test).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from barkgpt.deploy.api_key import ENV_API_KEY, ENV_API_KEY_SECRET, read_api_key, resource_arn, store_api_key
from barkgpt.deploy.aws import AwsTarget, aws_target
from barkgpt.deploy.gates import check_gates, deploy_quantization, judged_sha256
from barkgpt.deploy.image import check_image, image_uri
from barkgpt.deploy.lambda_fn import (FunctionSpec, alias_version, ensure_function, ensure_role, ensure_url,
                                      move_alias, publish, published_versions)
from barkgpt.deploy.lambda_handler import ENV_MANIFEST, ENV_MANIFEST_SHA, AppFactory
from barkgpt.deploy.provenance import (dvc_data_hash, git_commit, mlflow_provenance, parity_summary,
                                       registry_matches)
from barkgpt.deploy.release import MIB, TransferSettings, build_manifest, ensure_bucket, upload_release
from barkgpt.deploy.smoke import SmokeTestFailed, smoke_test
from barkgpt.errors import BarkError
from barkgpt.fileio import sha256_file, write_json
from barkgpt.gates import GateError
from barkgpt.layout import layout
from barkgpt.params import SharedParams
from barkgpt.runs import writer_lock

__all__ = ["SmokeTestFailed", "check_gates", "deploy_pipeline", "release_files"]


def release_files(params: SharedParams, name: str, root: Path) -> tuple[dict[str, Path], str]:
    """{role: path} of what ships, and the serving backend (barkgpt.serve) that reads it."""
    paths = layout(name, root)
    if params.deploy.artifact == "gguf":
        return {"model": paths.gguf(deploy_quantization(params)), "tokenizer": paths.tokenizer}, "llama"
    # PyTorch checkpoint: one file carrying its own sha256 (checked at load), and the tokenizer.
    return {"model": paths.checkpoint, "tokenizer": paths.tokenizer}, "torch"


def deploy_pipeline(params: SharedParams, name: str, root: Path | str = ".", *, target: AwsTarget | None = None,
                    provenance: dict | None = None, app_factory: AppFactory | None = None,
                    transfer: TransferSettings | None = None, log=print) -> dict:
    """Release the pipeline's model to S3 and serve it from Lambda; writes reports/<name>/deploy.json."""
    from barkgpt.dvclock import read_lock

    root = Path(root)
    lay = layout(name, root)
    read_lock(lay.dvc_lock)  # an empty or corrupt dvc.lock: refused before anything trusts it
    # The pipeline's writer lock, which train, evaluate, export, quantize and parity also take: no
    # stage rewrites what was judged while it is checked and copied. The upload reads the copy.
    lay.release_snapshots.mkdir(parents=True, exist_ok=True)
    with writer_lock(lay, f"deploy {name}"), \
            tempfile.TemporaryDirectory(prefix=f"{name}-", dir=lay.release_snapshots) as snapshot:
        gates = check_gates(params, name, root)
        files, backend = release_files(params, name, root)
        files, judged = snapshot_judged(params, name, root, files, Path(snapshot))
        return _deploy(params, name, root, gates, files, judged, backend, target=target, provenance=provenance,
                       app_factory=app_factory, transfer=transfer, log=log)


def snapshot_judged(params: SharedParams, name: str, root: Path, files: dict[str, Path],
                    folder: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """({role: copy in `folder`}, {role: sha256}): each copy checked to be the bytes a gating report
    judged; GateError naming a file that changed since. With gates off, copied as it is."""
    judged = judged_sha256(params, name, root) if params.deploy.require_gates else {}
    out, shas = {}, {}
    for role, path in files.items():
        if not path.exists():
            raise BarkError(f"{path}: not found; run the pipeline (dvc repro) before deploying")
        copy = folder / path.name
        shutil.copyfile(path, copy)
        want, got = judged.get(path.resolve()), sha256_file(copy)
        if params.deploy.require_gates and want != got:
            raise GateError(f"not releasing {path}: its bytes (sha256 {got[:12]}...) are not the ones its gate "
                            f"judged ({str(want)[:12]}...); re-run the stages that judge it (dvc repro)")
        out[role], shas[role] = copy, got
    return out, shas


def _deploy(params: SharedParams, name: str, root: Path, gates: dict, files: dict[str, Path], judged: dict[str, str],
            backend: str, *,
            target, provenance, app_factory, transfer, log) -> dict:
    cfg = params.deploy
    started = time.perf_counter()
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
        api_key, secret_env, secret_arn = None, {}, None
        if cfg.api_key_secret:
            if os.environ.get(ENV_API_KEY):
                store_api_key(cfg.api_key_secret, os.environ[ENV_API_KEY], tgt.client, log)
            api_key = read_api_key(cfg.api_key_secret, tgt.client)  # fails here, before any upload
            secret_env = {ENV_API_KEY_SECRET: cfg.api_key_secret}
            secret_arn = resource_arn(cfg.api_key_secret, tgt.client, tgt.region, tgt.account_id)
        ensure_bucket(s3, cfg.bucket, tgt.region)
        manifest = build_manifest(files, pipeline=name, backend=backend, bucket=cfg.bucket, prefix=cfg.prefix,
                                  provenance=prov)
        upload = upload_release(s3, manifest, files, transfer, log)
        manifest = upload["manifest"]
        # Each object was verified against the manifest on upload; the manifest must name the judged bytes.
        shipped = {role: f["sha256"] for role, f in manifest["files"].items()}
        if shipped != judged:
            raise GateError(f"release {manifest['release_id']} on S3 holds other bytes than the ones judged "
                            f"({shipped} != {judged}); not serving it, re-run the deploy")
        role = cfg.role_arn or ensure_role(tgt.client("iam"), f"barkgpt-lambda-{name}", cfg.bucket,
                                           cfg.prefix, log, secret_arn=secret_arn)
        uri = image_uri(cfg, tgt)
        check_image(tgt, uri)
        spec = FunctionSpec(
            name=fn_name, role_arn=role, image_uri=uri, memory_mb=cfg.memory_mb, timeout_s=cfg.timeout_s,
            ephemeral_mb=cfg.ephemeral_storage_mb, architecture=cfg.architecture,
            environment={**cfg.environment, **secret_env, ENV_MANIFEST: upload["manifest_uri"],
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
            mode = cfg.smoke if cfg.smoke != "auto" else ("in_process" if tgt.emulated else "remote")
            # The new version is tested by its number BEFORE the alias moves: a kill at any moment
            # leaves `live` on a version that passed its smoke test.
            try:
                smoke = smoke_test(tgt, fn_name, version, cfg, mode, app_factory, api_key, log)
            except Exception as err:
                kept = f"still on version {live}" if live else "there is none yet"
                raise SmokeTestFailed(f"smoke test of version {version} failed; alias {cfg.alias} not moved ({kept}): "
                                      f"{err}") from None
            previous = move_alias(lam, fn_name, cfg.alias, version, log)
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
                         "url_auth_type": cfg.url_auth_type, "api_key_secret": cfg.api_key_secret,
                         "memory_mb": fn["MemorySize"], "timeout_s": fn["Timeout"]},
            "smoke": smoke, "provenance": manifest["provenance"], "registry_matches": registry_matches(manifest),
            "seconds": round(time.perf_counter() - started, 3),
        }
    write_json(layout(name, root).deploy_report, report)
    return report
