"""The plain versions of the kernels' statistics: [N, V] logits in memory. They are the oracles of the
tests and the baseline of benchmarks/token_kl.py, not what training runs (`fd_jax.kernels.token_kl`).
`fd_jax.kernels.token_kl.reference_divergence` stays importable there."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fd_jax.kernels.divergences import categorical_divergence
from fd_jax.kernels.plan import TokenStats, check_inputs, log_tail

Array = jax.Array


def _reference_support(mode: str, logp_NV, logq_NV, s_NV, ids_N, *, alpha, top_k, add_tail) -> Array:
    if mode == "full":
        return categorical_divergence(logp_NV, logq_NV, alpha=alpha)
    if mode == "topk":
        idx_NK = jax.lax.top_k(jax.lax.stop_gradient(s_NV), top_k)[1]
        logp_NK = jnp.take_along_axis(logp_NV, idx_NK, axis=1)
        logq_NK = jnp.take_along_axis(logq_NV, idx_NK, axis=1)
        if add_tail:
            logp_NK = jnp.concatenate([logp_NK, log_tail(logp_NK)], axis=1)
            logq_NK = jnp.concatenate([logq_NK, log_tail(logq_NK)], axis=1)
        else:
            logp_NK, logq_NK = jax.nn.log_softmax(logp_NK, axis=1), jax.nn.log_softmax(logq_NK, axis=1)
        return categorical_divergence(logp_NK, logq_NK, alpha=alpha)
    # sampled_token: value est, gradient sg(est) · ∇ log p_S(y).
    logp_y = jnp.take_along_axis(logp_NV, ids_N[:, None], axis=1)[:, 0]
    est = jax.lax.stop_gradient(logp_y - jnp.take_along_axis(logq_NV, ids_N[:, None], axis=1)[:, 0])
    return est + est * (logp_y - jax.lax.stop_gradient(logp_y))


def reference_stats_from_logits(s_NV: Array, t_NV: Array, mask: Array, sampled_ids: Array, *, alpha=1.0,
                                mode="full", top_k=None, add_tail=False) -> TokenStats:
    """TokenStats from materialised student and teacher logits [N, V]; the teacher side is a constant."""
    logp_NV = jax.nn.log_softmax(s_NV, axis=1)
    logq_NV = jax.nn.log_softmax(jax.lax.stop_gradient(t_NV), axis=1)
    ids_N = jnp.asarray(sampled_ids, jnp.int32)
    div = _reference_support(mode, logp_NV, logq_NV, s_NV, ids_N, alpha=alpha, top_k=top_k, add_tail=add_tail)
    logprob = jnp.take_along_axis(logp_NV, ids_N[:, None], axis=1)[:, 0]
    entropy = -jnp.sum(jnp.exp(logp_NV) * logp_NV, axis=1)
    on = jnp.asarray(mask) > 0
    return TokenStats(*(jnp.where(on, x, 0.0) for x in (div, logprob, entropy)))


def reference_token_stats(h_student, h_teacher, w_unembed, mask, sampled_ids, *, alpha=1.0, mode="full",
                          top_k=None, add_tail=False, w_teacher=None) -> TokenStats:
    """`fused_token_stats` computed plainly with [N, V] logits in f32 (f64 under x64); small shapes only."""
    check_inputs(h_student, h_teacher, w_unembed, mask, sampled_ids, alpha=alpha, mode=mode, top_k=top_k,
           w_teacher=w_teacher)
    acc = jnp.promote_types(h_student.dtype, jnp.float32)
    s_NV = jnp.dot(h_student, w_unembed, preferred_element_type=acc)
    t_NV = jnp.dot(h_teacher, w_unembed if w_teacher is None else w_teacher, preferred_element_type=acc)
    return reference_stats_from_logits(s_NV, t_NV, mask, sampled_ids, alpha=alpha, mode=mode, top_k=top_k,
                                       add_tail=add_tail)


def reference_divergence(h_student: Array, h_teacher: Array, w_unembed: Array, mask: Array, *, alpha: float,
                         mode: str, top_k: int | None = None, add_tail: bool = False,
                         sampled_ids: Array | None = None, w_teacher: Array | None = None) -> Array:
    """per_token[N] divergence with materialised [N, V] logits; the oracle of `fused_divergence`."""
    ids = jnp.zeros(mask.shape, jnp.int32) if sampled_ids is None and mode != "sampled_token" else sampled_ids
    return reference_token_stats(h_student, h_teacher, w_unembed, mask, ids, alpha=alpha, mode=mode,
                                 top_k=top_k, add_tail=add_tail, w_teacher=w_teacher).divergence
