"""The trainer on an episodic task (configs/arithmetic_tools_cpu.py) as a user runs it: it trains, logs
every episode in full, and a run killed with SIGKILL resumes to the same metrics, episodes and weights as
an uninterrupted one (tool timings aside, which are wall-clock)."""

from __future__ import annotations

import json
import os
import signal

import pytest

from fd_jax.train.metrics_log import read_jsonl
from test_trainer import REPO, _assert_same_weights, _deterministic, _lines, _run, _start, _wait_until, _weights


def _no_timings(record):
    out = dict(record)
    out["turns"] = [{k: v for k, v in t.items() if k != "tool_s"} for t in record["turns"]]
    out["calls"] = [{k: v for k, v in c.items() if k != "time_s"} for c in record["calls"]]
    return out


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla_cache_episodes")
    return ["--config", os.path.join(REPO, "configs", "arithmetic_tools_cpu.py"), f"--config.compilation_cache_dir={cache}",
            "--config.log.progress=false", "--config.total_steps=4", "--config.checkpoint.every_steps=2",
            "--config.episode.max_turn_tokens=24", "--config.episode.max_episode_tokens=80",
            # periodic evaluation runs episodes too: pass@k of the final answers every 2 steps
            "--config.eval.every_steps=2", "--config.eval.num_problems=3", "--config.eval.n=2", "--config.eval.ks=(1, 2)"]


def test_episodic_training_logs_episodes_and_resumes_exactly(args, tmp_path):
    reference = tmp_path / "reference"
    _run(reference, *args, timeout=420)
    metrics = read_jsonl(reference / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert m["episode/turns_mean"] >= 1 and "time/tool_s" in m and m["loss"] == m["loss"]  # not NaN
    evaluated = [m for m in metrics if "eval/pass@1" in m]
    assert [m["step"] for m in evaluated] == [2, 4]
    for m in evaluated:
        assert 0.0 <= m["eval/pass@1"] <= m["eval/pass@2"] <= 1.0 and m["eval/entropy"] > 0
    report = json.loads((reference / "eval" / "step_2" / "report.json").read_text())
    assert report["num_problems"] == 3 and report["n"] == 2 and sum(report["statuses"].values()) == 6
    rollouts = read_jsonl(reference / "rollouts.jsonl")
    assert len(rollouts) == 4 * 4 * 4
    for r in rollouts:
        assert r["end"] in ("stop", "submit", "length", "turns") and r["turns"]
        assert r["completion"].startswith(r["turns"][0]["text"])
        if r["end"] in ("length", "turns"):  # no answer: fails closed, never checked
            assert r["status"] == "rejected" and "without an answer" in r["reason"]

    resumed = tmp_path / "resumed"
    process = _start(resumed, *args)
    _wait_until(process, lambda: (resumed / "checkpoints" / "2").is_dir() and _lines(resumed / "metrics.jsonl") >= 3,
                "step-2 checkpoint", timeout=300)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(read_jsonl(resumed / "metrics.jsonl")) < 4, "the run finished before it could be killed"
    done = _run(resumed, *args, timeout=420)
    assert "resumed stage fd from the checkpoint of step" in done.stderr
    assert [_deterministic(r) for r in read_jsonl(resumed / "metrics.jsonl")] == [_deterministic(r) for r in metrics]
    assert [_no_timings(r) for r in read_jsonl(resumed / "rollouts.jsonl")] == [_no_timings(r) for r in rollouts]
    _assert_same_weights(_weights(resumed / "hf_final"), _weights(reference / "hf_final"))
