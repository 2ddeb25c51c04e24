"""The training entry point end to end, as a user runs it: `scripts/train_tpu.py` in a subprocess on the
smoke config (tiny shapes, a few steps), with real orbax checkpoints and real signals.

What is proved: the workdir holds the contract's files and they agree with each other; a run killed with
SIGKILL and resumed ends bit for bit like an uninterrupted one (metrics, rollouts and parameters: the
sampler is seeded by (seed, step), the data order and the optimizer state come back from the checkpoint,
and XLA on CPU is deterministic); SIGTERM ends a run cleanly with a checkpoint of the step it was in;
fd_then_grpo hands the FD stage's final policy to the GRPO stage.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from fd_jax.config_utils import ConfigError
from fd_jax.metrics_log import read_jsonl
from fd_jax.models import save_hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "train_tpu.py")
CONTRACT_FIELDS = ("step", "stage", "loss", "reward_mean", "entropy", "kl_mean", "pass_rate", "tokens_per_s",
                   "time/rollout_s", "time/generate_s", "time/verify_s", "time/feedback_s", "time/train_s",
                   "time/step_s", "learning_rate", "grad_norm")
# Wall-clock fields and the process's compilation counts differ between any two runs; everything else must
# match exactly.
TIMING = ("time/", "tokens_per_s", "train/tokens_per_s", "wall_time", "compile/")


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    """Arguments every run here shares: tiny, few shapes, one compilation cache for all subprocesses."""
    cache = tmp_path_factory.mktemp("xla_cache")
    return ["--config", os.path.join(REPO, "configs", "smoke_cpu.py"), f"--config.compilation_cache_dir={cache}",
            "--config.log.progress=false", "--config.eval.at_end=false"]


def _command(workdir, *args):
    return [sys.executable, SCRIPT, f"--workdir={workdir}", *args]


def _run(workdir, *args, timeout=240):
    done = subprocess.run(_command(workdir, *args), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _start(workdir, *args):
    return subprocess.Popen(_command(workdir, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _lines(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_until(process, condition, what, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert process.poll() is None, f"exited before {what}: " + process.stdout.read()[-3000:]
        time.sleep(0.01)
    process.kill()
    raise AssertionError(f"no {what} after {timeout} s")


def _deterministic(record):
    return {k: v for k, v in record.items() if not k.startswith(TIMING)}


def _weights(hf_dir):
    return load_file(str(hf_dir / "model.safetensors"))


def _assert_same_weights(ours, theirs):
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not np.array_equal(ours[k], theirs[k])]
    assert not different, f"tensors differ: {different}"


def _smoke_config():
    spec = importlib.util.spec_from_file_location("smoke_cpu", os.path.join(REPO, "configs", "smoke_cpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _checkpoint_steps(directory):
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, common):
    """An uninterrupted 6-step FD run, with checkpoints every 2 steps and an evaluation at the end. Every
    run here sees conftest's 8 CPU devices: weights, optimizer state and batches are sharded (FSDP)."""
    workdir = tmp_path_factory.mktemp("reference")
    args = [*common, "--config.total_steps=6", "--config.checkpoint.every_steps=2"]
    _run(workdir, *args, "--config.eval.at_end=true", "--config.eval.num_problems=8")
    return workdir, args


def test_smoke_command_leaves_the_contract_files(reference, tmp_path):
    workdir, _ = reference
    records = read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        missing = [f for f in CONTRACT_FIELDS if f not in record]
        assert not missing, f"step {record['step']} lacks {missing}"
        assert record["stage"] == "fd" and record["loss"] == pytest.approx(record["fd_loss"])
        assert record["kl_mean"] >= 0 and record["entropy"] > 0
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 6
    assert _checkpoint_steps(workdir / "checkpoints") == [2, 4, 6]

    # The metrics line and the rollout log are written by different code from the same rollout.
    rollouts = read_jsonl(workdir / "rollouts.jsonl")
    assert len(rollouts) == 6 * 8 * 4  # steps x problems x generations
    for record in records:
        rewards = [r["reward"] for r in rollouts if r["step"] == record["step"]]
        assert record["reward_mean"] == pytest.approx(np.mean(rewards))
        valid = [r["status"] == "valid" for r in rollouts if r["step"] == record["step"]]
        assert record["pass_rate"] == pytest.approx(np.mean(valid))
        distilled = [r["distilled"] for r in rollouts if r["step"] == record["step"]]
        assert record["rollout/distilled_frac"] == pytest.approx(np.mean(distilled))

    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    report = json.loads((workdir / "eval" / "step_6" / "report.json").read_text())
    assert set(report["pass_at_k"]) == {"1", "2", "4"} and report["num_problems"] == 8

    # The exported policy is the last checkpoint's (restore_policy is what scripts/evaluate.py uses).
    from fd_jax.trainer import restore_policy

    model, tokenizer = restore_policy(workdir)
    _assert_same_weights(_weights(save_hf(model, model.config, tmp_path / "restored")), _weights(workdir / "hf_final"))
    assert tokenizer.decode(tokenizer.encode("Compute 1 + 2.", add_special_tokens=False)) == "Compute 1 + 2."


def test_resume_after_kill_equals_the_uninterrupted_run(reference, tmp_path):
    reference_dir, args = reference
    process = _start(tmp_path, *args)
    # Orbax renames a checkpoint into place once complete: kill after the step-2 one exists, mid-run.
    _wait_until(process, lambda: (tmp_path / "checkpoints" / "2").is_dir() and _lines(tmp_path / "metrics.jsonl") >= 3,
                "step-2 checkpoint")
    process.send_signal(signal.SIGKILL)  # no chance to clean up: a crash or a lost VM
    process.wait()
    killed_at = len(read_jsonl(tmp_path / "metrics.jsonl"))
    assert killed_at < 6, "the run finished before it could be killed"

    done = _run(tmp_path, *args)
    assert "resumed stage fd from the checkpoint of step" in done.stderr
    resumed = read_jsonl(tmp_path / "metrics.jsonl")
    expected = read_jsonl(reference_dir / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # lines after the checkpoint were dropped
    # Bit for bit, not to a tolerance: the resumed steps see the same samples and the same state.
    assert [_deterministic(r) for r in resumed] == [_deterministic(r) for r in expected]
    assert (tmp_path / "rollouts.jsonl").read_text() == (reference_dir / "rollouts.jsonl").read_text()
    _assert_same_weights(_weights(tmp_path / "hf_final"), _weights(reference_dir / "hf_final"))


def test_sigterm_saves_the_current_step_and_exits_cleanly(common, tmp_path):
    # Asynchronous rollouts: the stop must also wait for the batch being sampled in the background.
    process = _start(tmp_path, *common, "--config.total_steps=1000", "--config.rollout.asynchronous=true")
    _wait_until(process, lambda: _lines(tmp_path / "metrics.jsonl") >= 2, "second metrics line")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    last = records[-1]["step"]
    assert last < 1000 and [r["step"] for r in records] == list(range(1, last + 1))
    assert _checkpoint_steps(tmp_path / "checkpoints") == [last]  # saved at the step it was in
    assert f"stopped at step {last}" in output
    # Step 2 trained on a batch sampled before step 1's update: one step off-policy, so the importance
    # weights depart from 1 (step 1's batch was sampled by the very weights it trained).
    assert records[0]["fd/is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert abs(records[1]["fd/is_weight_mean"] - 1.0) > 1e-5


def test_fd_then_grpo_hands_the_fd_policy_to_the_grpo_stage(common, tmp_path):
    _run(tmp_path, *common, "--config.algorithm=fd_then_grpo", "--config.total_steps=4", "--config.fd_steps=2",
         "--config.num_iterations=2")
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["stage"]) for r in records] == [(1, "fd"), (2, "fd"), (3, "grpo"), (4, "grpo")]
    assert all("fd_loss" in r for r in records[:2]) and not any("fd_loss" in r for r in records[2:])
    assert all("grpo_loss" in r and r.get("feedback/requests") is None for r in records[2:])
    # num_iterations=2: the second update of a batch reuses the sampler's log-probs after the first
    # update moved the policy, so its importance weights are no longer 1.
    assert abs(records[0]["last_iteration/fd/is_weight_mean"] - 1.0) > 1e-6
    # GRPO asks no feedback and builds no teacher prompt.
    rollouts = read_jsonl(tmp_path / "rollouts.jsonl")
    assert all(r["feedback"] is None and not r["distilled"] for r in rollouts if r["step"] > 2)

    from fd_jax.trainer import restore_policy

    fd_final = _weights(tmp_path / "fd" / "hf_final")  # the FD stage's exported final policy
    grpo_start, _ = restore_policy(tmp_path, step=2)  # the GRPO stage's own checkpoint before its first step
    assert _checkpoint_steps(tmp_path / "grpo" / "checkpoints") == [2, 4]
    _assert_same_weights(_weights(save_hf(grpo_start, grpo_start.config, tmp_path / "grpo_start")), fd_final)
    # (Whether GRPO then moves the policy depends on rewards, and a random model earns none here.)

    # The stage layout is part of the workdir: changing fd_steps afterwards is refused, naming the field.
    from fd_jax.config_utils import stages
    from fd_jax.trainer import resume_point

    cfg = _smoke_config()
    cfg.algorithm, cfg.total_steps, cfg.fd_steps = "fd_then_grpo", 6, 3
    with pytest.raises(ConfigError, match="fd_steps"):
        resume_point(stages(cfg), tmp_path)
    cfg.fd_steps = 2  # same layout, longer GRPO stage: resumes after step 4
    assert resume_point(stages(cfg), tmp_path) == (1, 4)


@pytest.mark.parametrize("arg, message", [
    ("--config.step.teacherr=ema", "config.step has no field 'teacherr'; did you mean config.step.teacher?"),
    ("--config.algorithm=ppo", "config.algorithm = 'ppo': must be one of ['fd', 'grpo', 'fd_then_grpo']"),
])
def test_config_errors_name_the_field_before_anything_runs(arg, message, tmp_path):
    done = subprocess.run(_command(tmp_path / "run", arg), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # failed before creating the workdir
