"""Tools a policy may call within an episode, and the environment that answers its turns.

A call is model output, so untrusted: `<tool>{"name": NAME, "arguments": {...}}</tool>` (JSON inside a
tag, the fallback format of models without a native tool format). Every call goes through a `ToolBox`:
run on a worker thread with a wall-clock timeout, its result cut to `max_output_chars`, and any failure
(unknown tool, bad arguments, an exception, a timeout) turned into an `error: ...` text for the model,
never an exception for the trainer. A thread cannot be killed, so a tool that can run away on its input
(a regular expression) does its work in a subprocess that is killed at its own deadline
(`MathlibSearch`); the thread timeout is the backstop for the rest.

Tools (each `tool(arguments: dict, context: ToolContext) -> str`):
* `calculator`: exact arithmetic on integers and fractions, parsed with `ast` (never `eval`), bounded in
  expression length, exponent and magnitude.
* `lean_check`: compiles `code` for the row's statement with the task's verifier (the Lean pool: the same
  screening and checks as a submission) and returns the verdict and Lean's formatted messages.
* `mathlib_search`: a regular expression over the `.lean` files of a Mathlib tree; at most `max_matches`
  matches as `path:line: text`.
* `read_mathlib`: lines [start, end] of one file of that tree (at most `max_lines`); the path must stay
  inside the tree (relative, no `..`, no symlink leading out).
* `submit`: ends the episode; its one argument, `answer` or `code` (a non-blank string), is what gets
  verified; any other shape is an error for the model (`submission`).
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import fractions
import operator
import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fd_jax.rollout.episodes import Reaction
from fd_jax.tasks.tool_formats import JSON_TAG, JsonTagFormat, ToolFormat, control_strings, neutralize
from fd_jax.tasks.tool_formats import RESULT_TEMPLATE  # noqa: F401 - the json_tag result, re-exported
from fd_jax.verification import ProofTask, Verifier

SUBMIT = "submit"
# The fallback format's call and result (`fd_jax.tasks.tool_formats.JsonTagFormat`).
CALL_OPEN, CALL_CLOSE = JSON_TAG.open, JSON_TAG.close


class ToolError(Exception):
    """A tool's refusal, shown to the model as `error: <message>`."""


@dataclasses.dataclass
class ToolContext:
    """What a tool may know about the episode it serves: the problem's statement and id."""

    statement: str = ""
    problem_id: str = ""


Tool = Callable[[dict[str, Any], ToolContext], str]


def parse_call(text: str) -> tuple[str, dict[str, Any]] | str | None:
    """The `<tool>{json}</tool>` call of a turn as (name, arguments); an error text when it is malformed
    (or several, unclosed, or inside a code block); None when the turn has no call."""
    return JSON_TAG.parse(text)


def _argument(arguments: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = arguments.get(name, default)
    if value is None or not isinstance(value, kind) or isinstance(value, bool):
        raise ToolError(f"argument {name!r} must be a {kind.__name__}, got {value!r}"[:200])
    return value


# -- calculator -------------------------------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


@dataclasses.dataclass(frozen=True)
class Calculator:
    """Exact arithmetic: integers, `+ - * / // % **` and parentheses; `/` is exact (a fraction).

    Bounds: expression length, |exponent| <= max_exponent, every intermediate value below 10**max_digits
    in absolute value (numerator and denominator); outside them, an error text."""

    max_chars: int = 200
    max_exponent: int = 64
    max_digits: int = 100

    def __call__(self, arguments: dict[str, Any], context: ToolContext) -> str:
        expression = _argument(arguments, "expression", str)
        if len(expression) > self.max_chars:
            raise ToolError(f"expression longer than {self.max_chars} characters")
        try:
            tree = ast.parse(expression, mode="eval")
        except SyntaxError:
            raise ToolError(f"cannot parse {expression!r}") from None
        value = self._eval(tree.body)
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"

    def _check(self, value: fractions.Fraction) -> fractions.Fraction:
        limit = 10**self.max_digits
        if abs(value.numerator) >= limit or value.denominator >= limit:
            raise ToolError(f"a value exceeds {self.max_digits} digits")
        return value

    def _eval(self, node: ast.AST) -> fractions.Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return self._check(fractions.Fraction(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            value = self._eval(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self._eval(node.left), self._eval(node.right)
            if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
                raise ToolError("division by zero")
            if isinstance(node.op, ast.Pow):
                if right.denominator != 1 or abs(right) > self.max_exponent:
                    raise ToolError(f"exponents must be integers of at most {self.max_exponent} in size")
                if left == 0 and right < 0:
                    raise ToolError("division by zero")
                # |left| ** |right| digits bound before computing: a huge power would take long to build
                digits = max(len(str(abs(left.numerator))), len(str(left.denominator)))
                if (digits - 1) * abs(int(right)) >= self.max_digits:
                    raise ToolError(f"a value exceeds {self.max_digits} digits")
                return self._check(left ** int(right))
            return self._check(fractions.Fraction(_BINARY[type(node.op)](left, right)))
        raise ToolError(f"only numbers, + - * / // % ** and parentheses are allowed, not {ast.dump(node)[:60]}")


# -- Mathlib tree ------------------------------------------------------------------------------------------

# Runs in a child process: `python -c _SEARCH root pattern max_matches max_line_chars`. Never follows
# symlinks (neither directories nor files), so the search stays inside the tree.
_SEARCH = r"""
import os, re, sys
root, pattern, limit, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rx = re.compile(pattern)
found = 0
for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
    dirnames.sort()
    for name in sorted(filenames):
        path = os.path.join(dirpath, name)
        if not name.endswith(".lean") or os.path.islink(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if rx.search(line):
                    rel = os.path.relpath(path, root)
                    print(f"{rel}:{number}: {line.rstrip()[:width]}", flush=False)
                    found += 1
                    if found >= limit:
                        sys.exit(0)
"""


@dataclasses.dataclass(frozen=True)
class MathlibSearch:
    """`pattern` (a Python regular expression, at most max_pattern_chars) over the tree's `.lean` files.

    The search runs in a subprocess killed after timeout_s: a catastrophic pattern costs at most that.
    Returns at most max_matches lines `path:line: text` (text cut to max_line_chars), or "no match"."""

    root: str
    max_matches: int = 20
    max_pattern_chars: int = 200
    max_line_chars: int = 200
    timeout_s: float = 10.0

    def __call__(self, arguments: dict[str, Any], context: ToolContext) -> str:
        pattern = _argument(arguments, "pattern", str)
        if not pattern or len(pattern) > self.max_pattern_chars:
            raise ToolError(f"pattern must have 1 to {self.max_pattern_chars} characters")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ToolError(f"invalid regular expression: {e}") from None
        command = [sys.executable, "-I", "-c", _SEARCH, self.root, pattern, str(self.max_matches),
                   str(self.max_line_chars)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout_s,
                                  env={"PATH": os.environ.get("PATH", "")}, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:  # the child is killed by subprocess.run
            raise ToolError(f"search timed out after {self.timeout_s:g} s (simplify the pattern)") from None
        if done.returncode != 0:
            raise ToolError(f"search failed: {done.stderr.strip().splitlines()[-1:]}")
        return done.stdout.rstrip("\n") or "no match"


def confined_path(root: str | os.PathLike, path: str) -> pathlib.Path:
    """`root/path` resolved, if it is a `.lean` file inside `root` (symlinks resolved); ToolError otherwise."""
    if not path or "\x00" in path or os.path.isabs(path) or path.startswith("~"):
        raise ToolError(f"path must be relative to the Mathlib tree, got {path!r}"[:200])
    if ".." in pathlib.PurePosixPath(path.replace("\\", "/")).parts:
        raise ToolError("path must not contain '..'")
    base = pathlib.Path(root).resolve()
    target = (base / path).resolve()
    if not target.is_relative_to(base):
        raise ToolError(f"{path!r} leads outside the Mathlib tree"[:200])
    if not target.is_file():
        raise ToolError(f"no such file: {path!r}"[:200])
    if target.suffix != ".lean":  # what mathlib_search shows; build outputs (.olean) and VCS files are not
        raise ToolError(f"only .lean source files can be read, not {path!r}"[:200])
    return target


@dataclasses.dataclass(frozen=True)
class ReadMathlib:
    """Lines [start_line, end_line] (1-based, inclusive) of `path` in the tree: at most max_lines lines of
    at most max_line_chars characters, numbered. Reads only up to end_line."""

    root: str
    max_lines: int = 80
    max_line_chars: int = 200

    def __call__(self, arguments: dict[str, Any], context: ToolContext) -> str:
        target = confined_path(self.root, _argument(arguments, "path", str))
        start = _argument(arguments, "start_line", int, 1)
        end = _argument(arguments, "end_line", int, start + self.max_lines - 1)
        if start < 1 or end < start:
            raise ToolError(f"need 1 <= start_line <= end_line, got {start}..{end}")
        end = min(end, start + self.max_lines - 1)
        lines = []
        with target.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if number > end:
                    break
                if number >= start:
                    lines.append(f"{number}: {line.rstrip()[: self.max_line_chars]}")
        return "\n".join(lines) if lines else f"the file has fewer than {start} lines"


# -- Lean --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeanCheck:
    """Compiles `code` (the whole file, the row's statement included) with the task's verifier: the same
    screening and checks as a submission. Returns the status and Lean's formatted messages."""

    verifier: Verifier
    max_chars: int = 2000

    def __call__(self, arguments: dict[str, Any], context: ToolContext) -> str:
        from fd_jax.lean.formatting import format_errors  # Lean formatting only where Lean is used

        code = _argument(arguments, "code", str)
        verdict = self.verifier.verify_batch([ProofTask(context.statement, code, id=context.problem_id)])[0]
        lines = [f"status: {verdict.status}"] + ([f"reason: {verdict.reason}"] if verdict.reason else [])
        if verdict.messages:
            lines.append(format_errors(code, verdict.messages, max_chars=self.max_chars))
        return "\n".join(lines)


SUBMIT_KEYS = ("answer", "code")


def submission(arguments: dict[str, Any]) -> str | ToolError:
    """What a `submit` call submits: its one argument, `answer` or `code`, a string with a non-blank
    character. Anything else (both keys, neither, another key, a non-string, only whitespace) is a
    ToolError to show the model: an ambiguous submission is never resolved by guessing which one counts."""
    keys = sorted(arguments)
    if len(keys) != 1 or keys[0] not in SUBMIT_KEYS:
        return ToolError(f"submit takes exactly one argument, 'answer' or 'code'; got {keys}"[:200])
    value = arguments[keys[0]]
    if not isinstance(value, str) or not value.strip():
        return ToolError(f"submit's {keys[0]!r} must be a non-empty string, got {value!r}"[:200])
    return value


def submit_tool(arguments: dict[str, Any], context: ToolContext) -> str:
    """Never run: the environment ends the episode on a `submit` call."""
    return "submitted"


# -- running calls -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class ToolResult:
    text: str
    ok: bool
    time_s: float


class ToolBox:
    """Runs calls concurrently on `workers` threads, each with a `timeout_s` deadline; results are cut to
    `max_output_chars`. `run` never raises: failures are `error: ...` texts with ok=False. A call that
    times out leaves its thread running until the tool returns (tools with unbounded work use a
    subprocess with its own timeout); the episode goes on without waiting for it."""

    def __init__(self, tools: Mapping[str, Tool], *, timeout_s: float = 120.0, max_output_chars: int = 4000,
                 workers: int = 8):
        self.tools = dict(tools)
        self.timeout_s = timeout_s
        self.max_output_chars = max_output_chars
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tool")

    def _call(self, name: str, arguments: dict[str, Any], context: ToolContext) -> str:
        return str(self.tools[name](arguments, context))

    def run(self, calls: Sequence[tuple[str, dict[str, Any], ToolContext]]) -> list[ToolResult]:
        start = time.perf_counter()
        futures = []
        for name, arguments, context in calls:
            futures.append(self._pool.submit(self._call, name, arguments, context) if name in self.tools else None)
        results = []
        for (name, _, _), future in zip(calls, futures):
            if future is None:
                results.append(ToolResult(f"error: unknown tool {name[:60]!r}; tools: {sorted(self.tools)}",
                                          False, 0.0))
                continue
            remaining = max(0.0, self.timeout_s - (time.perf_counter() - start))
            try:
                text, ok = future.result(timeout=remaining), True
            except concurrent.futures.TimeoutError:
                text, ok = f"error: {name} timed out after {self.timeout_s:g} s", False
            except ToolError as e:
                text, ok = f"error: {e}", False
            except Exception as e:  # noqa: BLE001 - a tool's bug is the model's error text, not the trainer's
                text, ok = f"error: {name} failed: {type(e).__name__}: {e}"[:500], False
            if len(text) > self.max_output_chars:
                text = text[: self.max_output_chars] + f"\n... (cut at {self.max_output_chars} characters)"
            results.append(ToolResult(text, ok, time.perf_counter() - start))
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_CUT_NOTE = "\n... (cut)"


class ToolEnvironment:
    """`fd_jax.rollout.episodes.Environment` over a ToolBox, in a tool-call format (`fd_jax.tasks.tool_formats`,
    `json_tag` by default): a turn with a call gets the tool's result as its observation; a malformed
    call gets an `error: ...` result; a `submit` call, or a turn without a call (an answer), ends the
    episode. `final[b]`: the text to verify for row b (submit's `answer` or `code`, else the last turn's
    text); `calls[b]`: the row's calls with results and timings, for the logs.

    messages[b]: the row's chat so far (a native format renders each result through the chat template
    after it; the prompt's messages at the start, then the turns and results are appended here).
    tokenizer: its special and added tokens are control strings, never left whole in a result.
    fit: (encode, max_tokens): a result is cut until its observation (scaffolding included) encodes to at
    most max_tokens, so the episode's own cut at max_obs_tokens never cuts a native format's scaffolding."""

    def __init__(self, toolbox: ToolBox, contexts: Sequence[ToolContext], *, tool_format: ToolFormat | None = None,
                 messages: Sequence[Sequence[dict[str, Any]]] | None = None,
                 fit: tuple[Callable[[str], Sequence[int]], int] | None = None, tokenizer: Any = None):
        self.toolbox = toolbox
        self.contexts = list(contexts)
        self.format = tool_format if tool_format is not None else JsonTagFormat()
        if self.format.native and messages is None:
            raise ValueError(f"tool format {self.format.name} needs each row's prompt messages")
        self.messages = [list(m) for m in messages] if messages is not None else [[] for _ in contexts]
        self.fit = fit
        self.controls = control_strings(self.format, tokenizer)  # never in a result as such (`neutralize`)
        self.final: list[str | None] = [None] * len(contexts)
        self.calls: list[list[dict[str, Any]]] = [[] for _ in contexts]

    def _observe(self, b: int, result: str, name: str | None) -> str:
        # A result often echoes model text (arguments in errors, code in Lean's messages): broken control
        # strings keep the model from writing scaffolding (a closed result, a new turn) through a tool.
        result = neutralize(result, self.controls)
        text = self.format.observation(self.messages[b], result, name)
        for _ in range(8 if self.fit is not None else 0):  # each pass cuts the result by its share of the excess
            encode, limit = self.fit
            count = len(encode(text))
            if count <= limit or not result:
                break
            content = max(1, len(encode(result)))
            room = limit - (count - content) - len(encode(_CUT_NOTE))  # what the scaffolding leaves
            keep = min(len(result) - 1, int(len(result) * room / content)) if room > 0 else 0
            result = result[:keep] + _CUT_NOTE if keep > 0 else ""
            text = self.format.observation(self.messages[b], result, name)
        self.messages[b].append({"role": "tool", "content": result, **({"name": name} if name else {})})
        return text

    def react(self, rows: Sequence[int], turn_texts: Sequence[str], ended: Sequence[bool]) -> list[Reaction]:
        reactions: dict[int, Reaction] = {}
        pending = []
        for i, (b, text) in enumerate(zip(rows, turn_texts)):
            self.messages[b].append({"role": "assistant", "content": text})
            parsed = self.format.parse(text)
            if parsed is None or (ended[i] and not self.format.calls_end_turns):  # an answer: the episode is over
                self.final[b] = text
                reactions[i] = Reaction(done=True)
            elif isinstance(parsed, str):  # a malformed call: tell the model
                self.calls[b].append({"name": None, "arguments": None, "result": parsed, "ok": False, "time_s": 0.0})
                reactions[i] = Reaction(observation=self._observe(b, parsed, None), call={"name": None})
            elif parsed[0] == SUBMIT:
                args = parsed[1]
                answer = submission(args)
                if isinstance(answer, ToolError):  # ambiguous or empty: never guessed, the model is told
                    error = f"error: {answer}"
                    self.calls[b].append({"name": SUBMIT, "arguments": args, "result": error, "ok": False,
                                          "time_s": 0.0})
                    reactions[i] = Reaction(observation=self._observe(b, error, SUBMIT), call={"name": SUBMIT})
                    continue
                self.final[b] = answer
                self.calls[b].append({"name": SUBMIT, "arguments": args, "result": None, "ok": True, "time_s": 0.0})
                reactions[i] = Reaction(done=True, call={"name": SUBMIT, "arguments": args})
            else:
                pending.append((i, b, parsed))
        results = self.toolbox.run([(name, args, self.contexts[b]) for _, b, (name, args) in pending])
        for (i, b, (name, args)), result in zip(pending, results):
            call = {"name": name, "arguments": args}
            self.calls[b].append({**call, "result": result.text, "ok": result.ok, "time_s": result.time_s})
            reactions[i] = Reaction(observation=self._observe(b, result.text, name), call=call, time_s=result.time_s)
        return [reactions[i] for i in range(len(rows))]


# JSON schemas of the tools (OpenAI function style), the `tools=` a native format's chat template renders.
_STRING = {"type": "string"}
_INTEGER = {"type": "integer"}
# name -> (description, properties, required)
SCHEMAS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "calculator": ("Exact arithmetic on integers: + - * / // % ** and parentheses.", {"expression": _STRING},
                   ["expression"]),
    "lean_check": ("Compile a complete Lean 4 file (statement included) and return Lean's messages.",
                   {"code": _STRING}, ["code"]),
    "mathlib_search": ("Search the Mathlib sources with a regular expression; matches as file:line: text.",
                       {"pattern": _STRING}, ["pattern"]),
    "read_mathlib": ("Read lines start_line..end_line of a Mathlib file.",
                     {"path": _STRING, "start_line": _INTEGER, "end_line": _INTEGER}, ["path"]),
    SUBMIT: ("Submit the final answer (arithmetic: answer) or the complete proof (Lean: code); ends the attempt.",
             {"answer": _STRING, "code": _STRING}, []),
}


def tool_schemas(names: Sequence[str]) -> list[dict[str, Any]]:
    """The schemas of `names` (in that order) as `apply_chat_template(tools=...)` takes them; a tool
    without a schema gets one with free-form arguments."""
    out = []
    for name in names:
        description, properties, required = SCHEMAS.get(name, (f"the {name} tool", {}, []))
        out.append({"type": "function", "function": {"name": name, "description": description, "parameters": {
            "type": "object", "properties": properties, "required": required}}})
    return out


def default_tools(*, mathlib_root: str | None = None, verifier: Verifier | None = None,
                  search_matches: int = 20, read_lines: int = 80, timeout_s: float = 120.0) -> dict[str, Tool]:
    """The tools available with what is configured: `calculator` and `submit` always, `mathlib_search`
    and `read_mathlib` with a Mathlib tree, `lean_check` with a verifier."""
    tools: dict[str, Tool] = {"calculator": Calculator(), SUBMIT: submit_tool}
    if mathlib_root:
        tools["mathlib_search"] = MathlibSearch(mathlib_root, max_matches=search_matches, timeout_s=timeout_s)
        tools["read_mathlib"] = ReadMathlib(mathlib_root, max_lines=read_lines)
    if verifier is not None:
        tools["lean_check"] = LeanCheck(verifier)
    return tools
