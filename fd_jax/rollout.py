"""One rollout step: sample -> extract -> screen -> verify -> feedback -> teacher reprompts -> TrainBatch.

Generation runs chunk by chunk in the calling thread. As soon as a chunk is generated its proofs go to
the verifier (its `submit` when it has one) and a host thread waits for the verdicts and asks the feedback
provider about the failures, so verification and feedback of chunk i overlap generation of chunk i+1.
Every rollout is appended to `{workdir}/rollouts.jsonl`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fd_jax import losses
from fd_jax.data.problems import Problem
from fd_jax.data.prompts import PromptFormat
from fd_jax.data.reprompt import RepromptTemplates, build_reprompt
from fd_jax.feedback import FeedbackProvider, FeedbackRequest
from fd_jax.lean.types import REJECTED, VALID, ProofTask, Verdict
from fd_jax.train_batch import TrainBatch, pack_train_batch

__all__ = ["RolloutConfig", "RolloutResult", "TrainBatch", "group_advantages", "run_rollout"]


@dataclasses.dataclass
class RolloutConfig:
    """Knobs of the rollout (the trainer fills them from the ml_collections config)."""

    num_generations: int = 4  # G samples per problem
    max_new_tokens: int = 256  # completion budget per sample
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    chunk_problems: int = 0  # problems per generate call; 0 = all at once (no overlap with verification)
    pad_multiple: int = 32  # S, U and C are this times 1, 2, 3, 4, 6, 8, ... (train_batch.bucket_length)
    request_feedback: bool = True  # ask the provider about failed rollouts (off for pure GRPO)
    use_successful_as_teacher: bool = False  # show the teacher a solved sibling as a demonstration
    dont_reprompt_on_self_success: bool = True  # a rollout's own success is never its demonstration
    max_reprompt_len: int | None = None  # cap on teacher prompt tokens; the feedback is truncated to fit
    templates: RepromptTemplates = dataclasses.field(default_factory=RepromptTemplates)
    scale_rewards: str = "group"  # advantage scaling: group | batch | none
    log_rollouts: bool = True  # append every rollout to {workdir}/rollouts.jsonl


@dataclasses.dataclass
class RolloutResult:
    """batch: what the train step takes. records: one dict per rollout (as written to the JSONL).
    timings: seconds per stage — generate_s (device), verify_s and feedback_s (host, summed over chunks,
    mostly hidden behind generation), wait_s (host time not hidden: after the last chunk), batch_s, total_s.
    counts: rollouts, statuses, distilled rows, truncated completions and reprompts, and the feedback
    provider's running totals (feedback_*, since the provider was built).
    truncated_B: 1.0 where the completion hit max_new_tokens without a stop token."""

    batch: TrainBatch
    records: list[dict[str, Any]]
    timings: dict[str, float]
    counts: dict[str, float]
    truncated_B: np.ndarray


def group_advantages(rewards_PG: np.ndarray, *, scale: str = "group", eps: float = 1e-4) -> np.ndarray:
    """`fd_jax.losses.group_advantages` on host arrays: (r - mean_g r) / (std + eps), as float32 numpy."""
    return np.asarray(losses.group_advantages(np.asarray(rewards_PG, np.float32), scale=scale, eps=eps), np.float32)


def feedback_messages(verdict: Verdict) -> list[dict[str, Any]]:
    """The verifier's messages, or one synthetic error carrying the reason (rejected, timeout, crashed)."""
    if verdict.messages or not verdict.reason:
        return verdict.messages
    return [{"severity": "error", "pos": None, "endPos": None, "data": f"{verdict.status}: {verdict.reason}"}]


@dataclasses.dataclass
class _Chunk:
    """Rows of one generate call, and what the host thread found out about them."""

    rows: list[int]
    tasks: list[ProofTask]
    submitted: float = 0.0  # perf_counter() when its proofs went to the verifier
    verdicts: list[Verdict] = dataclasses.field(default_factory=list)
    feedback: dict[int, str] = dataclasses.field(default_factory=dict)  # row -> text
    verify_s: float = 0.0
    feedback_s: float = 0.0


def _check_chunk(
    chunk: _Chunk,
    screened: dict[int, Verdict],
    pending: concurrent.futures.Future | None,
    verifier: Any,
    provider: FeedbackProvider | None,
) -> _Chunk:
    """Host thread: collect the verdicts of a chunk, then ask for feedback on its failures."""
    to_check = [i for i in range(len(chunk.rows)) if i not in screened]
    if pending is not None:
        checked = pending.result()
    else:
        checked = verifier.verify_batch([chunk.tasks[i] for i in to_check]) if to_check else []
    verdicts = dict(screened)
    verdicts.update(zip(to_check, checked))
    chunk.verdicts = [verdicts[i] for i in range(len(chunk.rows))]
    chunk.verify_s = time.perf_counter() - chunk.submitted
    failed = [i for i, v in enumerate(chunk.verdicts) if v.status != VALID]
    if provider is not None and failed:
        start = time.perf_counter()
        requests = [
            FeedbackRequest(chunk.tasks[i].statement, chunk.tasks[i].code, feedback_messages(chunk.verdicts[i]))
            for i in failed
        ]
        texts = provider.feedback(requests)
        chunk.feedback = {chunk.rows[i]: text for i, text in zip(failed, texts)}
        chunk.feedback_s = time.perf_counter() - start
    return chunk


def _takes_n(generate_fn: Callable[..., Any]) -> bool:
    """Whether generate_fn samples n completions per prompt itself (one prefill per prompt, not per row)."""
    try:
        return "n" in inspect.signature(generate_fn).parameters
    except (TypeError, ValueError):
        return False


def _row(seq: Any, i: int, n: int) -> list:
    """Row i's first n entries as Python scalars (from a numpy array or nested lists)."""
    return np.asarray(seq[i][:n]).tolist()


@dataclasses.dataclass
class _Samples:
    """Per-row results of sampling and checking, rows b = p * G + g."""

    completions: list[list[int]]
    logprobs: list[list[float]]
    texts: list[str]
    finish: list[str]
    tasks: list[ProofTask]
    verdicts: list[Verdict]
    feedback: dict[int, str]  # row -> feedback text, failed rows only
    timings: dict[str, float]


def _sample_and_check(
    problems: Sequence[Problem],
    student_prompts: list[list[int]],
    *,
    model: Any,
    tokenizer: Any,
    fmt: PromptFormat,
    verifier: Any,
    provider: FeedbackProvider | None,
    config: RolloutConfig,
    generate_fn: Callable[..., Any],
    screen_fn: Callable[[str, str], str | None] | None,
    seed: int,
) -> _Samples:
    """Generate chunk by chunk; each chunk's verification and feedback run on a host thread meanwhile."""
    G, P = config.num_generations, len(problems)
    B = P * G
    none: list = [None] * B
    s = _Samples([[]] * B, [[]] * B, [""] * B, [""] * B, list(none), list(none), {}, {})
    stop_ids = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
    chunk_size = config.chunk_problems or P
    per_prompt = G > 1 and _takes_n(generate_fn)
    generate_s, checks = 0.0, []
    with concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="rollout-host") as host:
        for c, first in enumerate(range(0, P, chunk_size)):
            chunk_problems = range(first, min(P, first + chunk_size))
            rows = [p * G + g for p in chunk_problems for g in range(G)]
            start = time.perf_counter()
            if per_prompt:
                prompts, extra = [student_prompts[p] for p in chunk_problems], {"n": G}
            else:
                prompts, extra = [student_prompts[b // G] for b in rows], {}
            out = generate_fn(
                model,
                prompts,
                **extra,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                top_p=config.top_p,
                top_k=config.top_k,
                stop_token_ids=stop_ids,
                seed=int(np.random.SeedSequence([seed, c]).generate_state(1)[0] >> 1),
            )
            generate_s += time.perf_counter() - start
            chunk, screened = _Chunk(rows=rows, tasks=[]), {}
            for i, b in enumerate(rows):
                n = int(out.lengths[i])
                s.completions[b] = _row(out.tokens, i, n)
                s.logprobs[b] = _row(out.logprobs, i, n)
                s.finish[b] = str(out.finish_reason[i])
                s.texts[b] = tokenizer.decode(s.completions[b], skip_special_tokens=True)
                s.tasks[b] = fmt.extract(problems[b // G], s.texts[b])
                chunk.tasks.append(s.tasks[b])
                reason = screen_fn(s.tasks[b].statement, s.tasks[b].code) if screen_fn else None
                if reason is not None:
                    screened[i] = Verdict(REJECTED, [], 0.0, reason=reason)
            to_check = [chunk.tasks[i] for i in range(len(rows)) if i not in screened]
            chunk.submitted = time.perf_counter()
            pending = verifier.submit(to_check) if to_check and hasattr(verifier, "submit") else None
            checks.append(host.submit(_check_chunk, chunk, screened, pending, verifier, provider))
        start = time.perf_counter()
        chunks = [f.result() for f in checks]
        wait_s = time.perf_counter() - start
    for chunk in chunks:
        for b, verdict in zip(chunk.rows, chunk.verdicts):
            s.verdicts[b] = verdict
        s.feedback.update(chunk.feedback)
    s.timings = {
        "generate_s": generate_s,
        "verify_s": sum(ch.verify_s for ch in chunks),
        "feedback_s": sum(ch.feedback_s for ch in chunks),
        "wait_s": wait_s,
    }
    return s


def _teacher_prompts(
    problems: Sequence[Problem],
    student_prompts: list[list[int]],
    s: _Samples,
    *,
    fmt: PromptFormat,
    encode: Callable[[str], list[int]],
    config: RolloutConfig,
) -> tuple[list[list[int]], list[str | None], np.ndarray, int]:
    """Per row: teacher prompt ids (the student prompt when there is no context), the reprompt text or
    None, distill_mask_B, and how many reprompts had their feedback truncated."""
    G = config.num_generations
    prompts, contexts, distill_B, cut = [], [], np.zeros(len(s.tasks), np.float32), 0
    for b in range(len(s.tasks)):
        p = b // G
        solution = None
        if config.use_successful_as_teacher:
            solved = [j for j in range(p * G, p * G + G) if s.verdicts[j].status == VALID]
            if config.dont_reprompt_on_self_success:
                solved = [j for j in solved if j != b]
            if solved:
                solution = fmt.demonstration(s.tasks[solved[0]])  # the first solved sibling, as SDPO does
        feedback = s.feedback.get(b)
        reprompt = None
        if feedback is not None or solution is not None:
            reprompt = build_reprompt(fmt, problems[p], feedback=feedback, solution=solution, encode=encode,
                                      templates=config.templates, max_len=config.max_reprompt_len)
        if reprompt is None:
            prompts.append(student_prompts[p])
            contexts.append(None)
        else:
            prompts.append(reprompt.tokens)
            contexts.append(reprompt.text)
            distill_B[b] = 1.0
            cut += reprompt.truncated
    return prompts, contexts, distill_B, cut


def run_rollout(
    problems: Sequence[Problem],
    *,
    model: Any,
    tokenizer: Any,
    fmt: PromptFormat,
    verifier: Any,
    feedback: FeedbackProvider | None,
    config: RolloutConfig,
    generate_fn: Callable[..., Any] | None = None,
    screen_fn: Callable[[str, str], str | None] | None = None,
    seed: int = 0,
    step: int = 0,
    workdir: str | pathlib.Path | None = None,
) -> RolloutResult:
    """Roll out P problems x G samples and build the `TrainBatch` (rows b = p * G + g).

    generate_fn: `fd_jax.sampling.generate` by default (§4 signature; `SampleOutput` rows with tokens,
      logprobs, lengths, finish_reason). When it takes `n`, each prompt goes once with n=G (rows
      prompt-major), else every row's prompt is passed. verifier: `verify_batch(tasks)`, optionally
      `submit(tasks)`.
    feedback: asked about failed rollouts when `config.request_feedback`; None = no feedback.
    screen_fn(statement, code) -> reason | None: rejected proofs never reach the verifier.
    The verifier's and provider's own failures arrive as verdicts / fallback texts; an exception here
    means a bug or a misconfiguration (e.g. an empty prompt).
    """
    if generate_fn is None:
        from fd_jax.sampling import generate as generate_fn
    total_start = time.perf_counter()
    G, P = config.num_generations, len(problems)
    B = P * G
    encode = lambda text: tokenizer.encode(text, add_special_tokens=fmt.add_special_tokens)  # noqa: E731
    student_texts = [fmt.render(p) for p in problems]
    student_prompts = [encode(t) for t in student_texts]
    provider = feedback if config.request_feedback else None
    s = _sample_and_check(
        problems, student_prompts, model=model, tokenizer=tokenizer, fmt=fmt, verifier=verifier,
        provider=provider, config=config, generate_fn=generate_fn, screen_fn=screen_fn, seed=seed,
    )

    start = time.perf_counter()
    rewards_B = np.array([v.reward for v in s.verdicts], np.float32)
    advantages_B = group_advantages(rewards_B.reshape(P, G), scale=config.scale_rewards).reshape(B)
    teacher_prompts, contexts, distill_B, reprompts_cut = _teacher_prompts(
        problems, student_prompts, s, fmt=fmt, encode=encode, config=config
    )
    batch = pack_train_batch(
        student_prompts=[student_prompts[b // G] for b in range(B)],
        teacher_prompts=teacher_prompts,
        completions=s.completions,
        old_logprobs=s.logprobs,
        rewards_B=rewards_B,
        advantages_B=advantages_B,
        distill_mask_B=distill_B,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        pad_multiple=config.pad_multiple,
    )
    truncated_B = np.array([f == "length" for f in s.finish], np.float32)
    batch_s = time.perf_counter() - start

    records = [
        {
            "step": step,
            "problem_id": problems[b // G].id,
            "sample": b % G,
            "prompt": student_texts[b // G],
            "completion": s.texts[b],
            "code": s.tasks[b].code,
            "finish_reason": s.finish[b],
            "status": s.verdicts[b].status,
            "reason": s.verdicts[b].reason,
            "messages": s.verdicts[b].messages,
            "feedback": s.feedback.get(b),
            "teacher_prompt": contexts[b],
            "reward": float(rewards_B[b]),
            "advantage": float(advantages_B[b]),
            "distilled": bool(distill_B[b]),
        }
        for b in range(B)
    ]
    if workdir is not None and config.log_rollouts:
        path = pathlib.Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        with (path / "rollouts.jsonl").open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    counts: dict[str, float] = {
        "rollouts": B,
        "distilled": float(distill_B.sum()),
        "truncated": float(truncated_B.sum()),
        "reprompts_truncated": reprompts_cut,
    }
    for v in s.verdicts:
        counts[v.status] = counts.get(v.status, 0) + 1
    if provider is not None:
        counts.update({f"feedback_{k}": v for k, v in provider.stats.as_dict().items()})
    timings = {**s.timings, "batch_s": batch_s, "total_s": time.perf_counter() - total_start}
    return RolloutResult(batch, records, timings, counts, truncated_B)
