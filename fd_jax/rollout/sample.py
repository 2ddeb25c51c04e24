"""Sample and verify, written once: chunks of problems go through the sampler (n completions per prompt,
one seed per chunk), each completion is decoded and extracted into a `ProofTask` by the prompt format, and
the chunk's tasks go to the verifier at once, so checking one chunk overlaps generating the next. The
rollout (`fd_jax.rollout.rollout`) adds feedback on a host thread; evaluation (`fd_jax.eval.evaluation`)
adds the entropy pass and pass@k. Rows are problem-major: row b = p * n + i.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from fd_jax.data.problems import Problem
from fd_jax.data.prompts import PromptFormat
from fd_jax.verification import ProofTask, Verdict, Verifier


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends only on (seed, *keys): the sampler seed of a training step (keys: step)
    and of a generate call within it (keys: chunk), so a resumed or re-chunked run draws the same."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0] >> 1)


@dataclasses.dataclass
class SampledChunk:
    """One generate call's rows and their checking. `problems`: the problem indices of the chunk; `rows`:
    the global row b of each sample; per row the completion ids, the sampler's log-probs, the decoded
    text, the finish reason and the extracted task; `verdicts`: the verifier's future (in row order);
    `submitted`: perf_counter() when it went to the verifier; `generate_s`: seconds of the generate call."""

    problems: range
    rows: list[int]
    completions: list[list[int]]
    logprobs: list[list[float]]
    texts: list[str]
    finish: list[str]
    tasks: list[ProofTask]
    verdicts: concurrent.futures.Future[list[Verdict]]
    submitted: float
    generate_s: float


def _row(seq: Any, i: int, n: int) -> list:
    """Row i's first n entries as Python scalars (from a numpy array or nested lists)."""
    return np.asarray(seq[i][:n]).tolist()


def sample_chunks(
    problems: Sequence[Problem],
    prompts: Sequence[Sequence[int]],
    *,
    model: Any,
    tokenizer: Any,
    fmt: PromptFormat,
    verifier: Verifier,
    generate_fn: Callable[..., Any],
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    chunk_problems: int = 0,
    stop_strings: Sequence[str] = (),
) -> Iterator[SampledChunk]:
    """Yields each chunk of `chunk_problems` problems (0 = all at once) as soon as its tasks are submitted.

    prompts[p]: the token ids of problem p's prompt. generate_fn: `fd_jax.sampling.generate` or any
    function with its signature (it samples `n` completions per prompt, rows prompt-major, and stops at the
    tokenizer's EOS and at `stop_strings`). The chunk c is sampled with seed `derive_seed(seed, c)`.
    """
    stop_ids = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
    extra = {"stop_strings": tuple(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    size = chunk_problems or len(problems)
    for c, first in enumerate(range(0, len(problems), size)):
        chunk = range(first, min(len(problems), first + size))
        start = time.perf_counter()
        out = generate_fn(model, [prompts[p] for p in chunk], n=n, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, top_k=top_k, stop_token_ids=stop_ids,
                          seed=derive_seed(seed, c), **extra)
        generate_s = time.perf_counter() - start
        rows = [p * n + i for p in chunk for i in range(n)]
        completions, logprobs, texts, finish, tasks = [], [], [], [], []
        for i, b in enumerate(rows):
            length = int(out.lengths[i])
            completions.append(_row(out.tokens, i, length))
            logprobs.append(_row(out.logprobs, i, length))
            finish.append(str(out.finish_reason[i]))
            texts.append(tokenizer.decode(completions[-1], skip_special_tokens=True))
            tasks.append(fmt.extract(problems[b // n], texts[-1]))
        submitted = time.perf_counter()
        yield SampledChunk(chunk, rows, completions, logprobs, texts, finish, tasks, verifier.submit(tasks),
                           submitted, generate_s)
