"""Lambda handler cold start (manifest + download + sha256 + model load) and warm request latency.

Runs the real handler code in-process against a local AWS API (moto, on loopback) holding a real
release of the project's model, fed function-URL events (payload 2.0), as Lambda would feed it.
Network time to real S3 and Lambda's own init are not included; the download part here is
loopback HTTP, so on AWS expect it to scale with the model size over S3 bandwidth.

    python benchmarks/lambda_latency.py                       # the default bark pipeline's GGUF
    python benchmarks/lambda_latency.py --artifact checkpoint  # the PyTorch checkpoint instead
    python benchmarks/lambda_latency.py --requests 5 --cold 1  # a short run that proves it works
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from barkgpt.config import load_params  # noqa: E402
from barkgpt.deploy.aws import aws_target  # noqa: E402
from barkgpt.deploy.deployer import release_files  # noqa: E402
from barkgpt.deploy.events import function_url_event, response_json  # noqa: E402
from barkgpt.deploy.lambda_handler import ENV_MANIFEST, ENV_MANIFEST_SHA, ENV_MODEL_DIR, LambdaApp  # noqa: E402
from barkgpt.deploy.release import TransferSettings, build_manifest, ensure_bucket, upload_release  # noqa: E402


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="project root where the pipeline ran")
    ap.add_argument("--pipeline", default="bark")
    ap.add_argument("--artifact", choices=["gguf", "checkpoint"], default=None)
    ap.add_argument("--requests", type=int, default=50, help="warm requests")
    ap.add_argument("--cold", type=int, default=3, help="cold starts (fresh container state each)")
    ap.add_argument("--prompt", default="User: speak Assistant:")
    args = ap.parse_args()
    root = Path(args.root)
    overrides = {"deploy": {"artifact": args.artifact}} if args.artifact else None
    params = load_params(root / "params.yaml", overrides)
    files, backend = release_files(params, args.pipeline, root)
    body = {"prompt": args.prompt}
    colds, warm, health = [], [], []
    with aws_target("local", params.deploy.region) as target:
        s3 = target.client("s3")
        ensure_bucket(s3, params.deploy.bucket, target.region)
        manifest = build_manifest(files, pipeline=args.pipeline, backend=backend, bucket=params.deploy.bucket,
                                  prefix=params.deploy.prefix)
        out = upload_release(s3, manifest, files, TransferSettings(), log=lambda *_: None)
        env = {ENV_MANIFEST: out["manifest_uri"], ENV_MANIFEST_SHA: out["manifest_sha256"]}
        for _ in range(args.cold):
            with tempfile.TemporaryDirectory() as tmp:  # empty /tmp: a new container
                app = LambdaApp({**env, ENV_MODEL_DIR: tmp}, s3=s3)
                t0 = time.perf_counter()
                first = app(function_url_event("POST", "/v1/model/generate", body))
                total = time.perf_counter() - t0
                assert first["statusCode"] == 200, first
                colds.append({**app.timings, "first_request_total_s": total})
        reply = response_json(first)["message"]
        for _ in range(args.requests):
            t0 = time.perf_counter()
            r = app(function_url_event("POST", "/v1/model/generate", body))
            warm.append(time.perf_counter() - t0)
            assert r["statusCode"] == 200, r
            t0 = time.perf_counter()
            app(function_url_event("GET", "/health"))
            health.append(time.perf_counter() - t0)
    size = sum(f["size"] for f in manifest["files"].values())
    result = {
        "artifact": params.deploy.artifact, "backend": backend, "model_file": str(files["model"]),
        "release_bytes": size, "reply": reply,
        # The first cold start also imports the serving stack (FastAPI, llama.cpp), as a new Lambda
        # container does; later ones in this process reuse the imports (a container with a warm
        # import cache but an empty /tmp), so both are reported.
        "first_cold_start_s": colds[0],
        "cold_start_s": {k: statistics.median(c[k] for c in colds[1:] or colds) for k in colds[0]},
        "cold_starts": len(colds),
        "warm_generate_ms": {"p50": 1000 * pct(warm, 0.5), "p99": 1000 * pct(warm, 0.99),
                             "mean": 1000 * statistics.mean(warm), "n": len(warm)},
        "warm_health_ms": {"p50": 1000 * pct(health, 0.5), "p99": 1000 * pct(health, 0.99)},
    }
    c, f = result["cold_start_s"], result["first_cold_start_s"]
    print(f"{args.pipeline} {result['artifact']} ({backend}), release {size:,} bytes; reply {reply!r}")
    print(f"first cold start (incl. imports): download+sha256 {f['download_verify_s']*1000:.1f} ms, load "
          f"{f['load_s']*1000:.1f} ms, total {f['cold_start_s']*1000:.1f} ms; first request incl. cold start "
          f"{f['first_request_total_s']*1000:.1f} ms")
    print(f"cold start (median of {max(1, len(colds) - 1)}, imports cached): manifest {c['manifest_s']*1000:.1f} ms, download+sha256 "
          f"{c['download_verify_s']*1000:.1f} ms, load {c['load_s']*1000:.1f} ms, total {c['cold_start_s']*1000:.1f} ms; "
          f"first request incl. cold start {c['first_request_total_s']*1000:.1f} ms")
    w = result["warm_generate_ms"]
    print(f"warm POST /v1/model/generate: p50 {w['p50']:.1f} ms, p99 {w['p99']:.1f} ms, mean {w['mean']:.1f} ms "
          f"(n={w['n']}); GET /health p50 {result['warm_health_ms']['p50']:.2f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
