"""Lean's own messages as feedback text: what the `lean_errors` provider returns, and what every other
provider falls back to when its LLM cannot answer."""

from __future__ import annotations

from typing import Any

MAX_ERRORS = 5
CONTEXT_LINES = 1
MAX_CHARS = 2000


def _local_format_errors(
    code: str, messages: list[dict[str, Any]], *, max_errors: int, context_lines: int, max_chars: int
) -> str:
    """Errors first (then warnings if there is no error), each with a few lines of `code` and a caret span."""
    errors = [m for m in messages if m.get("severity") == "error"] or list(messages)
    if not errors:
        return "Lean reported no errors."
    lines = code.splitlines()
    parts = []
    for message in errors[:max_errors]:
        pos, end = message.get("pos") or {}, message.get("endPos") or {}
        line, column = pos.get("line"), pos.get("column", 0)
        head = f"{message.get('severity', 'error')}"
        head += f" at line {line}, column {column}:" if line else ":"
        block = [head, "  " + str(message.get("data", "")).strip().replace("\n", "\n  ")]
        if line and 1 <= line <= len(lines):
            for i in range(max(1, line - context_lines), min(len(lines), line + context_lines) + 1):
                block.append(f"{'>' if i == line else ' '} {i:4d} | {lines[i - 1]}")
                if i == line:
                    stop = end.get("column") if end.get("line") == line else len(lines[i - 1])
                    width = max(1, (stop or column + 1) - column)
                    block.append(f"       | {' ' * column}{'^' * width}")
        parts.append("\n".join(block))
    if len(errors) > max_errors:
        parts.append(f"... and {len(errors) - max_errors} more")
    text = "\n\n".join(parts)
    return text if len(text) <= max_chars else text[: max_chars - 15] + "\n... (truncated)"


def lean_errors_text(
    code: str,
    messages: list[dict[str, Any]],
    *,
    max_errors: int = MAX_ERRORS,
    context_lines: int = CONTEXT_LINES,
    max_chars: int = MAX_CHARS,
) -> str:
    """Lean's messages on `code`, formatted for a reader; never raises.

    Uses `fd_jax.lean.format_errors` (the Lean package's normalising formatter) when it is available and
    a small local formatter otherwise (or if that one fails on odd input).
    """
    options = dict(max_errors=max_errors, context_lines=context_lines, max_chars=max_chars)
    try:
        from fd_jax.lean import format_errors  # written alongside the Lean pool; optional here

        return format_errors(code, messages, **options)
    except Exception:  # an ImportError, or a formatter failure: feedback must still come back
        return _local_format_errors(code, messages, **options)
