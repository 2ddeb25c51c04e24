"""`format_errors`: the feedback text for Lean's errors, checked against hand-written expectations."""

from __future__ import annotations

from fd_jax.lean import format_errors

CODE = (
    "theorem t (a b : ℝ) (h : a < b) :\n"
    "    a ^ 2 < b ^ 2 := by\n"
    "  nlinarith [sq_nonneg (a - b)]\n"
    "  linarith\n"
)


def _msg(severity, line, column, end_line, end_column, data):
    end = None if end_line is None else {"line": end_line, "column": end_column}
    return {"severity": severity, "pos": {"line": line, "column": column}, "endPos": end, "data": data}


LINARITH = _msg("error", 4, 2, 4, 10, "linarith failed to find a contradiction")
UNSOLVED = _msg("error", 2, 18, 4, 10, "unsolved goals\na b : ℝ\n⊢ a ^ 2 < b ^ 2")
UNUSED = _msg("warning", 1, 21, 1, 22, "unused variable `h`")


def test_single_and_multiline_spans_in_source_order():
    expected = (
        "error: line 2, column 18: unsolved goals\n"
        "a b : ℝ\n"
        "⊢ a ^ 2 < b ^ 2\n"
        "  1 | theorem t (a b : ℝ) (h : a < b) :\n"
        "> 2 |     a ^ 2 < b ^ 2 := by\n"
        "    |                   ^^^^^\n"
        "> 3 |   nlinarith [sq_nonneg (a - b)]\n"
        "> 4 |   linarith\n"
        "    |   ^^^^^^^^\n"
        "\n"
        "error: line 4, column 2: linarith failed to find a contradiction\n"
        "  3 |   nlinarith [sq_nonneg (a - b)]\n"
        "> 4 |   linarith\n"
        "    |   ^^^^^^^^"
    )
    assert format_errors(CODE, [LINARITH, UNUSED, UNSOLVED]) == expected


def test_context_lines_and_point_spans():
    point = _msg("error", 3, 12, None, None, "unknown identifier 'sq_nonneg'")  # old spelling, no endPos
    expected = (
        "error: line 3, column 12: Unknown identifier `sq_nonneg`\n"
        "> 3 |   nlinarith [sq_nonneg (a - b)]\n"
        "    |             ^"
    )
    assert format_errors(CODE, [point], context_lines=0) == expected


def test_messages_without_position_have_no_excerpt():
    no_position = {"severity": "error", "pos": {"line": 0, "column": 0}, "data": "Lean error:\nx"}
    assert format_errors(CODE, [no_position]) == "error: Lean error:\nx"
    beyond = _msg("error", 99, 0, 99, 1, "far away")
    text = format_errors(CODE, [beyond, {"severity": "error"}])
    assert text == "error:\n\nerror: line 99, column 0: far away"


def test_caps():
    many = [_msg("error", 4, 2, 4, 10, f"error number {i}") for i in range(4)]
    text = format_errors(CODE, many, max_errors=2, context_lines=0)
    assert text.count("error number") == 2 and text.endswith("... and 2 more")
    short = format_errors(CODE, many, max_chars=100)
    assert len(short) <= 100 and short.endswith("(truncated)")
    huge = format_errors(CODE, [_msg("error", 4, 2, 4, 10, "x" * 5000)], context_lines=0)
    assert len(huge.splitlines()[0]) < 700 and "(truncated)" in huge


def test_warnings_only_when_there_is_no_error():
    sorry = _msg("warning", 1, 8, 1, 9, "declaration uses 'sorry'")
    assert format_errors(CODE, [sorry], context_lines=0) == (
        "warning: line 1, column 8: declaration uses `sorry`\n"
        "> 1 | theorem t (a b : ℝ) (h : a < b) :\n"
        "    |         ^"
    )
    assert format_errors(CODE, []) == "Lean reported no errors."
    info = {"severity": "info", "data": "Try this: ring_nf"}
    assert format_errors(CODE, [info]) == "Lean reported no errors."
