"""The arithmetic test bed: generator, exact checking with precise messages, the verifier interface."""

from __future__ import annotations

import concurrent.futures
import re
import time

import pytest

from fd_jax.data import Problem
from fd_jax.verification import ProofTask
from fd_jax.tasks.arithmetic import (
    ArithmeticFormat,
    ArithmeticLevel,
    ArithmeticVerifier,
    answer_of,
    check_answer,
    make_problems,
    worked_examples,
)

STATEMENT = "Compute 4831 * 27 - 903."  # = 130437 - 903 = 129534


def test_generator_is_seeded_and_follows_the_level():
    level = ArithmeticLevel(min_digits=2, max_digits=4, num_ops=3, ops="+-*")
    problems = make_problems(50, seed=7, level=level)
    assert problems == make_problems(50, seed=7, level=level)
    assert problems != make_problems(50, seed=8, level=level)
    for p in problems:
        expression = re.fullmatch(r"Compute (.+)\.", p.statement).group(1)
        parts = expression.split(" ")
        assert len(parts) == 7 and all(op in "+-*" for op in parts[1::2])
        assert all(2 <= len(n) <= 4 and not n.startswith("0") for n in parts[::2])
        assert answer_of(p.statement) == eval(expression)  # Python's own precedence is the oracle
    easy = make_problems(200, seed=0, level="easy")
    assert all(re.fullmatch(r"Compute \d \+ \d\.", p.statement) for p in easy)
    assert len({p.statement for p in easy}) > 50  # most of the 100 single-digit sums appear
    with pytest.raises(ValueError, match="ops in"):
        make_problems(1, level=ArithmeticLevel(ops="/"))


def test_exact_answers_and_precise_messages():
    assert answer_of(STATEMENT) == 129534
    assert check_answer(STATEMENT, "129534").status == "valid"
    assert check_answer(STATEMENT, " 129534 ").messages == []

    wrong = check_answer(STATEMENT, "129634")
    assert wrong.status == "invalid"
    [m] = wrong.messages
    assert m["severity"] == "error"
    assert m["data"] == (
        "wrong answer 129634: wrong digit(s) at position(s) 3 counted from the right (1 = units); "
        "the answer is too large"
    )
    assert (m["pos"], m["endPos"]) == ({"line": 1, "column": 3}, {"line": 1, "column": 4})

    short = check_answer(STATEMENT, "-29534").messages[0]["data"]
    assert short == ("wrong answer -29534: the sign is wrong; the answer has 5 digit(s) but the result has 6; "
                     "the answer is too small")

    malformed = check_answer(STATEMENT, "12x34").messages[0]
    assert malformed["pos"] == {"line": 1, "column": 2} and "found 'x' at column 2" in malformed["data"]
    assert "found a leading zero at column 0" in check_answer(STATEMENT, "0129534").messages[0]["data"]
    missing = check_answer(STATEMENT, "   ").messages[0]
    assert missing["data"].startswith("missing answer") and missing["pos"] == {"line": 1, "column": 0}

    not_arith = check_answer("theorem t : True := by\n", "trivial")
    assert not_arith.status == "rejected" and "Compute EXPR." in not_arith.reason


def test_verifier_interface_matches_the_lean_pool():
    tasks = [ProofTask(STATEMENT, "129534", id="a"), ProofTask(STATEMENT, "1", id="b"),
             ProofTask("Compute 2 - 5.", "-3")]
    with ArithmeticVerifier(delay_s=0.05) as verifier:
        start = time.monotonic()
        future = verifier.submit(tasks)
        assert isinstance(future, concurrent.futures.Future)
        assert time.monotonic() - start < 0.05  # submit does not wait for the checks
        assert [v.status for v in future.result(timeout=5)] == ["valid", "invalid", "valid"]
        assert [v.status for v in verifier.verify_batch(tasks)] == ["valid", "invalid", "valid"]
    with pytest.raises(RuntimeError):
        verifier.submit(tasks)  # closed


def test_format_renders_and_extracts_answers():
    fmt = ArithmeticFormat()
    problem = Problem("arith-0-0", "Compute 3 + 4.")
    assert fmt.render(problem) == "Compute 3 + 4.\nAnswer: "
    assert fmt.render(problem, context="Hint.\n") == "Hint.\nCompute 3 + 4.\nAnswer: "
    assert fmt.extract(problem, "7\nCompute 1 + 1.").code == "7"
    assert fmt.extract(problem, "<think>3+4 is 8?</think>so... Answer: 7 done").code == "7 done"
    assert fmt.extract(problem, "").code == ""
    task = fmt.extract(problem, " 7")
    assert (task.statement, task.id) == ("Compute 3 + 4.", "arith-0-0")
    assert check_answer(task.statement, task.code).status == "valid"
    assert fmt.demonstration(task) == "Compute 3 + 4.\nAnswer: 7"


def test_worked_examples_are_distinct_solved_and_seeded():
    examples = worked_examples(3, level="medium", seed=5)
    assert examples == worked_examples(3, level="medium", seed=5)
    assert len({s for s, _ in examples}) == 3
    for statement, answer in examples:
        assert answer == eval(re.fullmatch(r"Compute (.+)\.", statement).group(1))  # Python as the oracle
    assert worked_examples(0) == []
    tiny = ArithmeticLevel(1, 1, 1, "*")  # exactly 100 distinct statements "Compute a * b."
    assert len(worked_examples(100, level=tiny)) == 100
    with pytest.raises(ValueError, match="only 100 distinct problems, not 101"):
        worked_examples(101, level=tiny)


def test_examples_precede_the_question_and_never_give_its_answer():
    examples = [("Compute 4 + 5.", 9), ("Compute 7 + 9.", 16)]
    fmt = ArithmeticFormat(examples=examples)
    problem = Problem("p", "Compute 3 + 4.")
    assert fmt.render(problem, context="Hint.\n") == (
        "Compute 4 + 5.\nAnswer: 9\n\nCompute 7 + 9.\nAnswer: 16\n\nHint.\nCompute 3 + 4.\nAnswer: "
    )
    # A problem that is one of the examples is asked without that example.
    assert fmt.render(Problem("q", "Compute 7 + 9.")) == "Compute 4 + 5.\nAnswer: 9\n\nCompute 7 + 9.\nAnswer: "
    # Extraction reads the completion only, so the examples' answers in the prompt are never taken.
    assert fmt.extract(problem, "7\n\nCompute 1 + 1.").code == "7"
    with pytest.raises(ValueError, match="system turn needs the chat format"):
        ArithmeticFormat(system="You are a calculator.")


def test_chat_examples_are_earlier_turns_and_feedback_reaches_only_the_question():
    from fd_jax.data.char_tokenizer import build_char_tokenizer

    fmt = ArithmeticFormat(tokenizer=build_char_tokenizer(), system="Be brief.", template="{context}{statement}",
                           examples=[("Compute 4 + 5.", 9)])
    text = fmt.render(Problem("p", "Compute 3 + 4."), context="Hint. ")
    assert text == ("<bos>system: Be brief.\nuser: Compute 4 + 5.\nassistant: Answer: 9<eos>\n"
                    "user: Hint. Compute 3 + 4.\nassistant: ")
    assert not fmt.add_special_tokens  # the chat template wrote <bos>
