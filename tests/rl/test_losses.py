"""GRPO and FD losses against hand-written numpy versions of their formulas (TRL's GRPOTrainer semantics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fd_jax.rl import losses

B, T = 6, 7


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.5, 0.5, size=(B, T))
    old = logp + rng.normal(0, 0.3, size=(B, T))  # ratios spread over both clip edges
    adv = rng.normal(size=B)
    lengths = np.array([7, 3, 5, 1, 6, 4])
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float64)
    ref = logp + rng.normal(0, 0.2, size=(B, T))
    return logp, old, adv, mask, ref


# ---- numpy oracle, written from the formulas (TRL grpo_trainer `_compute_loss`) -------------------------


def np_policy_loss(logp, old, adv, mask, loss_type, eps_low, eps_high, level, max_len=None, beta=0.0,
                   ref=None, delta=None):
    log_ratio = logp - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(1) / np.maximum(mask.sum(1), 1))[:, None] * np.ones_like(logp)
    ratio = np.exp(log_ratio)
    if delta is not None:
        unclipped = np.minimum(ratio, delta) * adv[:, None]
    else:
        unclipped = ratio * adv[:, None]
    clipped = np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv[:, None]
    per_token = -np.minimum(unclipped, clipped)
    if beta:
        per_token = per_token + beta * (np.exp(ref - logp) - (ref - logp) - 1)
    total = (per_token * mask).sum()
    if loss_type == "grpo":
        return np.mean((per_token * mask).sum(1) / np.maximum(mask.sum(1), 1))
    if loss_type in ("bnpo", "dapo"):
        return total / max(mask.sum(), 1)
    if loss_type == "dr_grpo":
        return total / (B * (T if max_len is None else max_len))
    raise AssertionError(loss_type)


def np_group_advantages(r, scale, eps=1e-4):
    out = np.empty_like(r)
    batch_std = np.std(r, ddof=1)
    for p in range(r.shape[0]):
        centred = r[p] - r[p].mean()
        std = {"group": np.std(r[p], ddof=1) if r.shape[1] > 1 else 0.0, "batch": batch_std}.get(scale)
        out[p] = centred if scale == "none" else centred / (std + eps)
    return out


# ---- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages(scale):
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.5, 0.0]])
    got = losses.group_advantages(jnp.asarray(rewards), scale=scale)
    np.testing.assert_allclose(got, np_group_advantages(rewards, scale), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], 0.0)  # all-equal group: no signal, no division by zero


def test_group_advantages_single_generation_and_errors():
    np.testing.assert_allclose(losses.group_advantages(jnp.array([[0.3], [0.9]]), scale="group"), 0.0)
    with pytest.raises(ValueError, match=r"scale_rewards='median'.*\['batch', 'group', 'none'\]"):
        losses.group_advantages(jnp.ones((2, 2)), scale="median")


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_policy_loss_matches_numpy(loss_type, level):
    logp, old, adv, mask, ref = _batch()
    kw = dict(loss_type=loss_type, eps_low=0.2, eps_high=0.28, importance_sampling_level=level)
    got = losses.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), **kw,
                             max_completion_length=9)
    want = np_policy_loss(logp, old, adv, mask, loss_type, 0.2, 0.28, level, max_len=9)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # the gradient w.r.t. log-probs against central differences of the numpy formula
    def loss(lp):
        return losses.policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), **kw,
                                  max_completion_length=9)

    def np_loss(lp):
        return np_policy_loss(lp, old, adv, mask, loss_type, 0.2, 0.28, level, 9)

    grad = np.asarray(jax.grad(loss)(jnp.asarray(logp)))
    direction = np.random.default_rng(3).normal(size=logp.shape)
    eps = 1e-4
    numeric = (np_loss(logp + eps * direction) - np_loss(logp - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=1e-3, atol=1e-6)


def test_policy_loss_k3_kl_dual_clip_and_dapo_global_count():
    logp, old, adv, mask, ref = _batch(1)
    args = [jnp.asarray(x) for x in (logp, old, adv, mask)]
    got, metrics = losses.policy_loss_and_metrics(*args, loss_type="grpo", eps_low=0.2, eps_high=0.2,
                                                  beta=0.04, ref_logp_BT=jnp.asarray(ref), delta=1.5)
    want = np_policy_loss(logp, old, adv, mask, "grpo", 0.2, 0.2, "token", beta=0.04, ref=ref, delta=1.5)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    np.testing.assert_allclose(metrics["kl"], (kl * mask).sum() / mask.sum(), rtol=1e-5)
    dapo = losses.policy_loss(*args, loss_type="dapo", eps_low=0.2, eps_high=0.2, num_items=100.0)
    bnpo = losses.policy_loss(*args, loss_type="bnpo", eps_low=0.2, eps_high=0.2)
    np.testing.assert_allclose(dapo * 100.0, bnpo * mask.sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="needs ref_logp_BT"):
        losses.policy_loss(*args, loss_type="grpo", eps_low=0.2, eps_high=0.2, beta=0.1)
    with pytest.raises(ValueError, match=r"loss_type='ppo'.*\['bnpo', 'dapo', 'dr_grpo', 'grpo'\]"):
        losses.policy_loss(*args, loss_type="ppo", eps_low=0.2, eps_high=0.2)


def test_policy_clip_metrics_count_tokens_outside_the_trust_region():
    logp, old, adv, mask, _ = _batch(2)
    _, metrics = losses.policy_loss_and_metrics(*(jnp.asarray(x) for x in (logp, old, adv, mask)),
                                                loss_type="grpo", eps_low=0.1, eps_high=0.15)
    ratio = np.exp(logp - old)
    low = (ratio < 0.9) & (adv[:, None] < 0)
    high = (ratio > 1.15) & (adv[:, None] > 0)
    for name, x in (("low", low), ("high", high), ("region", low | high)):
        want = (x * mask).sum() / mask.sum()
        np.testing.assert_allclose(metrics[f"clip_ratio/{name}_mean"], want, rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio_max"], ratio[mask > 0].max(), rtol=1e-6)


def test_without_old_logprobs_the_ratio_is_one_but_has_a_gradient():
    logp, _, adv, mask, _ = _batch()

    def loss(lp):
        return losses.policy_loss(lp, None, jnp.asarray(adv), jnp.asarray(mask), loss_type="bnpo",
                                  eps_low=0.2, eps_high=0.2)

    value, grad = jax.value_and_grad(loss)(jnp.asarray(logp))
    np.testing.assert_allclose(value, -(adv[:, None] * mask).sum() / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(grad, -adv[:, None] * mask / mask.sum(), rtol=1e-5)  # d ratio / d logp = 1


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "constant"])
def test_fd_loss_importance_weights_and_aggregation(agg):
    logp, old, _, mask, _ = _batch()
    div = np.abs(np.random.default_rng(4).normal(size=(B, T)))
    mask[3] = 0.0  # a rollout that was not distilled
    weight = np.minimum(np.exp(logp - old), 2.0)
    x = div * weight * mask
    want = {
        "token_mean": x.sum() / mask.sum(),
        "seq_mean": np.mean([x[b].sum() / mask[b].sum() for b in range(B) if mask[b].sum() > 0]),
        "constant": x.sum() / 50.0,
    }[agg]

    def loss(d, lp):
        return losses.fd_loss_and_metrics(d, lp, jnp.asarray(old), jnp.asarray(mask), is_clip=2.0,
                                          loss_agg=agg, normaliser=50.0)

    (value, metrics), (d_div, d_logp) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        jnp.asarray(div), jnp.asarray(logp))
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_array_equal(d_logp, 0.0)  # the importance weight is a constant
    assert np.all((np.asarray(d_div) > 0) == (mask > 0))
    active = mask > 0
    clipped = np.exp(logp - old) > 2.0
    np.testing.assert_allclose(metrics["fd/is_clip_frac"], clipped[active].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["fd/is_weight_max"], weight[active].max(), rtol=1e-6)
    np.testing.assert_allclose(metrics["fd/kl_max"], div[active].max(), rtol=1e-6)


@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
def test_policy_aggregation_weights_reproduce_the_aggregation(loss_type):
    rng = np.random.default_rng(5)
    x_BT = rng.normal(size=(4, 7)).astype(np.float32)
    mask_BT = (rng.random((4, 7)) < 0.7).astype(np.float32)
    mask_BT[2] = 0.0  # an empty row
    kw = dict(max_completion_length=9, num_items=None)
    weights = losses.policy_aggregation_weights(loss_type, mask_BT, **kw)
    want = losses._POLICY_AGGREGATIONS[loss_type](jnp.asarray(x_BT), jnp.asarray(mask_BT), **kw)
    np.testing.assert_allclose(float(jnp.sum(weights * x_BT)), float(want), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(weights)[mask_BT == 0], 0.0)


@pytest.mark.parametrize("loss_agg", losses.LOSS_AGGS)
def test_fd_aggregation_weights_reproduce_the_aggregation(loss_agg):
    rng = np.random.default_rng(6)
    x_BT = rng.normal(size=(3, 5)).astype(np.float32)
    mask_BT = (rng.random((3, 5)) < 0.6).astype(np.float32)
    weights = losses.fd_aggregation_weights(loss_agg, mask_BT, normaliser=11.0)
    want = losses._FD_AGGREGATIONS[loss_agg](jnp.asarray(x_BT), jnp.asarray(mask_BT), 11.0)
    np.testing.assert_allclose(float(jnp.sum(weights * x_BT)), float(want), rtol=1e-5, atol=1e-7)
