"""Lean's own messages as feedback text: what the `lean_errors` provider returns, and what every other
provider falls back to when its LLM cannot answer. One formatter for the package: `fd_jax.lean.format_errors`."""

from __future__ import annotations

from typing import Any

from fd_jax.lean.formatting import CONTEXT_LINES, MAX_CHARS, MAX_ERRORS, format_errors


def lean_errors_text(
    code: str,
    messages: list[dict[str, Any]],
    *,
    max_errors: int = MAX_ERRORS,
    context_lines: int = CONTEXT_LINES,
    max_chars: int = MAX_CHARS,
) -> str:
    """Lean's messages on `code`, formatted for a reader by `fd_jax.lean.format_errors`; never raises."""
    return format_errors(code, messages, max_errors=max_errors, context_lines=context_lines, max_chars=max_chars)
