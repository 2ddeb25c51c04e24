"""The verifier interface every back-end speaks, and a thread-pool base for back-ends that check one proof
per call (Kimina over HTTP, LeanDojo)."""

from __future__ import annotations

import concurrent.futures
import threading
from fd_jax.lean.screen import DEFAULT_HEADER, screen
from fd_jax.lean.types import CRASHED, REJECTED, ProofTask, Verdict
from fd_jax.verification import Verifier  # noqa: F401  (the contract; re-exported for the back-ends)


def gather(futures: list[concurrent.futures.Future[Verdict]]) -> concurrent.futures.Future[list[Verdict]]:
    """One future for the verdicts of `futures`, in order; a cancelled or failed one becomes `crashed`."""
    combined: concurrent.futures.Future[list[Verdict]] = concurrent.futures.Future()
    combined.set_running_or_notify_cancel()
    if not futures:
        combined.set_result([])
        return combined
    remaining = [len(futures)]
    lock = threading.Lock()

    def verdict_of(future: concurrent.futures.Future[Verdict]) -> Verdict:
        if future.cancelled():
            return Verdict(CRASHED, reason="the verifier was closed before this proof ran")
        if (err := future.exception()) is not None:
            return Verdict(CRASHED, reason=f"internal error in the verifier: {err!r}")
        return future.result()

    def on_done(_: concurrent.futures.Future[Verdict]) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        combined.set_result([verdict_of(f) for f in futures])

    for future in futures:
        future.add_done_callback(on_done)
    return combined


class ThreadedVerifier:
    """Screens each task, then runs `_verify_one` on up to `max_concurrency` threads.

    Subclasses implement `_verify_one(task, header) -> Verdict` for a screened task; an exception there
    becomes a `crashed` verdict.
    """

    def __init__(
        self, *, header: str = DEFAULT_HEADER, max_concurrency: int = 8, allow_native_decide: bool = False
    ):
        name = type(self).__name__
        if max_concurrency < 1:
            raise ValueError(f"{name}: max_concurrency must be >= 1, got {max_concurrency}")
        self.header = header
        self.allow_native_decide = allow_native_decide
        self._executor = concurrent.futures.ThreadPoolExecutor(max_concurrency, thread_name_prefix=name)
        self._closed = False

    def _verify_one(self, task: ProofTask, header: str) -> Verdict:
        raise NotImplementedError

    def _check(self, task: ProofTask) -> Verdict:
        header = self.header if task.header is None else task.header
        native = self.allow_native_decide
        reason = screen(task.statement, task.code, allow_native_decide=native, header=header)
        if reason is not None:
            return Verdict(REJECTED, reason=reason)
        try:
            return self._verify_one(task, header)
        except Exception as err:  # one bad task must not fail the batch
            return Verdict(CRASHED, reason=f"{type(self).__name__}: {err!r}")

    def submit(self, tasks: list[ProofTask]) -> concurrent.futures.Future[list[Verdict]]:
        """Queue `tasks`; the future's result is their verdicts, in order."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__}.submit: the verifier is closed")
        return gather([self._executor.submit(self._check, task) for task in tasks])

    def verify_batch(self, tasks: list[ProofTask]) -> list[Verdict]:
        """The verdicts of `tasks`, in order (blocks)."""
        return self.submit(tasks).result()

    def close(self) -> None:
        """Stop the threads; tasks not started yet get `crashed` verdicts."""
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
