"""One Lean REPL process: started in its own process group with a scrubbed environment and an address-space
limit, spoken to with deadlines, killed with everything it started.

Nothing here blocks without a deadline: stdin and stdout are non-blocking and waited on with `poll`, so a
REPL that hangs, stops reading, or floods its output costs at most the timeout. Failures are exceptions
(`ReplTimeout`, `ReplCrashed`) that the pool turns into verdicts.
"""

from __future__ import annotations

import json
import os
import pathlib
import select
import shlex
import signal
import subprocess
import time
from typing import Any

# Variables the REPL, lake and elan need; everything else (credentials, PYTHONPATH, ...) is dropped.
KEPT_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "ELAN_HOME", "ELAN_TOOLCHAIN", "LEAN_PATH", "LEAN_SRC_PATH",
            "LAKE_HOME", "LEAN_NUM_THREADS", "LEAN_SYSROOT")  # fmt: skip
_READ_CHUNK = 1 << 16
_STDERR_TAIL = 400


class ReplError(Exception):
    """The REPL did not answer a command; `str(error)` says why."""


class ReplTimeout(ReplError):
    """No complete answer before the deadline."""


class ReplCrashed(ReplError):
    """The REPL exited, broke a pipe or answered something that is not a JSON object."""


def scrubbed_env(home: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a REPL process: KEPT_ENV from ours, HOME and TMPDIR set to `home`, then `extra`.

    elan finds its toolchains through ELAN_HOME, which defaults to `~/.elan` of the real home; since HOME
    is replaced, ELAN_HOME is set explicitly to that directory when it exists and is not set already.
    """
    env = {key: os.environ[key] for key in KEPT_ENV if key in os.environ}
    real_elan = pathlib.Path.home() / ".elan"
    if "ELAN_HOME" not in env and real_elan.is_dir():
        env["ELAN_HOME"] = str(real_elan)
    env.update(HOME=home, TMPDIR=home)
    env.update(extra or {})
    return env


def _limited(command: list[str], memory_limit_mb: int | None) -> list[str]:
    """`command` run under RLIMIT_AS = memory_limit_mb, through `sh -c 'ulimit -v ...; exec ...'`.

    The shell sets the limit and replaces itself with the REPL; unlike `preexec_fn`, it is safe to use
    from a multi-threaded process (the pool starts workers from its threads).
    """
    if not memory_limit_mb:
        return list(command)
    return ["/bin/sh", "-c", f'ulimit -v {int(memory_limit_mb) * 1024} && exec "$@"', "repl", *command]


def _has_exited(proc: subprocess.Popen) -> bool:
    """True if `proc` has exited, without reaping it where the OS allows (its group id then stays reserved
    until `kill`, so signalling the group cannot hit an unrelated process that reused the id)."""
    if not hasattr(os, "waitid"):  # macOS: reaping is the only way to ask
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


class ReplProcess:
    """A started REPL. Use `request` for each command; call `kill` when done (also after any ReplError)."""

    def __init__(
        self,
        command: list[str],
        *,
        workdir: str,
        cwd: str | None = None,
        memory_limit_mb: int | None = None,
        extra_env: dict[str, str] | None = None,
    ):
        """Start `command` in its own session (process group), cwd `cwd` or else `workdir`.

        workdir: a private directory: HOME and TMPDIR of the process, and where its stderr is kept.
        Raises OSError (e.g. FileNotFoundError) if the command cannot be started.
        """
        self.command = list(command)
        self._stderr = open(os.path.join(workdir, "repl.stderr"), "w+b")  # noqa: SIM115 (closed in kill)
        try:
            self._proc = subprocess.Popen(
                _limited(self.command, memory_limit_mb),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                cwd=cwd or workdir,
                env=scrubbed_env(workdir, extra_env),
                start_new_session=True,
                close_fds=True,
            )
        except BaseException:
            self._stderr.close()
            raise
        self.pid = self.pgid = self._proc.pid  # a new session: the process leads its own group
        self._in, self._out = self._proc.stdin.fileno(), self._proc.stdout.fileno()
        os.set_blocking(self._in, False)
        os.set_blocking(self._out, False)
        self._readable, self._writable = select.poll(), select.poll()
        self._readable.register(self._out, select.POLLIN | select.POLLHUP | select.POLLERR)
        self._writable.register(self._in, select.POLLOUT | select.POLLERR)
        self._buffer = bytearray()
        self._scanned = 0
        self._killed = False

    @property
    def alive(self) -> bool:
        return not self._killed and self._proc.poll() is None

    def request(self, command: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send one command and return its answer; ReplTimeout after `timeout_s` seconds, ReplCrashed if the
        process dies or answers garbage. The process is unusable after either: kill it."""
        deadline = time.monotonic() + timeout_s
        self._write(json.dumps(command, ensure_ascii=False).encode(errors="replace") + b"\n\n", deadline)
        return self._read_answer(deadline)

    def stray_output(self) -> bytes:
        """Whatever the process printed that no command asked for (read without waiting)."""
        while self._readable.poll(0):
            try:
                data = os.read(self._out, _READ_CHUNK)
            except BlockingIOError:
                break
            if not data:
                break
            self._buffer += data
        return bytes(self._buffer).strip()

    def terminate_group(self) -> None:
        """SIGKILL the whole process group (the REPL and anything it started, e.g. under `lake env`).

        Safe to call from any thread: it only sends a signal, so a thread blocked in `request` on this
        process returns promptly with ReplCrashed. The owner still calls `kill` to reap and close pipes.
        """
        if self._proc.returncode is None:  # once reaped, the group id may belong to someone else
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self) -> None:
        """Kill the process group, reap the REPL, close the pipes. Only the thread using it calls this."""
        if self._killed:
            return
        self._killed = True
        self.terminate_group()  # even if the REPL itself has exited, what it started may still run
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # unkillable (uninterruptible sleep); the OS reaps it later
            pass
        for stream in (self._proc.stdin, self._proc.stdout, self._stderr):
            try:
                stream.close()
            except OSError:
                pass

    def _write(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReplTimeout("the REPL stopped reading its input")
            if not self._writable.poll(remaining * 1000):
                continue
            try:
                view = view[os.write(self._in, view) :]
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                raise ReplCrashed(self._death_reason()) from None

    def _read_answer(self, deadline: float) -> dict[str, Any]:
        while True:
            end = self._buffer.find(b"\n\n", self._scanned)
            if end >= 0:
                chunk = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                self._scanned = 0
                if not chunk.strip():
                    continue
                try:
                    answer = json.loads(chunk)
                except (ValueError, RecursionError):  # RecursionError: JSON nested too deeply
                    raise ReplCrashed(f"the REPL printed something not JSON: {chunk[:200]!r}") from None
                if not isinstance(answer, dict):
                    raise ReplCrashed(f"the REPL printed a JSON {type(answer).__name__}, not an object")
                return answer
            self._scanned = max(0, len(self._buffer) - 1)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReplTimeout("no answer before the deadline")
            if not self._readable.poll(remaining * 1000):
                continue
            try:
                data = os.read(self._out, _READ_CHUNK)
            except BlockingIOError:
                continue
            if not data:
                raise ReplCrashed(self._death_reason())
            self._buffer += data

    def _death_reason(self) -> str:
        """Why the process went away: its exit status and the end of its stderr. Kills the group first."""
        deadline = time.monotonic() + 0.5  # it closed its output: usually it is exiting; let it say why
        while time.monotonic() < deadline and not _has_exited(self._proc):
            time.sleep(0.005)
        self.kill()
        code = self._proc.returncode
        if code is None:
            status = "closed its output"
        elif code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            status = f"was killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
        else:
            status = f"exited with status {code}"
        try:
            with open(self._stderr.name, "rb") as err:
                err.seek(max(0, os.path.getsize(self._stderr.name) - _STDERR_TAIL))
                tail = err.read().decode(errors="replace").strip()
        except OSError:
            tail = ""
        command = shlex.join(self.command)
        return f"the REPL ({command}) {status}" + (f"; stderr ends: {tail}" if tail else "")
