"""Kernels: the token-level divergence between student and teacher, from hidden states (`token_kl`)."""

from fd_jax.kernels.token_kl import (
    TokenStats,
    fused_divergence,
    fused_token_stats,
    reference_divergence,
    reference_token_stats,
    token_logprobs_and_entropy,
)

__all__ = [
    "TokenStats",
    "fused_divergence",
    "fused_token_stats",
    "reference_divergence",
    "reference_token_stats",
    "token_logprobs_and_entropy",
]
