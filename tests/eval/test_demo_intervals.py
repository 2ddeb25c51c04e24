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


def naive_pass_at_k(n, c, k):
    """1 - C(n-c, k) / C(n, k) with exact binomials: an oracle independent of the product form."""
    from math import comb

    return 1.0 - comb(n - c, k) / comb(n, k)


def test_paired_difference_means_against_a_naive_computation():
    a = [report([0, 4, 16, 8]), report([1, 2, 3, 0]), report([16, 16, 0, 5])]
    b = [report([2, 4, 10, 8]), report([0, 2, 3, 1]), report([16, 12, 0, 0])]
    diff = demo.paired_difference(a, b, (1, 2, 16))
    for k in (1, 2, 16):
        want = np.mean([naive_pass_at_k(16, x["correct"], k) - naive_pass_at_k(16, y["correct"], k)
                        for ra, rb in zip(a, b) for x, y in zip(ra["problems"], rb["problems"])])
        got = diff[str(k)]
        np.testing.assert_allclose(got["mean"], want, atol=1e-12)
        assert got["lo"] <= got["mean"] <= got["hi"] and 0.0 <= got["p_le_0"] <= 1.0


def test_paired_difference_of_equal_runs_is_zero_and_of_a_constant_shift_is_that_shift():
    runs = [report([0, 4, 16, 8]), report([1, 2, 3, 0])]
    same = demo.paired_difference(runs, runs, (1, 4))
    assert all(v["mean"] == v["lo"] == v["hi"] == 0.0 and v["p_le_0"] == 1.0 for v in same.values())
    # pass@1 = c / n: every problem 4/16 higher in a, so the difference is 0.25 in every resample.
    shifted = demo.paired_difference([report([8, 12, 4])], [report([4, 8, 0])], (1,))["1"]
    np.testing.assert_allclose([shifted["mean"], shifted["lo"], shifted["hi"]], 0.25)
    assert shifted["p_le_0"] == 0.0


def test_bootstrap_interval_width_matches_the_normal_approximation():
    """One seed, 400 problems with independent pass@1 differences: the 95% percentile interval of the mean
    is close to mean ± 1.96 sd / sqrt(P) (the bootstrap's 2000 draws put ~5% noise on its width)."""
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 17, 400), rng.integers(0, 17, 400)
    got = demo.paired_difference([report(a.tolist())], [report(b.tolist())], (1,))["1"]
    d = (a - b) / 16
    half = 1.96 * d.std() / np.sqrt(len(d))
    np.testing.assert_allclose(got["mean"], d.mean(), atol=1e-12)
    np.testing.assert_allclose(got["hi"] - got["lo"], 2 * half, rtol=0.12)


def test_markdown_table_lists_every_seed_the_mean_and_the_paired_differences():
    summary = {
        "runs": {"fd": {"0": {"reward_first_quarter": 0.4, "reward_last_quarter": 0.6, "entropy_first_3": 0.12,
                              "entropy_last_3": 0.1, "final_eval": {"entropy": 0.11, "pass_at_k": {"1": 0.5}}}}},
        "pooled": {"fd": {"pass_at_k": {"1": {"mean": 0.5, "lo": 0.4, "hi": 0.6}}, "reward_last_quarter": 0.6,
                          "entropy_last_3": 0.1, "eval_entropy": 0.11}},
        "paired_differences": {"fd - control": {"1": {"mean": 0.1, "lo": 0.02, "hi": 0.2, "p_le_0": 0.01}}},
    }
    text = demo.markdown_table(summary, (1,))
    assert "| FD | 0 | 0.400 → 0.600 | 0.120 → 0.100 | 0.110 | 0.500 |" in text
    assert "| **FD** | mean | 0.400 → 0.600 |" in text and "**0.500** [0.40, 0.60]" in text
    assert "| FD − no-update control | +0.100 [+0.02, +0.20] p=0.01 |" in text
