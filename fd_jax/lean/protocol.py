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
_AXIOMS_LIST = re.compile(r"depends on axioms: \[([^\]]*)\]")
_NO_AXIOMS = "does not depend on any axioms"


def parse_repl_output(text: str) -> list[dict[str, Any]]:
    """The JSON objects of a REPL output stream, in order.

    Objects may be pretty-printed over several lines and are separated by whitespace (the REPL writes a
    blank line after each). Raises ValueError naming the offset and the text found there if something
    other than a JSON object appears (a crash trace, garbage).
    """
    decoder = json.JSONDecoder()
    objects, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return objects
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as err:
            found = text[i : i + 80]
            raise ValueError(f"REPL output is not JSON at offset {i}: {found!r} ({err.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"REPL output at offset {i} is a JSON {type(obj).__name__}, expected an object")
        objects.append(obj)


def normalize_message(text: str) -> str:
    """One spelling for messages whose wording changed across Lean versions (the newer one)."""
    for pattern, replace in _RENAMES:
        if match := pattern.fullmatch(text):
            return replace(match)
    return text


def _normalized(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        return []
    out = []
    for message in messages:
        if isinstance(message, dict):
            message = dict(message)
            message["data"] = normalize_message(str(message.get("data", "")))
            out.append(message)
    return out


def _error_message(text: str) -> dict[str, Any]:
    """A message in the REPL's shape for an error that has no source position (line 0, as the REPL does)."""
    return {"severity": "error", "pos": {"line": 0, "column": 0}, "endPos": None, "data": text}


def classify(response: dict[str, Any]) -> Verdict:
    """The verdict for one REPL answer (see the module docstring for the shapes).

    A command answer is `invalid` if any message is an error, `sorry` if it lists sorries or warns that a
    declaration uses sorry, `valid` otherwise (warnings and infos do not matter). A tactic answer is
    `valid` only when the proof is complete. `{"message": "Lean error: ..."}` is `invalid` (with that text
    as an error message); any other protocol error or unrecognised answer is `crashed`. `time_s` is the
    answer's `time` field when present (Kimina adds one), else 0.
    """
    if not isinstance(response, dict):
        return Verdict(CRASHED, reason=f"REPL answer is a {type(response).__name__}, not a JSON object")
    messages = _normalized(response.get("messages"))
    time_s = float(response.get("time") or 0.0)
    errors = [m for m in messages if m.get("severity") == "error"]
    has_sorry = bool(response.get("sorries")) or any(
        m.get("severity") == "warning" and _SORRY_WARNING in m["data"] for m in messages
    )
    if "message" in response and not {"env", "messages", "proofState"} & response.keys():
        text = str(response["message"])
        if text.startswith("Lean error:"):
            return Verdict(INVALID, [_error_message(text)], time_s, reason=text)
        return Verdict(CRASHED, reason=f"REPL protocol error: {text}")
    if "proofState" in response or "proofStatus" in response:
        status = str(response.get("proofStatus", ""))
        if errors:
            return Verdict(INVALID, messages, time_s)
        if "sorry" in status:
            return Verdict(SORRY, messages, time_s)
        complete = status == "Completed" or (not status and response.get("goals") == [])
        return Verdict(VALID if complete else INVALID, messages, time_s, reason="" if complete else status)
    if not {"env", "messages", "sorries", "time"} & response.keys():
        return Verdict(CRASHED, reason=f"unrecognised REPL answer with keys {sorted(response)}")
    if errors:
        return Verdict(INVALID, messages, time_s)
    if has_sorry:
        return Verdict(SORRY, messages, time_s)
    return Verdict(VALID, messages, time_s)


def header_command(header: str) -> dict[str, Any]:
    """The command that loads `header` in a fresh environment (its answer's `env` is reused)."""
    return {"cmd": header}


def strip_imports(code: str) -> str:
    """`code` with its leading `import` lines blanked out.

    The header provides the imports, and the REPL refuses `import` in a continued environment. The lines
    are replaced by spaces, not removed, so that the line and column of every message Lean reports are
    those of the submitted `code`.
    """
    end = leading_import_end(lex(code)[0])
    return re.sub(r"[^\n]", " ", code[:end]) + code[end:]


def proof_command(code: str, env: int) -> dict[str, Any]:
    """The command that checks `code` (leading imports blanked) in environment `env`."""
    return {"cmd": strip_imports(code), "env": env}


def audit_command(name: str, env: int) -> dict[str, Any]:
    """The command that lists the axioms theorem `name` depends on, in the environment after the proof."""
    return {"cmd": f"#print axioms {name}", "env": env}


def audit_verdict(
    name: str, response: dict[str, Any], *, allow_native_decide: bool = False
) -> Verdict | None:
    """None if the `#print axioms` answer shows only standard axioms, else the verdict that overrides `valid`.

    A proof whose messages were hidden (or that otherwise sneaked past the screen) still depends on
    `sorryAx` or on a foreign axiom here; this is the last line of defence.
    """
    allowed = STANDARD_AXIOMS | (NATIVE_AXIOMS if allow_native_decide else frozenset())
    texts = [str(m.get("data", "")) for m in response.get("messages", []) if isinstance(m, dict)]
    for text in texts:
        if _NO_AXIOMS in text:
            return None
        if match := _AXIOMS_LIST.search(text):
            axioms = {a.strip() for a in match.group(1).split(",") if a.strip()}
            if axioms <= allowed:
                return None
            foreign = sorted(axioms - allowed)
            why = f"theorem `{name}` depends on axioms outside the standard ones: {', '.join(foreign)}"
            return Verdict(SORRY if "sorryAx" in axioms else INVALID, [_error_message(why)], reason=why)
    why = f"could not audit the axioms of theorem `{name}`: {' | '.join(texts) or 'no answer'}"
    return Verdict(INVALID, [_error_message(why)], reason=why)
