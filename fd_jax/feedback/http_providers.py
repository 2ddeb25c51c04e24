"""LLM feedback over HTTP: any OpenAI-compatible chat-completions endpoint, and Anthropic's Messages API."""

from __future__ import annotations

import logging
import os
from typing import Any

from fd_jax.feedback.base import Completion, FeedbackProvider
from fd_jax.feedback.http import post_json

log = logging.getLogger(__name__)


class HTTPProvider(FeedbackProvider):
    """Shared options of the HTTP providers.

    api_key: the key itself; None reads the environment variable named by `api_key_env` (the key is never
      logged or shown in repr). Without a key, requests go out unauthenticated (fine for a local vLLM).
    timeout_s: per attempt; max_retries: retries on 429/5xx/timeouts, exponential backoff from backoff_s,
      honouring Retry-After; max_tokens, temperature: generation settings, None leaves them out of the request
      (for models that reject them); system: an optional system prompt.
    """

    default_base_url = ""
    default_key_env = ""

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        max_tokens: int | None = 1024,
        temperature: float | None = 0.7,
        system: str | None = None,
        **common: Any,
    ):
        super().__init__(model=model, **common)
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        env = api_key_env or self.default_key_env
        self._api_key = api_key if api_key is not None else os.environ.get(env)
        if not self._api_key:
            log.warning("feedback provider %s: no API key (environment variable %s is unset)", self.name, env)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.system = system

    def generation_params(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "system": self.system}

    def _settings(self) -> dict[str, Any]:
        settings = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        return {k: v for k, v in settings.items() if v is not None}

    def _post(self, path: str, payload: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        return post_json(
            self.base_url + path,
            payload,
            headers,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            backoff_s=self.backoff_s,
            max_backoff_s=self.max_backoff_s,
            on_retry=lambda: self._count("retries"),
        )


class OpenAIProvider(HTTPProvider):
    """`POST {base_url}/chat/completions` (OpenAI, vLLM, SGLang, most gateways). `extra_body` is merged
    into every request (e.g. {"max_completion_tokens": 2048} for models that want it)."""

    name = "openai"
    default_base_url = "https://api.openai.com/v1"
    default_key_env = "OPENAI_API_KEY"

    def __init__(self, *, extra_body: dict[str, Any] | None = None, **options: Any):
        super().__init__(**options)
        self.extra_body = dict(extra_body or {})

    def generation_params(self) -> dict[str, Any]:
        return {**super().generation_params(), **self.extra_body}

    def _complete(self, prompt: str) -> Completion:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": prompt}
        ]
        payload = {"model": self.model, "messages": messages, **self._settings(), **self.extra_body}
        headers = {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        answer = self._post("/chat/completions", payload, headers)
        try:
            text = answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"unexpected chat-completions answer from {self.base_url}: {answer!s:.200}") from e
        usage = answer.get("usage") or {}
        return Completion(text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))


class AnthropicProvider(HTTPProvider):
    """`POST {base_url}/v1/messages` with the `x-api-key` and `anthropic-version` headers."""

    name = "anthropic"
    default_base_url = "https://api.anthropic.com"
    default_key_env = "ANTHROPIC_API_KEY"

    def __init__(self, *, anthropic_version: str = "2023-06-01", **options: Any):
        super().__init__(**options)
        self.anthropic_version = anthropic_version

    def _complete(self, prompt: str) -> Completion:
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}], **self._settings()}
        if self.system:
            payload["system"] = self.system
        headers = {"anthropic-version": self.anthropic_version}
        if self._api_key:
            headers["x-api-key"] = self._api_key
        answer = self._post("/v1/messages", payload, headers)
        blocks = answer.get("content")
        if not isinstance(blocks, list):
            raise ValueError(f"unexpected Messages API answer from {self.base_url}: {str(answer)[:200]}")
        text = "".join(b.get("text", "") for b in blocks if isinstance(b, dict) and b.get("type") == "text")
        usage = answer.get("usage") or {}
        return Completion(text, int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0)))
