"""JSON POST with retries, on the standard library only (no HTTP client dependency)."""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

# 408/409 are transient by the APIs' own documentation; 529 is Anthropic's "overloaded".
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
# A loopback server must never be reached through an HTTP proxy set in the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_DEFAULT = urllib.request.build_opener()


class RequestFailed(RuntimeError):
    """The request failed for good: a non-retryable status, or retries exhausted. `status` is the last HTTP
    status (None for network errors and timeouts)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class RequestTimedOut(RequestFailed):
    """The last attempt got no (complete) answer within `timeout_s`."""


def _is_timeout(error: BaseException) -> bool:
    reason = getattr(error, "reason", None)  # URLError wraps the socket's timeout
    return isinstance(error, (socket.timeout, TimeoutError)) or isinstance(reason, (socket.timeout, TimeoutError))


def retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds, possibly fractional, or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def post_json(
    url: str,
    payload: Mapping[str, Any],
    headers: Mapping[str, str],
    *,
    timeout_s: float,
    max_retries: int,
    backoff_s: float = 0.5,
    max_backoff_s: float = 30.0,
    on_retry: Callable[[], None] | None = None,
    retry_timeouts: bool = True,
) -> dict[str, Any]:
    """POST `payload` as JSON and return the decoded JSON answer.

    timeout_s: per attempt, for connecting and for each read (a server that stalls is abandoned after it).
    max_retries: extra attempts after the first, on 408/409/429/5xx/529, timeouts and connection errors.
      The wait before retry k (0-based) is the server's Retry-After when it sends one, else
      backoff_s * 2**k with jitter in [0.5, 1], never more than max_backoff_s.
    retry_timeouts: False to give up at the first timeout (a server that is slow on this request, such as a
      Lean server on a long proof, would only be slow again).
    Raises RequestFailed (a 4xx other than the above fails at once), RequestTimedOut when the last attempt
    timed out; never logs headers (they hold keys).
    """
    data = json.dumps(payload).encode("utf-8")
    host = urllib.parse.urlsplit(url).hostname or ""
    opener = _DIRECT if host in _LOOPBACK else _DEFAULT
    for attempt in range(max_retries + 1):
        all_headers = {**headers, "content-type": "application/json"}
        request = urllib.request.Request(url, data=data, headers=all_headers)
        wait, status = None, None
        try:
            with opener.open(request, timeout=timeout_s) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            status = e.code
            body = e.read()[:300].decode("utf-8", "replace")
            e.close()
            if status not in RETRY_STATUSES:
                raise RequestFailed(f"HTTP {status} from {url}: {body}", status) from None
            wait = retry_after_s(e.headers.get("retry-after"))
            reason = f"HTTP {status}"
        except json.JSONDecodeError as e:
            raise RequestFailed(f"answer from {url} is not JSON: {e}") from None
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout, OSError) as e:
            reason = f"{type(e).__name__}: {e}"
            if _is_timeout(e) and (not retry_timeouts or attempt == max_retries):
                raise RequestTimedOut(f"no answer from {url} within {timeout_s:g} s ({reason})") from None
        if attempt == max_retries:
            raise RequestFailed(f"{url}: giving up after {max_retries + 1} attempts, last: {reason}", status)
        if wait is None:
            wait = backoff_s * 2**attempt * random.uniform(0.5, 1.0)
        wait = min(wait, max_backoff_s)
        log.info("retrying %s in %.2fs (%s)", url, wait, reason)
        if on_retry is not None:
            on_retry()
        time.sleep(wait)
    raise AssertionError("unreachable")
