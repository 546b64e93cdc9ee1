"""The gate: the binomial contract test's arithmetic, one pure verdict over a report, and reports bound
to the bytes they judged (a retrained model cannot ship on its predecessor's reports)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from barkgpt.config import load_params
from barkgpt.deploy.deployer import deploy_pipeline
from barkgpt.errors import BarkError
from barkgpt.gates import binomial_cdf, contract_test, judge, max_failures, verify_judged
from barkgpt.pipelines import run_stage
from test_deploy import moto_endpoint, names, target  # noqa: F401  (fixtures: a moto server on loopback)


def log_binomial_cdf(k: int, n: int, p: float) -> float:
    """An independent route (log-gamma in floats) to the same probability."""
    return sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                        + i * math.log(p) + (n - i) * math.log1p(-p)) for i in range(k + 1))


def test_contract_test_arithmetic():
    """n = 1000, pass when failures <= 13: a model at 0.995 passes >= 999 times in 1,000; one at 0.97 fails."""
    test = contract_test(load_params().bark.gates)
    assert (test.samples, test.max_failures) == (1000, 13)
    assert test.pass_probability >= 0.999 and test.pass_probability == pytest.approx(0.999328, abs=1e-6)
    assert test.reject_pass_probability == pytest.approx(0.000349, abs=1e-6)
    # k is the smallest count that meets the requirement: one fewer would not
    assert binomial_cdf(12, 1000, 0.005) < 0.999 <= binomial_cdf(13, 1000, 0.005)
    for k, p in [(13, 0.005), (13, 0.03), (0, 0.5), (3, 0.2)]:
        assert binomial_cdf(k, 1000 if p < 0.1 else 10, p) == pytest.approx(
            log_binomial_cdf(k, 1000 if p < 0.1 else 10, p), rel=1e-9)
    assert max_failures(10, 0.5, 0.999) == 9 and binomial_cdf(9, 10, 0.5) == 1023 / 1024
    # and by simulation: 200,000 evaluations of each model
    rng = np.random.default_rng(0)
    assert (rng.binomial(1000, 0.005, 200_000) <= 13).mean() == pytest.approx(0.99933, abs=3e-4)
    assert (rng.binomial(1000, 0.03, 200_000) <= 13).mean() < 0.001


def test_judge_is_a_pure_function_of_the_numbers():
    params = load_params()
    report = {"stage": "evaluate", "pipeline": "bark", "contract_samples": 1000, "contract_failures": 13}
    first = judge(report, params)
    assert first.passed and judge(report, params) == first and report == {
        "stage": "evaluate", "pipeline": "bark", "contract_samples": 1000, "contract_failures": 13}
    assert not judge({**report, "contract_failures": 14}, params).passed
    short = judge({**report, "contract_samples": 200, "contract_failures": 0}, params)
    assert not short.passed and "needs 1000" in short.reason()  # too few samples: no verdict
    text = {"stage": "evaluate", "pipeline": "webtext", "val_bpb": 2.4}
    assert judge(text, params).passed and not judge({**text, "val_bpb": 2.6}, params).passed
    with pytest.raises(BarkError, match="has no gate"):
        judge({"stage": "train", "pipeline": "bark"}, params)


def test_retrained_model_cannot_ship_on_stale_reports(target, bark_copy, names):  # noqa: F811
    """After a passing pipeline, a worse model (25 steps) exported and quantized without evaluate and
    parity: deploy refuses, naming both stale reports, and uploads nothing. Evaluated, it fails the gate."""
    root = bark_copy
    params = load_params(root / "params.yaml", {"deploy": names, "export": {"f16": False, "hf": False}})
    run_stage(params, "bark", "export", root)
    run_stage(params, "bark", "quantize", root)
    run_stage(params, "bark", "parity", root)
    verify_judged(root / "reports/bark/parity.json", {"checkpoint": root / "models/bark/best.pt"})

    worse = load_params(root / "params.yaml", {"deploy": names, "export": {"f16": False, "hf": False},
                                               "bark": {"train": {"max_steps": 25}}, "tracking": {"enabled": False}})
    run_stage(worse, "bark", "train", root, progress=False)
    run_stage(worse, "bark", "export", root)
    run_stage(worse, "bark", "quantize", root)
    with pytest.raises(BarkError) as refused:
        deploy_pipeline(worse, "bark", root, target=target, log=lambda *_: None)
    message = str(refused.value)
    assert "metrics.json is stale" in message and "Re-run the evaluate stage" in message
    assert "parity.json is stale" in message and "Re-run the parity stage" in message
    assert "best.pt changed since it was judged" in message and "bark-q8_0.gguf changed" in message
    assert names["bucket"] not in [b["Name"] for b in target.client("s3").list_buckets()["Buckets"]]

    metrics = run_stage(worse, "bark", "evaluate", root)  # the worse model, judged: it fails the contract test
    assert metrics["contract_failures"] > 13 and metrics["gate_passed"] is False, metrics
    with pytest.raises(BarkError, match="evaluation gate did not pass"):
        deploy_pipeline(worse, "bark", root, target=target, log=lambda *_: None)
    assert names["bucket"] not in [b["Name"] for b in target.client("s3").list_buckets()["Buckets"]]
