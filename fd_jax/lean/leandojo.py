"""The `leandojo` back-end (optional extra: `pip install 'fd_jax[leandojo]'`, which installs lean-dojo).

LeanDojo interacts with theorems that exist in a traced Lean repository: it replaces a theorem's proof
with its own REPL tactic and runs tactics against the goal. So this back-end checks a task whose statement
names a theorem of `file_path` in the repository `repo_url` at `commit` (e.g. a miniF2F repository traced
by LeanDojo), by running the task's tactic block (the code after the statement's `:= by`) as one tactic.
Helper declarations before the statement are not available there; a proof that needs them fails.
"""

from __future__ import annotations

import importlib
from typing import Any

from fd_jax.lean.base import ThreadedVerifier
from fd_jax.lean.screen import DEFAULT_HEADER, statement_span, theorem_name
from fd_jax.lean.types import CRASHED, INVALID, SORRY, TIMEOUT, VALID, ProofTask, Verdict


def _import_lean_dojo() -> Any:
    try:
        return importlib.import_module("lean_dojo")
    except ImportError:
        raise ImportError(
            "the `leandojo` Lean back-end needs LeanDojo, which is not installed: pip install "
            "'fd_jax[leandojo]' (or pip install lean-dojo); or use the `local` or `kimina` back-end"
        ) from None


def tactic_block(statement: str, code: str) -> str | None:
    """The tactics after the statement in `code` (its `:= by` dropped), or None if the statement is absent."""
    span = statement_span(statement, code)
    if span is None:
        return None
    rest, given = code[span[1] :], statement.split()
    if given[-1:] != [":="] and given[-2:] != [":=", "by"]:
        rest = rest.lstrip().removeprefix(":=")
    if given[-1:] != ["by"]:
        rest = rest.lstrip().removeprefix("by")
    return rest.strip("\n")


def _message(text: str) -> dict[str, Any]:
    return {"severity": "error", "pos": {"line": 0, "column": 0}, "endPos": None, "data": text}


class LeanDojoVerifier(ThreadedVerifier):
    """Checks proofs through LeanDojo's `Dojo` (see the module docstring).

    repo_url, commit, file_path: the traced repository and the file whose theorems the tasks name.
    timeout_s: LeanDojo's per-theorem timeout. max_concurrency: Dojos run at once (each is a Lean process).
    Raises ImportError with installation instructions when lean-dojo is not installed.
    """

    def __init__(
        self,
        repo_url: str,
        commit: str,
        file_path: str,
        *,
        header: str = DEFAULT_HEADER,
        timeout_s: float = 600.0,
        max_concurrency: int = 1,
        allow_native_decide: bool = False,
    ):
        self._dojo = _import_lean_dojo()
        super().__init__(
            header=header, max_concurrency=max_concurrency, allow_native_decide=allow_native_decide
        )
        self._repo = self._dojo.LeanGitRepo(repo_url, commit)
        self.file_path = file_path
        self.timeout_s = timeout_s

    def _verify_one(self, task: ProofTask, header: str) -> Verdict:
        dojo = self._dojo
        name, tactics = theorem_name(task.statement), tactic_block(task.statement, task.code)
        if name is None or tactics is None:
            return Verdict(CRASHED, reason="LeanDojo needs a `theorem NAME ... := by` statement in the code")
        theorem = dojo.Theorem(self._repo, self.file_path, name)
        try:
            with dojo.Dojo(theorem, timeout=int(self.timeout_s)) as (session, state):
                result = session.run_tac(state, tactics)
        except Exception as err:  # LeanDojo signals timeouts and crashes with its own exception classes
            status = TIMEOUT if "timeout" in type(err).__name__.lower() else CRASHED
            return Verdict(status, reason=f"LeanDojo: {type(err).__name__}: {err}")
        if isinstance(result, dojo.ProofFinished):
            return Verdict(VALID)
        if isinstance(result, dojo.ProofGivenUp):
            return Verdict(SORRY, reason="the proof gave up (sorry)")
        if isinstance(result, dojo.TacticState):
            text = f"unsolved goals\n{result.pp}"
            return Verdict(INVALID, [_message(text)], reason="unsolved goals")
        text = str(getattr(result, "error", result))
        status = TIMEOUT if "timeout" in type(result).__name__.lower() else INVALID
        return Verdict(status, [_message(text)] if status == INVALID else [], reason=text)
