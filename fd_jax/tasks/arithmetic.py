"""Exact integer arithmetic: a verifiable test bed that runs the whole loop on any CPU without Lean.

Problems read "Compute 4831 * 27 - 903." (usual precedence: `*` before `+`/`-`); the model answers with an
integer. The checker knows the answer by re-evaluating the statement, so it needs no answer key, and it
speaks the verifier contract of `fd_jax.verification` (`verify_batch`, `submit`, `close`, context
manager) with Lean-REPL-shaped messages that say precisely what is wrong. This is a test bed for the
training machinery; it is not theorem proving.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from ml_collections import config_dict

from fd_jax.data.extraction import strip_think
from fd_jax.data.problems import Problem
from fd_jax.data.prompts import ChatMessages, fill
from fd_jax.tasks.base import Task, fail, format_options
from fd_jax.verification import INVALID, REJECTED, VALID, ProofTask, Verdict

_STATEMENT = re.compile(r"^Compute (.+)\.$")
_TOKEN = re.compile(r"\s*(\d+|[-+*])")
_INTEGER = re.compile(r"0|-?[1-9][0-9]*")  # canonical: no "-0", no leading zeros


@dataclasses.dataclass(frozen=True)
class ArithmeticLevel:
    """Difficulty: operands have min_digits..max_digits digits; num_ops operators drawn from `ops`."""

    min_digits: int = 1
    max_digits: int = 1
    num_ops: int = 1
    ops: str = "+"


LEVELS = {
    # "Compute 3 + 4.": a tiny random model learns it in a few hundred steps (the smoke configuration).
    "easy": ArithmeticLevel(1, 1, 1, "+"),
    "medium": ArithmeticLevel(1, 2, 2, "+-"),
    "hard": ArithmeticLevel(2, 4, 2, "+-*"),  # "Compute 4831 * 27 - 903."
}


def make_problems(n: int, *, seed: int = 0, level: str | ArithmeticLevel = "easy") -> list[Problem]:
    """n problems drawn from `level` (a LEVELS name or an ArithmeticLevel); the same (n, seed, level) gives
    the same problems. ids are "arith-{seed}-{i}"."""
    if isinstance(level, str) and level not in LEVELS:
        raise ValueError(f"unknown arithmetic level {level!r}; known: {sorted(LEVELS)} or an ArithmeticLevel")
    lvl = LEVELS[level] if isinstance(level, str) else level
    valid_ops = bool(lvl.ops) and set(lvl.ops) <= set("+-*")
    if not (1 <= lvl.min_digits <= lvl.max_digits and lvl.num_ops >= 1 and valid_ops):
        raise ValueError(
            f"invalid ArithmeticLevel {lvl}: need 1 <= min_digits <= max_digits, num_ops >= 1, ops in '+-*'"
        )
    rng = np.random.default_rng(seed)

    def operand() -> int:
        digits = int(rng.integers(lvl.min_digits, lvl.max_digits + 1))
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return int(rng.integers(low, 10**digits))

    problems = []
    for i in range(n):
        parts = [str(operand())]
        for _ in range(lvl.num_ops):
            parts += [lvl.ops[int(rng.integers(len(lvl.ops)))], str(operand())]
        problems.append(Problem(id=f"arith-{seed}-{i}", statement=f"Compute {' '.join(parts)}."))
    return problems


def evaluate(expression: str) -> int:
    """Value of a `+ - *` integer expression with the usual precedence. Raises ValueError when malformed."""
    tokens, pos = [], 0
    while pos < len(expression.rstrip()):
        match = _TOKEN.match(expression, pos)
        if match is None:
            raise ValueError(f"unexpected character {expression[pos]!r} at {pos} in {expression!r}")
        tokens.append(match.group(1))
        pos = match.end()
    if len(tokens) % 2 == 0 or not all(t.isdigit() == (i % 2 == 0) for i, t in enumerate(tokens)):
        raise ValueError(f"expected number (op number)*, got {expression!r}")
    total, term, sign = 0, int(tokens[0]), 1
    for op, number in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            term *= int(number)
        else:
            total += sign * term
            sign, term = (1 if op == "+" else -1), int(number)
    return total + sign * term


def answer_of(statement: str) -> int:
    """The exact answer to "Compute EXPR." Raises ValueError for any other statement."""
    match = _STATEMENT.match(statement.strip())
    if match is None:
        raise ValueError(f"not an arithmetic problem (expected 'Compute EXPR.'): {statement!r}")
    return evaluate(match.group(1))


def _message(data: str, column: int, end_column: int) -> dict[str, Any]:
    return {
        "severity": "error",
        "pos": {"line": 1, "column": column},
        "endPos": {"line": 1, "column": end_column},
        "data": data,
    }


def _describe_wrong(answer: str, expected: int, offset: int) -> dict[str, Any]:
    """One message for a well-formed wrong answer: sign, digit count, and which digit positions differ."""
    got, want = answer.lstrip("-"), str(abs(expected))
    notes = []
    if answer.startswith("-") != (expected < 0):
        notes.append("the sign is wrong")
    if len(got) != len(want):
        notes.append(f"the answer has {len(got)} digit(s) but the result has {len(want)}")
    # Digits are compared right-aligned (units with units), the way column arithmetic carries.
    wrong = [k for k in range(1, len(got) + 1) if k > len(want) or got[-k] != want[-k]]
    if wrong:
        names = ", ".join(str(k) for k in wrong)
        notes.append(f"wrong digit(s) at position(s) {names} counted from the right (1 = units)")
    notes.append("the answer is too large" if int(answer) > expected else "the answer is too small")
    columns = [len(answer) - k for k in wrong] or [0, len(answer) - 1]
    data = f"wrong answer {answer}: " + "; ".join(notes)
    return _message(data, offset + min(columns), offset + max(columns) + 1)


def _describe_malformed(answer: str, offset: int) -> dict[str, Any]:
    """One message for an answer that is not a canonical integer, pointing at the first bad character."""
    sign = 1 if answer.startswith("-") else 0
    rest = answer[sign:]
    if rest.isdigit() and rest.startswith("0"):
        bad, what = sign, f"a leading zero at column {offset + sign}"
    else:
        bad = sign + len(rest) - len(rest.lstrip("0123456789"))  # the first character after the digits
        what = f"{answer[bad]!r} at column {offset + bad}" if bad < len(answer) else "the end of the answer"
    data = f"malformed answer {answer[:40]!r}: expected an integer (digits, maybe a leading '-'); found {what}"
    return _message(data, offset + bad, offset + bad + 1)


def check_answer(statement: str, code: str) -> Verdict:
    """Verdict for one answer: valid iff `code` (stripped) is exactly the integer value of the statement.

    Messages (REPL shape, columns into `code`'s single line) say: missing answer, malformed answer (and the
    first offending character), or for a wrong integer the sign, digit count and wrong digit positions.
    A statement that is not "Compute EXPR." gives a `rejected` verdict naming it.
    """
    start = time.perf_counter()
    try:
        expected = answer_of(statement)
    except ValueError as e:
        return Verdict(REJECTED, [], time.perf_counter() - start, reason=str(e))
    answer = code.strip()
    offset = len(code) - len(code.lstrip())
    if not answer:
        messages = [_message("missing answer: write the result as an integer after 'Answer:'", 0, 0)]
    elif not _INTEGER.fullmatch(answer):
        messages = [_describe_malformed(answer, offset)]
    elif int(answer) == expected:
        messages = []
    else:
        messages = [_describe_wrong(answer, expected, offset)]
    return Verdict(INVALID if messages else VALID, messages, time.perf_counter() - start)


class ArithmeticVerifier:
    """The arithmetic checker behind the `LeanVerifier` interface.

    delay_s: seconds added per task, to stand in for a slow verifier when testing overlap (default 0).
    """

    def __init__(self, *, workers: int = 1, delay_s: float = 0.0):
        self._delay_s = delay_s
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="arith")

    def verify(self, task: ProofTask) -> Verdict:
        if self._delay_s:
            time.sleep(self._delay_s)
        return check_answer(task.statement, task.code)

    def verify_batch(self, tasks: list[ProofTask]) -> list[Verdict]:
        return [self.verify(task) for task in tasks]

    def submit(self, tasks: list[ProofTask]) -> concurrent.futures.Future[list[Verdict]]:
        """Check `tasks` in the background; the future holds their verdicts in order."""
        return self._executor.submit(self.verify_batch, list(tasks))

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> ArithmeticVerifier:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


ARITHMETIC_TEMPLATE = "{context}{statement}\nAnswer: "
ARITHMETIC_CHAT_TEMPLATE = "{context}{statement}\nReply with 'Answer: ' followed by the integer."
EXAMPLES_SEED = 1  # the stream worked examples come from: easy gives 4 + 5 = 9 and 7 + 9 = 16 (one carry, one not)


def worked_examples(
    k: int, *, level: str | ArithmeticLevel = "easy", seed: int = EXAMPLES_SEED
) -> list[tuple[str, int]]:
    """The first k distinct problems of the `seed` stream of `level`, solved: [(statement, answer)].

    Raises ValueError when the level has fewer than k distinct problems."""
    if k < 0:
        raise ValueError(f"worked_examples: k must be >= 0, got {k}")
    examples: dict[str, int] = {}
    for problem in make_problems(100 * k, seed=seed, level=level):
        if len(examples) == k:
            break
        examples.setdefault(problem.statement, answer_of(problem.statement))
    if len(examples) < k:
        raise ValueError(f"worked_examples: level {level!r} gave only {len(examples)} distinct problems, not {k}")
    return list(examples.items())


@dataclasses.dataclass
class ArithmeticFormat:
    """Prompt format of the test bed: completion style by default, a chat turn when `tokenizer` is given.

    examples: worked examples (statement, answer) shown before the question, as earlier chat exchanges or
    as earlier "question, answer" blocks: a small model copies their answer format (SmolLM2-135M-Instruct
    answers "Compute 3 + 7." with prose without them). An example whose statement is the problem's own is
    left out of that problem's prompt, so no prompt holds its answer. system: a system turn (chat only).
    """

    template: str | None = None  # None: ARITHMETIC_TEMPLATE, or ARITHMETIC_CHAT_TEMPLATE with a tokenizer
    tokenizer: Any = None
    system: str | None = None
    examples: Sequence[tuple[str, int]] = ()
    tools: tuple[dict[str, Any], ...] = ()  # tool schemas rendered by the template (a native tool format)
    tool_format: Any = None  # the episode's `fd_jax.tasks.tool_formats` format (None: json_tag / no tools)

    def __post_init__(self) -> None:
        if self.system and self.tokenizer is None:
            raise ValueError("ArithmeticFormat: a system turn needs the chat format (give the tokenizer)")
        self.examples = tuple((str(statement), int(answer)) for statement, answer in self.examples)

    @property
    def add_special_tokens(self) -> bool:
        return self.tokenizer is None

    @property
    def default_placement(self) -> str:
        """Where `auto` puts the teacher's context: chat `turns`, measured (docs/demo/README.md) to keep the
        few-shot answer pattern that the user-turn placement breaks; completion style `user`, its only one."""
        return "turns" if self.tokenizer is not None else "user"

    def _ask(self, statement: str, context: str = "") -> str:
        chat = self.tokenizer is not None
        template = self.template or (ARITHMETIC_CHAT_TEMPLATE if chat else ARITHMETIC_TEMPLATE)
        return fill(template, context=context, statement=statement, header="", informal="")

    def _shown(self, problem: Problem) -> list[tuple[str, int]]:
        return [(s, a) for s, a in self.examples if s != problem.statement]

    def messages(self, problem: Problem, context: str = "") -> ChatMessages:
        """The chat turns (chat style only; raises ValueError for the completion style)."""
        if self.tokenizer is None:
            raise ValueError("ArithmeticFormat: chat messages need the chat format (give the tokenizer)")
        turns = tuple((self._ask(s), f"Answer: {a}") for s, a in self._shown(problem))
        return ChatMessages(self.system, turns, self._ask(problem.statement, context), tuple(self.tools))

    def render(self, problem: Problem, context: str = "") -> str:
        if self.tokenizer is not None:
            return self.messages(problem, context).render(self.tokenizer)
        # Completion style: the template ends with the answer cue, so an example's reply is the bare integer.
        shown = self._shown(problem)
        return "".join(f"{self._ask(s)}{a}\n\n" for s, a in shown) + self._ask(problem.statement, context)

    def extract(self, problem: Problem, completion: str) -> ProofTask:
        """The answer: the first line after the last 'Answer:' (or of the whole text when there is none)."""
        text = strip_think(completion)
        if "Answer:" in text:
            text = text.rsplit("Answer:", 1)[1]
        lines = text.strip().splitlines()
        answer = lines[0].strip() if lines else ""
        return ProofTask(statement=problem.statement, code=answer, header=None, id=problem.id)

    def demonstration(self, task: ProofTask) -> str:
        return f"{task.statement}\nAnswer: {task.code}"

    def reference_completion(self, problem: Problem) -> str:
        """A correct completion as the model should write it (chat: "Answer: N"; completion style: "N",
        the template ending with the cue), for the pre-flight check and supervised targets."""
        answer = answer_of(problem.statement)
        return f"Answer: {answer}" if self.tokenizer is not None else str(answer)


def _share_of(statement: str) -> float:
    """A fixed number in [0, 1) per question (not Python's salted hash: the same in every process)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(statement.encode()).digest()[:8], "big") / 2.0**64


class ArithmeticTask(Task):
    """The test bed as a task: generated problems of `data.level`, the formats above, the exact checker."""

    name = "arithmetic"
    prompt_formats = ("arithmetic", "arithmetic_chat")
    supervised = True
    default_num_problems = 32  # problems generated when no count is given
    default_max_new_tokens = 16  # an answer is a number and a stop token

    def check(self, cfg: config_dict.ConfigDict) -> None:
        super().check(cfg)
        if cfg.data.num_problems < 1:
            raise fail("data.num_problems", cfg.data.num_problems,
                       "data.task=arithmetic generates this many problems: >= 1")

    def problems(self, cfg: config_dict.ConfigDict, *, held_out: bool = False) -> list[Problem]:
        d = cfg.data
        held = make_problems(cfg.eval.num_problems, seed=d.eval_problem_seed, level=d.level)
        if held_out:
            return held
        if not d.get("exclude_eval_problems", False):
            return make_problems(d.num_problems, seed=d.problem_seed, level=d.level)
        # The streams are independent draws: at level easy (100 distinct questions) most held-out questions
        # also occur in training. The training stream is read further until num_problems others are found.
        unseen = {p.statement for p in held}
        for extra in (2, 10):
            kept = [p for p in make_problems(extra * d.num_problems, seed=d.problem_seed, level=d.level)
                    if p.statement not in unseen]
            if len(kept) >= d.num_problems:
                return kept[: d.num_problems]
        raise fail("data.exclude_eval_problems", True, f"level {d.level} has too few questions outside the "
                   f"{len(unseen)} held-out ones for data.num_problems = {d.num_problems}")

    def prompt_format(self, cfg: config_dict.ConfigDict, tokenizer: Any) -> ArithmeticFormat:
        # The completion and the chat style are one format: it becomes a chat turn when given the tokenizer.
        examples = worked_examples(cfg.data.num_shots, level=cfg.data.level)
        return ArithmeticFormat(examples=examples, **format_options(cfg, tokenizer))

    def verifier(self, cfg: config_dict.ConfigDict) -> ArithmeticVerifier:
        return ArithmeticVerifier()

    def source(self, cfg: config_dict.ConfigDict) -> str:
        return f"arithmetic:{cfg.data.level}"

    def sft_pair(self, cfg: config_dict.ConfigDict, fmt: ArithmeticFormat, problem: Problem, *, rng: Any,
                 feedback_fn: Any, templates: Any, placement: str) -> tuple[str, str]:
        """The correct answer as the target, after: the question with feedback on a wrong answer (the
        correct one +- 1..10; probability `sft.feedback_fraction`), the question with a solved copy of it as a
        hint (`sft.hint_fraction`), or the bare question (the rest). A share `sft.context_only_fraction` of
        the questions (fixed by the question's text) is never shown bare: on those the model can only be
        right by reading the context, which is what makes a teacher that knows more than the student."""
        from fd_jax.data.reprompt import render_teacher_prompt
        from fd_jax.feedback import FeedbackRequest

        answer, target = answer_of(problem.statement), fmt.reference_completion(problem)
        u = rng.random()
        with_context = cfg.sft.feedback_fraction + cfg.sft.hint_fraction
        if with_context > 0 and _share_of(problem.statement) < cfg.sft.context_only_fraction:
            u *= with_context  # a question never shown bare: only its context tells the model its answer
        if u < cfg.sft.feedback_fraction:
            wrong = str(answer + int(rng.choice([-1, 1])) * int(rng.integers(1, 11)))
            request = FeedbackRequest(problem.statement, wrong, check_answer(problem.statement, wrong).messages)
            attempt = f"Answer: {wrong}" if fmt.tokenizer is not None else wrong
            prompt = render_teacher_prompt(fmt, problem, feedback=feedback_fn(request), solution=None,
                                           templates=templates, placement=placement, attempt=attempt)
        elif u < cfg.sft.feedback_fraction + cfg.sft.hint_fraction:
            solved = ProofTask(statement=problem.statement, code=str(answer), header=None, id=problem.id)
            prompt = render_teacher_prompt(fmt, problem, feedback=None, solution=fmt.demonstration(solved),
                                           templates=templates, placement=placement, solved_reply=target)
        else:
            prompt = fmt.render(problem)
        return prompt, target
