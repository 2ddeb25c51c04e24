"""GRPO and Feedback-Distillation losses, from per-token arrays (pure functions, jit-friendly).

* `group_advantages(rewards_PG)`: (r - mean of the group) / (std + eps), std per group, over the batch, or
  not at all, as TRL's GRPOTrainer (std with Bessel's correction; the mean is always the group's).
* `policy_loss(logp_BT, old_logp_BT, advantages_B, mask_BT, ...)`: the clipped surrogate of the GRPO family,
  exactly as TRL defines `grpo` (mean over each sequence's tokens, then over sequences), `bnpo` (mean over
  the batch's active tokens), `dr_grpo` (sum / (B · max_completion_length)) and `dapo` (sum / active tokens
  of the whole generation batch, `num_items`); token or sequence (GSPO) importance ratios; asymmetric
  clipping (eps_low, eps_high); optional dual-clip `delta`; optional k3 KL to a reference, weight `beta`.
* `fd_loss(divergence_BT, logp_BT, old_logp_BT, mask_BT, ...)`: the per-token divergence (from
  `fd_jax.kernels.token_kl.fused_token_stats`) times the stop-gradient importance weight
  min(exp(logp - old_logp), is_clip), aggregated by `loss_agg` (token_mean | seq_mean | constant).
* Per-token pieces for a loss folded into the kernel (`fd_jax.kernels.token_loss`, the train step's one-pass
  path): `clipped_surrogate`, `k3_kl`, `fd_importance_weight`, and `policy_aggregation_weights` /
  `fd_aggregation_weights`, the per-token weights that reproduce each (linear) aggregation.

The `*_and_metrics` variants also return a dict of scalar metrics (clip fractions, importance weights, KL).
Variants are looked up by name in registries; an unknown name raises a ValueError listing the known ones.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fd_jax.config import schema

Array = jax.Array
Metrics = dict[str, Array]


def _lookup(registry: dict, name: str, what: str):
    if name not in registry:
        raise ValueError(f"losses: {what}={name!r} is unknown; use one of {sorted(registry)}")
    return registry[name]


def _safe_div(num: Array, den: Array) -> Array:
    return num / jnp.maximum(den, 1.0)


# ---------------------------------------------------------------------------------------------------------
# Advantages.
# ---------------------------------------------------------------------------------------------------------


def _std(x: Array, axis=None, keepdims=False) -> Array:
    """Sample standard deviation (ddof 1); 0 for a single sample, as TRL does."""
    count = x.size if axis is None else x.shape[axis]
    if count < 2:
        return jnp.zeros_like(jnp.mean(x, axis=axis, keepdims=keepdims))
    return jnp.std(x, axis=axis, keepdims=keepdims, ddof=1)


_REWARD_SCALES: dict[str, Callable[[Array], Array | None]] = {
    "group": lambda r_PG: _std(r_PG, axis=1, keepdims=True),
    "batch": lambda r_PG: _std(r_PG),
    "none": lambda r_PG: None,
}


def group_advantages(rewards_PG: Array, *, scale: str = "group", eps: float = 1e-4) -> Array:
    """[P, G] advantages of G generations for each of P problems: (r - group mean) / (std + eps).

    scale: `group` (std within each group), `batch` (std over all P·G rewards) or `none` (no division;
    Dr. GRPO). ValueError for another name or a rewards array that is not 2-D.
    """
    if rewards_PG.ndim != 2:
        raise ValueError(f"losses: rewards must be [P problems, G generations], got shape {rewards_PG.shape}")
    std = _lookup(_REWARD_SCALES, scale, "scale_rewards")(rewards_PG)
    centred_PG = rewards_PG - jnp.mean(rewards_PG, axis=1, keepdims=True)
    return centred_PG if std is None else centred_PG / (std + eps)


# ---------------------------------------------------------------------------------------------------------
# The GRPO family.
# ---------------------------------------------------------------------------------------------------------


def _log_weights_token(log_ratio_BT: Array, mask_BT: Array) -> Array:
    return log_ratio_BT


def _log_weights_sequence(log_ratio_BT: Array, mask_BT: Array) -> Array:
    """GSPO: the length-normalised sequence log-ratio, one per sequence [B, 1]."""
    return _safe_div(jnp.sum(log_ratio_BT * mask_BT, axis=1), jnp.sum(mask_BT, axis=1))[:, None]


_IS_LEVELS = {"token": _log_weights_token, "sequence": _log_weights_sequence}


def _agg_grpo(loss_BT, mask_BT, *, max_completion_length, num_items):
    return jnp.mean(_safe_div(jnp.sum(loss_BT * mask_BT, axis=1), jnp.sum(mask_BT, axis=1)))


def _agg_bnpo(loss_BT, mask_BT, *, max_completion_length, num_items):
    return _safe_div(jnp.sum(loss_BT * mask_BT), jnp.sum(mask_BT))


def _agg_dr_grpo(loss_BT, mask_BT, *, max_completion_length, num_items):
    length = loss_BT.shape[1] if max_completion_length is None else max_completion_length
    return jnp.sum(loss_BT * mask_BT) / (loss_BT.shape[0] * length)


def _agg_dapo(loss_BT, mask_BT, *, max_completion_length, num_items):
    return _safe_div(jnp.sum(loss_BT * mask_BT), jnp.sum(mask_BT) if num_items is None else num_items)


_POLICY_AGGREGATIONS = {"grpo": _agg_grpo, "bnpo": _agg_bnpo, "dr_grpo": _agg_dr_grpo, "dapo": _agg_dapo}
LOSS_TYPES = tuple(sorted(_POLICY_AGGREGATIONS))
assert LOSS_TYPES == schema.LOSS_TYPES, "fd_jax.config.schema.LOSS_TYPES names these aggregations"


def clipped_surrogate(log_ratio: Array, advantages: Array, *, eps_low: float, eps_high: float,
                      delta: float | None = None) -> Array:
    """Per-token GRPO term -min(ρ A, clip(ρ, 1 - eps_low, 1 + eps_high) A), ρ = exp(log_ratio) capped at
    `delta` (dual clip) in the first product; elementwise, broadcasting."""
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    capped = ratio if delta is None else jnp.minimum(ratio, delta)
    return -jnp.minimum(capped * advantages, clipped * advantages)


def k3_kl(logp: Array, ref_logp: Array) -> Array:
    """Per-token k3 estimate of KL(policy || reference): exp(r) - r - 1 with r = ref_logp - logp."""
    diff = ref_logp - logp
    return jnp.exp(diff) - diff - 1.0


def policy_aggregation_weights(loss_type: str, mask_BT: Array, *, max_completion_length: int | None = None,
                               num_items: Array | float | None = None) -> Array:
    """[B, T] weights ω with Σ ω·loss_BT equal to `loss_type`'s aggregation of per-token losses (every
    aggregation is linear in them); masked tokens get 0."""
    aggregate = _lookup(_POLICY_AGGREGATIONS, loss_type, "loss_type")
    mask_BT = jnp.asarray(mask_BT, jnp.float32)
    return jax.grad(lambda x: aggregate(x, mask_BT, max_completion_length=max_completion_length,
                                        num_items=num_items))(jnp.zeros_like(mask_BT))


def _masked_mean(x_BT: Array, mask_BT: Array) -> Array:
    """Mean over active tokens; a per-sequence [B, 1] array counts once per sequence (as TRL logs it)."""
    if x_BT.shape[1] == 1:
        return jnp.mean(x_BT)
    return _safe_div(jnp.sum(x_BT * mask_BT), jnp.sum(mask_BT))


def policy_loss_and_metrics(logp_BT: Array, old_logp_BT: Array | None, advantages_B: Array, mask_BT: Array, *,
                            loss_type: str, eps_low: float, eps_high: float,
                            importance_sampling_level: str = "token",
                            max_completion_length: int | None = None, beta: float = 0.0,
                            ref_logp_BT: Array | None = None, delta: float | None = None,
                            num_items: Array | float | None = None) -> tuple[Array, Metrics]:
    """`policy_loss` and its metrics: clip_ratio/{low,high,region}_mean, ratio_mean, ratio_max, kl."""
    mask_BT = jnp.asarray(mask_BT, jnp.float32)
    if old_logp_BT is None:  # one update per batch: the ratio is 1 but still carries the gradient
        old_logp_BT = jax.lax.stop_gradient(logp_BT)
    log_w = _lookup(_IS_LEVELS, importance_sampling_level, "importance_sampling_level")(logp_BT - old_logp_BT,
                                                                                       mask_BT)
    aggregate = _lookup(_POLICY_AGGREGATIONS, loss_type, "loss_type")
    ratio = jnp.exp(log_w)
    adv_B1 = advantages_B[:, None]
    loss_BT = jnp.broadcast_to(clipped_surrogate(log_w, adv_B1, eps_low=eps_low, eps_high=eps_high, delta=delta),
                               logp_BT.shape)
    metrics: Metrics = {}
    if beta != 0.0:
        if ref_logp_BT is None:
            raise ValueError(f"losses: beta={beta} needs ref_logp_BT (the reference policy's log-probs)")
        kl_BT = k3_kl(logp_BT, ref_logp_BT)
        loss_BT = loss_BT + beta * kl_BT
        metrics["kl"] = _masked_mean(kl_BT, mask_BT)
    loss = aggregate(loss_BT, mask_BT, max_completion_length=max_completion_length, num_items=num_items)
    low = ((ratio < 1.0 - eps_low) & (adv_B1 < 0)).astype(jnp.float32)
    high = ((ratio > 1.0 + eps_high) & (adv_B1 > 0)).astype(jnp.float32)
    metrics.update({
        "clip_ratio/low_mean": _masked_mean(low, mask_BT),
        "clip_ratio/high_mean": _masked_mean(high, mask_BT),
        "clip_ratio/region_mean": _masked_mean(jnp.maximum(low, high), mask_BT),
        "ratio_mean": _masked_mean(ratio, mask_BT),
        "ratio_max": jnp.max(jnp.where(mask_BT > 0, ratio, 0.0)),
    })
    return loss, jax.lax.stop_gradient(metrics)


def policy_loss(logp_BT: Array, old_logp_BT: Array | None, advantages_B: Array, mask_BT: Array, *,
                loss_type: str, eps_low: float, eps_high: float, importance_sampling_level: str = "token",
                max_completion_length: int | None = None, **extra) -> Array:
    """Scalar GRPO-family loss (to minimise).

    logp_BT: log π_θ of the completion tokens [B, T]; old_logp_BT: log π_old (None: the batch is used
    once, ratio 1); advantages_B: [B]; mask_BT: 1 on completion tokens. loss_type: grpo | bnpo | dr_grpo |
    dapo; importance_sampling_level: token | sequence (GSPO); max_completion_length: dr_grpo's constant
    (default T). Extra keywords: beta, ref_logp_BT (k3 KL), delta (dual clip), num_items (dapo's global
    token count). ValueError for an unknown loss_type or level, or beta != 0 without ref_logp_BT.
    """
    return policy_loss_and_metrics(logp_BT, old_logp_BT, advantages_B, mask_BT, loss_type=loss_type,
                                   eps_low=eps_low, eps_high=eps_high,
                                   importance_sampling_level=importance_sampling_level,
                                   max_completion_length=max_completion_length, **extra)[0]


# ---------------------------------------------------------------------------------------------------------
# Feedback distillation.
# ---------------------------------------------------------------------------------------------------------


def _fd_token_mean(x_BT, mask_BT, normaliser):
    return _safe_div(jnp.sum(x_BT * mask_BT), jnp.sum(mask_BT))


def _fd_seq_mean(x_BT, mask_BT, normaliser):
    """Mean over the sequences with at least one active token of each one's token mean."""
    counts_B = jnp.sum(mask_BT, axis=1)
    per_seq_B = _safe_div(jnp.sum(x_BT * mask_BT, axis=1), counts_B)
    return _safe_div(jnp.sum(per_seq_B), jnp.sum(counts_B > 0))


def _fd_constant(x_BT, mask_BT, normaliser):
    """Sum over active tokens / a fixed normaliser (default B·T), so that the scale does not depend on how
    many rollouts were distilled."""
    den = x_BT.size if normaliser is None else normaliser
    return jnp.sum(x_BT * mask_BT) / den


_FD_AGGREGATIONS = {"token_mean": _fd_token_mean, "seq_mean": _fd_seq_mean, "constant": _fd_constant}
LOSS_AGGS = tuple(sorted(_FD_AGGREGATIONS))
assert LOSS_AGGS == schema.LOSS_AGGS, "fd_jax.config.schema.LOSS_AGGS names these aggregations"


def fd_loss_and_metrics(divergence_BT: Array, logp_BT: Array | None, old_logp_BT: Array | None,
                        mask_BT: Array, *, is_clip: float | None = 2.0, loss_agg: str = "token_mean",
                        normaliser: float | None = None) -> tuple[Array, Metrics]:
    """Scalar FD loss and metrics fd/kl_mean, fd/kl_max, fd/is_weight_mean, fd/is_weight_max,
    fd/is_clip_frac, fd/tokens.

    divergence_BT: per-token D_alpha(student || teacher) (nats), differentiable; logp_BT / old_logp_BT:
    log-probs of the realised tokens under the current and the behaviour policy (either None: weight 1);
    mask_BT: 1 on the distilled completion tokens. The importance weight min(exp(logp - old_logp), is_clip)
    is a constant (stop-gradient); is_clip None leaves it unclipped. loss_agg: token_mean | seq_mean |
    constant (with `normaliser`, default B·T). ValueError for another loss_agg.
    """
    aggregate = _lookup(_FD_AGGREGATIONS, loss_agg, "loss_agg")
    mask_BT = jnp.asarray(mask_BT, jnp.float32)
    if logp_BT is None or old_logp_BT is None:
        raw_BT = jnp.ones_like(divergence_BT)
    else:
        raw_BT = jnp.exp(jax.lax.stop_gradient(logp_BT - old_logp_BT))
    weight_BT = _cap(raw_BT, is_clip)
    loss = aggregate(divergence_BT * weight_BT, mask_BT, normaliser)
    active = mask_BT > 0
    metrics = {
        "fd/kl_mean": _safe_div(jnp.sum(divergence_BT * mask_BT), jnp.sum(mask_BT)),
        "fd/kl_max": jnp.max(jnp.where(active, divergence_BT, -jnp.inf)),
        "fd/is_weight_mean": _safe_div(jnp.sum(weight_BT * mask_BT), jnp.sum(mask_BT)),
        "fd/is_weight_max": jnp.max(jnp.where(active, weight_BT, 0.0)),
        "fd/is_clip_frac": _safe_div(jnp.sum((raw_BT > weight_BT) * mask_BT), jnp.sum(mask_BT)),
        "fd/tokens": jnp.sum(mask_BT),
    }
    return loss, jax.lax.stop_gradient(metrics)


def _cap(raw: Array, is_clip: float | None) -> Array:
    return raw if is_clip is None else jnp.minimum(raw, is_clip)


def fd_importance_weight(logp: Array, old_logp: Array, *, is_clip: float | None) -> Array:
    """The FD off-policy weight min(exp(logp - old_logp), is_clip), a constant (stop-gradient); unclipped
    when is_clip is None. Elementwise."""
    return _cap(jnp.exp(jax.lax.stop_gradient(logp - old_logp)), is_clip)


def fd_aggregation_weights(loss_agg: str, mask_BT: Array, *, normaliser: float | None = None) -> Array:
    """[B, T] weights ω with Σ ω·x_BT equal to `loss_agg`'s aggregation of per-token terms x_BT."""
    aggregate = _lookup(_FD_AGGREGATIONS, loss_agg, "loss_agg")
    mask_BT = jnp.asarray(mask_BT, jnp.float32)
    return jax.grad(lambda x: aggregate(x, mask_BT, normaliser))(jnp.zeros_like(mask_BT))


def fd_loss(divergence_BT: Array, logp_BT: Array | None, old_logp_BT: Array | None, mask_BT: Array, *,
            is_clip: float | None = 2.0, loss_agg: str = "token_mean",
            normaliser: float | None = None) -> Array:
    """The scalar FD loss of `fd_loss_and_metrics`."""
    return fd_loss_and_metrics(divergence_BT, logp_BT, old_logp_BT, mask_BT, is_clip=is_clip,
                               loss_agg=loss_agg, normaliser=normaliser)[0]


# ---------------------------------------------------------------------------------------------------------
# The mixture used by the train step.
# ---------------------------------------------------------------------------------------------------------


def normaliser(kind: str, mask_BT: Array, *, max_completion_length: int, constant: float | None = None) -> Array:
    """The denominator of a policy loss type or an FD aggregation over `mask_BT`: active tokens (dapo, bnpo,
    token_mean), rows (grpo, which averages per-row means), rows x max length (dr_grpo), rows with a token
    (seq_mean) or the constant (default B·T). Being counts, they add up over micro-batches: the train step
    weights each micro-batch's loss by its share, which makes gradient accumulation exact."""
    if kind in ("dapo", "bnpo", "token_mean"):
        return jnp.sum(mask_BT)
    if kind == "grpo":
        return jnp.asarray(mask_BT.shape[0], jnp.float32)
    if kind == "dr_grpo":
        return jnp.asarray(mask_BT.shape[0] * max_completion_length, jnp.float32)
    if kind == "seq_mean":
        return jnp.sum(jnp.sum(mask_BT, axis=1) > 0).astype(jnp.float32)
    if kind == "constant":
        return jnp.asarray(mask_BT.size if constant is None else constant, jnp.float32)
    raise ValueError(f"unknown loss aggregation {kind!r}")
