"""The REPL protocol against recorded real output: the Lean REPL's own conformance transcripts (Lean
v4.33.0-rc2) and the answers a Kimina Lean Server gave for 51 Lean Workbook proofs."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from fd_jax.lean import DEFAULT_HEADER, classify, kimina_verdict, normalize_message, parse_repl_output
from fd_jax.lean.kimina import kimina_line_offset
from fd_jax.lean.protocol import audit_command, audit_verdict, proof_command, strip_imports


def _commands(path: pathlib.Path) -> list[dict]:
    """The JSON commands of a transcript's `.in` (the REPL accepts raw newlines in strings, so not strict)."""
    decoder, text, i, out = json.JSONDecoder(strict=False), path.read_text(), 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return out
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)


@pytest.fixture(scope="module")
def transcripts(shared_data) -> dict[str, tuple[list[dict], list[dict]]]:
    """name -> (commands, answers) for every transcript with a recorded output."""
    folder = shared_data / "lean_repl_transcripts"
    out = {}
    for expected in sorted(folder.glob("*.expected.out")):
        name = expected.name.removesuffix(".expected.out")
        out[name] = (_commands(folder / f"{name}.in"), parse_repl_output(expected.read_text()))
    return out


def test_every_transcript_parses_one_answer_per_command(transcripts):
    assert len(transcripts) >= 50
    for name, (commands, answers) in transcripts.items():
        assert len(answers) == len(commands), name
        assert all(isinstance(a, dict) and a for a in answers), name


def test_every_answer_classifies(transcripts):
    """Every recorded answer gets a verdict; command answers that report an error are never valid."""
    seen = set()
    for name, (commands, answers) in transcripts.items():
        for command, answer in zip(commands, answers):
            verdict = classify(answer)
            seen.add(verdict.status)
            has_error = any(m.get("severity") == "error" for m in answer.get("messages", []))
            if has_error or answer.get("sorries"):
                assert verdict.status in ("invalid", "sorry"), (name, answer)
            if "cmd" in command and verdict.status == "valid":
                assert "env" in answer and not answer.get("sorries"), (name, answer)
    assert seen == {"valid", "invalid", "sorry", "crashed"}


# Hand-read from the recorded outputs (the oracle): what each command answer must be classified as.
EXPECTED = {
    "tactic_sorry": ["sorry"],
    "term_sorry": ["sorry"],
    "import_lean": ["valid"],
    "dup_msg": ["valid", "valid", "invalid"],  # def; #check (an info); #check of an unknown identifier
    "synthesize_placeholder": ["invalid"],
    "unknown_environment": ["crashed"],  # a protocol error, not Lean's verdict on the proof
    "app_type_mismatch": ["invalid", "sorry", "invalid", "invalid", "invalid"],  # kernel error first
    "readme": ["sorry", "invalid", "valid"],  # open goals after `apply`, "Completed" after `exact`
    "unknown_tactic": ["sorry", "invalid"],  # {"message": "Lean error: ... unknown tactic"}
    "line_breaks": ["invalid", "sorry", "valid"],
    "have_by_sorry": ["invalid", "sorry", "invalid"],  # an error outranks the sorry it also contains
    "unknown_proof_state": ["sorry", "crashed"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_transcripts(transcripts, name):
    _, answers = transcripts[name]
    assert [classify(a).status for a in answers] == EXPECTED[name]


def test_lean_error_message_becomes_an_error(transcripts):
    verdict = classify(transcripts["unknown_tactic"][1][1])
    assert verdict.errors[0]["data"] == "Lean error:\n<input>:1:1: unknown tactic"
    assert verdict.errors[0]["pos"] == {"line": 0, "column": 0}


def test_positions_and_new_spelling_kept(transcripts):
    verdict = classify(transcripts["dup_msg"][1][2])
    assert verdict.errors == [
        {"severity": "error", "pos": {"line": 1, "column": 7}, "endPos": {"line": 1, "column": 8},
         "data": "Unknown identifier `g`"}
    ]  # fmt: skip


def test_old_lean_spellings_are_normalised(transcripts):
    """Lean < 4.23 wrote `unknown identifier 'g'` and `declaration uses 'sorry'` (see the REPL's README)."""
    assert normalize_message("unknown identifier 'g'") == "Unknown identifier `g`"
    assert normalize_message("unknown constant 'Nat.foo'") == "Unknown constant `Nat.foo`"
    assert normalize_message("declaration uses 'sorry'") == "declaration uses `sorry`"
    assert normalize_message("unsolved goals\n⊢ 1 = 1") == "unsolved goals\n⊢ 1 = 1"
    answer = json.loads(json.dumps(transcripts["tactic_sorry"][1][0]))
    answer["messages"][0]["data"] = "declaration uses 'sorry'"
    del answer["sorries"]  # only the warning is left to tell
    verdict = classify(answer)
    assert verdict.status == "sorry" and verdict.messages[0]["data"] == "declaration uses `sorry`"


def test_garbage_is_rejected_with_its_offset():
    good = '{"env": 0}\n\n{"messages": [], "env": 1}\n\n'
    assert parse_repl_output(good) == [{"env": 0}, {"messages": [], "env": 1}]
    with pytest.raises(ValueError, match="offset 12.*INTERNAL PANIC"):
        parse_repl_output('{"env": 0}\n\nINTERNAL PANIC: out of memory\n')
    with pytest.raises(ValueError, match="JSON list"):
        parse_repl_output("[1, 2]")
    assert classify("not a dict").status == "crashed"  # type: ignore[arg-type]
    assert classify({"unexpected": 1}).status == "crashed"


def test_imports_blanked_keeping_positions():
    code = "import Mathlib\nimport Aesop -- x\ntheorem t : True := by\n  trivial\n"
    body = proof_command(code, 3)
    assert body["env"] == 3
    assert body["cmd"].splitlines() == [" " * 14, " " * 13 + "-- x", "theorem t : True := by", "  trivial"]
    assert len(body["cmd"]) == len(code)
    assert strip_imports("theorem t : True := trivial") == "theorem t : True := trivial"


def _info(*texts: str) -> dict:
    """A `#print axioms` answer as the REPL gives it: one info message per text, and the new env."""
    at = {"line": 1, "column": 0}
    return {"messages": [{"severity": "info", "pos": at, "endPos": at, "data": t} for t in texts], "env": 7}


def test_axiom_audit_answers():
    assert audit_command("t", 3) == {"cmd": "#print axioms _root_.t", "env": 3}
    assert audit_command("_root_.t", 3)["cmd"] == "#print axioms _root_.t"
    assert audit_verdict("t", _info("'t' depends on axioms: [propext, Classical.choice, Quot.sound]")) is None
    assert audit_verdict("t", _info("'t' does not depend on any axioms")) is None
    assert audit_verdict("t'", _info("'t'' does not depend on any axioms")) is None
    assert audit_verdict("t", _info("'t' depends on axioms: [propext, sorryAx]")).status == "sorry"
    native = _info("'t' depends on axioms: [Lean.ofReduceBool, propext]")
    assert audit_verdict("t", native).status == "invalid"
    assert audit_verdict("t", native, allow_native_decide=True) is None
    error = {"messages": [{"severity": "error", "pos": {"line": 1, "column": 0}, "data": "unknown constant 't'"}]}
    assert audit_verdict("t", error).status == "invalid"


# Answers an attacker would like the audit to accept: about another constant, ambiguous, or none at all.
AUDIT_ATTACKS = {
    "another constant": _info("'Hack.t' depends on axioms: [propext]"),
    "a suffix of the name": _info("'t' depends on axioms: [propext]"),  # asked about `my.t`
    "two reports": _info("'t' depends on axioms: [propext]", "'t' depends on axioms: [propext]"),
    "clean report plus a sorryAx one": _info("'t' depends on axioms: [propext]", "'u' depends on axioms: [sorryAx]"),
    "no report": _info(),
    "no messages key": {"env": 7},
    "report as a warning then text": _info("'t' depends on axioms: [propext] and 't' too"),
    "name twice in one report": _info("'t' depends on axioms: [propext] 't' depends on axioms: []"),
    "sorryAx outside the messages": {**_info("'t' depends on axioms: [propext]"), "extra": "sorryAx"},
    "messages a string": {"messages": "'t' does not depend on any axioms", "env": 7},
    "message without severity": {"messages": [{"pos": {"line": 1, "column": 0},
                                               "data": "'t' does not depend on any axioms"}], "env": 7},
    "not a dict": ["'t' does not depend on any axioms"],
}


@pytest.mark.parametrize("name", sorted(AUDIT_ATTACKS))
def test_axiom_audit_attacks_are_never_accepted(name):
    asked = "my.t" if name == "a suffix of the name" else "t"
    verdict = audit_verdict(asked, AUDIT_ATTACKS[name])
    assert verdict is not None and verdict.status in ("invalid", "sorry"), verdict


# --- Kimina Lean Server results ---


@pytest.fixture(scope="module")
def kimina_results(shared_data) -> dict[str, tuple[str, dict]]:
    """name -> (submitted Lean source, recorded result)."""
    folder = shared_data / "kimina_match"
    out = {}
    for path in sorted((folder / "output").glob("*.json")):
        source = (folder / "input" / f"{path.stem}.lean").read_text()
        out[path.stem] = (source, json.loads(path.read_text())["results"][0])
    return out


def test_every_kimina_result_classifies(kimina_results):
    statuses = {name: kimina_verdict(result).status for name, (_, result) in kimina_results.items()}
    assert len(statuses) == 51
    # The server timed out on one problem; every other proof compiled (with warnings, for many).
    assert statuses.pop("goedel-lean_workbook_1036") == "timeout"
    assert set(statuses.values()) == {"valid"}
    with_warnings = [n for n, (_, r) in kimina_results.items() if (r["response"] or {}).get("messages")]
    assert len(with_warnings) >= 15


def test_kimina_valid_with_warnings_and_line_offset(kimina_results):
    source, result = kimina_results["goedel-lean_workbook_10222"]
    assert source.startswith(DEFAULT_HEADER)
    # The server reports lines from its first line that is neither blank nor an import (here the 4th).
    offset = kimina_line_offset(DEFAULT_HEADER, source)
    assert offset == 7 - 3
    verdict = kimina_verdict(result, line_offset=offset)
    assert verdict.status == "valid" and verdict.time_s == pytest.approx(0.35268568992614746)
    info = [m for m in verdict.messages if m["severity"] == "info"][0]
    assert info["data"] == "Try this: ring_nf"
    # The shifted position points at the same text in the code without its header.
    code_lines = source[len(DEFAULT_HEADER):].splitlines()
    line, start, end = info["pos"]["line"], info["pos"]["column"], info["endPos"]["column"]
    assert code_lines[line - 1][start:end] == source.splitlines()[line - 1 + 7][start:end] == "ring"


def test_kimina_server_errors():
    timed_out = {"error": "Lean REPL command timed out in 60 seconds", "time": 60}
    assert kimina_verdict(timed_out).status == "timeout"
    assert kimina_verdict({"error": "No available REPLs"}).status == "crashed"
    assert kimina_verdict({"error": None, "response": None}).status == "crashed"
    protocol_error = {"error": None, "response": {"message": "Unknown environment."}}
    assert kimina_verdict(protocol_error).status == "crashed"
    in_header = {"severity": "error", "pos": {"line": 1, "column": 0}, "data": "x"}
    header_error = {"response": {"messages": [in_header]}}
    assert kimina_verdict(header_error, line_offset=7).messages[0]["pos"] == {"line": 0, "column": 0}
    assert re.search("timed out", kimina_verdict({"error": "Lean process timed out"}).reason)
