"""The verifier contract: what a task's checker is given (`ProofTask`), what it answers (`Verdict`) and how it
is called (`Verifier`). Every back-end implements it: the Lean pool, Kimina and LeanDojo (`fd_jax.lean`), and
each task's own checker (`fd_jax.tasks`). Nothing here imports the rest of fd_jax.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Protocol

# A verdict's status. `valid` is the only one that earns reward.
VALID = "valid"  # Lean accepted the proof: no error, no sorry, the given statement proved
INVALID = "invalid"  # Lean reported at least one error
SORRY = "sorry"  # the proof elaborated but relies on `sorry`
TIMEOUT = "timeout"  # the wall-clock limit ran out; the worker was killed and restarted
CRASHED = "crashed"  # the worker died, ran out of memory or answered garbage
REJECTED = "rejected"  # screened out before Lean ran (see `reason`)
STATUSES = (VALID, INVALID, SORRY, TIMEOUT, CRASHED, REJECTED)


@dataclasses.dataclass(frozen=True)
class ProofTask:
    """One proof to check.

    statement: the theorem statement as given to the model (it must appear verbatim in `code`).
    code: the complete Lean source the model submitted, statement included, header excluded.
    header: `import`/`open`/`set_option` lines to run before `code`; None means the verifier's default.
    id: the caller's name for this task (problem id, rollout index), echoed in logs.
    """

    statement: str
    code: str
    header: str | None = None
    id: str = ""


@dataclasses.dataclass
class Verdict:
    """What a verifier concluded about one `ProofTask`.

    status: one of STATUSES.
    messages: Lean's messages in the REPL's JSON shape: dicts with `severity` ("error" | "warning" |
      "info"), `pos` and `endPos` ({"line", "column"}, lines 1-based in the submitted `code`) and `data`.
    time_s: wall-clock seconds the check took.
    reason: a human-readable explanation for rejected / timeout / crashed verdicts ("" otherwise).
    """

    status: str
    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    time_s: float = 0.0
    reason: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"Verdict.status must be one of {STATUSES}, got {self.status!r}")

    @property
    def reward(self) -> float:
        return 1.0 if self.status == VALID else 0.0

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("severity") == "error"]


class Verifier(Protocol):
    """What the rollout and evaluation call. Failures are verdicts; only misuse (a closed verifier, a
    non-task) raises. `submit` returns at once, so checking overlaps the caller's next generation; the
    future holds the verdicts in the order of `tasks`. A verifier is a context manager (`close` on exit)."""

    def verify_batch(self, tasks: list[ProofTask]) -> list[Verdict]: ...

    def submit(self, tasks: list[ProofTask]) -> concurrent.futures.Future[list[Verdict]]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Verifier: ...

    def __exit__(self, *exc: Any) -> None: ...
