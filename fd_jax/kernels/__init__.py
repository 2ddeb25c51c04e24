"""Kernels: the token-level divergence between student and teacher, from hidden states (`token_kl`), and a
per-token loss of it with the gradient formed in the same pass (`token_loss`). `plan` is their shared
internal planning (settings, supports, engine choice); `reference` holds the plain [N, V]-logit versions
that the tests and benchmarks compare against."""

from fd_jax.kernels.token_kl import (
    TokenStats,
    fused_divergence,
    fused_token_stats,
    token_logprobs_and_entropy,
)
from fd_jax.kernels.token_loss import fused_token_loss

__all__ = [
    "TokenStats",
    "fused_divergence",
    "fused_token_loss",
    "fused_token_stats",
    "token_logprobs_and_entropy",
]
