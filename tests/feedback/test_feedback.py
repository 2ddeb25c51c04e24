"""Feedback providers against real HTTP servers on loopback, the cache, the budget and the fallbacks."""

from __future__ import annotations

import email.utils
import http.server
import json
import logging
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from fd_jax.feedback import FEEDBACK_PROMPT, FeedbackRequest, get_provider, lean_errors_text
from fd_jax.feedback.http import retry_after_s
from fd_jax.lean import format_errors

CODE = "theorem t (a b : ℕ) : a + b = b + a := by\n  simp [foo]\n"
MESSAGES = [
    {
        "severity": "error",
        "pos": {"line": 2, "column": 8},
        "endPos": {"line": 2, "column": 11},
        "data": "unknown identifier 'foo'",
    }
]
STATEMENT = "theorem t (a b : ℕ) : a + b = b + a := by\n"
REQUEST = FeedbackRequest(statement=STATEMENT, attempt=CODE, lean_messages=MESSAGES)


def openai_answer(text: str, prompt_tokens: int = 100, completion_tokens: int = 20) -> dict:
    return {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }


class _Backlogged(http.server.ThreadingHTTPServer):
    request_queue_size = 64  # room for every concurrent client of these tests (socketserver's default is 5)


class LoopbackServer:
    """A real HTTP server on 127.0.0.1:0. `respond(i, path, body) -> (status, headers, payload, delay_s)` is
    called for request i; every request is recorded with server-side start and end times."""

    def __init__(self, respond: Callable[[int, str, dict], tuple[int, dict, object, float]]):
        self.records: list[SimpleNamespace] = []
        self.stop = threading.Event()
        lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                start = time.monotonic()
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with lock:
                    index = len(server.records)
                    record = SimpleNamespace(path=self.path, headers=self.headers, body=body, start=start)
                    server.records.append(record)
                status, headers, payload, delay = respond(index, self.path, body)
                if delay:
                    server.stop.wait(delay)
                record.end = time.monotonic()
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = _Backlogged(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(respond):
        servers.append(LoopbackServer(respond))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def openai(server, **options):
    defaults = dict(model="critic-1", base_url=server.url + "/v1", api_key="sk-test", timeout_s=0.5,
                    max_retries=3, backoff_s=0.01, max_concurrency=8)
    return get_provider("openai", **{**defaults, **options})


def test_openai_retries_429_honouring_retry_after(serve, monkeypatch, caplog):
    monkeypatch.setenv("FD_TEST_CRITIC_KEY", "sk-secret-123")

    def respond(i, path, body):
        if i == 0:
            return 429, {"Retry-After": "0.3"}, {"error": "rate limited"}, 0
        return 200, {}, openai_answer("The lemma `foo` does not exist; try `Nat.add_comm`."), 0

    server = serve(respond)
    provider = openai(server, api_key=None, api_key_env="FD_TEST_CRITIC_KEY")
    with caplog.at_level(logging.DEBUG):
        texts = provider.feedback([REQUEST])
    assert texts == ["The lemma `foo` does not exist; try `Nat.add_comm`."]
    first, second = server.records
    # backoff_s is 0.01 s, so only the server's Retry-After explains a 0.3 s pause.
    assert second.start - first.end >= 0.28
    assert second.path == "/v1/chat/completions"
    assert second.headers["Authorization"] == "Bearer sk-secret-123"
    prompt = second.body["messages"][-1]["content"]
    assert second.body["model"] == "critic-1"
    assert prompt == FEEDBACK_PROMPT.format(statement=REQUEST.statement.rstrip(), attempt=CODE.rstrip(),
                                            lean_errors=lean_errors_text(CODE, MESSAGES))
    assert "unknown identifier" in prompt.lower() and "simp [foo]" in prompt
    assert provider.stats.retries == 1 and provider.stats.failures == 0
    assert provider.stats.prompt_tokens == 100 and provider.stats.completion_tokens == 20
    assert "sk-secret-123" not in repr(provider) and "sk-secret-123" not in caplog.text


def test_openai_retries_500s_then_succeeds(serve):
    server = serve(lambda i, p, b: (500, {}, "boom", 0) if i < 2 else (200, {}, openai_answer("hint"), 0))
    provider = openai(server, temperature=None, extra_body={"max_completion_tokens": 64}, max_tokens=None)
    assert provider.feedback([REQUEST]) == ["hint"]
    assert len(server.records) == 3 and provider.stats.retries == 2 and provider.stats.failures == 0
    body = server.records[-1].body  # settings set to None stay out of the request (models that reject them)
    assert "temperature" not in body and "max_tokens" not in body and body["max_completion_tokens"] == 64


def test_stalling_server_falls_back_to_lean_errors_within_time_bound(serve):
    def respond(i, path, body):
        stall = "STALL" in body["messages"][-1]["content"]
        return 200, {}, openai_answer("useful hint"), (10.0 if stall else 0)

    server = serve(respond)
    provider = openai(server, timeout_s=0.2, max_retries=1)
    stalled = FeedbackRequest(REQUEST.statement, CODE + "-- STALL\n", MESSAGES)
    start = time.monotonic()
    texts = provider.feedback([stalled, REQUEST])
    elapsed = time.monotonic() - start
    # Two attempts of 0.2 s plus one backoff of at most 0.01 s, with slack for a loaded CI machine.
    assert elapsed < 1.2
    assert texts[0] == lean_errors_text(stalled.attempt, MESSAGES)
    assert texts[1] == "useful hint"
    assert provider.stats.failures == 1 and provider.stats.llm_calls == 1


def test_eight_concurrent_requests_overlap(serve):
    # Each request is held in the server until all eight are inside it at once: a client that sends them one
    # (or a few) at a time leaves the barrier broken after its timeout, whatever the machine's speed. The
    # client's own timeout is generous and retries are off, so load cannot turn into a retried, late request.
    arrived = threading.Barrier(8, timeout=30)

    def respond(i, path, body):
        try:
            arrived.wait()
        except threading.BrokenBarrierError:
            return 500, {}, {"error": "requests were not concurrent"}, 0
        return 200, {}, openai_answer(f"hint {i}"), 0

    server = serve(respond)
    provider = openai(server, max_concurrency=8, timeout_s=60, max_retries=0)
    requests = [FeedbackRequest(REQUEST.statement, CODE + f"-- try {k}\n", MESSAGES) for k in range(8)]
    texts = provider.feedback(requests)
    assert not arrived.broken
    assert len(server.records) == 8 and all(t.startswith("hint ") for t in texts)


def test_concurrency_limit_holds_across_concurrent_calls(serve):
    # Requests pair up at a barrier (so two are in flight together, on any machine) while a counter taken
    # on arrival records the most that were ever inside the server at once.
    paired = threading.Barrier(2, timeout=30)
    lock = threading.Lock()
    inside = SimpleNamespace(now=0, most=0)

    def respond(i, path, body):
        with lock:
            inside.now += 1
            inside.most = max(inside.most, inside.now)
        try:
            paired.wait()
            time.sleep(0.05)  # give a third request, were it let through, the time to arrive
        finally:
            with lock:
                inside.now -= 1
        return 200, {}, openai_answer("h"), 0

    server = serve(respond)
    provider = openai(server, max_concurrency=2, timeout_s=60, max_retries=0)
    # Two rollout chunks asking at the same time share the provider's limit.
    calls = [threading.Thread(target=provider.feedback,
                              args=([FeedbackRequest("s", f"attempt {c}{k}", MESSAGES) for k in range(2)],))
             for c in "ab"]
    for t in calls:
        t.start()
    for t in calls:
        t.join()
    assert len(server.records) == 4 and not paired.broken and inside.most == 2


def test_anthropic_messages_api(serve):
    def respond(i, path, body):
        if i == 0:
            return 529, {"retry-after": "0"}, {"type": "error", "error": {"type": "overloaded_error"}}, 0
        answer = {
            "type": "message",
            "content": [{"type": "text", "text": "Rewrite with "}, {"type": "text", "text": "`Nat.add_comm`."}],
            "usage": {"input_tokens": 1000, "output_tokens": 200},
        }
        return 200, {}, answer, 0

    server = serve(respond)
    provider = get_provider("anthropic", model="claude-test", base_url=server.url, api_key="ak-test",
                            timeout_s=0.5, max_retries=2, backoff_s=0.01, max_tokens=300, system="Be brief.",
                            usd_per_mtok_in=3.0, usd_per_mtok_out=15.0)
    assert provider.feedback([REQUEST]) == ["Rewrite with `Nat.add_comm`."]
    record = server.records[-1]
    assert record.path == "/v1/messages"
    assert record.headers["x-api-key"] == "ak-test" and record.headers["anthropic-version"] == "2023-06-01"
    assert record.body["max_tokens"] == 300 and record.body["system"] == "Be brief."
    assert record.body["messages"][0]["role"] == "user"
    assert provider.stats.retries == 1
    assert provider.stats.cost_usd == pytest.approx((1000 * 3.0 + 200 * 15.0) / 1e6)


def test_cache_serves_repeat_without_http(serve, tmp_path):
    server = serve(lambda i, p, b: (200, {}, openai_answer(f"answer {i}"), 0))
    first = openai(server, cache_dir=str(tmp_path))
    # The duplicate inside one batch is asked once.
    assert first.feedback([REQUEST, REQUEST]) == ["answer 0", "answer 0"]
    assert len(server.records) == 1
    first.close()
    again = openai(server, cache_dir=str(tmp_path))  # a rerun: a new provider over the same directory
    assert again.feedback([REQUEST]) == ["answer 0"]
    assert len(server.records) == 1 and again.stats.cache_hits == 1 and again.stats.llm_calls == 0
    other_model = openai(server, cache_dir=str(tmp_path), model="critic-2")
    assert other_model.feedback([REQUEST]) == ["answer 1"]  # the key includes the model


def test_budget_switches_to_lean_errors(serve):
    server = serve(lambda i, p, b: (200, {}, openai_answer("llm hint", 600_000, 100_000), 0))
    provider = openai(server, budget_usd=1.0, usd_per_mtok_in=1.0, usd_per_mtok_out=4.0)
    assert provider.feedback([REQUEST]) == ["llm hint"]  # costs 0.6 + 0.4 = 1.0 USD: the budget is spent
    other = FeedbackRequest(REQUEST.statement, CODE + "-- again\n", MESSAGES)
    assert provider.feedback([other]) == [lean_errors_text(other.attempt, MESSAGES)]
    assert len(server.records) == 1 and provider.stats.budget_fallbacks == 1 and provider.stats.failures == 0


def test_client_errors_fail_fast_and_bad_answers_fall_back(serve):
    def respond(i, path, body):
        return (401, {}, {"error": "bad key"}, 0) if i == 0 else (200, {}, {"no": "choices"}, 0)

    server = serve(respond)
    provider = openai(server)
    fallback = lean_errors_text(CODE, MESSAGES)
    assert provider.feedback([REQUEST]) == [fallback]
    assert len(server.records) == 1  # 401 is not retried
    assert provider.feedback([FeedbackRequest("s", "x", MESSAGES)]) == [lean_errors_text("x", MESSAGES)]
    assert provider.stats.failures == 2


def test_a_malformed_request_does_not_sink_the_batch(serve):
    server = serve(lambda i, p, b: (200, {}, openai_answer("fine"), 0))
    provider = openai(server)
    broken = FeedbackRequest(STATEMENT, None, [{"severity": "error", "pos": "nonsense"}])  # type: ignore[arg-type]
    texts = provider.feedback([broken, REQUEST])
    assert texts[1] == "fine" and isinstance(texts[0], str) and texts[0]
    assert provider.stats.failures == 1 and len(server.records) == 1


def test_unreachable_endpoint_falls_back():
    provider = get_provider("openai", model="m", base_url="http://127.0.0.1:9/v1", api_key="k", timeout_s=0.2,
                            max_retries=1, backoff_s=0.01)
    assert provider.feedback([REQUEST]) == [lean_errors_text(CODE, MESSAGES)]
    assert provider.stats.failures == 1


def test_think_sections_are_dropped_from_llm_answers(serve):
    server = serve(lambda i, p, b: (200, {}, openai_answer("<think>long musing</think>\nUse `omega`."), 0))
    assert openai(server).feedback([REQUEST]) == ["Use `omega`."]


def test_lean_errors_text_is_the_lean_formatter():
    """One formatter for the package: the feedback text is fd_jax.lean.format_errors' (tested exactly in
    test_lean_formatting.py), and odd messages do not make it raise."""
    assert lean_errors_text(CODE, MESSAGES) == format_errors(CODE, MESSAGES)
    assert "Unknown identifier `foo`" in lean_errors_text(CODE, MESSAGES)
    odd = [{"severity": "error", "pos": {"line": 2, "column": "x"}, "data": 3}, "not a message", {"pos": None}]
    assert lean_errors_text(CODE, odd).startswith("error: line 2, column 0: 3")
    assert lean_errors_text("x", []) == "Lean reported no errors."


def test_lean_errors_provider_and_registry():
    provider = get_provider("lean_errors")
    assert provider.feedback([REQUEST]) == [lean_errors_text(CODE, MESSAGES)]
    assert "unknown identifier" in provider.feedback([REQUEST])[0].lower()
    with pytest.raises(ValueError, match="unknown feedback provider 'nope'"):
        get_provider("nope")
    with pytest.raises(ValueError, match="bogus"):
        get_provider("lean_errors", template="{bogus}")


def test_local_provider_batches_through_the_sampler():
    from fd_jax.data.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    seen = {}

    def generate(model, prompts, *, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed):
        seen.update(model=model, prompts=prompts, stop=stop_token_ids, max_new_tokens=max_new_tokens)
        reply = tokenizer.encode("Use omega.", add_special_tokens=False) + [tokenizer.eos_token_id]
        tokens = [reply + [0] * 3 for _ in prompts]
        return SimpleNamespace(tokens=tokens, lengths=[len(reply)] * len(prompts))

    provider = get_provider("local", model="policy", tokenizer=tokenizer, generate_fn=generate,
                            max_new_tokens=16, template="Fix: {attempt}")
    texts = provider.feedback([FeedbackRequest("s", "a1", []), FeedbackRequest("s", "a2", [])])
    assert texts == ["Use omega.", "Use omega."]
    assert seen["model"] == "policy" and seen["max_new_tokens"] == 16
    assert seen["stop"] == (tokenizer.eos_token_id,)
    assert tokenizer.decode(seen["prompts"][1]) == "<bos>user: Fix: a2\nassistant: "

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    provider = get_provider("local", model="policy", tokenizer=tokenizer, generate_fn=broken)
    assert provider.feedback([REQUEST]) == [lean_errors_text(CODE, MESSAGES)]
    assert provider.stats.failures == 1


def test_retry_after_parsing():
    assert retry_after_s("2") == 2.0 and retry_after_s("0.25") == 0.25
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after_s(future) <= 30
