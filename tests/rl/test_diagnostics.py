"""Teacher-advantage diagnostics against a direct computation: each sequence run through the model on its
own (full logits, no padding, no index maps, no fused kernel), log-softmax in float64."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

from fd_jax.models import ModelConfig, init_model
from fd_jax.rl.batch import pack_train_batch
from fd_jax.rl.diagnostics import diagnostics, make_diagnostics, probe_batch
from fd_jax.rl.step import StepConfig, TrainState, init_train_state, make_train_step

CFG = ModelConfig.from_hf(transformers.Qwen3Config(
    vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, tie_word_embeddings=False))
STEP = StepConfig(teacher="ema", token_chunk=4, vocab_tile=16)

# One problem, 3 samples: row 1 is correct; rows 0 and 2 failed and have teacher prompts (feedback tokens).
STUDENT = [1, 5, 6, 7]
TEACHER = {0: [1, 20, 21, 5, 6, 7], 2: [1, 22, 23, 24, 25, 5, 6, 7]}
COMPLETIONS = [[9, 10, 11, 2], [12, 13, 2], [14, 2]]
CORRECT = np.array([False, True, False])
DISTILL = np.array([1.0, 0.0, 1.0], np.float32)


def log_probs(model, prompt, completion):
    """Per-token log p(completion | prompt) and entropies from one unpadded forward pass."""
    tokens = np.array([prompt + completion], np.int32)
    logits = np.asarray(model(tokens, np.arange(tokens.shape[1])[None]), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    rows = logp[len(prompt) - 1: len(prompt) - 1 + len(completion)]
    return rows[np.arange(len(completion)), completion], -(np.exp(rows) * rows).sum(-1), rows


@pytest.fixture(scope="module")
def models():
    student, teacher = init_model(CFG, seed=0), init_model(CFG, seed=1)  # an EMA teacher that differs
    return student, teacher


def _batches():
    teacher_prompts = [TEACHER.get(b, STUDENT) for b in range(3)]
    common = dict(pad_id=0, pad_multiple=4)
    batch = pack_train_batch(student_prompts=[STUDENT] * 3, teacher_prompts=teacher_prompts, completions=COMPLETIONS,
                             old_logprobs=[[0.0] * len(c) for c in COMPLETIONS], rewards_B=CORRECT.astype(np.float32),
                             advantages_B=np.zeros(3), distill_mask_B=DISTILL, **common)
    probe = probe_batch(student_prompts=[STUDENT] * 3, teacher_prompts=teacher_prompts, completions=COMPLETIONS,
                        logprobs=[[0.0] * len(c) for c in COMPLETIONS], correct_B=CORRECT, distill_B=DISTILL, group=3,
                        **common)
    return batch, probe


def test_probe_pairs_each_distilled_row_with_its_correct_sibling():
    _, probe = _batches()
    np.testing.assert_array_equal(probe.distill_mask_B, [1, 1, 0])  # rows 0 and 2, then one filler row
    mask = probe.completion_mask_BC.astype(bool)
    for r in range(3):
        assert list(probe.completion_tokens_BC[r][mask[r]]) == COMPLETIONS[1]
    rows = np.arange(3)[:, None]
    after = probe.teacher_tokens_BU[rows, probe.teacher_index_BC + 1]
    np.testing.assert_array_equal(after[mask], probe.completion_tokens_BC[mask])
    assert probe_batch(student_prompts=[STUDENT] * 3, teacher_prompts=[STUDENT] * 3, completions=COMPLETIONS,
                       logprobs=[[0.0] * len(c) for c in COMPLETIONS], correct_B=np.zeros(3, bool), distill_B=DISTILL,
                       group=3, pad_id=0, pad_multiple=4) is None


def _direct_batch_metrics(student, teacher, first_k):
    """Distilled rows: reverse KL (alpha = 1) per token, its share on the first k tokens, and the entropies."""
    kl_first = kl_all = t_ent = s_ent = tokens = 0.0
    for b in (0, 2):
        _, se, s_rows = log_probs(student, STUDENT, COMPLETIONS[b])
        _, te, t_rows = log_probs(teacher, TEACHER[b], COMPLETIONS[b])
        kl = (np.exp(s_rows) * (s_rows - t_rows)).sum(-1)
        kl_first, kl_all = kl_first + kl[:first_k].sum(), kl_all + kl.sum()
        t_ent, s_ent, tokens = t_ent + te.sum(), s_ent + se.sum(), tokens + len(COMPLETIONS[b])
    return {"teacher/kl_first_k_share": kl_first / kl_all, "teacher/entropy": t_ent / tokens,
            "teacher/student_entropy": s_ent / tokens}


def _assert_batch_metrics(got, want):
    np.testing.assert_allclose(got["teacher/kl_first_k_share"], want["teacher/kl_first_k_share"], rtol=1e-4)
    np.testing.assert_allclose(got["teacher/entropy"], want["teacher/entropy"], rtol=1e-5)
    np.testing.assert_allclose(got["teacher/student_entropy"], want["teacher/student_entropy"], rtol=1e-5)


def _as_dict(rows):
    return {k: np.asarray(v) for k, v in dataclasses.asdict(rows).items()}


@pytest.mark.parametrize("share_prompts", [True, False])
def test_teacher_minus_student_equals_the_direct_computation(models, share_prompts):
    student, teacher = models
    batch, probe = _batches()
    graphdef, params = nnx.split(student)
    _, teacher_params = nnx.split(teacher)
    state = TrainState(np.zeros((), np.int32), params, teacher_params, None, None)
    step_cfg = dataclasses.replace(STEP, share_prompts=share_prompts)  # the probe's forward: layout or full rows
    got = jax.device_get(make_diagnostics(graphdef, step_cfg, first_k=2)(state, _as_dict(batch), _as_dict(probe)))

    gains = []
    for b in (0, 2):  # the distilled rows, scored on the correct sibling's completion (row 1)
        t, _, _ = log_probs(teacher, TEACHER[b], COMPLETIONS[1])
        s, _, _ = log_probs(student, STUDENT, COMPLETIONS[1])
        gains.append(t.sum() - s.sum())
    np.testing.assert_allclose(got["teacher/logp_gain_correct"], np.mean(gains), rtol=1e-4, atol=1e-5)
    assert got["teacher/better_frac"] == np.mean(np.array(gains) > 0)
    assert got["teacher/probe_rows"] == 2
    _assert_batch_metrics(got, _direct_batch_metrics(student, teacher, first_k=2))


@pytest.mark.parametrize("share_prompts,kernel_passes", [(True, "one"), (False, "two")])
def test_the_train_step_reports_the_batch_metrics_before_its_update(models, share_prompts, kernel_passes):
    """The trainer takes the batch's teacher/* from the step's own statistics (no extra forward pass): they
    must be the direct computation's, with the weights the step starts from, whatever the layout and the
    kernel. A step made without diagnostics reports none."""
    student, teacher = models
    batch, _ = _batches()
    graphdef, params = nnx.split(student)
    _, teacher_params = nnx.split(teacher)
    want = _direct_batch_metrics(student, teacher, first_k=2)  # before the step donates the weights
    step_cfg = dataclasses.replace(STEP, share_prompts=share_prompts, kernel_passes=kernel_passes)
    optimizer = optax.sgd(0.5)
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731  (the step donates its state)
    state = init_train_state(copy(params), optimizer, step_cfg)._replace(teacher=copy(teacher_params))
    new_state, metrics = make_train_step(graphdef, optimizer, step_cfg, diagnostics_first_k=2)(state, _as_dict(batch))
    _assert_batch_metrics(jax.device_get(metrics), want)
    assert float(optax.global_norm(jax.tree.map(jnp.subtract, new_state.params, params))) > 0  # it did update
    state = init_train_state(copy(params), optimizer, step_cfg)._replace(teacher=copy(teacher_params))
    _, plain = make_train_step(graphdef, optimizer, step_cfg)(state, _as_dict(batch))
    assert not any(k.startswith("teacher/") for k in plain)


def test_a_probe_riding_on_the_step_scores_as_the_direct_computation(models):
    """The trainer packs the probe's completions into the step's shared-prompt layout (its prompts are the
    batch rows'): the probe's metrics must be the direct computation's, and the step's own loss, gradient
    and batch metrics those of the step without the probe."""
    student, teacher = models
    batch, probe = _batches()
    graphdef, params = nnx.split(student)
    _, teacher_params = nnx.split(teacher)
    gains = []
    for b in (0, 2):
        t, _, _ = log_probs(teacher, TEACHER[b], COMPLETIONS[1])
        s, _, _ = log_probs(student, STUDENT, COMPLETIONS[1])
        gains.append(t.sum() - s.sum())
    optimizer = optax.sgd(0.5)
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731  (the step donates its state)
    out = {}
    for ride in (False, True):
        state = init_train_state(copy(params), optimizer, STEP)._replace(teacher=copy(teacher_params))
        step_fn = make_train_step(graphdef, optimizer, STEP, diagnostics_first_k=2)
        assert step_fn.takes_probe(_as_dict(batch))
        out[ride] = jax.device_get(step_fn(state, _as_dict(batch), _as_dict(probe) if ride else None)[1])
    got = out[True]
    np.testing.assert_allclose(got["teacher/logp_gain_correct"], np.mean(gains), rtol=1e-4, atol=1e-5)
    assert got["teacher/better_frac"] == np.mean(np.array(gains) > 0)
    assert got["teacher/probe_rows"] == 2
    assert "teacher/probe_rows" not in out[False]
    for key in ("loss", "grad_norm", "kl_mean", "entropy", "teacher/entropy", "teacher/kl_first_k_share"):
        np.testing.assert_allclose(got[key], out[False][key], rtol=1e-5, err_msg=key)
    unshared = dataclasses.replace(STEP, share_prompts=False)  # no layout to ride on: the caller scores it apart
    assert not make_train_step(graphdef, optimizer, unshared).takes_probe(_as_dict(batch))


def test_without_probe_rows_only_the_batch_metrics(models):
    student, _ = models
    batch, _ = _batches()
    graphdef, params = nnx.split(student)
    rows = {k: np.asarray(v) for k, v in dataclasses.asdict(batch).items()}
    got = diagnostics(graphdef, params, None, rows, None, STEP)  # live teacher: the student's own weights
    assert "teacher/logp_gain_correct" not in got
    assert float(got["teacher/kl_first_k_share"]) > 0.0
