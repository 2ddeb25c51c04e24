"""Feedback providers: who writes the feedback `f = F(x, y, m)` that the FD teacher reads.

`get_provider(name, **options)` looks the provider up in `PROVIDERS`:
  openai       any OpenAI-compatible chat-completions endpoint (base_url, model, api_key / api_key_env, ...)
  anthropic    Anthropic's Messages API (same options)
  local        an fd_jax model through the sampler (model, tokenizer, ...)
  lean_errors  no LLM: Lean's messages, formatted
  checker      no LLM: the checker's message texts alone (no code excerpt, no carets)
Every provider's `.feedback(list[FeedbackRequest]) -> list[str]` falls back to Lean's errors for a request
the LLM could not answer, and counts it in `.stats`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fd_jax.feedback.base import (
    FEEDBACK_PROMPT,
    CheckerMessagesProvider,
    Completion,
    FeedbackProvider,
    FeedbackRequest,
    FeedbackStats,
    LeanErrorsProvider,
)
from fd_jax.feedback.http_providers import AnthropicProvider, OpenAIProvider
from fd_jax.feedback.lean_text import lean_errors_text


def _local(**options: Any) -> FeedbackProvider:
    from fd_jax.feedback.local import LocalProvider  # imports the sampler (JAX) only when asked for

    return LocalProvider(**options)


PROVIDERS: dict[str, Callable[..., FeedbackProvider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "local": _local,
    "lean_errors": LeanErrorsProvider,
    "checker": CheckerMessagesProvider,
}


def get_provider(name: str, **options: Any) -> FeedbackProvider:
    """The provider registered as `name`, built with `options` (see each class for its options)."""
    if name not in PROVIDERS:
        raise ValueError(f"unknown feedback provider {name!r}; known: {sorted(PROVIDERS)}")
    return PROVIDERS[name](**options)


__all__ = [
    "FEEDBACK_PROMPT",
    "PROVIDERS",
    "AnthropicProvider",
    "CheckerMessagesProvider",
    "Completion",
    "FeedbackProvider",
    "FeedbackRequest",
    "FeedbackStats",
    "LeanErrorsProvider",
    "OpenAIProvider",
    "get_provider",
    "lean_errors_text",
]
