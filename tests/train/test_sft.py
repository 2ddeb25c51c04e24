"""The supervised stage (`algorithm=sft`): its loss is the targets' mean NLL and goes down on a tiny model;
its pairs are the task's (bare, with feedback, with a hint); a run killed with SIGKILL and resumed ends
exactly like an uninterrupted one (metrics and weights)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import transformers
from flax import nnx
from safetensors.numpy import load_file

from fd_jax.config.defaults import base_config
from fd_jax.config.schema import OptimConfig, RolloutConfig, StepConfig
from fd_jax.data.char_tokenizer import build_char_tokenizer
from fd_jax.feedback import get_provider
from fd_jax.models import ModelConfig, init_model
from fd_jax.rl.optim import make_optimizer
from fd_jax.rl.sft import make_sft_step, sft_loss
from fd_jax.rl.step import init_train_state
from fd_jax.tasks.arithmetic import ArithmeticFormat, answer_of, make_problems
from fd_jax.train.sft import sft_batch, sft_examples

STEPS = 12  # checkpoints every 2 steps (each save takes longer than an SFT step): time to kill mid-run
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "train_tpu.py")
TOKENIZER = build_char_tokenizer()
CFG = ModelConfig.from_hf(transformers.Qwen3Config(
    vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8))
STEP = StepConfig(token_chunk=16, vocab_tile=64)


def _pairs(step=1, n=8, feedback=0.4, hint=0.3, context_only=0.0):
    cfg = base_config()
    cfg.sft.feedback_fraction, cfg.sft.hint_fraction = feedback, hint
    cfg.sft.context_only_fraction = context_only
    feedback_fn = lambda request: get_provider("checker").feedback([request])[0]  # noqa: E731
    return sft_examples(cfg, make_problems(n, seed=5, level="medium"), fmt=ArithmeticFormat(),
                        rollout=RolloutConfig(), feedback_fn=feedback_fn, step=step)


def test_pairs_are_bare_with_feedback_or_with_a_hint_and_target_the_answer():
    problems = make_problems(8, seed=5, level="medium")
    pairs = _pairs()
    kinds = set()
    for problem, (prompt, target) in zip(problems, pairs):
        assert target == str(answer_of(problem.statement))
        assert prompt.endswith(problem.statement + "\nAnswer: ")
        if "Feedback on an earlier, incorrect attempt" in prompt:
            kinds.add("feedback")
            assert "wrong answer " in prompt and "^" not in prompt  # the checker's sentence, no carets
        elif "A correct solution to this problem" in prompt:
            kinds.add("hint")
            assert f"{problem.statement}\nAnswer: {target}" in prompt
        else:
            kinds.add("bare")
            assert prompt == ArithmeticFormat().render(problem)
    assert kinds == {"bare", "feedback", "hint"}
    assert _pairs() == pairs and _pairs(step=2) != pairs  # drawn from (seed, step): a resume draws the same
    assert all(p == ArithmeticFormat().render(q) for (p, _), q in zip(_pairs(feedback=0.0, hint=0.0), problems))
    # Questions marked context-only are never bare; with every question marked, no prompt is bare.
    for step in range(1, 6):
        assert all(p != ArithmeticFormat().render(q) for (p, _), q in zip(_pairs(step, context_only=1.0), problems))


def test_sft_loss_is_the_targets_mean_nll_and_goes_down():
    model = init_model(CFG, seed=0)
    graphdef, params = nnx.split(model)
    batch = sft_batch(_pairs(), tokenizer=TOKENIZER, fmt=ArithmeticFormat(), pad_multiple=16)
    rows = {k: np.asarray(v) for k, v in dataclasses.asdict(batch).items()}
    # Oracle: one unpadded forward pass per example, log-softmax in float64, the target tokens' NLL.
    nll, count = 0.0, 0
    for b in range(len(rows["completion_tokens_BC"])):
        n = int(rows["completion_mask_BC"][b].sum())
        seq = rows["student_tokens_BS"][b][rows["student_positions_BS"][b] >= 0]
        logits = np.asarray(model(seq[None], np.arange(len(seq))[None]), np.float64)[0]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        start = len(seq) - n
        nll -= sum(logp[start - 1 + c, seq[start + c]] for c in range(n))
        count += n
    loss, _ = sft_loss(params, graphdef, rows, STEP)
    np.testing.assert_allclose(float(loss), nll / count, rtol=1e-5)

    optimizer = make_optimizer(OptimConfig(learning_rate=3e-3))
    state = init_train_state(params, optimizer, dataclasses.replace(STEP, teacher="live"))
    step = make_sft_step(graphdef, optimizer, STEP)
    losses = []
    for _ in range(8):
        state, metrics = step(state, rows)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses


def _command(workdir, *args):
    return [sys.executable, SCRIPT, f"--workdir={workdir}", "--config", os.path.join(REPO, "configs", "smoke_cpu.py"),
            "--config.algorithm=sft", f"--config.total_steps={STEPS}", "--config.checkpoint.every_steps=2",
            "--config.log.progress=false", "--config.eval.at_end=false", *args]


def _records(workdir):
    skip = ("time/", "wall_time", "compile/")
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(skip)}
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_killed_and_resumed_sft_run_equals_the_uninterrupted_one(tmp_path):
    cache = [f"--config.compilation_cache_dir={tmp_path / 'xla'}"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = subprocess.run(_command(reference, *cache), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    process = subprocess.Popen(_command(killed, *cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    metrics = killed / "metrics.jsonl"
    # Orbax renames a checkpoint into place once complete: kill after the step-2 one exists, mid-run.
    while time.monotonic() < deadline and not ((killed / "checkpoints" / "2").is_dir() and metrics.exists()
                                               and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # no chance to clean up
    process.wait()
    assert len(metrics.read_text().splitlines()) < STEPS, "the run finished before it could be killed"
    done = subprocess.run(_command(killed, *cache), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed stage sft from the checkpoint of step" in done.stderr
    assert [r["step"] for r in _records(killed)] == list(range(1, STEPS + 1))
    assert _records(killed) == _records(reference)
    ours, theirs = load_file(str(killed / "hf_final" / "model.safetensors")), load_file(
        str(reference / "hf_final" / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert _records(reference)[-1]["loss"] < _records(reference)[0]["loss"]
