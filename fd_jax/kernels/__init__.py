"""Kernels: the token-level divergence between student and teacher, from hidden states (`token_kl`), and a
per-token loss of it with the gradient formed in the same pass (`token_loss`)."""

from fd_jax.kernels.token_kl import (
    TokenStats,
    fused_divergence,
    fused_token_stats,
    reference_divergence,
    reference_token_stats,
    token_logprobs_and_entropy,
)
from fd_jax.kernels.token_loss import fused_token_loss

__all__ = [
    "TokenStats",
    "fused_divergence",
    "fused_token_loss",
    "fused_token_stats",
    "reference_divergence",
    "reference_token_stats",
    "token_logprobs_and_entropy",
]
