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

from fd_jax.config.errors import ConfigError
from fd_jax.train.metrics_log import read_jsonl
from fd_jax.models import save_hf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    from fd_jax.train.workdir import restore_policy

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
    no_eval = lambda r: {k: v for k, v in _deterministic(r).items() if not k.startswith("eval/")}  # noqa: E731
    assert [_deterministic(r) for r in resumed] == [no_eval(r) for r in expected]  # only the reference evaluated
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
         "--config.num_iterations=2", "--config.log.teacher_diagnostics_every_steps=2")
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["stage"]) for r in records] == [(1, "fd"), (2, "fd"), (3, "grpo"), (4, "grpo")]
    # teacher/* on every 2nd FD step only; GRPO has no teacher to diagnose.
    assert ["teacher/entropy" in r for r in records] == [False, True, False, False]
    assert all("fd_loss" in r for r in records[:2]) and not any("fd_loss" in r for r in records[2:])
    assert all("grpo_loss" in r and r.get("feedback/requests") is None for r in records[2:])
    # num_iterations=2: the second update of a batch reuses the sampler's log-probs after the first
    # update moved the policy, so its importance weights are no longer 1.
    assert abs(records[0]["last_iteration/fd/is_weight_mean"] - 1.0) > 1e-6
    # GRPO asks no feedback and builds no teacher prompt.
    rollouts = read_jsonl(tmp_path / "rollouts.jsonl")
    assert all(r["feedback"] is None and not r["distilled"] for r in rollouts if r["step"] > 2)

    from fd_jax.train.workdir import restore_policy

    fd_final = _weights(tmp_path / "fd" / "hf_final")  # the FD stage's exported final policy
    grpo_start, _ = restore_policy(tmp_path, step=2)  # the GRPO stage's own checkpoint before its first step
    assert _checkpoint_steps(tmp_path / "grpo" / "checkpoints") == [2, 4]
    _assert_same_weights(_weights(save_hf(grpo_start, grpo_start.config, tmp_path / "grpo_start")), fd_final)
    # (Whether GRPO then moves the policy depends on rewards, and a random model earns none here.)

    # The stage layout is part of the workdir: changing fd_steps afterwards is refused, naming the field.
    from fd_jax.train.stages import stages
    from fd_jax.train.loop import resume_point

    cfg = _smoke_config()
    cfg.algorithm, cfg.total_steps, cfg.fd_steps = "fd_then_grpo", 6, 3
    with pytest.raises(ConfigError, match="fd_steps"):
        resume_point(stages(cfg), tmp_path)
    cfg.fd_steps = 2  # same layout, longer GRPO stage: resumes after step 4
    assert resume_point(stages(cfg), tmp_path) == (1, 4)


@pytest.mark.parametrize("arg, message", [
    ("--config.step.teacherr=ema", "config.step has no field 'teacherr'; did you mean config.step.teacher?"),
    ("--config.algorithm=ppo", "config.algorithm = 'ppo': must be one of ['fd', 'grpo', 'fd_then_grpo', 'sft']"),
])
def test_config_errors_name_the_field_before_anything_runs(arg, message, tmp_path):
    done = subprocess.run(_command(tmp_path / "run", arg), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # failed before creating the workdir


def _tensorboard_tags(logdir):
    """{tag: [(step, value)]} of the scalar events under `logdir` (TFRecord framing: length, crc, event, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    tags = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append((event.step, value.simple_value))
    return tags


def test_evaluation_scores_and_compilations_reach_the_logs(reference):
    """docs/usage.md lists eval/pass@k and eval/entropy among the metrics: eval.at_end writes them into the
    last step's line and TensorBoard (they were only in eval/step_N/report.json). compile/count, the XLA
    programs built, does not grow from step to step: every later step reuses the first step's shapes."""
    workdir, _ = reference
    records = read_jsonl(workdir / "metrics.jsonl")
    report = json.loads((workdir / "eval" / "step_6" / "report.json").read_text())
    for k in ("1", "2", "4"):
        assert records[-1][f"eval/pass@{k}"] == pytest.approx(report["pass_at_k"][k])
    assert records[-1]["eval/entropy"] == pytest.approx(report["entropy"])
    assert not any(k.startswith("eval/") for r in records[:-1] for k in r)
    tags = _tensorboard_tags(workdir / "tensorboard")
    # TensorBoard tags allow no '@': tensorboardX writes eval/pass@1 as eval/pass_1.
    assert tags["eval/pass_1"] == [(6, pytest.approx(report["pass_at_k"]["1"]))]
    assert [step for step, _ in tags["loss"]] == [1, 2, 3, 4, 5, 6]
    counts = [r["compile/count"] for r in records]
    # The first checkpoint (after step 2) builds orbax's copy programs once; no step builds anything new.
    assert counts[0] > 0 and len(set(counts[2:])) == 1 and counts[0] == counts[1], counts


def test_the_export_stops_generating_at_the_tokenizers_eos(reference):
    """transformers' generate on hf_final stops at the tokenizer's <eos> (with eos_token_id null it ran
    to the token limit). The random model rarely says <eos>, so a logits processor makes it say it as its
    fourth token; whether generation then stops is the export's doing."""
    import torch
    import transformers

    workdir, _ = reference
    tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "hf_final")
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf_final").eval()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2

    class EosAsFourthToken(transformers.LogitsProcessor):
        def __init__(self, start):
            self.start = start

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - self.start == 3:
                scores[:, :] = -float("inf")
                scores[:, tokenizer.eos_token_id] = 0.0
            else:
                scores[:, tokenizer.eos_token_id] = -float("inf")
            return scores

    prompt = tokenizer("Compute 1 + 2.\nAnswer: ", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=20, do_sample=False,
                             logits_processor=transformers.LogitsProcessorList([EosAsFourthToken(prompt.shape[1])]))
    assert out.shape[1] - prompt.shape[1] == 4 and out[0, -1].item() == tokenizer.eos_token_id
    assert oct((workdir / "hf_final" / "model.safetensors").stat().st_mode & 0o777) == oct(
        (workdir / "hf_final" / "config.json").stat().st_mode & 0o777)


def _tree_bytes(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _refused(workdir, *args):
    """Runs the script, expecting a refusal: exit status 2 and a single line on stderr, no traceback."""
    done = subprocess.run(_command(workdir, *args), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


def test_an_incompatible_workdir_is_refused_and_left_byte_for_byte(reference, tmp_path):
    """--config.algorithm=grpo on an FD workdir gave a 47-line orbax traceback and rewrote config.json
    (then evaluate.py --checkpoint failed too). Now: one line naming what differs, the workdir untouched,
    refused before JAX compiles anything."""
    import shutil

    reference_dir, args = reference
    workdir = tmp_path / "copy"
    shutil.copytree(reference_dir, workdir)
    before = _tree_bytes(workdir)
    line = _refused(workdir, *args, "--config.algorithm=grpo")
    assert "config.algorithm = 'fd' there, 'grpo' here" in line and "use a new --workdir" in line
    line = _refused(workdir, *args, "--config.model.init.hidden_size=32")
    assert "config.model.init.hidden_size = 64 there, 32 here" in line
    assert _tree_bytes(workdir) == before
    # Fields that do not change what a checkpoint holds may change on resume: a longer run continues.
    from fd_jax.config.validation import config_from_json
    from fd_jax.train.workdir import check_resumable

    cfg = config_from_json((workdir / "config.json").read_text())
    cfg.total_steps, cfg.optim.learning_rate = 10, 1e-4
    check_resumable(cfg, workdir)


def test_failed_checks_leave_a_new_workdir_absent(common, tmp_path):
    """A bad problem file or a missing Lean: one line (file, line and column for the data), exit 2, and
    no config.json or empty metrics.jsonl left behind."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "a", "split": "valid", "formal_statement": "theorem a : 1 = 1 := by"}\n'
                   '{"name": "b", "split": "valid" "formal_statement": "x"}\n')
    lean = ["--config.data.task=lean", "--config.data.prompt_format=lean_completion"]
    line = _refused(tmp_path / "run", *common, *lean, f"--config.data.path={bad}")
    assert f"{bad}:2: not valid JSON" in line and "column 32" in line
    good = tmp_path / "good.jsonl"
    good.write_text('{"name": "a", "split": "valid", "formal_statement": "theorem a : 1 = 1 := by"}\n')
    line = _refused(tmp_path / "run", *common, *lean, f"--config.data.path={good}",
                    "--config.lean.repl_command=no-such-lean-repl", "--config.eval.at_end=false")
    assert "config.lean.repl_command = 'no-such-lean-repl'" in line and "setup_lean.sh" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--config.total_steps=abc"], "config error: --config.total_steps=abc: invalid literal for int()"),
    (["--config.total_steps=abc", "--workdir="], "config error: --config.total_steps=abc"),
    (["NOWORKDIR"], "error: --workdir DIR is required"),
], ids=["not-an-int", "not-an-int-no-workdir", "no-workdir"])
def test_command_line_mistakes_are_one_line(args, message, tmp_path):
    command = [sys.executable, SCRIPT, *(a for a in args if a != "NOWORKDIR")]
    if "NOWORKDIR" not in args and not any(a.startswith("--workdir") for a in args):
        command.append(f"--workdir={tmp_path / 'run'}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr[-3000:]
    assert done.stderr.startswith("train_tpu.py: " + message), done.stderr
    assert not (tmp_path / "run").exists()
    if "abc" in message:  # --debug shows the parse error's traceback (a missing flag has none)
        debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_help_exits_0_with_the_example_intact():
    done = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--workdir runs/kimina \\\n        --config.total_steps=500" in done.stdout
    assert "--workdir: the run's directory" in done.stdout


def test_evaluate_checkpoint_of_a_missing_step_is_one_line(reference, tmp_path):
    """scripts/evaluate.py --checkpoint with a step the workdir does not have: one line naming the steps it
    has, exit status 2, before any model is built."""
    workdir, _ = reference
    done = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), "--checkpoint", str(workdir),
                           "--step", "5", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr == f"evaluate.py: workdir error: {workdir}: no checkpoint of step 5 (it has steps [2, 4, 6])\n"
    assert not (tmp_path / "out").exists()
