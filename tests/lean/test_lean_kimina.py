"""The Kimina back-end over real HTTP on loopback, against a stand-in server that replays the answers a
Kimina Lean Server recorded (../shared/data/kimina_match) and misbehaves on demand; plus the back-end
registry and the LeanDojo guard."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fd_jax.lean import BACKENDS, DEFAULT_HEADER, KiminaVerifier, LeanVerifier, ProofTask, get_verifier
from fd_jax.lean.leandojo import tactic_block

STATEMENT = "theorem t : 1 = 1 := by"


def _body_line_offset(snippet: str) -> int:
    """Lines the server's header takes: its leading `import` and blank lines (how the server splits)."""
    lead = 0
    for line in snippet.splitlines():
        if line.strip() and not line.strip().startswith("import "):
            break
        lead += 1
    return lead


class StandIn(ThreadingHTTPServer):
    """POST /check answered by `self.respond(snippet_code) -> (http status, body)`; requests are recorded."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, dict, dict]] = []
        self.respond = lambda code: (200, {"id": "x", "response": {"env": 0}})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, dict(self.headers), payload))
        status, body = self.server.respond(payload["snippet"]["code"])
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    stand_in = StandIn()
    thread = threading.Thread(target=stand_in.serve_forever, daemon=True)
    thread.start()
    yield stand_in
    stand_in.shutdown()
    stand_in.server_close()


def _with_audit(response: dict, snippet: str, axioms: str = "propext, Classical.choice, Quot.sound") -> dict:
    """`response` plus the info message Lean prints for a `#print axioms` command in `snippet`."""
    match = re.search(r"^#print axioms (\S+)$", snippet, re.M)
    if not match:
        return response
    line = snippet.count("\n", 0, match.start()) + 1 - _body_line_offset(snippet)
    info = {"severity": "info", "pos": {"line": line, "column": 0}, "endPos": {"line": line, "column": 6},
            "data": f"'{match.group(1).removeprefix('_root_.')}' depends on axioms: [{axioms}]"}  # fmt: skip
    return {**response, "messages": [*response.get("messages", []), info]}


def test_recorded_kimina_answers_over_http(server, shared_data):
    folder = shared_data / "kimina_match"
    recorded, tasks = {}, []
    for path in sorted((folder / "input").glob("*.lean")):
        source = path.read_text()
        header = DEFAULT_HEADER if source.startswith(DEFAULT_HEADER) else ""
        code = source[len(header) :]
        statement = re.search(r"theorem\s.*?:=\s*by", code, re.S).group(0)
        name = statement.split()[1]
        recorded[name] = json.loads((folder / "output" / f"{path.stem}.json").read_text())["results"][0]
        tasks.append(ProofTask(statement, code, id=path.stem))

    def respond(snippet: str):
        result = dict(recorded[re.search(r"theorem\s+(\S+)", snippet).group(1)])
        if result.get("response"):
            result["response"] = _with_audit(result["response"], snippet)
        return 200, result

    server.respond = respond
    with KiminaVerifier(server.url, timeout_s=60, max_concurrency=4) as verifier:
        verdicts = verifier.verify_batch(tasks)
    statuses = {task.id: verdict.status for task, verdict in zip(tasks, verdicts)}
    assert statuses.pop("goedel-lean_workbook_1036") == "timeout"
    assert set(statuses.values()) == {"valid"}  # warnings do not matter
    assert len(server.requests) == 51
    path, headers, payload = server.requests[0]
    assert path == "/check" and headers["Content-Type"] == "application/json"
    assert "Authorization" not in headers
    assert payload["timeout"] == 60 and payload["reuse"] is True
    assert payload["snippet"]["code"].startswith(DEFAULT_HEADER)
    # Positions come back in the coordinates of the submitted code, and the audit's message is consumed.
    index = [t.id for t in tasks].index("goedel-lean_workbook_10222")
    info = [m for m in verdicts[index].messages if m["severity"] == "info"]
    assert [m["data"] for m in info] == ["Try this: ring_nf"]
    line, start, end = info[0]["pos"]["line"], info[0]["pos"]["column"], info[0]["endPos"]["column"]
    assert tasks[index].code.splitlines()[line - 1][start:end] == "ring"


def _task(body: str) -> ProofTask:
    return ProofTask(STATEMENT, f"{STATEMENT}\n  {body}\n", id="t1")


def test_server_failures_become_verdicts(server):
    attempts = []

    def respond(snippet: str):
        attempts.append(snippet)
        if "BUSY_ONCE" in snippet and sum("BUSY_ONCE" in a for a in attempts) == 1:
            return 429, {"detail": "No available REPLs"}
        if "FAIL" in snippet:
            return 500, {"detail": "boom"}
        if "GARBAGE" in snippet:
            return 200, b"<html>not json</html>"
        if "SLOW" in snippet:
            time.sleep(4.0)
        if "LEAN_TIMEOUT" in snippet:
            return 200, {"id": "t1", "error": "Lean REPL command timed out in 5 seconds", "time": 5.0}
        axioms = "propext, sorryAx" if "HIDDEN" in snippet else "propext"
        result = {"id": "t1", "time": 0.2, "response": _with_audit({"env": 1}, snippet, axioms)}
        return 200, ({"results": [result]} if "OLD_SHAPE" in snippet else result)

    server.respond = respond
    bodies = ["rfl", "BUSY_ONCE", "FAIL", "GARBAGE", "SLOW", "LEAN_TIMEOUT", "HIDDEN", "sorry", "OLD_SHAPE"]
    with KiminaVerifier(server.url, timeout_s=5, http_timeout_s=2.0, api_key="k", max_retries=1) as verifier:
        start = time.monotonic()
        verdicts = verifier.verify_batch([_task(b) for b in bodies])
        assert time.monotonic() - start < 4.0  # the slow answer was not waited for
    assert [v.status for v in verdicts] == [
        "valid", "valid", "crashed", "crashed", "timeout", "timeout", "sorry", "rejected", "valid"
    ]  # fmt: skip
    assert "HTTP 500" in verdicts[2].reason and "timed out" in verdicts[5].reason
    assert "sorryAx" in verdicts[6].reason
    assert verdicts[0].time_s == pytest.approx(0.2)
    assert sum("BUSY_ONCE" in a for a in attempts) == 2  # retried after the 429
    assert sum("FAIL" in a for a in attempts) == 2  # a 500 is retried too (the package's one HTTP client)
    assert len(attempts) == 10  # 8 proofs sent (the rejected one never was), two of them twice
    assert not any("\n  sorry\n" in a for a in attempts)
    assert all(h["Authorization"] == "Bearer k" for _, h, _ in server.requests)


def test_unreachable_server_is_crashed():
    with KiminaVerifier("http://127.0.0.1:9", max_retries=0) as verifier:
        verdict = verifier.verify_batch([_task("rfl")])[0]
    assert verdict.status == "crashed" and "Connection refused" in verdict.reason
    with pytest.raises(ValueError, match="base_url"):
        KiminaVerifier("localhost:8000")


def test_registry(tmp_path):
    assert sorted(BACKENDS) == ["kimina", "leandojo", "local"]
    with pytest.raises(ValueError, match="choose one of"):
        get_verifier("lean3")
    fake = [sys.executable, str(__import__("pathlib").Path(__file__).with_name("fake_repl.py"))]
    with get_verifier("local", repl_command=fake, workers=1) as verifier:
        assert isinstance(verifier, LeanVerifier)
        assert verifier.verify_batch([_task("rfl")])[0].status == "valid"
    with get_verifier("kimina", base_url="http://127.0.0.1:9") as verifier:
        assert isinstance(verifier, KiminaVerifier)


@pytest.mark.skipif(importlib.util.find_spec("lean_dojo") is not None, reason="lean-dojo is installed")
def test_leandojo_missing_says_how_to_install():
    with pytest.raises(ImportError, match=r"pip install 'fd_jax\[leandojo\]'"):
        get_verifier("leandojo", repo_url="https://github.com/x/y", commit="abc", file_path="A.lean")


def test_tactic_block():
    code = "lemma h : True := trivial\n" + STATEMENT + "\n  norm_num\n  rfl\n"
    assert tactic_block(STATEMENT, code) == "  norm_num\n  rfl"
    assert tactic_block("theorem t : 1 = 1", "theorem t : 1 = 1 := by simp") == " simp"
    assert tactic_block(STATEMENT, "theorem u : True := trivial") is None


def test_kimina_audit_is_bound_to_the_theorem(server):
    """The snippet ends with `#print axioms _root_.t`; an answer about another constant, two reports, or no
    report is never `valid`."""
    def respond(snippet: str):
        assert snippet.rstrip().endswith("#print axioms _root_.t")
        audited = _with_audit({"time": 0.1}, snippet)
        info = audited["messages"][0]
        if "OTHER" in snippet:
            info["data"] = "'Hack.t' depends on axioms: [propext]"
        elif "TWICE" in snippet:
            audited["messages"].append(dict(info))
        elif "SILENT" in snippet:
            audited["messages"] = []
        elif "ELSEWHERE" in snippet:  # a report on another line (the proof's own output) does not count
            info["pos"] = {"line": 1, "column": 0}
        return 200, {"id": "t1", "error": None, "response": audited}

    server.respond = respond
    bodies = ["rfl -- OTHER", "rfl -- TWICE", "rfl -- SILENT", "rfl -- ELSEWHERE", "rfl"]
    with KiminaVerifier(server.url, timeout_s=5, max_retries=0) as verifier:
        verdicts = verifier.verify_batch([_task(b) for b in bodies])
    assert [v.status for v in verdicts] == ["invalid", "invalid", "invalid", "invalid", "valid"], verdicts
