"""The `kimina` back-end: a Kimina Lean Server (project-numina/kimina-lean-server) over HTTP.

`POST {base_url}/check` with `{"snippet": {"id", "code"}, "timeout", "debug", "reuse"}` answers
`{"id", "time", "error", "response"}`: `response` is the REPL's answer to the whole snippet (header
included; the server splits the header off and caches its environment), `error` a server-side failure
such as "Lean REPL command timed out in 60 seconds". The older `/verify` endpoint answers
`{"results": [{"custom_id", "error", "response"}]}`, whose items have the same two fields;
`kimina_verdict` reads either.

One request per proof on `max_concurrency` threads, through the package's HTTP client (fd_jax.feedback.http,
the standard library only).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from fd_jax.lean.base import ThreadedVerifier
from fd_jax.lean.protocol import audit_query, audit_verdict, classify_answer, strip_imports
from fd_jax.lean.screen import DEFAULT_HEADER, theorem_name
from fd_jax.lean.types import CRASHED, TIMEOUT, VALID, ProofTask, Verdict


def _shift(messages: list[dict[str, Any]], line_offset: int) -> list[dict[str, Any]]:
    """Messages with line numbers moved from the full snippet to the submitted code (header lines -> 0)."""
    shifted = []
    for message in messages:
        message = dict(message)
        for key in ("pos", "endPos"):
            pos = message.get(key)
            if isinstance(pos, dict) and isinstance(pos.get("line"), int):
                line = pos["line"] - line_offset
                message[key] = {**pos, "line": line} if line >= 1 else {"line": 0, "column": 0}
        shifted.append(message)
    return shifted


def kimina_line_offset(prefix: str, snippet: str) -> int:
    """How many lines to subtract from a line the server reports to get a line of the code after `prefix`.

    The server splits the snippet's leading `import` and blank lines off as its header and reports lines
    of the rest; the code proper starts after the `prefix` (our header) lines.
    """
    lead = 0
    for line in snippet.splitlines():
        if line.strip() and not line.strip().startswith("import "):
            break
        lead += 1
    return prefix.count("\n") - lead


def kimina_verdict(result: Any, *, line_offset: int = 0) -> Verdict:
    """The verdict for one Kimina result (`{"error": ..., "response": ...}`, see the module docstring).

    Fails closed like `classify`: a result whose fields have the wrong type (`error` neither null nor a
    string, `time` not a finite non-negative number, `response` not an object, an error beside a
    response, ...) is `crashed` with the reason. A server error mentioning a timeout is `timeout`, any
    other server error `crashed`; a REPL answer is classified as by `classify` except that `env` may be
    absent (the server drops it), with `line_offset` subtracted from message lines (see
    `kimina_line_offset`; lines that fall in the header become 0). Never raises.
    """
    if not isinstance(result, dict):
        return Verdict(CRASHED, reason=f"Kimina result is a {type(result).__name__}, not a JSON object")
    time_s = result.get("time", 0.0)
    if time_s is None:
        time_s = 0.0
    if isinstance(time_s, bool) or not isinstance(time_s, (int, float)) or not 0 <= time_s < math.inf:
        return Verdict(CRASHED, reason=f"malformed Kimina result: `time` is {time_s!r}")
    error, response = result.get("error"), result.get("response")
    if error is not None and not isinstance(error, str):
        return Verdict(CRASHED, time_s=time_s, reason=f"malformed Kimina result: `error` is {error!r}")
    if error:
        if response is not None:
            return Verdict(CRASHED, time_s=time_s, reason=f"Kimina result has an error beside a response: {error}")
        status = TIMEOUT if "timed out" in error.lower() or "timeout" in error.lower() else CRASHED
        return Verdict(status, time_s=time_s, reason=f"Kimina server: {error}")
    if not isinstance(response, dict):
        return Verdict(CRASHED, time_s=time_s, reason="Kimina result has neither an error nor a response object")
    verdict = classify_answer(response, require_env=False)
    verdict.messages = _shift(verdict.messages, line_offset)
    verdict.time_s = verdict.time_s or time_s
    return verdict


class KiminaVerifier(ThreadedVerifier):
    """Checks proofs on a Kimina Lean Server.

    base_url: the server, e.g. "http://localhost:8000".
    header: sent before each proof (the server caches its environment); a task's own header overrides it.
    timeout_s: the server-side limit per proof (the server reports a timeout as an error).
    max_concurrency: requests in flight.
    api_key: sent as `Authorization: Bearer <key>` when set.
    http_timeout_s: client-side limit per request (default timeout_s + 30); past it the verdict is `timeout`.
    max_retries: extra attempts after 408/409/429/5xx/529 or a refused connection, with exponential backoff.
    audit_axioms: append `#print axioms _root_.NAME` to the snippet and refuse non-standard axioms; the
      audit's answer is the message on that line, and it must name exactly that constant, once.
    """

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        *,
        header: str = DEFAULT_HEADER,
        timeout_s: float = 60.0,
        max_concurrency: int = 8,
        api_key: str | None = None,
        http_timeout_s: float | None = None,
        max_retries: int = 2,
        allow_native_decide: bool = False,
        audit_axioms: bool = True,
    ):
        super().__init__(
            header=header, max_concurrency=max_concurrency, allow_native_decide=allow_native_decide
        )
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"KiminaVerifier: base_url must start with http:// or https://: {base_url!r}")
        self.url = base_url.rstrip("/") + "/check"
        self.timeout_s = timeout_s
        self.http_timeout_s = timeout_s + 30 if http_timeout_s is None else http_timeout_s
        self.api_key = api_key
        self.max_retries = max_retries
        self.audit_axioms = audit_axioms

    def _post(self, payload: dict[str, Any]) -> Any:
        """The server's JSON answer (the package's one HTTP client: fd_jax.feedback.http.post_json).

        Retries 408/409/429/5xx/529 and refused connections with exponential backoff; a client-side timeout is
        not retried (the same proof would be slow again). Raises RequestTimedOut / RequestFailed.
        """
        from fd_jax.feedback.http import post_json  # imported here: fd_jax.feedback imports fd_jax.lean

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return post_json(self.url, payload, headers, timeout_s=self.http_timeout_s, max_retries=self.max_retries,
                         backoff_s=0.25, max_backoff_s=8.0, retry_timeouts=False)  # fmt: skip

    def _verify_one(self, task: ProofTask, header: str) -> Verdict:
        prefix = header if header.endswith("\n") or not header else header + "\n"
        code = prefix + strip_imports(task.code)
        line_offset = kimina_line_offset(prefix, code)
        name = theorem_name(task.statement) if self.audit_axioms else None
        audit_line = code.count("\n") + 3 - prefix.count("\n")  # in the coordinates of task.code
        if name:
            code += f"\n\n{audit_query(name)}\n"
        payload = {"snippet": {"id": task.id or "fd_jax", "code": code}, "timeout": math.ceil(self.timeout_s),
                   "debug": False, "reuse": True}  # fmt: skip
        from fd_jax.feedback.http import RequestFailed, RequestTimedOut

        start = time.monotonic()
        try:
            result = self._post(payload)
        except RequestTimedOut as err:
            return Verdict(TIMEOUT, time_s=time.monotonic() - start, reason=str(err))
        except (RequestFailed, ValueError) as err:
            return Verdict(CRASHED, time_s=time.monotonic() - start, reason=str(err))
        if isinstance(result, dict) and "results" in result:  # a server answering in the older `/verify` shape
            results = result["results"]
            if not isinstance(results, list) or len(results) != 1:
                return Verdict(CRASHED, time_s=time.monotonic() - start,
                               reason=f"Kimina `results` is not a list of one result: {str(results)[:200]}")
            result = results[0]
        verdict = kimina_verdict(result, line_offset=line_offset)
        if name and isinstance(result, dict) and isinstance(result.get("response"), dict):
            audit = [m for m in verdict.messages if (m.get("pos") or {}).get("line") == audit_line]
            # The audit's report leaves the messages; an error there (the proof ran into the query) stays.
            verdict.messages = [m for m in verdict.messages if m not in audit or m.get("severity") == "error"]
            override = audit_verdict(name, {"messages": audit}, allow_native_decide=self.allow_native_decide)
            if verdict.status == VALID and override is not None:
                verdict = dataclasses.replace(override, messages=verdict.messages + override.messages,
                                              time_s=verdict.time_s)  # fmt: skip
        verdict.time_s = verdict.time_s or time.monotonic() - start
        return verdict
