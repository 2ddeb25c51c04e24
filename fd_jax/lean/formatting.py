"""Lean's messages as text a feedback model (or a human) can act on: the code around each error, marked.

Example (`format_errors(code, messages)`):

    error: line 3, column 2: linarith failed to find a contradiction
       2 |   nlinarith [sq_nonneg (a - b)]
    >  3 |   linarith
         |   ^^^^^^^^
       4 | end
"""

from __future__ import annotations

from typing import Any

from fd_jax.lean.protocol import normalize_message

MAX_ERRORS = 5
CONTEXT_LINES = 1
MAX_CHARS = 2000
MAX_MESSAGE_CHARS = 600  # one message (e.g. a huge "unsolved goals" dump) may not crowd out the others


def _position(message: dict[str, Any], key: str) -> tuple[int, int] | None:
    pos = message.get(key)
    if not isinstance(pos, dict) or not isinstance(pos.get("line"), int) or pos["line"] < 1:
        return None
    column = pos.get("column")
    return pos["line"], column if isinstance(column, int) and column >= 0 else 0


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 16)].rstrip() + " ... (truncated)"


def _snippet(
    lines: list[str], start: tuple[int, int], end: tuple[int, int] | None, context_lines: int
) -> list[str]:
    """Numbered source lines around the span; `>` on the lines in it, `^` under its first and last line."""
    first, column = start
    last, end_column = end if end and end > start else (first, column + 1)
    last = min(last, len(lines))
    numbers = range(max(1, first - context_lines), min(len(lines), last + context_lines) + 1)
    width = len(str(numbers[-1]))
    out = []
    for number in numbers:
        text = lines[number - 1]
        out.append(f"{'>' if first <= number <= last else ' '} {number:>{width}} | {text}")
        if number == first:
            lo, hi = column, (end_column if last == first else len(text))
        elif number == last:
            lo, hi = len(text) - len(text.lstrip()), end_column
        else:
            continue
        out.append(f"  {' ' * width} | {' ' * lo}{'^' * max(1, hi - lo)}")
    return out


def format_errors(
    code: str,
    messages: list[dict[str, Any]],
    *,
    max_errors: int = MAX_ERRORS,
    context_lines: int = CONTEXT_LINES,
    max_chars: int = MAX_CHARS,
    severities: tuple[str, ...] = ("error",),
) -> str:
    """Lean's `messages` about `code` as readable text, for feedback prompts.

    code: the submitted Lean source the messages' positions refer to (1-based lines, 0-based columns).
    messages: REPL-shaped messages (`severity`, `pos`, `endPos`, `data`), e.g. `Verdict.messages`.
    Keeps messages whose severity is in `severities` (if there are none, the warnings, so that a proof
    using sorry still gets its "declaration uses `sorry`"); for each of the first `max_errors` (in source
    order) prints a header line with its position and Lean's message (normalised, each capped at
    MAX_MESSAGE_CHARS), then `context_lines` lines of code before and after its span, `>` marking lines
    in the span and `^` its columns. Messages without a position (line 0) have no code excerpt. The whole
    text is capped at `max_chars`. Never raises on odd messages; returns "Lean reported no errors." when
    there is nothing to show.
    """
    chosen = [m for m in messages if isinstance(m, dict) and m.get("severity") in severities]
    if not chosen:
        chosen = [m for m in messages if isinstance(m, dict) and m.get("severity") == "warning"]
    if not chosen:
        return "Lean reported no errors."
    chosen.sort(key=lambda m: _position(m, "pos") or (0, 0))
    lines = code.splitlines() or [""]
    blocks = []
    for message in chosen[:max_errors]:
        start, end = _position(message, "pos"), _position(message, "endPos")
        text = _clip(normalize_message(str(message.get("data", ""))).strip(), MAX_MESSAGE_CHARS)
        where = f"line {start[0]}, column {start[1]}: " if start else ""
        block = [f"{message.get('severity', 'error')}: {where}{text}".rstrip()]
        if start and start[0] <= len(lines):
            block += _snippet(lines, start, end, context_lines)
        blocks.append("\n".join(block))
    if len(chosen) > max_errors:
        blocks.append(f"... and {len(chosen) - max_errors} more")
    return _clip("\n\n".join(blocks), max_chars)
