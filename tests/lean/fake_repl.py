"""A stand-in for the Lean REPL (leanprover-community/repl) that speaks its protocol and misbehaves on demand.

Protocol as the real one: JSON commands separated by blank lines on stdin; each answered by a
pretty-printed JSON object and a blank line on stdout. `{"cmd": text}` without `env` is a header (it may
`import`) and creates an environment; `{"cmd": text, "env": n}` continues n (unknown n ->
`{"message": "Unknown environment."}`; an `import` line -> an error, as Lean gives). `#print axioms NAME`
lists axioms as Lean does (`_root_.NAME` is NAME). Messages use Lean 4.9's spelling (`unknown identifier 'x'`,
`declaration uses 'sorry'`) so that the client's normalisation is exercised.

Magic words in a proof trigger behaviours (FAKE_BAD_HEADER in a header makes it fail to load):
  FAKE_HANG            never answer
  FAKE_HANG_WITH_CHILD start a child process (same process group), log its pid, never answer
  FAKE_CRASH           die of SIGSEGV
  FAKE_GARBAGE         print a line that is not JSON
  FAKE_OOM             allocate more than RLIMIT_AS in one step (MemoryError, exit 1); without a limit,
                       answer an error instead of eating the machine
  FAKE_ERROR           an error message spanning the word, with its real line and column
  FAKE_OLD_SORRY       a sorry, reported in Lean 4.9's words
  FAKE_AXIOM           the theorem then depends on sorryAx (as if an error had been hidden)
  FAKE_NATIVE_AXIOM    the theorem then depends on Lean.ofReduceBool
  FAKE_AXIOMS_OTHER    `#print axioms` answers about another constant (`Hack.NAME`), as an open namespace would
  FAKE_AXIOMS_TWICE    `#print axioms` answers with two reports (an ambiguous answer)
  FAKE_AXIOMS_SILENT   `#print axioms` answers with no report
  FAKE_AXIOMS_HIDDEN_SORRY  a clean report for the theorem, and a second one that names sorryAx
  FAKE_EXTRA_OUTPUT    answer, then print a second, unasked-for answer
  FAKE_REPORT          an info message with this process's pid, pgid, sid, cwd, environment and RLIMIT_AS
  FAKE_SLEEP_MS=<n>    sleep n milliseconds before answering

Options: --header-log FILE (append "<pid> <header sha1>" per header loaded), --pid-log FILE (append pids
of this process and of children it starts), --burn-ms N (burn N ms of CPU per proof), --header-s S
(take S seconds to load a header, like importing Mathlib).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time


def _position(text: str, offset: int) -> dict[str, int]:
    line = text.count("\n", 0, offset) + 1
    return {"line": line, "column": offset - (text.rfind("\n", 0, offset) + 1)}


def _message(severity: str, text: str, start: int, end: int, data: str) -> dict:
    return {"severity": severity, "pos": _position(text, start), "endPos": _position(text, end), "data": data}


def _log(path: str | None, line: str) -> None:
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def _burn(ms: float) -> None:
    stop = time.process_time() + ms / 1000
    while time.process_time() < stop:
        pass


def _oom(text: str) -> dict:
    if resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY:
        start = text.index("FAKE_OOM")
        return {"messages": [_message("error", text, start, start + 8, "fake_repl: no RLIMIT_AS was set")]}
    # One allocation as large as the whole limit cannot fit beside the interpreter: the allocator fails at
    # once (no page is touched), so the case ends in a MemoryError however loaded the machine is, never in
    # the test's wall-clock timeout. MemoryError ends the process, as an out-of-memory abort ends Lean.
    return {"hoard": len(bytearray(resource.getrlimit(resource.RLIMIT_AS)[0]))}


def _report() -> str:
    return json.dumps(
        {
            "pid": os.getpid(),
            "pgid": os.getpgid(0),
            "sid": os.getsid(0),
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "rlimit_as": resource.getrlimit(resource.RLIMIT_AS)[0],
        }
    )


def _proof(text: str, args: argparse.Namespace) -> dict:
    """The answer to a proof command (without `env`)."""
    if match := re.search(r"FAKE_SLEEP_MS=(\d+)", text):
        time.sleep(int(match.group(1)) / 1000)
    if "FAKE_HANG_WITH_CHILD" in text:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        _log(args.pid_log, str(child.pid))
        time.sleep(10**6)
    if "FAKE_HANG" in text:
        time.sleep(10**6)
    if "FAKE_CRASH" in text:
        os.kill(os.getpid(), signal.SIGSEGV)
    if "FAKE_OOM" in text:
        return _oom(text)
    if args.burn_ms:
        _burn(args.burn_ms)
    messages, answer = [], {}
    if match := re.search(r"(?m)^\s*import\b", text):
        why = "invalid 'import' command, it must be used in the beginning of the file"
        messages.append(_message("error", text, match.start(), match.end(), why))
    if "FAKE_ERROR" in text:
        start = text.index("FAKE_ERROR")
        messages.append(_message("error", text, start, start + 10, "unknown identifier 'FAKE_ERROR'"))
    if "FAKE_OLD_SORRY" in text:
        start = text.index("FAKE_OLD_SORRY")
        messages.append(_message("warning", text, 0, 7, "declaration uses 'sorry'"))
        span = {"pos": _position(text, start), "endPos": _position(text, start + 14)}
        answer["sorries"] = [{**span, "goal": "⊢ True"}]
    if "FAKE_REPORT" in text:
        messages.append(_message("info", text, 0, 0, _report()))
    if messages:
        answer["messages"] = messages
    return answer


def _axioms(query: str, text: str) -> dict:
    name = query.removeprefix("_root_.")  # Lean resolves `_root_.x` to the root declaration `x`
    if not re.search(rf"(theorem|lemma)\s+{re.escape(name)}(?![\w'.])", text):
        return {"messages": [_message("error", "", 0, 0, f"unknown constant '{name}'")]}
    axioms = ["propext", "Classical.choice", "Quot.sound"]
    axioms += ["sorryAx"] if "FAKE_AXIOM" in text and "FAKE_AXIOMS_" not in text else []
    axioms += ["Lean.ofReduceBool"] if "FAKE_NATIVE_AXIOM" in text else []
    report = f"'{name}' depends on axioms: [{', '.join(axioms)}]"
    clean = "depends on axioms: [propext]"
    if "FAKE_AXIOMS_OTHER" in text:  # as if the query had resolved to another constant
        report = f"'Hack.{name}' {clean}"
    elif "FAKE_AXIOMS_TWICE" in text:  # an ambiguous answer: two reports
        report = [report, f"'{name}' {clean}"]
    elif "FAKE_AXIOMS_SILENT" in text:  # no report at all
        report = []
    elif "FAKE_AXIOMS_HIDDEN_SORRY" in text:  # a clean report for the name, sorryAx in a second message
        report = [f"'{name}' {clean}", "'helper' depends on axioms: [sorryAx]"]
    reports = report if isinstance(report, list) else [report]
    return {"messages": [_message("info", "", 0, 0, r) for r in reports]}


def _answer(command: dict, envs: list[str], args: argparse.Namespace) -> dict:
    text = command.get("cmd", "")
    if "env" not in command:
        _log(args.header_log, f"{os.getpid()} {hashlib.sha1(text.encode()).hexdigest()}")
        time.sleep(args.header_s)
        if "FAKE_BAD_HEADER" in text:  # as Lean answers `import NoSuchModule`
            return {"message": "Lean error:\nunknown module prefix 'NoSuchModule'"}
        envs.append(text)
        return {"env": len(envs) - 1}
    env = command["env"]
    if not isinstance(env, int) or not 0 <= env < len(envs):
        return {"message": "Unknown environment."}
    if match := re.fullmatch(r"#print axioms (\S+)", text.strip()):
        answer = _axioms(match.group(1), envs[env])
    else:
        answer = _proof(text, args)
    envs.append(envs[env] + "\n" + text)
    return {**answer, "env": len(envs) - 1}


def _write(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, ensure_ascii=False) + "\n\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--header-log")
    parser.add_argument("--pid-log")
    parser.add_argument("--burn-ms", type=float, default=0.0)
    parser.add_argument("--header-s", type=float, default=0.0)
    args = parser.parse_args()
    _log(args.pid_log, str(os.getpid()))
    envs: list[str] = []
    pending: list[str] = []
    for line in sys.stdin:
        if line.strip():
            pending.append(line)
            continue
        if not pending:
            continue
        raw, pending = "".join(pending), []
        try:
            command = json.loads(raw)
        except ValueError:
            _write({"message": f"Could not parse JSON:\n{raw}"})
            continue
        text = command.get("cmd", "")
        if "FAKE_GARBAGE" in text:
            sys.stdout.write("INTERNAL PANIC: this is not JSON\n\n")
            sys.stdout.flush()
            continue
        _write(_answer(command, envs, args))
        if "FAKE_EXTRA_OUTPUT" in text:
            _write({"env": 0})


if __name__ == "__main__":
    main()
