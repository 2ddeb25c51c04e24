"""The local REPL pool against a stand-in REPL (tests/lean/fake_repl.py) that hangs, crashes, prints garbage and
exhausts its memory on demand: right verdicts, bounded time, recovery, and no process left behind."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fd_jax.lean import LeanVerifier, ProofTask
from fd_jax.lean.process import KEPT_ENV

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="process checks read /proc (Linux)")

REPO = pathlib.Path(__file__).resolve().parents[2]
FAKE = REPO / "tests" / "lean" / "fake_repl.py"
STATEMENT = "theorem t : 1 = 1 := by"


def task(body: str, *, prefix: str = "", header: str | None = None) -> ProofTask:
    return ProofTask(STATEMENT, f"{prefix}{STATEMENT}\n  {body}\n", header=header)


def fake(tmp_path: pathlib.Path, *options: str) -> list[str]:
    return [sys.executable, str(FAKE), "--header-log", str(tmp_path / "headers.log"),
            "--pid-log", str(tmp_path / "pids.log"), *options]  # fmt: skip


def header_log(tmp_path: pathlib.Path) -> list[tuple[int, str]]:
    path = tmp_path / "headers.log"
    if not path.exists():
        return []
    return [(int(pid), sha) for pid, sha in map(str.split, path.read_text().splitlines())]


def logged_pids(tmp_path: pathlib.Path) -> set[int]:
    path = tmp_path / "pids.log"
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def _state(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of a process, from /proc; None if there is no such process."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def running(pids) -> set[int]:
    """The pids that are live processes (zombies waiting for their parent to reap them do not count)."""
    return {pid for pid in pids if (state := _state(pid)) is not None and state[0] != "Z"}


def group_members(pgids) -> set[int]:
    """Live processes whose process group is in `pgids`."""
    pgids = set(pgids)
    members = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (state := _state(int(entry))) and state[0] != "Z" and state[1] in pgids:
            members.add(int(entry))
    return members


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_verdicts_for_every_misbehaviour(tmp_path):
    batch = [
        task("rfl"),
        task("FAKE_ERROR", prefix="import Mathlib\n"),  # the import line is blanked, not removed
        task("FAKE_HANG"),
        task("FAKE_CRASH"),
        task("FAKE_GARBAGE"),
        task("FAKE_OOM"),
        task("FAKE_OLD_SORRY"),
        task("FAKE_AXIOM"),  # Lean said nothing, but the proof depends on sorryAx
        task("FAKE_NATIVE_AXIOM"),
        task("sorry"),
    ]
    with LeanVerifier(fake(tmp_path), workers=2, timeout_s=1.0, memory_limit_mb=400) as verifier:
        start = time.monotonic()
        verdicts = verifier.verify_batch(batch)
        wall = time.monotonic() - start
        assert [v.status for v in verdicts] == [
            "valid", "invalid", "timeout", "crashed", "crashed", "crashed", "sorry", "sorry", "invalid",
            "rejected",
        ]  # fmt: skip
        # One task hangs: the batch costs one timeout plus process (re)starts, never a timeout per task
        # (10 x 1 s); the rest of the margin is for worker restarts on a loaded machine.
        assert wall < len(batch) * 1.0
        assert verdicts[1].errors == [
            {"severity": "error", "pos": {"line": 3, "column": 2}, "endPos": {"line": 3, "column": 12},
             "data": "Unknown identifier `FAKE_ERROR`"}
        ]  # fmt: skip
        # waited the whole timeout, and was not left to run on (a second timeout's worth is slack for load)
        assert 1.0 <= verdicts[2].time_s < 3.0 and "killed and restarted" in verdicts[2].reason
        assert "SIGSEGV" in verdicts[3].reason
        assert "not JSON" in verdicts[4].reason
        assert "MemoryError" in verdicts[5].reason  # RLIMIT_AS stopped the allocation
        assert verdicts[6].messages[0]["data"] == "declaration uses `sorry`"
        assert "sorryAx" in verdicts[7].reason and "Lean.ofReduceBool" in verdicts[8].reason
        assert "sorry" in verdicts[9].reason
        stats = verifier.stats()
        assert stats["timeouts"] == 1 and stats["crashed"] == 3 and stats["rejected"] == 1
        # Still works, on fresh processes where needed.
        assert {v.status for v in verifier.verify_batch([task("rfl")] * 6)} == {"valid"}
        groups = verifier.process_groups()
    assert not running(logged_pids(tmp_path)) and not group_members(groups)


def test_header_loaded_once_per_process(tmp_path):
    with LeanVerifier(fake(tmp_path), workers=2, timeout_s=5, max_uses=1000) as verifier:
        assert verifier.wait_ready(10)
        for _ in range(3):
            assert {v.status for v in verifier.verify_batch([task("rfl")] * 10)} == {"valid"}
        log = header_log(tmp_path)
        assert len(log) == 2 and len({pid for pid, _ in log}) == 2 and len({sha for _, sha in log}) == 1
        # A task's own header is loaded once, next to the default one, in the process that needs it.
        other = "import Mathlib\nopen Finset\n"
        verdicts = verifier.verify_batch([task("rfl", header=other), task("rfl", header=other)])
        assert [v.status for v in verdicts] == ["valid", "valid"]
        log = header_log(tmp_path)
        assert {pid for pid, _ in log} == {pid for pid, _ in log[:2]} and len({sha for _, sha in log}) == 2
        stats = verifier.stats()
        assert stats["processes_started"] == 2 and stats["proofs"] == 32


def test_recycling_after_max_uses(tmp_path):
    with LeanVerifier(fake(tmp_path), workers=1, timeout_s=5, max_uses=3) as verifier:
        assert {v.status for v in verifier.verify_batch([task("rfl")] * 7)} == {"valid"}
        stats = verifier.stats()
    assert stats["recycled"] == 2 and stats["processes_started"] == 3
    pids = [pid for pid, _ in header_log(tmp_path)]
    assert len(pids) == len(set(pids)) == 3  # each process loaded the header exactly once


def test_timeout_kills_what_the_repl_started(tmp_path):
    with LeanVerifier(fake(tmp_path), workers=1, timeout_s=1.0) as verifier:
        assert [v.status for v in verifier.verify_batch([task("FAKE_HANG_WITH_CHILD")])] == ["timeout"]
        child = logged_pids(tmp_path) - {pid for pid, _ in header_log(tmp_path)}
        assert len(child) == 1 and wait_until(lambda: not running(child))
        assert verifier.verify_batch([task("rfl")])[0].status == "valid"


def test_submit_returns_at_once_and_keeps_order(tmp_path):
    with LeanVerifier(fake(tmp_path), workers=2, timeout_s=5) as verifier:
        assert verifier.wait_ready(10)
        start = time.monotonic()
        slow = verifier.submit([task("FAKE_SLEEP_MS=300")] * 4)
        mixed = verifier.submit([task("FAKE_ERROR"), task("rfl"), task("sorry")])
        assert time.monotonic() - start < 0.1 and not slow.done()
        assert [v.status for v in mixed.result(timeout=5)] == ["invalid", "valid", "rejected"]
        assert {v.status for v in slow.result(timeout=5)} == {"valid"}
        assert 0.55 < time.monotonic() - start < 3.0  # 4 x 0.3 s on 2 workers
        assert verifier.submit([]).result(timeout=1) == []


def test_processes_are_isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FD_JAX_TEST_SECRET", "do-not-leak")

    def report(verifier) -> dict:
        verdict = verifier.verify_batch([task("FAKE_REPORT")])[0]
        assert verdict.status == "valid"
        return json.loads(verdict.messages[0]["data"])

    with LeanVerifier(fake(tmp_path), workers=1, memory_limit_mb=300) as verifier:
        info = report(verifier)
    assert info["pid"] == info["pgid"] == info["sid"]  # its own session and process group
    assert info["cwd"] == info["env"]["HOME"] == info["env"]["TMPDIR"] != os.getcwd()
    assert not os.path.exists(info["cwd"])  # the private directory is removed on close
    assert "FD_JAX_TEST_SECRET" not in info["env"]
    assert set(info["env"]) <= set(KEPT_ENV) | {"HOME", "TMPDIR", "PWD"}  # PWD: set by the ulimit shell
    assert info["rlimit_as"] == 300 * 2**20
    project = tmp_path / "project"
    project.mkdir()
    with LeanVerifier(fake(tmp_path), workers=1, memory_limit_mb=None, cwd=str(project),
                      extra_env={"LEAN_NUM_THREADS": "1"}) as verifier:  # fmt: skip
        info = report(verifier)
    assert info["cwd"] == str(project) and info["env"]["LEAN_NUM_THREADS"] == "1" and info["rlimit_as"] == -1


def test_header_that_fails_to_load(tmp_path):
    header = "import NoSuchModule -- FAKE_BAD_HEADER\n"
    with LeanVerifier(fake(tmp_path), header=header, workers=1) as verifier:
        verdict = verifier.verify_batch([task("rfl")])[0]
    assert verdict.status == "crashed"
    assert "header failed to load" in verdict.reason and "NoSuchModule" in verdict.reason


def test_unasked_output_gets_a_fresh_process(tmp_path):
    """An answer nobody asked for puts the REPL out of step; the pool notices (env ids only grow)."""
    with LeanVerifier(fake(tmp_path), workers=1) as verifier:
        verdicts = verifier.verify_batch([task("FAKE_EXTRA_OUTPUT"), task("rfl"), task("rfl")])
        assert [v.status for v in verdicts] == ["crashed", "valid", "valid"]
        assert "out of step" in verdicts[0].reason
        assert verifier.stats()["processes_started"] == 2


def test_close_answers_queued_tasks_and_leaves_nothing(tmp_path):
    verifier = LeanVerifier(fake(tmp_path), workers=1, timeout_s=30)
    future = verifier.submit([task("FAKE_SLEEP_MS=20000"), task("rfl"), task("rfl")])
    assert wait_until(lambda: len(logged_pids(tmp_path)) >= 1)
    time.sleep(0.3)
    groups = verifier.process_groups()
    start = time.monotonic()
    verifier.close()
    assert time.monotonic() - start < 5
    verdicts = future.result(timeout=5)
    assert [v.status for v in verdicts] == ["crashed"] * 3
    assert "closed" in verdicts[2].reason
    assert not running(logged_pids(tmp_path)) and not group_members(groups)
    with pytest.raises(RuntimeError, match="closed"):
        verifier.submit([task("rfl")])


def test_keyboard_interrupt_leaves_nothing_running(tmp_path):
    script = textwrap.dedent(
        f"""
        import faulthandler, os, signal, sys, threading, time
        faulthandler.dump_traceback_later(30, exit=True)  # a hang shows where, instead of a bare timeout
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job inherits SIGINT ignored
        sys.path.insert(0, {str(REPO)!r})
        from fd_jax.lean import LeanVerifier, ProofTask
        log = {str(tmp_path / "pids.log")!r}
        verifier = LeanVerifier({fake(tmp_path)!r}, workers=2, timeout_s=600)
        s = {STATEMENT!r}
        future = verifier.submit([ProofTask(s, s + " FAKE_HANG_WITH_CHILD"), ProofTask(s, s + " FAKE_HANG")])
        while not os.path.exists(log) or len(open(log).read().split()) < 3:
            time.sleep(0.02)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        future.result()
        """
    )
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and "KeyboardInterrupt" in result.stderr, result.stderr
        pids = logged_pids(tmp_path)
        assert len(pids) == 3 and wait_until(lambda: not running(pids)), running(pids)
    finally:  # if the test failed, do not leave its processes behind
        for pid in running(logged_pids(tmp_path)):
            os.kill(pid, signal.SIGKILL)


def test_idle_repls_exit_when_the_caller_is_killed(tmp_path):
    """No exit hook runs after SIGKILL; an idle REPL still goes, because its input closes."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from fd_jax.lean import LeanVerifier
        verifier = LeanVerifier({fake(tmp_path)!r}, workers=2)
        verifier.wait_ready(30)
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    caller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert caller.stdout.readline().strip() == "ready"
        pids = logged_pids(tmp_path)
        assert len(pids) == 2 and running(pids) == pids
        caller.kill()
        caller.wait(timeout=10)
        assert wait_until(lambda: not running(pids)), running(pids)
    finally:
        caller.kill()
        caller.stdout.close()
        for pid in running(logged_pids(tmp_path)):
            os.kill(pid, signal.SIGKILL)


def test_configuration_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="setup_lean.sh"):
        LeanVerifier(["no-such-repl-binary"], workers=1)
    with pytest.raises(FileNotFoundError, match="cwd"):
        LeanVerifier(fake(tmp_path), cwd=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="workers"):
        LeanVerifier(fake(tmp_path), workers=0)
    with pytest.raises(ValueError, match="repl_command"):
        LeanVerifier([], workers=1)
    with LeanVerifier(fake(tmp_path), workers=1) as verifier, pytest.raises(TypeError, match="ProofTask"):
        verifier.submit(["theorem t : True := trivial"])  # type: ignore[list-item]


def test_axiom_audit_is_bound_to_the_theorem(tmp_path):
    """The stand-in answers `#print axioms` about another constant, twice, not at all, or with sorryAx in a
    second report: never `valid`."""
    bodies = ["FAKE_AXIOMS_OTHER", "FAKE_AXIOMS_TWICE", "FAKE_AXIOMS_SILENT", "FAKE_AXIOMS_HIDDEN_SORRY", "rfl"]
    with LeanVerifier(fake(tmp_path), workers=1, timeout_s=10.0, memory_limit_mb=None) as verifier:
        verdicts = verifier.verify_batch([task(body) for body in bodies])
    assert [v.status for v in verdicts] == ["invalid", "invalid", "invalid", "sorry", "valid"], verdicts
    assert "Hack.t" in verdicts[0].reason and "exactly one" in verdicts[1].reason
