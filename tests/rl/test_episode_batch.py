"""Training on multi-turn episodes: the completion is the whole transcript after the prompt, and only the
model's own tokens (mask 1) reach the GRPO and FD losses; tool output (mask 0) is context only."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fd_jax.models import init_model
from fd_jax.rl import losses
from fd_jax.rl.batch import pack_train_batch
from fd_jax.rl.step import StepConfig
from test_train_step import CFG, KERNEL, _loss_and_grads

RNG = np.random.default_rng(7)


def _episode_rows(rows=4):
    """Per row: a prompt, and a transcript model turn / tool output / model turn (/ tool output / turn)."""
    prompts, transcripts, masks = [], [], []
    for b in range(rows):
        prompts.append(list(RNG.integers(1, 61, RNG.integers(2, 6))))
        tokens, mask = [], []
        for turn in range(1 + 2 * (b % 2 + 1)):
            piece = list(RNG.integers(1, 61, RNG.integers(2, 6)))
            tokens += piece
            mask += [0 if turn % 2 else 1] * len(piece)  # odd pieces are tool output
        transcripts.append(tokens)
        masks.append(mask)
    return prompts, transcripts, masks


def _batch(prompts, transcripts, masks, old):
    feedback = [list(RNG.integers(1, 61, 4)) for _ in prompts]
    batch = pack_train_batch(
        student_prompts=prompts, teacher_prompts=[p + f for p, f in zip(prompts, feedback)], completions=transcripts,
        old_logprobs=old, rewards_B=np.zeros(len(prompts)), advantages_B=np.array([1.0, -0.5, 0.7, -1.2]),
        distill_mask_B=np.ones(len(prompts)), pad_id=0, pad_multiple=8, completion_masks=masks)
    return {k: np.asarray(v) for k, v in dataclasses.asdict(batch).items()}


@pytest.fixture(scope="module")
def episode_setup():
    graphdef, params = nnx.split(init_model(CFG, seed=0))
    _, teacher = nnx.split(init_model(CFG, seed=3))
    prompts, transcripts, masks = _episode_rows()
    old = [list(RNG.normal(-4.0, 0.3, len(t))) for t in transcripts]
    return graphdef, params, teacher, _batch(prompts, transcripts, masks, old), masks


def test_pack_train_batch_takes_the_episode_mask(episode_setup):
    *_, batch, masks = episode_setup
    for b, mask in enumerate(masks):
        np.testing.assert_array_equal(batch["completion_mask_BC"][b, : len(mask)], mask)
        assert batch["completion_mask_BC"][b, len(mask):].sum() == 0
    with pytest.raises(ValueError, match="row 0 has 3 completion tokens but a mask of 2"):
        pack_train_batch(student_prompts=[[1]], teacher_prompts=[[1]], completions=[[1, 2, 3]],
                         old_logprobs=[[0.0] * 3], rewards_B=np.zeros(1), advantages_B=np.zeros(1),
                         distill_mask_B=np.zeros(1), pad_id=0, completion_masks=[[1, 0]])


CONFIGS = {
    "grpo": StepConfig(distill_weight=0.0, teacher="live", loss_type="dapo", **KERNEL),
    "fd": StepConfig(distill_weight=1.0, teacher="ema", alpha=0.5, **KERNEL),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tool_tokens_contribute_nothing_to_either_loss(episode_setup, name):
    """Changing everything the losses could read at tool-output columns (old log-probs, the scored id,
    the teacher's position) changes neither the loss nor any gradient; the same change at one model
    column does."""
    graphdef, params, teacher, batch, _ = episode_setup
    cfg = CONFIGS[name]
    teacher = None if cfg.teacher == "live" else teacher
    loss, (grads, _) = _loss_and_grads(graphdef, params, teacher, batch, cfg)

    def perturbed(where_BC):
        out = {k: v.copy() for k, v in batch.items()}
        out["old_logprobs_BC"] = np.where(where_BC, RNG.normal(0.0, 5.0, where_BC.shape), batch["old_logprobs_BC"])
        out["completion_tokens_BC"] = np.where(where_BC, 5, batch["completion_tokens_BC"]).astype(np.int32)
        out["teacher_index_BC"] = np.where(where_BC, 0, batch["teacher_index_BC"]).astype(np.int32)
        return out

    real_BC = np.zeros_like(batch["completion_mask_BC"], bool)
    real_BC[:, : max(map(len, episode_setup[4]))] = True
    tool_BC = real_BC & (batch["completion_mask_BC"] == 0)
    assert tool_BC.sum() >= 8  # the batch has tool output to mask
    loss2, (grads2, _) = _loss_and_grads(graphdef, params, teacher, perturbed(tool_BC), cfg)
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6, atol=0)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-9)

    model_col = np.zeros_like(tool_BC)
    model_col[0, 1] = True
    assert batch["completion_mask_BC"][0, 1] == 1
    loss3, _ = _loss_and_grads(graphdef, params, teacher, perturbed(model_col), cfg)
    assert abs(float(loss3) - float(loss)) > 1e-3 * abs(float(loss))  # far above rounding (1e-6)


def test_episode_loss_equals_the_losses_module_over_model_tokens(episode_setup):
    """An oracle on plain forward passes: DAPO's token mean counts model tokens only."""
    graphdef, params, teacher, batch, _ = episode_setup
    cfg = CONFIGS["grpo"]
    loss, _ = _loss_and_grads(graphdef, params, None, batch, cfg)
    logits = nnx.merge(graphdef, params)(batch["student_tokens_BS"], batch["student_positions_BS"])
    logits = np.take_along_axis(np.asarray(logits, np.float64), batch["student_index_BC"][:, :, None], axis=1)
    logp = jax.nn.log_softmax(logits)
    logp_tok = np.take_along_axis(np.asarray(logp), batch["completion_tokens_BC"][:, :, None], -1)[..., 0]
    want = losses.policy_loss(jnp.asarray(logp_tok, jnp.float32), batch["old_logprobs_BC"], batch["advantages_B"],
                              batch["completion_mask_BC"], loss_type="dapo", eps_low=0.2, eps_high=0.2)
    np.testing.assert_allclose(float(loss), float(want), rtol=2e-5, atol=1e-6)
