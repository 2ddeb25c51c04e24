"""The local back-end: a pool of Lean REPL processes on this host.

Each worker is a thread that owns one REPL process (`process.ReplProcess`) and takes tasks from a shared
queue, so a slow proof never holds up the others. A worker loads the header once per process (its `env`
is reused for every proof), kills the process group and starts a fresh, pre-warmed one after a timeout,
a crash, garbage on stdout or `max_uses` proofs, and turns every failure into a verdict: `verify_batch`
and the futures of `submit` never raise because of Lean.

Shutdown: `close()` (also run by `with`, at interpreter exit and when the verifier is garbage collected)
kills every process group, answers still-queued tasks with `crashed` verdicts and removes the temporary
directories. A KeyboardInterrupt in the caller ends the program through the same exit hook. REPL
processes run in their own sessions, so a terminal's Ctrl-C does not reach them directly. A trainer killed
without a chance to clean up (SIGKILL, SIGTERM's default action) closes the REPLs' input by dying, and
an idle REPL exits at the end of its input; one busy with a runaway proof exits only when that proof
ends, so the job system should reap the session's process groups.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import queue
import shutil
import tempfile
import threading
import time
import weakref
from typing import Any

from fd_jax.lean.process import ReplCrashed, ReplError, ReplProcess, ReplTimeout
from fd_jax.lean.protocol import audit_command, audit_verdict, classify, header_command, proof_command
from fd_jax.lean.screen import DEFAULT_HEADER, screen, theorem_name
from fd_jax.lean.types import CRASHED, REJECTED, TIMEOUT, VALID, ProofTask, Verdict


@dataclasses.dataclass(frozen=True)
class _Config:
    """LeanVerifier's arguments, as the workers read them (see LeanVerifier for their meaning)."""

    repl_command: tuple[str, ...]
    header: str
    timeout_s: float
    memory_limit_mb: int | None
    max_uses: int
    cwd: str | None
    startup_timeout_s: float
    allow_native_decide: bool
    audit_axioms: bool
    extra_env: dict[str, str]


class _Stats:
    """Counters shared by the worker threads."""

    def __init__(self):
        self._counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def add(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class _Batch:
    """The verdicts of one `submit` call, filled in by the workers in any order."""

    def __init__(self, size: int):
        self.future: concurrent.futures.Future[list[Verdict]] = concurrent.futures.Future()
        self.future.set_running_or_notify_cancel()
        self._verdicts: list[Verdict | None] = [None] * size
        self._remaining = size
        self._lock = threading.Lock()
        if size == 0:
            self.future.set_result([])

    def put(self, index: int, verdict: Verdict) -> None:
        with self._lock:
            self._verdicts[index] = verdict
            self._remaining -= 1
            done = self._remaining == 0
        if done:
            self.future.set_result(list(self._verdicts))  # type: ignore[arg-type]


class _Worker(threading.Thread):
    """One REPL process and the thread that drives it."""

    def __init__(self, index: int, config: _Config, tasks: queue.SimpleQueue, stats: _Stats):
        super().__init__(name=f"fd_jax-lean-worker-{index}", daemon=True)
        self.config = config
        self.tasks = tasks
        self.stats = stats
        self.workdir = tempfile.mkdtemp(prefix=f"fd_jax_lean_{index}_")
        self.ready = threading.Event()
        self._proc: ReplProcess | None = None
        self._envs: dict[str, int] = {}  # header text -> env id in the current process
        self._last_env = -1  # the REPL numbers environments in order: an older id means a stale answer
        self._uses = 0
        self._lock = threading.Lock()  # orders process replacement against shutdown
        self._closed = False

    @property
    def pgid(self) -> int | None:
        proc = self._proc
        return proc.pgid if proc is not None else None

    def run(self) -> None:
        self._warm()
        while (item := self.tasks.get()) is not None:
            batch, index, task = item
            try:
                verdict = self._check(task)
            except Exception as err:  # a bug here must not hang the caller's future
                self._discard()
                verdict = Verdict(CRASHED, reason=f"internal error in the Lean pool: {err!r}")
            batch.put(index, verdict)
            if self._proc is None and not self._closed:
                self._warm()  # restart now, while the other workers keep going
        self._discard()

    def shutdown(self) -> None:
        """From another thread: no new processes, and kill the current one's group (unblocking `run`)."""
        with self._lock:
            self._closed = True
            if self._proc is not None:
                self._proc.terminate_group()

    def _warm(self) -> None:
        try:
            self._env_for(self.config.header)
        except (ReplError, OSError):
            pass  # remembered as a dead process; the next task retries and reports the failure
        finally:
            self.ready.set()

    def _start(self) -> None:
        with self._lock:
            if self._closed:
                raise ReplCrashed("the verifier was closed")
            self._proc = ReplProcess(
                list(self.config.repl_command),
                workdir=self.workdir,
                cwd=self.config.cwd,
                memory_limit_mb=self.config.memory_limit_mb,
                extra_env=self.config.extra_env,
            )
        self._envs, self._uses, self._last_env = {}, 0, -1
        self.stats.add("processes_started")

    def _discard(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
        self._envs = {}

    def _request(self, command: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """The answer to `command`; ReplCrashed if it is not newer than every answer before it."""
        answer = self._proc.request(command, timeout_s)
        env = answer.get("env")
        if isinstance(env, int):
            if env <= self._last_env:
                raise ReplCrashed(f"the REPL's answers are out of step (env {env} after {self._last_env})")
            self._last_env = env
        return answer

    def _env_for(self, header: str) -> int:
        """The env id of `header` in a live process, starting the process and loading the header if needed."""
        if self._proc is not None and (not self._proc.alive or self._proc.stray_output()):
            self._discard()  # died while idle, or printed something unasked: out of step with us
        if self._proc is None:
            self._start()
        if header not in self._envs:
            try:
                answer = self._request(header_command(header), self.config.startup_timeout_s)
            except ReplError:
                self._discard()
                raise
            verdict = classify(answer)
            if verdict.status != VALID or not isinstance(answer.get("env"), int):
                self._discard()
                errors = "; ".join(m["data"] for m in verdict.errors) or verdict.reason or str(answer)[:300]
                raise ReplCrashed(f"the header failed to load: {errors}")
            self._envs[header] = answer["env"]
            self.stats.add("headers_loaded")
        return self._envs[header]

    def _check(self, task: ProofTask) -> Verdict:
        config = self.config
        header = config.header if task.header is None else task.header
        native = config.allow_native_decide
        reason = screen(task.statement, task.code, allow_native_decide=native, header=header)
        if reason is not None:
            self.stats.add("rejected")
            return Verdict(REJECTED, reason=reason)
        try:
            env = self._env_for(header)
        except (ReplError, OSError) as err:
            self.stats.add("crashed")
            return Verdict(CRASHED, reason=f"could not start the REPL or load the header: {err}")
        start = time.monotonic()
        try:
            answer = self._request(proof_command(task.code, env), config.timeout_s)
            verdict = classify(answer)
            name = theorem_name(task.statement)
            if verdict.status == VALID and not isinstance(answer.get("env"), int):
                verdict = Verdict(CRASHED, reason=f"the REPL answered without an env: {str(answer)[:200]}")
            elif verdict.status == VALID and config.audit_axioms and name:
                audit = self._request(audit_command(name, answer["env"]), config.timeout_s)
                if override := audit_verdict(name, audit, allow_native_decide=native):
                    verdict = dataclasses.replace(override, messages=verdict.messages + override.messages)
        except ReplTimeout:
            self._discard()
            self.stats.add("timeouts")
            why = f"no answer within {config.timeout_s:g} s; the REPL was killed and restarted"
            return Verdict(TIMEOUT, time_s=time.monotonic() - start, reason=why)
        except ReplCrashed as err:
            self._discard()
            self.stats.add("crashed")
            return Verdict(CRASHED, time_s=time.monotonic() - start, reason=str(err))
        verdict.time_s = time.monotonic() - start
        self.stats.add("proofs")
        self._uses += 1
        if verdict.status == CRASHED:  # a protocol error: the process is in an unknown state
            self.stats.add("crashed")
            self._discard()
        elif self._uses >= config.max_uses:  # the REPL's memory grows with every command
            self.stats.add("recycled")
            self._discard()
        return verdict


def _shutdown(workers: list[_Worker], tasks: queue.SimpleQueue) -> None:
    for worker in workers:
        worker.shutdown()
    for _ in workers:
        tasks.put(None)
    for worker in workers:
        if worker.is_alive() and worker is not threading.current_thread():
            worker.join(timeout=15)
        shutil.rmtree(worker.workdir, ignore_errors=True)


def _check_command(repl_command: list[str], cwd: str | None) -> None:
    """Fail early, with what to do, on a command that cannot work (later failures are verdicts)."""
    if not isinstance(repl_command, (list, tuple)) or not repl_command or not all(
        isinstance(arg, str) for arg in repl_command
    ):
        raise ValueError(f"LeanVerifier: repl_command must be a non-empty list of strings: {repl_command!r}")
    if cwd is not None and not os.path.isdir(cwd):
        raise FileNotFoundError(
            f"LeanVerifier: cwd={cwd!r} is not a directory (use the Mathlib project setup_lean.sh prints)"
        )
    program = repl_command[0]
    relative_ok = os.sep in program and os.access(os.path.join(cwd or "", program), os.X_OK)
    if shutil.which(program) is None and not relative_ok:
        raise FileNotFoundError(
            f"LeanVerifier: repl_command[0]={program!r} is not an executable on PATH; run "
            "scripts/setup_lean.sh and use the repl_command it prints"
        )


class LeanVerifier:
    """Checks proofs with a pool of Lean REPL processes (the `local` back-end).

    repl_command: how to start one REPL, e.g. `["lake", "env", "/path/to/repl/.lake/build/bin/repl"]` with
      `cwd` the Mathlib project (both printed by scripts/setup_lean.sh).
    header: Lean source run once per process before any proof (imports, options, opens); a task's own
      `header` overrides it (each distinct header is loaded once per process).
    workers: REPL processes (default: CPU cores - 1, at least 1).
    timeout_s: wall-clock limit per proof; past it the process group is killed and restarted.
    memory_limit_mb: RLIMIT_AS per process (recent Mathlib needs >= 9 GB); None for no limit.
    max_uses: proofs per process before it is recycled (the REPL's memory grows with each command).
    cwd: working directory of the processes; default a private temporary directory per worker.
    startup_timeout_s: limit for starting a process and loading the header (importing Mathlib).
    allow_native_decide: accept `native_decide` (trusts the compiler); passed to `screen`.
    audit_axioms: after a valid proof, ask `#print axioms NAME` and refuse non-standard axioms.
    extra_env: variables added to the processes' scrubbed environment.

    Workers start and load the header at construction, concurrently; `wait_ready` waits for that.
    Raises ValueError / FileNotFoundError for a bad configuration; after that, failures are verdicts.
    """

    def __init__(
        self,
        repl_command: list[str],
        *,
        header: str = DEFAULT_HEADER,
        workers: int | None = None,
        timeout_s: float = 60.0,
        memory_limit_mb: int | None = 16384,
        max_uses: int = 100,
        cwd: str | None = None,
        startup_timeout_s: float = 600.0,
        allow_native_decide: bool = False,
        audit_axioms: bool = True,
        extra_env: dict[str, str] | None = None,
    ):
        _check_command(repl_command, cwd)
        workers = max(1, (os.cpu_count() or 2) - 1) if workers is None else workers
        for name, value in (("workers", workers), ("timeout_s", timeout_s), ("max_uses", max_uses),
                            ("startup_timeout_s", startup_timeout_s)):  # fmt: skip
            if value <= 0:
                raise ValueError(f"LeanVerifier: {name} must be positive, got {value!r}")
        config = _Config(
            repl_command=tuple(repl_command),
            header=header,
            timeout_s=float(timeout_s),
            memory_limit_mb=memory_limit_mb,
            max_uses=int(max_uses),
            cwd=cwd,
            startup_timeout_s=float(startup_timeout_s),
            allow_native_decide=allow_native_decide,
            audit_axioms=audit_axioms,
            extra_env=dict(extra_env or {}),
        )
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._stats = _Stats()
        self._workers = [_Worker(i, config, self._tasks, self._stats) for i in range(int(workers))]
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._tasks)
        for worker in self._workers:
            worker.start()

    def submit(self, tasks: list[ProofTask]) -> concurrent.futures.Future[list[Verdict]]:
        """Queue `tasks` and return at once; the future's result is their verdicts, in order. It never fails
        because of Lean (failures are verdicts). Raises RuntimeError if the verifier is closed."""
        if self._closed:
            raise RuntimeError("LeanVerifier.submit: the verifier is closed")
        tasks = list(tasks)
        for i, task in enumerate(tasks):
            if not isinstance(task, ProofTask):
                raise TypeError(f"LeanVerifier.submit: tasks[{i}] is a {type(task).__name__}, not ProofTask")
        batch = _Batch(len(tasks))
        for i, task in enumerate(tasks):
            self._tasks.put((batch, i, task))
        return batch.future

    def verify_batch(self, tasks: list[ProofTask]) -> list[Verdict]:
        """The verdicts of `tasks`, in order (blocks; see `submit` for the asynchronous form)."""
        return self.submit(tasks).result()

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Wait until every worker has tried to start and load the header; True if all did in time."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for worker in self._workers:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not worker.ready.wait(remaining):
                return False
        return True

    def process_groups(self) -> list[int]:
        """Process group ids of the live REPL processes (for monitoring and tests)."""
        return [pgid for worker in self._workers if (pgid := worker.pgid) is not None]

    def stats(self) -> dict[str, int]:
        """Counters: proofs, rejected, timeouts, crashed, recycled, processes_started, headers_loaded."""
        return self._stats.snapshot()

    def close(self) -> None:
        """Kill every REPL process group, answer queued tasks with `crashed`, remove temporary directories."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> LeanVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
