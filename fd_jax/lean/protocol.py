"""The Lean REPL's JSON protocol: commands out, answers in, answers to verdicts.

leanprover-community/repl reads one-line JSON commands separated by blank lines (`{"cmd": src}` starts
a new environment and may `import`; `{"cmd": src, "env": n}` continues environment n) and answers each
with a pretty-printed JSON object followed by a blank line:

* a command answer: `env` (the new environment), and optionally `messages` (`severity`, `pos`, `endPos`,
  `data`; lines 1-based, columns 0-based in code points of the command's text) and `sorries`;
* a tactic answer (tactic mode): `proofState`, `goals`, optionally `proofStatus` and `messages`;
* a protocol error: `{"message": "Unknown environment."}`, or `{"message": "Lean error: ..."}` when Lean
  threw while processing the input.

Message texts changed across Lean versions (``Unknown identifier `g` `` since Lean 4.23, `unknown
identifier 'g'` before); `normalize_message` maps both to one spelling, the newer one.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fd_jax.lean.lexer import lex
from fd_jax.lean.screen import leading_import_end
from fd_jax.lean.types import CRASHED, INVALID, SORRY, VALID, Verdict

# Old spelling -> new spelling. Each regex matches the whole message text.
_RENAMES = [
    (re.compile(r"unknown (identifier|constant|namespace|attribute|universe level|tactic) '(.+)'", re.S),
     lambda m: f"Unknown {m.group(1)} `{m.group(2)}`"),
    (re.compile(r"declaration uses 'sorry'"), lambda m: "declaration uses `sorry`"),
]  # fmt: skip
_SORRY_WARNING = "declaration uses `sorry`"
# The axioms every Mathlib proof may use; anything else (sorryAx, user axioms, ofReduceBool) is not valid.
STANDARD_AXIOMS = frozenset({"propext", "Classical.choice", "Quot.sound"})
NATIVE_AXIOMS = frozenset({"Lean.ofReduceBool", "Lean.ofReduceNat", "Lean.trustCompiler"})
_AXIOMS_REPORT = re.compile(r"depends on axioms|does not depend on any axioms")
_AXIOMS_LIST_FULL = re.compile(r"'(\S+)' depends on axioms: \[([^\]]*)\]")
_NO_AXIOMS_FULL = re.compile(r"'(\S+)' does not depend on any axioms")


def parse_repl_output(text: str) -> list[dict[str, Any]]:
    """The JSON objects of a REPL output stream, in order.

    Objects may be pretty-printed over several lines and are separated by whitespace (the REPL writes a
    blank line after each). Raises ValueError (and nothing else) naming the offset and the text found
    there if something other than a JSON object appears (a crash trace, garbage, JSON nested too deeply
    to decode), or if `text` is not a string.
    """
    if not isinstance(text, str):
        raise ValueError(f"REPL output must be a string, got a {type(text).__name__}")
    decoder = json.JSONDecoder()
    objects, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return objects
        try:
            obj, i = decoder.raw_decode(text, i)
        except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
            found = text[i : i + 80]
            why = getattr(err, "msg", type(err).__name__)
            raise ValueError(f"REPL output is not JSON at offset {i}: {found!r} ({why})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"REPL output at offset {i} is a JSON {type(obj).__name__}, expected an object")
        objects.append(obj)


def normalize_message(text: str) -> str:
    """One spelling for messages whose wording changed across Lean versions (the newer one)."""
    for pattern, replace in _RENAMES:
        if match := pattern.fullmatch(text):
            return replace(match)
    return text


SEVERITIES = ("error", "warning", "info")


class MalformedAnswer(ValueError):
    """A REPL / server answer whose fields do not have the documented types; `str(err)` says which."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _position_ok(pos: Any) -> bool:
    return isinstance(pos, dict) and _is_int(pos.get("line")) and _is_int(pos.get("column"))


def checked_messages(messages: Any) -> list[dict[str, Any]]:
    """`messages` as a list of well-formed message dicts (data normalised); MalformedAnswer otherwise.

    Each message needs `severity` exactly one of SEVERITIES, `data` a string, `pos` a {"line", "column"}
    dict of non-negative integers and `endPos` such a dict or null (or absent).
    """
    if not isinstance(messages, list):
        raise MalformedAnswer(f"`messages` is a {type(messages).__name__}, not a list")
    out = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise MalformedAnswer(f"messages[{k}] is a {type(message).__name__}, not an object")
        severity, data = message.get("severity"), message.get("data")
        if not isinstance(severity, str) or severity not in SEVERITIES:
            raise MalformedAnswer(f"messages[{k}].severity is {severity!r}, not one of {SEVERITIES}")
        if not isinstance(data, str):
            raise MalformedAnswer(f"messages[{k}].data is a {type(data).__name__}, not a string")
        if not _position_ok(message.get("pos")):
            raise MalformedAnswer(f"messages[{k}].pos is {message.get('pos')!r}, not a line/column object")
        if message.get("endPos") is not None and not _position_ok(message["endPos"]):
            raise MalformedAnswer(f"messages[{k}].endPos is {message['endPos']!r}, not a line/column object")
        out.append({**message, "data": normalize_message(data)})
    return out


def _checked_time(response: dict[str, Any]) -> float:
    value = response.get("time", 0.0)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise MalformedAnswer(f"`time` is {value!r}, not a non-negative number")
    return float(value)


def _error_message(text: str) -> dict[str, Any]:
    """A message in the REPL's shape for an error that has no source position (line 0, as the REPL does)."""
    return {"severity": "error", "pos": {"line": 0, "column": 0}, "endPos": None, "data": text}


def _has_sorry(response: dict[str, Any], messages: list[dict[str, Any]]) -> bool:
    sorries = response.get("sorries", [])
    if not isinstance(sorries, list):
        raise MalformedAnswer(f"`sorries` is a {type(sorries).__name__}, not a list")
    return bool(sorries) or any(m["severity"] == "warning" and _SORRY_WARNING in m["data"] for m in messages)


def _tactic_verdict(response: dict[str, Any], messages: list[dict[str, Any]], time_s: float) -> Verdict:
    if not _is_int(response.get("proofState")):
        raise MalformedAnswer(f"`proofState` is {response.get('proofState')!r}, not a non-negative integer")
    goals = response.get("goals")
    if not isinstance(goals, list) or not all(isinstance(g, str) for g in goals):
        raise MalformedAnswer(f"`goals` is {goals!r}, not a list of strings")
    status = response.get("proofStatus")
    if status is not None and not isinstance(status, str):
        raise MalformedAnswer(f"`proofStatus` is a {type(status).__name__}, not a string")
    if any(m["severity"] == "error" for m in messages):
        return Verdict(INVALID, messages, time_s)
    if status is not None and "sorry" in status.lower():
        return Verdict(SORRY, messages, time_s)
    if not (status == "Completed" or (status is None and goals == [])):
        return Verdict(INVALID, messages, time_s, reason=str(status))
    if _has_sorry(response, messages):
        return Verdict(SORRY, messages, time_s)
    return Verdict(VALID, messages, time_s)


def _command_verdict(response: dict[str, Any], *, require_env: bool) -> Verdict:
    """The verdict of a command answer; MalformedAnswer for any field of the wrong type."""
    time_s = _checked_time(response)
    if "message" in response:
        text = response["message"]
        if not isinstance(text, str):
            raise MalformedAnswer(f"`message` is a {type(text).__name__}, not a string")
        if {"env", "messages", "sorries", "proofState", "goals"} & response.keys():
            raise MalformedAnswer(f"a protocol error ({text[:100]!r}) beside an answer's fields")
        if text.startswith("Lean error:"):
            return Verdict(INVALID, [_error_message(text)], time_s, reason=text)
        return Verdict(CRASHED, time_s=time_s, reason=f"REPL protocol error: {text}")
    messages = checked_messages(response.get("messages", []))
    if "proofState" in response or "proofStatus" in response or "goals" in response:
        return _tactic_verdict(response, messages, time_s)
    if "env" in response or require_env:
        if not _is_int(response.get("env")):
            raise MalformedAnswer(f"`env` is {response.get('env')!r}, not a non-negative integer")
    elif not {"messages", "time"} & response.keys():
        raise MalformedAnswer(f"unrecognised answer with keys {sorted(map(str, response))}")
    if any(m["severity"] == "error" for m in messages):
        return Verdict(INVALID, messages, time_s)
    if _has_sorry(response, messages):
        return Verdict(SORRY, messages, time_s)
    return Verdict(VALID, messages, time_s)


def classify_answer(response: Any, *, require_env: bool = True) -> Verdict:
    """`classify`, with `require_env=False` for servers that drop `env` from command answers (Kimina)."""
    if not isinstance(response, dict):
        return Verdict(CRASHED, reason=f"REPL answer is a {type(response).__name__}, not a JSON object")
    try:
        return _command_verdict(response, require_env=require_env)
    except MalformedAnswer as err:
        return Verdict(CRASHED, reason=f"malformed REPL answer: {err}")


def classify(response: dict[str, Any]) -> Verdict:
    """The verdict for one REPL answer (see the module docstring for the shapes). Never raises.

    Fails closed: every field read is type-checked, and an answer with a field of the wrong type or value
    (`messages` not a list of well-formed messages, a `severity` other than "error" / "warning" / "info",
    `env` not a non-negative integer, `time` not a finite non-negative number, a protocol `message` beside
    other fields, ...) is `crashed` with the reason. Otherwise: a command answer (it must carry `env`) is
    `invalid` if any message is an error, `sorry` if it lists sorries or warns that a declaration uses
    sorry, `valid` otherwise (warnings and infos do not matter). A tactic answer (`proofState`, `goals`)
    is `valid` only when the proof is complete. `{"message": "Lean error: ..."}` alone is `invalid` (with
    that text as an error message); any other protocol error is `crashed`. `time_s` is the answer's
    `time` field when present (Kimina adds one), else 0.
    """
    return classify_answer(response, require_env=True)


def header_command(header: str) -> dict[str, Any]:
    """The command that loads `header` in a fresh environment (its answer's `env` is reused)."""
    return {"cmd": header}


def strip_imports(code: str) -> str:
    """`code` with its leading `import` lines blanked out.

    The header provides the imports, and the REPL refuses `import` in a continued environment. The lines
    are replaced by spaces, not removed, so that the line and column of every message Lean reports are
    those of the submitted `code`.
    """
    if "import" not in code:  # the common case: nothing to blank, no need to lex
        return code
    end = leading_import_end(lex(code)[0])
    return re.sub(r"[^\n]", " ", code[:end]) + code[end:]


def proof_command(code: str, env: int) -> dict[str, Any]:
    """The command that checks `code` (leading imports blanked) in environment `env`."""
    return {"cmd": strip_imports(code), "env": env}


def audit_command(name: str, env: int) -> dict[str, Any]:
    """The command that lists the axioms of theorem `name` (its full name), in the environment after the proof.

    The name is asked for as `_root_.NAME`: no namespace or `open` left behind by the proof can redirect it
    to another constant.
    """
    return {"cmd": audit_query(name), "env": env}


def audit_query(name: str) -> str:
    """`#print axioms _root_.NAME` for the full name `name` (a leading `_root_.` is not doubled)."""
    return f"#print axioms _root_.{name.removeprefix('_root_.')}"


def audit_verdict(name: str, response: Any, *, allow_native_decide: bool = False) -> Verdict | None:
    """None if the `#print axioms` answer shows that constant `name` uses only standard axioms, else the
    verdict that overrides `valid`.

    Bound to the declaration: the answer must be well-formed, contain no error, and carry exactly one
    axioms report, about exactly `name` (named once): `'NAME' depends on axioms: [...]` or `'NAME' does not
    depend on any axioms`. `sorryAx` anywhere in the answer is `sorry`; a report about another constant,
    two reports, none, or non-standard axioms is `invalid`. A proof whose messages were hidden (or that
    otherwise sneaked past the screen) still depends on `sorryAx` here: this is the last line of defence.
    """
    full = name.removeprefix("_root_.")
    allowed = STANDARD_AXIOMS | (NATIVE_AXIOMS if allow_native_decide else frozenset())

    def fail(why: str, status: str = INVALID) -> Verdict:
        why = f"axiom audit of theorem `{full}`: {why}"
        return Verdict(status, [_error_message(why)], reason=why)

    if not isinstance(response, dict):
        return fail(f"the answer is a {type(response).__name__}, not a JSON object")
    try:
        messages = checked_messages(response.get("messages", []))
    except MalformedAnswer as err:
        return fail(f"malformed answer: {err}")
    texts = [m["data"] for m in messages]
    if any("sorryAx" in text for text in texts) or "sorryAx" in json.dumps(response, default=str):
        return fail("the theorem depends on sorryAx", SORRY)
    if errors := [m["data"] for m in messages if m["severity"] == "error"]:
        return fail(f"Lean answered with an error: {' | '.join(errors)}")
    reports = [t for t in texts if _AXIOMS_REPORT.search(t)]
    if len(reports) != 1:
        return fail(f"expected exactly one axioms report, got {len(reports)}: {' | '.join(texts) or 'no answer'}")
    match = _AXIOMS_LIST_FULL.fullmatch(reports[0].strip()) or _NO_AXIOMS_FULL.fullmatch(reports[0].strip())
    if match is None or match.group(1) != full or reports[0].count(f"'{full}'") != 1:
        return fail(f"the report is not about exactly `{full}`: {reports[0]!r}")
    if match.re is _NO_AXIOMS_FULL:
        return None
    axioms = [a.strip() for a in match.group(2).split(",") if a.strip()]
    if foreign := sorted(set(axioms) - allowed):
        return fail(f"the theorem depends on axioms outside the standard ones: {', '.join(foreign)}")
    return None
