"""The feedback provider interface and the machinery every LLM provider shares: the prompt template, the
disk cache, token and cost counters, the budget, concurrency, and the fallback to Lean's own errors."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
from typing import Any

from fd_jax.data.extraction import strip_think
from fd_jax.feedback.cache import FeedbackCache, cache_key
from fd_jax.feedback.lean_text import lean_errors_text

log = logging.getLogger(__name__)

# Config string; fields {statement}, {attempt}, {lean_errors}. It asks for a diagnosis and hints: the
# teacher must be helped to prefer good tokens, not handed a proof to copy.
FEEDBACK_PROMPT = """You are reviewing a failed attempt at a formal proof in Lean 4.

Theorem statement:
```lean4
{statement}
```

Attempted proof:
```lean4
{attempt}
```

Lean's messages:
{lean_errors}

Explain briefly what is wrong with the attempt and give concrete hints to fix it: the step that fails and \
why, and tactics or Mathlib lemmas worth trying. Do not write a complete proof."""


# Appended to the prompt of a multi-turn episode's request: the critique is of the whole trajectory.
TRAJECTORY_TAGS = ("<trajectory>", "</trajectory>")  # never whole inside the block (rollout.trajectory_text)
TRAJECTORY_BLOCK = """

The attempt above was submitted at the end of this episode (the model's turns, its tool calls and the tools'
results, in order):
<trajectory>
{trajectory}
</trajectory>"""


@dataclasses.dataclass(frozen=True)
class FeedbackRequest:
    """One failed attempt to comment on.

    statement: the theorem statement; attempt: the code the model submitted; lean_messages: the verifier's
    messages in the REPL JSON shape (severity, pos, endPos, data). trajectory: for a multi-turn episode, the
    whole transcript after the prompt (the model's turns, its tool calls and their results); "" otherwise.
    """

    statement: str
    attempt: str
    lean_messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    trajectory: str = ""


@dataclasses.dataclass
class Completion:
    """An LLM's answer to one prompt, with the token usage it reported."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class BudgetExhausted(RuntimeError):
    """The provider's budget is spent; the request is answered with Lean's errors instead."""


@dataclasses.dataclass
class FeedbackStats:
    """Running counters of a provider (since construction). `as_dict()` is what the trainer logs."""

    requests: int = 0  # feedback texts asked for
    cache_hits: int = 0  # served from the disk cache (or a duplicate in the same batch), no LLM call
    llm_calls: int = 0  # prompts answered by the LLM
    retries: int = 0  # HTTP retries after 429/5xx/timeouts
    failures: int = 0  # requests that fell back to Lean's errors because the LLM could not answer
    budget_fallbacks: int = 0  # requests answered with Lean's errors because the budget was spent
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


class FeedbackProvider:
    """Base class. A provider turns `FeedbackRequest`s into feedback texts with `feedback(requests)`.

    Subclasses implement `_complete(prompt) -> Completion` (called concurrently, up to max_concurrency
    threads) or override `_complete_many(prompts)` to batch. Everything else lives here:

    template: the feedback prompt (FEEDBACK_PROMPT's fields).
    cache_dir: a directory for the sqlite cache keyed by (provider, model, generation params, prompt); None
      disables it.
    budget_usd / budget_tokens: once spent, further requests get Lean's errors (counted in
      `budget_fallbacks`). The check happens as each request starts, so up to max_concurrency requests
      already in flight may overshoot it.
    usd_per_mtok_in / usd_per_mtok_out: prices per million prompt / completion tokens, for `cost_usd`.
    lean_errors: options of `lean_errors_text` for the fallback text and the prompt's {lean_errors}.
    """

    name = "base"

    def __init__(
        self,
        *,
        model: str = "",
        template: str = FEEDBACK_PROMPT,
        cache_dir: str | None = None,
        budget_usd: float | None = None,
        budget_tokens: int | None = None,
        usd_per_mtok_in: float = 0.0,
        usd_per_mtok_out: float = 0.0,
        max_concurrency: int = 8,
        lean_errors: dict[str, Any] | None = None,
    ):
        if max_concurrency < 1:
            raise ValueError(f"feedback provider {self.name}: max_concurrency={max_concurrency}, must be >= 1")
        self.model = model
        self.template = template
        self.cache = FeedbackCache(cache_dir) if cache_dir else None
        self.budget_usd = budget_usd
        self.budget_tokens = budget_tokens
        self.usd_per_mtok_in = usd_per_mtok_in
        self.usd_per_mtok_out = usd_per_mtok_out
        self.max_concurrency = max_concurrency
        self.lean_errors_options = dict(lean_errors or {})
        self.stats = FeedbackStats()
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.render(FeedbackRequest("s", "a", []))  # a template with unknown fields fails here, not mid-run

    # -- what subclasses provide -------------------------------------------------------------------------

    def generation_params(self) -> dict[str, Any]:
        """Settings that change the answer (temperature, max tokens...): part of the cache key."""
        return {}

    def _complete(self, prompt: str) -> Completion:
        raise NotImplementedError

    def _complete_many(self, prompts: list[str]) -> list[Completion | BaseException]:
        """Answers (or the exception each request ended with), in order, max_concurrency at a time."""

        def one(prompt: str) -> Completion | BaseException:
            try:
                self._check_budget()
                return self._complete(prompt)
            except Exception as e:  # one bad request must not sink the batch
                return e

        if len(prompts) <= 1:
            return [one(p) for p in prompts]
        return list(self._executor().map(one, prompts))

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        """One pool per provider, so concurrent `feedback` calls (one per rollout chunk) share the
        max_concurrency limit instead of multiplying it."""
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.max_concurrency, thread_name_prefix=f"feedback-{self.name}"
                )
            return self._pool

    # -- shared machinery --------------------------------------------------------------------------------

    def lean_errors_text(self, request: FeedbackRequest) -> str:
        return lean_errors_text(request.attempt, request.lean_messages, **self.lean_errors_options)

    def render(self, request: FeedbackRequest) -> str:
        """The prompt the LLM sees for `request`; an episode's trajectory goes in the template's
        `{trajectory}` field, or after the prompt (TRAJECTORY_BLOCK) when the template has none."""
        trajectory = request.trajectory.rstrip("\n")
        try:
            text = self.template.format(
                statement=request.statement.rstrip("\n"),
                attempt=request.attempt.rstrip("\n"),
                lean_errors=self.lean_errors_text(request),
                trajectory=trajectory,
            )
        except (KeyError, IndexError) as e:
            raise ValueError(
                f"feedback template field {e} is unknown; use {{statement}}, {{attempt}}, {{lean_errors}}, "
                f"{{trajectory}}"
            ) from None
        if trajectory and "{trajectory}" not in self.template:
            text += TRAJECTORY_BLOCK.format(trajectory=trajectory)
        return text

    def budget_spent(self) -> bool:
        with self._lock:
            over_usd = self.budget_usd is not None and self.stats.cost_usd >= self.budget_usd
            used = self.stats.prompt_tokens + self.stats.completion_tokens
            over_tokens = self.budget_tokens is not None and used >= self.budget_tokens
        return over_usd or over_tokens

    def _check_budget(self) -> None:
        if self.budget_spent():
            raise BudgetExhausted(f"feedback budget of provider {self.name} is spent")

    def _account(self, completion: Completion) -> None:
        with self._lock:
            self.stats.llm_calls += 1
            self.stats.prompt_tokens += completion.prompt_tokens
            self.stats.completion_tokens += completion.completion_tokens
            usd_in = completion.prompt_tokens * self.usd_per_mtok_in
            self.stats.cost_usd += (usd_in + completion.completion_tokens * self.usd_per_mtok_out) / 1e6

    def feedback(self, requests: list[FeedbackRequest]) -> list[str]:
        """One feedback text per request, in order. Never raises for a bad request: a failed, empty or
        over-budget answer becomes Lean's errors text for that request (counted in `stats`)."""
        with self._lock:
            self.stats.requests += len(requests)
        texts: list[str | None] = [None] * len(requests)
        params = self.generation_params()
        pending: dict[str, tuple[str, list[int]]] = {}  # key -> (prompt, indices asking for it)
        for i, request in enumerate(requests):
            try:
                prompt = self.render(request)
                key = cache_key(self.name, self.model, prompt, params)
                cached = self.cache.get(key) if self.cache is not None else None
            except Exception as e:  # a malformed request, or an unreadable cache
                log.warning("feedback provider %s: request %d unusable (%s: %s)", self.name, i, type(e).__name__, e)
                self._count("failures")
                texts[i] = self._fallback(request)
                continue
            if cached is not None:
                texts[i] = cached
                self._count("cache_hits")
            elif key in pending:
                pending[key][1].append(i)
                self._count("cache_hits")
            else:
                pending[key] = (prompt, [i])
        keys = list(pending)
        answers = self._complete_many([pending[k][0] for k in keys]) if keys else []
        for key, answer in zip(keys, answers):
            indices = pending[key][1]
            text = None
            if isinstance(answer, Completion):
                self._account(answer)
                text = strip_think(answer.text).strip()
                if text and self.cache is not None:
                    try:
                        self.cache.put(key, text)
                    except Exception as e:  # a full disk loses the cache entry, not the feedback
                        log.warning("feedback cache write failed: %s", e)
            if not text:
                budget = isinstance(answer, BudgetExhausted)
                self._count("budget_fallbacks" if budget else "failures", len(indices))
                if not budget:
                    empty = isinstance(answer, Completion)
                    reason = "an empty answer" if empty else f"{type(answer).__name__}: {answer}"
                    log.warning("feedback provider %s failed (%s); using Lean's errors", self.name, reason)
            for i in indices:
                texts[i] = text or self._fallback(requests[i])
        return texts  # type: ignore[return-value]

    def _fallback(self, request: FeedbackRequest) -> str:
        """Lean's errors for `request`; a fixed sentence if even those cannot be formatted."""
        try:
            return self.lean_errors_text(request)
        except Exception:
            return "The attempt failed; Lean's messages are not available."

    def _count(self, field: str, n: int = 1) -> None:
        with self._lock:
            setattr(self.stats, field, getattr(self.stats, field) + n)

    def close(self) -> None:
        """Stop the request threads and close the cache."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.cache is not None:
            self.cache.close()

    def __repr__(self) -> str:  # deliberately without credentials
        return f"{type(self).__name__}(model={self.model!r})"


class LeanErrorsProvider(FeedbackProvider):
    """No LLM: the feedback is Lean's messages, formatted with a little code context."""

    name = "lean_errors"

    def feedback(self, requests: list[FeedbackRequest]) -> list[str]:
        with self._lock:
            self.stats.requests += len(requests)
        return [self._fallback(r) for r in requests]


class CheckerMessagesProvider(FeedbackProvider):
    """No LLM: the checker's own message texts, one per line, without code excerpts or carets. For a checker
    whose messages already say what is wrong in the task's terms (the arithmetic test bed: "wrong answer 13:
    ... the answer is too large"), so the teacher reads plain sentences rather than a Lean-shaped listing."""

    name = "checker"

    def feedback(self, requests: list[FeedbackRequest]) -> list[str]:
        with self._lock:
            self.stats.requests += len(requests)
        return [self._messages_text(r) for r in requests]

    def _messages_text(self, request: FeedbackRequest) -> str:
        lines = [str(m.get("data", "")).strip() for m in request.lean_messages if m.get("severity", "error") == "error"]
        lines = [line for line in lines if line]
        return "\n".join(lines) if lines else self._fallback(request)
