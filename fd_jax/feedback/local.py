"""Feedback written by an fd_jax model (a separate checkpoint, or the policy itself) through the sampler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fd_jax.data.prompts import render_chat
from fd_jax.feedback.base import Completion, FeedbackProvider


class LocalProvider(FeedbackProvider):
    """All pending prompts go to the sampler in one `generate` call.

    model: an fd_jax model (assign `provider.model_obj` to follow a changing policy); tokenizer: its HF
    tokenizer. chat: render the prompt as a user turn with the tokenizer's chat template.
    max_prompt_len: prompts longer than this (in tokens) keep their last max_prompt_len tokens.
    generate_fn: `fd_jax.rollout.sampling.generate` by default (injectable for tests).
    The disk cache is off unless `cache_dir` is given; with a policy that changes, leave it off.
    """

    name = "local"

    def __init__(
        self,
        *,
        model: Any,
        tokenizer: Any,
        model_name: str = "local",
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        chat: bool = True,
        max_prompt_len: int | None = None,
        generate_fn: Callable[..., Any] | None = None,
        **common: Any,
    ):
        super().__init__(model=model_name, **common)
        self.model_obj = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.chat = chat
        self.max_prompt_len = max_prompt_len
        self._seed = seed
        self._calls = 0
        if generate_fn is None:
            from fd_jax.rollout.sampling import generate as generate_fn  # needs the device stack only when used
        self._generate = generate_fn

    def generation_params(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "chat": self.chat}

    def _encode(self, prompt: str) -> list[int]:
        if self.chat:
            ids = self.tokenizer.encode(render_chat(self.tokenizer, prompt), add_special_tokens=False)
        else:
            ids = self.tokenizer.encode(prompt)
        return ids[-self.max_prompt_len :] if self.max_prompt_len else ids

    def _complete_many(self, prompts: list[str]) -> list[Completion | BaseException]:
        try:
            self._check_budget()
            ids = [self._encode(p) for p in prompts]
            self._calls += 1
            out = self._generate(
                self.model_obj,
                ids,
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                stop_token_ids=tuple(t for t in (self.tokenizer.eos_token_id,) if t is not None),
                seed=self._seed + self._calls,
            )
        except Exception as e:  # the whole batch falls back; the trainer goes on
            return [e] * len(prompts)
        answers: list[Completion | BaseException] = []
        for i, prompt_ids in enumerate(ids):
            n = int(out.lengths[i])
            text = self.tokenizer.decode(list(out.tokens[i][:n]), skip_special_tokens=True)
            answers.append(Completion(text, len(prompt_ids), n))
        return answers
