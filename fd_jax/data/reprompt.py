"""The teacher's reprompt: the student prompt with a feedback block and an optional solved-sibling
demonstration, cut to `max_reprompt_len` tokens by truncating the feedback (never the completion, which is
appended after the reprompt by the batch builder).

Where the context goes (`placement`, `PLACEMENTS`):
  user    in the format's `{context}` slot of the question's user turn (every format; the original place);
  system  in the system turn (after the format's own system text), the question turn left as the student's;
  turns   as chat exchanges: a solved sibling becomes one more worked example of this very problem (the
          question, then the sibling's reply), a failed attempt a retry exchange (the question, the attempt
          as the assistant's reply, then the feedback and the question again as the next user turn).
  auto    the format's own `default_placement` (`user` for a format without it): the measured choice per
          format (docs/demo/README.md: arithmetic chat `turns`; Lean chat `user`, not measured yet).
`system` and `turns` keep the last user turn exactly the student's question (or a short retry of it), so the
few-shot pattern the model answers by is not broken; they need a chat format (one with `messages`).

The feedback, the demonstration, the failed attempt and the solved sibling's reply are untrusted text (model
output, or a feedback LLM's critique that may quote it): each has its control strings broken
(`fd_jax.data.control.neutralize`) before it enters the messages, so a completion containing
`<|im_end|>\n<|im_start|>user` cannot forge a turn in the teacher's context once the rendered text is encoded
with special-token parsing. The problem and the templates are trusted and left as they are; a text without
control strings renders exactly as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from fd_jax.data.control import neutralize, tokenizer_controls
from fd_jax.data.prompts import PromptFormat, fill
from fd_jax.data.problems import Problem

FEEDBACK_TEMPLATE = "Feedback on an earlier, incorrect attempt at this problem:\n\n{feedback}\n\n"
SOLUTION_TEMPLATE = "A correct solution to this problem, for reference:\n\n{solution}\n\n"
REPROMPT_TEMPLATE = "{solution}{feedback}Taking this into account, solve the problem below.\n\n"
RETRY_TEMPLATE = "That is not right: {feedback}\n\n"  # turns: before the question in the retry turn
TRUNCATION_MARKER = "\n[... feedback truncated]"
PLACEMENTS = ("auto", "user", "system", "turns")


def resolve_placement(fmt: PromptFormat, placement: str) -> str:
    """`placement`, with `auto` replaced by the format's `default_placement` (`user` when it has none)."""
    return getattr(fmt, "default_placement", "user") if placement == "auto" else placement


@dataclasses.dataclass(frozen=True)
class RepromptTemplates:
    """Config strings: `reprompt` has `{solution}` and `{feedback}`, filled with the two blocks (or "")."""

    reprompt: str = REPROMPT_TEMPLATE
    feedback: str = FEEDBACK_TEMPLATE
    solution: str = SOLUTION_TEMPLATE
    retry: str = RETRY_TEMPLATE  # placement=turns: `{feedback}`, put before the question of the retry turn


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


def render_teacher_prompt(
    fmt: PromptFormat,
    problem: Problem,
    *,
    feedback: str | None,
    solution: str | None,
    templates: RepromptTemplates = RepromptTemplates(),
    placement: str = "user",
    attempt: str | None = None,
    solved_reply: str | None = None,
    controls: Sequence[str] | None = None,
) -> str:
    """The teacher prompt as text, with the context placed by `placement` (see the module docstring).

    solution: the demonstration text (`fmt.demonstration`) for `user` and `system`; solved_reply: the solved
    sibling's completion as the model wrote it, the reply of the extra worked example under `turns` (None:
    the demonstration). attempt: the failed completion the feedback is about (`turns`: the assistant turn
    of the retry exchange; None: the feedback goes before the question, as a retry without the attempt).
    controls: the strings broken in those four untrusted texts (`neutralize`); None: the special and markup
    tokens of the format's tokenizer (`tokenizer_controls(fmt.tokenizer)`; none for a format without one,
    so a completion format's caller passes its tokenizer's).
    Raises ValueError for an unknown placement, or `system` / `turns` with a format without chat turns.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown context placement {placement!r}; known: {list(PLACEMENTS)}")
    if controls is None:
        controls = tokenizer_controls(getattr(fmt, "tokenizer", None))
    feedback, solution, attempt, solved_reply = (
        None if t is None else neutralize(t, controls) for t in (feedback, solution, attempt, solved_reply))
    placement = resolve_placement(fmt, placement)
    if placement == "user" or (feedback is None and solution is None):
        return fmt.render(problem, teacher_context(feedback, solution, templates))
    messages = getattr(fmt, "messages", None)
    if messages is None:
        raise ValueError(f"context placement {placement!r} needs a chat prompt format ({type(fmt).__name__} has "
                         f"no chat turns); use placement 'user'")
    base = messages(problem)
    if placement == "system":
        text = teacher_context(feedback, solution, templates).strip()
        system = f"{base.system}\n\n{text}" if base.system else text
        return dataclasses.replace(base, system=system).render(fmt.tokenizer)
    turns, user = list(base.turns), base.user
    if solution is not None:
        turns.append((base.user, solution if solved_reply is None else solved_reply))
    if feedback is not None:
        if attempt is not None:
            turns.append((base.user, attempt))
        user = messages(problem, fill(templates.retry, feedback=feedback)).user
    return dataclasses.replace(base, turns=tuple(turns), user=user).render(fmt.tokenizer)


def build_reprompt(
    fmt: PromptFormat,
    problem: Problem,
    *,
    feedback: str | None,
    solution: str | None,
    encode: Callable[[str], list[int]],
    templates: RepromptTemplates = RepromptTemplates(),
    max_len: int | None = None,
    placement: str = "user",
    attempt: str | None = None,
    solved_reply: str | None = None,
    controls: Sequence[str] | None = None,
) -> Reprompt | None:
    """The teacher prompt for one rollout, or None when even the bare context does not fit.

    encode: text -> token ids, exactly as the student prompt is encoded (special tokens included).
    max_len: a cap on len(tokens); the feedback is cut to the longest prefix that fits (a binary search over
    characters, so it holds for any tokenizer) and marked; the demonstration is never cut. None when
    nothing fits: the rollout is then not distilled.
    placement, attempt, solved_reply: where the context goes (`render_teacher_prompt`); controls: the
    strings broken in the untrusted texts (`render_teacher_prompt`).
    """

    def attempt_fit(fb: str | None, sol: str | None) -> tuple[list[int], str]:
        text = render_teacher_prompt(fmt, problem, feedback=fb, solution=sol, templates=templates,
                                     placement=placement, attempt=attempt, solved_reply=solved_reply,
                                     controls=controls)
        return encode(text), text

    tokens, text = attempt_fit(feedback, solution)
    if max_len is None or len(tokens) <= max_len:
        return Reprompt(tokens, text, truncated=False)
    if feedback:
        lo, hi, best = 0, len(feedback) - 1, None
        while lo <= hi:  # the longest feedback prefix that still fits
            mid = (lo + hi) // 2
            cand_tokens, cand_text = attempt_fit(feedback[:mid] + TRUNCATION_MARKER, solution)
            if len(cand_tokens) <= max_len:
                best, lo = Reprompt(cand_tokens, cand_text, truncated=True), mid + 1
            else:
                hi = mid - 1
        return best
    return None
