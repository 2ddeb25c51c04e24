"""scripts/demo_fd_vs_grpo.py's pooling over seeds: pass@k means over seeds and problems, and their
bootstrap intervals (which must hold the mean, and collapse when every seed and problem agree)."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np

from fd_jax.eval.evaluation import pass_at_k

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "demo_fd_vs_grpo.py"
spec = importlib.util.spec_from_file_location("demo_fd_vs_grpo", SCRIPT)
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)


def report(correct, n=16):
    return {"n": n, "problems": [{"correct": c} for c in correct]}


def test_pooled_pass_at_k_means_and_intervals():
    reports = [report([0, 4, 16, 8]), report([1, 2, 3, 0]), report([16, 16, 0, 5])]
    pooled = demo.pooled_pass_at_k(reports, (1, 4, 16))
    for k in (1, 4, 16):
        want = np.mean([pass_at_k(16, c, k) for r in reports for c in (p["correct"] for p in r["problems"])])
        got = pooled[str(k)]
        np.testing.assert_allclose(got["mean"], want)
        assert got["lo"] <= got["mean"] <= got["hi"] and got["hi"] - got["lo"] > 0.05
    same = demo.pooled_pass_at_k([report([8, 8]), report([8, 8])], (1,))["1"]
    assert same["lo"] == same["hi"] == same["mean"] == 0.5


def test_mean_curves_average_each_step_over_seeds():
    curves = demo.mean_curves([[{"step": 1, "stage": "fd", "reward_mean": 0.2}, {"step": 2, "reward_mean": 0.4}],
                               [{"step": 1, "stage": "fd", "reward_mean": 0.4}]])
    assert [c["step"] for c in curves] == [1, 2]
    np.testing.assert_allclose(curves[0]["reward_mean"], 0.3)
    np.testing.assert_allclose(curves[1]["reward_mean"], 0.4)
    assert demo.RUNS["control"]["optim.learning_rate"] == "0.0"
