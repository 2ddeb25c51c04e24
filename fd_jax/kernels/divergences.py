"""The divergence D_alpha(student || teacher) between two categorical distributions, by its weight alpha.

* alpha = 0: forward KL(teacher || student);
* alpha = 1: reverse KL(student || teacher);
* 0 < alpha < 1: generalized Jensen-Shannon with the mixture M = (1 - alpha) p + alpha q,
  D = (1 - alpha) KL(p || M) + alpha KL(q || M)  (p student, q teacher).

Each divergence is written three ways, one per consumer:

* `categorical`: from log-probabilities over a small support (the naive reference, the top-k support);
* `value` / `pass2_terms`: from sums that a pass over vocabulary tiles accumulates (the fused kernel);
* `logit_grad`: d D / d (student logit) per vocabulary entry, with the teacher held fixed. With p the
  student's softmax: reverse KL gives p (log p - log q - D); forward KL gives p - q; the JSD gives
  (1 - alpha) p (log p - log M - KL(p || M)) (differentiate D in p, then through the softmax).

Callers look a divergence up with `get_divergence(alpha)`.
"""

from __future__ import annotations

import math
from typing import Mapping, Protocol

import jax
import jax.numpy as jnp

Array = jax.Array


def divergence_name(alpha: float) -> str:
    """`forward_kl` (alpha 0), `reverse_kl` (alpha 1) or `jsd` (between); ValueError outside [0, 1]."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise ValueError(f"divergence alpha={alpha!r} must lie in [0, 1] "
                         "(0 forward KL, 1 reverse KL, in between the generalized JSD)")
    return {0.0: "forward_kl", 1.0: "reverse_kl"}.get(alpha, "jsd")


def mixture_logprob(logp: Array, logq: Array, alpha: float) -> Array:
    """log M for M = (1 - alpha) p + alpha q, elementwise; 0 < alpha < 1."""
    return jnp.logaddexp(math.log1p(-alpha) + logp, math.log(alpha) + logq)


class Divergence(Protocol):
    alpha: float
    online_sum: str | None  # which cross sum of the first tile pass gives the value ("rev", "fwd")
    needs_pass2: bool  # True when the value needs both log-normalisers first (a second tile pass)

    def categorical(self, logp_XK: Array, logq_XK: Array) -> Array: ...

    def value(self, stats: Mapping[str, Array]) -> Array: ...

    def pass2_terms(self, logp: Array, logq: Array) -> tuple[Array, Array]: ...

    def logit_grad(self, logp: Array, logq: Array, p: Array, tok: Mapping[str, Array]) -> Array: ...


class ReverseKL:
    """KL(p || q) = E_p[s - t] - lse_s + lse_t, with s, t the logits: one pass suffices."""

    online_sum = "rev"
    needs_pass2 = False

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def categorical(self, logp_XK, logq_XK):
        return jnp.sum(jnp.exp(logp_XK) * (logp_XK - logq_XK), axis=-1)

    def value(self, stats):
        return stats["rev"] - stats["lse_s"] + stats["lse_t"]

    def logit_grad(self, logp, logq, p, tok):
        return p * (logp - logq - tok["div"][:, None])


class ForwardKL:
    """KL(q || p) = E_q[t - s] - lse_t + lse_s: one pass suffices."""

    online_sum = "fwd"
    needs_pass2 = False

    def __init__(self, alpha: float = 0.0):
        self.alpha = alpha

    def categorical(self, logp_XK, logq_XK):
        return jnp.sum(jnp.exp(logq_XK) * (logq_XK - logp_XK), axis=-1)

    def value(self, stats):
        return stats["fwd"] - stats["lse_t"] + stats["lse_s"]

    def logit_grad(self, logp, logq, p, tok):
        return p - jnp.exp(logq)


class GeneralizedJSD:
    """(1 - a) KL(p || M) + a KL(q || M): log M needs both normalisers, hence a second tile pass whose
    sums are KL(p || M) (kept for the gradient as `kl_pm`) and KL(q || M)."""

    online_sum = None
    needs_pass2 = True

    def __init__(self, alpha: float):
        self.alpha = alpha

    def categorical(self, logp_XK, logq_XK):
        log_m = mixture_logprob(logp_XK, logq_XK, self.alpha)
        kl_pm = jnp.sum(jnp.exp(logp_XK) * (logp_XK - log_m), axis=-1)
        kl_qm = jnp.sum(jnp.exp(logq_XK) * (logq_XK - log_m), axis=-1)
        return (1.0 - self.alpha) * kl_pm + self.alpha * kl_qm

    def pass2_terms(self, logp, logq):
        log_m = mixture_logprob(logp, logq, self.alpha)
        return jnp.exp(logp) * (logp - log_m), jnp.exp(logq) * (logq - log_m)

    def value(self, stats):
        return (1.0 - self.alpha) * stats["kl_pm"] + self.alpha * stats["kl_qm"]

    def logit_grad(self, logp, logq, p, tok):
        log_m = mixture_logprob(logp, logq, self.alpha)
        return (1.0 - self.alpha) * p * (logp - log_m - tok["kl_pm"][:, None])


_DIVERGENCES = {"forward_kl": ForwardKL, "reverse_kl": ReverseKL, "jsd": GeneralizedJSD}


def get_divergence(alpha: float) -> Divergence:
    """The divergence object for `alpha` (see the module docstring); ValueError outside [0, 1]."""
    return _DIVERGENCES[divergence_name(alpha)](float(alpha))


def categorical_divergence(logp_XK: Array, logq_XK: Array, *, alpha: float) -> Array:
    """D_alpha(p || q) over the last axis of normalised log-probabilities [..., K] -> [...]."""
    return get_divergence(alpha).categorical(logp_XK, logq_XK)
