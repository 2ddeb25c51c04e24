"""Strict answer parsing: malformed REPL / Kimina answers are never `valid` and never raise.

The fuzz cases are derived from the recorded real answers (../shared/data): each takes a real answer and
applies one to three mutations that break the documented shape (a field re-typed, removed or misspelt,
a protocol error beside an answer); the oracle is which mutation was applied, not a second parser.
"""

from __future__ import annotations

import copy
import json
import math
import random

import pytest

from fd_jax.lean import classify, kimina_verdict, parse_repl_output

# Values of the wrong type for any field.
WRONG = ["", "0", "error", 1.5, -1, True, False, None, [], {}, ["error"], {"line": 1}, math.nan, math.inf]


def _pick(rng: random.Random, values: list):
    return copy.deepcopy(rng.choice(values))


def _message_mutations(rng: random.Random, answer: dict) -> list:
    """Mutations that break one message of `answer` (it has a non-empty list of messages)."""
    k = rng.randrange(len(answer["messages"]))

    def severity(a):
        a["messages"][k]["severity"] = rng.choice(
            [a["messages"][k]["severity"].upper(), "eror", "warn", "Error", " error", ["error"], None, 2]
        )

    def missing(a):
        del a["messages"][k][rng.choice(["severity", "data", "pos"])]

    def data(a):
        a["messages"][k]["data"] = rng.choice([None, 3, ["x"], {"text": "x"}, True])

    def position(a):
        key = rng.choice(["pos", "endPos"])
        a["messages"][k][key] = rng.choice(
            ["1:0", [1, 0], {"line": "1", "column": 0}, {"line": 1}, {"line": True, "column": 0},
             {"line": -1, "column": 0}, {"line": 1.0, "column": 0}, 7]
        )  # fmt: skip

    def retype(a):
        a["messages"][k] = rng.choice([json.dumps(a["messages"][k]), [a["messages"][k]], None, "error"])

    return [severity, missing, data, position, retype]


def _mutations(rng: random.Random, answer: dict) -> list:
    """Mutations that make `answer` malformed (each applicable to its shape)."""
    out = []

    def messages(a):
        a["messages"] = rng.choice(
            [json.dumps(a.get("messages", [])), {"0": {"severity": "info", "data": "x"}}, ["warning: x"], 0, None]
        )

    def time(a):
        a["time"] = rng.choice(["0.3", "fast", math.nan, math.inf, -1.0, True, [0.1], {"s": 1}])

    def protocol_error(a):
        a["message"] = rng.choice(["Unknown environment.", "Lean error: x", "", 3])

    def sorries(a):
        a["sorries"] = rng.choice(["[]", "none", 0, {"goal": "x"}, None, True])

    out += [messages, time, protocol_error, sorries]
    if isinstance(answer.get("messages"), list) and answer["messages"]:
        if all(isinstance(m, dict) for m in answer["messages"]):
            out += _message_mutations(rng, answer)
    if "proofState" in answer:
        def proof_state(a):
            a["proofState"] = rng.choice(["0", None, True, -1, 1.5, [0]])

        def goals(a):
            a["goals"] = rng.choice(["⊢ True", [1, 2], None, {"goal": "x"}, [None]])

        def status(a):
            a["proofStatus"] = rng.choice([["Completed"], 1, True, {"s": "Completed"}])

        out += [proof_state, goals, status]
    elif "env" in answer:
        def env(a):
            if rng.random() < 0.3:
                del a["env"]
            else:
                a["env"] = rng.choice(["0", None, True, False, -1, 1.0, [0], {"env": 0}])

        out += [env] * 3  # the field the issue found unchecked: weight it
    return out


def _real_answers(shared_data) -> list[dict]:
    folder = shared_data / "lean_repl_transcripts"
    answers = []
    for path in sorted(folder.glob("*.expected.out")):
        answers += parse_repl_output(path.read_text())
    return [a for a in answers if "message" not in a]  # protocol errors are already not valid


def test_real_answers_are_well_formed(shared_data):
    """The strict checks accept every recorded real answer's shape (none becomes `crashed`)."""
    answers = _real_answers(shared_data)
    assert len(answers) >= 150
    bad = [(a, v.reason) for a in answers if (v := classify(a)).status == "crashed"]
    assert not bad, bad[:3]


def test_fuzzed_answers_are_never_valid(shared_data):
    rng = random.Random(16)
    answers = _real_answers(shared_data)
    statuses, cases = {}, 0
    for _ in range(6000):
        answer = copy.deepcopy(rng.choice(answers))
        rng.choice(_mutations(rng, answer))(answer)  # the answer is well-formed: this one applies
        for _ in range(rng.randint(0, 2)):
            try:  # later ones may not find the field they break any more
                rng.choice(_mutations(rng, answer))(answer)
            except (KeyError, IndexError, TypeError, AttributeError):
                pass
        verdict = classify(answer)  # must not raise
        assert verdict.status != "valid", answer
        statuses[verdict.status] = statuses.get(verdict.status, 0) + 1
        cases += 1
    assert cases == 6000 and statuses.get("crashed", 0) > 3000  # most are recognised as malformed


def test_fuzzed_kimina_results_are_never_valid(shared_data):
    rng = random.Random(61)
    folder = shared_data / "kimina_match" / "output"
    results = [json.loads(p.read_text())["results"][0] for p in sorted(folder.glob("*.json"))]
    responses = [r for r in results if isinstance(r.get("response"), dict)]
    assert all(kimina_verdict(r).status == "valid" for r in responses)
    for _ in range(3000):
        result = copy.deepcopy(rng.choice(responses))
        response = result["response"]
        choice = rng.random()
        if choice < 0.5:
            mutation = rng.choice([m for m in _mutations(rng, response) if m.__name__ != "env"])
            mutation(response)
        elif choice < 0.7:
            result["error"] = _pick(rng, [1, True, ["timeout"], {"e": 1}, "REPL crashed"])
        elif choice < 0.85:
            result["response"] = _pick(rng, WRONG)
        else:
            result["time"] = _pick(rng, ["1", math.nan, -2, True, [1]])
            if rng.random() < 0.5:
                response["env"] = _pick(rng, ["0", None, True, -1, 1.5])
        assert kimina_verdict(result).status != "valid", result


# The answers issue 16 found `valid` (each a real answer with one field broken).
OK = {"env": 3, "messages": [{"severity": "warning", "pos": {"line": 1, "column": 0},
                              "endPos": {"line": 1, "column": 5}, "data": "unused variable"}]}  # fmt: skip


def _with(**fields) -> dict:
    answer = copy.deepcopy(OK)
    for key, value in fields.items():
        if value is KeyError:
            answer.pop(key, None)
        else:
            answer[key] = value
    return answer


def _message(**fields) -> dict:
    message = copy.deepcopy(OK["messages"][0])
    message.update(fields)
    return {**OK, "messages": [message]}


MALFORMED = {
    "messages a string": _with(messages="error: unsolved goals"),
    "messages a dict": _with(messages={"severity": "error"}),
    "messages a list of strings": _with(messages=["error: unsolved goals"]),
    "severity missing": {**OK, "messages": [{k: v for k, v in OK["messages"][0].items() if k != "severity"}]},
    "severity upper-case": _message(severity="ERROR"),
    "severity misspelt": _message(severity="eror"),
    "severity a list": _message(severity=["error"]),
    "env missing": _with(env=KeyError),
    "env null": _with(env=None),
    "env a string": _with(env="3"),
    "env a bool": _with(env=True),
    "message beside env": _with(message="Lean error: something broke"),
    "time not numeric": _with(time="slow"),
    "time NaN": _with(time=math.nan),
    "data not a string": _message(data=["unsolved goals"]),
    "pos not an object": _message(pos="1:0"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_answers_are_crashed(name):
    verdict = classify(MALFORMED[name])
    assert verdict.status == "crashed" and verdict.reason, verdict
    assert classify(OK).status == "valid"  # the unbroken answer


def test_kimina_malformed_results():
    good = {"error": None, "response": {"messages": OK["messages"], "time": 0.5}, "time": 0.5}
    assert kimina_verdict(good).status == "valid"
    for result in (
        {**good, "error": 7},
        {**good, "error": "REPL crashed"},  # an error beside a response
        {**good, "time": "0.5"},
        {**good, "response": {**good["response"], "env": "0"}},
        {**good, "response": {**good["response"], "messages": "none"}},
        {**good, "response": {"unexpected": 1}},
        {**good, "response": []},
    ):
        verdict = kimina_verdict(result)
        assert verdict.status == "crashed" and verdict.reason, result


def test_parse_repl_output_raises_only_value_error(shared_data):
    rng = random.Random(7)
    texts = [p.read_text() for p in sorted((shared_data / "lean_repl_transcripts").glob("*.expected.out"))]
    hostile = ["[" * 100000, '{"a":' * 100000, "\x00", "{}{", "{} []", '{"env": 0}\n\nnull', "1e999999"]
    for text in hostile:
        with pytest.raises(ValueError):
            parse_repl_output(text)
    with pytest.raises(ValueError):
        parse_repl_output(b'{"env": 0}')  # type: ignore[arg-type]
    for _ in range(2000):
        text = rng.choice(texts)
        i = rng.randrange(len(text))
        text = text[:i] + rng.choice(['"', "{", "}", "[", "\\", "", "\n\n", "\x00", ","]) + text[i + 1 :]
        try:
            answers = parse_repl_output(text)
        except ValueError:
            continue
        for answer in answers:
            classify(answer)  # whatever parsed, classifying it must not raise
