"""How many XLA programs this process has built, and the seconds it spent on them: a new padded shape
reaching a jitted function shows up as one more (a stall of seconds on a CPU, minutes for a large model
on a TPU). The trainer logs both with every step (`compile/count`, `compile/seconds`), so a run whose
set of shapes is not closed is visible in metrics.jsonl.

JAX reports each program it compiles, or loads from the persistent compilation cache, as one
`BACKEND_COMPILE_EVENT` with its duration; `install()` subscribes once per process.
"""

from __future__ import annotations

import threading

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_lock = threading.Lock()
_totals = {"count": 0, "seconds": 0.0}
_installed = False


def _listen(event: str, duration_s: float, **_: object) -> None:
    if event == BACKEND_COMPILE_EVENT:
        with _lock:
            _totals["count"] += 1
            _totals["seconds"] += duration_s


def install() -> None:
    """Starts counting (idempotent); programs built before the first call are not counted."""
    global _installed
    with _lock:
        if _installed:
            return
        from jax import monitoring

        monitoring.register_event_duration_secs_listener(_listen)
        _installed = True


def totals() -> dict[str, float]:
    """{"compile/count": programs built since install(), "compile/seconds": their build time}."""
    with _lock:
        return {"compile/count": _totals["count"], "compile/seconds": _totals["seconds"]}
