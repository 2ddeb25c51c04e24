"""The teacher's reprompt: the student prompt with a feedback block and an optional solved-sibling
demonstration in the format's `{context}` slot, cut to `max_reprompt_len` tokens by truncating the feedback
(never the completion, which is appended after the reprompt by the batch builder)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from fd_jax.data.prompts import PromptFormat, fill
from fd_jax.data.problems import Problem

FEEDBACK_TEMPLATE = "Feedback on an earlier, incorrect attempt at this problem:\n\n{feedback}\n\n"
SOLUTION_TEMPLATE = "A correct solution to this problem, for reference:\n\n{solution}\n\n"
REPROMPT_TEMPLATE = "{solution}{feedback}Taking this into account, solve the problem below.\n\n"
TRUNCATION_MARKER = "\n[... feedback truncated]"


@dataclasses.dataclass(frozen=True)
class RepromptTemplates:
    """Config strings: `reprompt` has `{solution}` and `{feedback}`, filled with the two blocks (or "")."""

    reprompt: str = REPROMPT_TEMPLATE
    feedback: str = FEEDBACK_TEMPLATE
    solution: str = SOLUTION_TEMPLATE


@dataclasses.dataclass(frozen=True)
class Reprompt:
    """tokens: the teacher prompt ids; text: the same as text; truncated: the feedback was cut to fit."""

    tokens: list[int]
    text: str
    truncated: bool


def teacher_context(feedback: str | None, solution: str | None, templates: RepromptTemplates) -> str:
    """The `{context}` text for the teacher ("" when there is neither feedback nor a solution)."""
    if feedback is None and solution is None:
        return ""
    return fill(
        templates.reprompt,
        feedback="" if feedback is None else fill(templates.feedback, feedback=feedback),
        solution="" if solution is None else fill(templates.solution, solution=solution),
    )


def build_reprompt(
    fmt: PromptFormat,
    problem: Problem,
    *,
    feedback: str | None,
    solution: str | None,
    encode: Callable[[str], list[int]],
    templates: RepromptTemplates = RepromptTemplates(),
    max_len: int | None = None,
) -> Reprompt | None:
    """The teacher prompt for one rollout, or None when even the bare context does not fit.

    encode: text -> token ids, exactly as the student prompt is encoded (special tokens included).
    max_len: a cap on len(tokens); the feedback is cut to the longest prefix that fits (a binary search over
    characters, so it holds for any tokenizer) and marked; the demonstration is never cut. None when
    nothing fits: the rollout is then not distilled.
    """

    def attempt(fb: str | None, sol: str | None) -> tuple[list[int], str]:
        text = fmt.render(problem, teacher_context(fb, sol, templates))
        return encode(text), text

    tokens, text = attempt(feedback, solution)
    if max_len is None or len(tokens) <= max_len:
        return Reprompt(tokens, text, truncated=False)
    if feedback:
        lo, hi, best = 0, len(feedback) - 1, None
        while lo <= hi:  # the longest feedback prefix that still fits
            mid = (lo + hi) // 2
            cand_tokens, cand_text = attempt(feedback[:mid] + TRUNCATION_MARKER, solution)
            if len(cand_tokens) <= max_len:
                best, lo = Reprompt(cand_tokens, cand_text, truncated=True), mid + 1
            else:
                hi = mid - 1
        return best
    return None
