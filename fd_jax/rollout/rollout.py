"""One rollout step: sample -> extract -> verify -> feedback -> teacher reprompts -> TrainBatch.

Generation runs chunk by chunk in the calling thread (`fd_jax.rollout.sample.sample_chunks`). As soon as a
chunk is generated its proofs go to the verifier (`submit`) and a host thread waits for the verdicts and
asks the feedback provider about the failures, so verification and feedback of chunk i overlap generation
of chunk i+1.
Every rollout is appended to `{workdir}/rollouts.jsonl`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fd_jax.rl import losses
from fd_jax.data.problems import Problem
from fd_jax.data.prompts import PromptFormat
from fd_jax.config.schema import RolloutConfig
from fd_jax.data.reprompt import build_reprompt
from fd_jax.feedback import FeedbackProvider, FeedbackRequest
from fd_jax.rollout.sample import SampledChunk, sample_chunks
from fd_jax.verification import VALID, ProofTask, Verdict, Verifier
from fd_jax.rl.batch import TrainBatch, pack_train_batch
from fd_jax.rl.diagnostics import probe_batch

__all__ = ["RolloutConfig", "RolloutResult", "TrainBatch", "group_advantages", "run_rollout"]


@dataclasses.dataclass
class RolloutResult:
    """batch: what the train step takes. records: one dict per rollout (as written to the JSONL).
    timings: seconds per stage — generate_s (device), verify_s and feedback_s (host, summed over chunks,
    mostly hidden behind generation), wait_s (host time not hidden: after the last chunk), batch_s, total_s.
    counts: rollouts, statuses, distilled rows, truncated completions and reprompts, and the feedback
    provider's running totals (feedback_*, since the provider was built).
    truncated_B: 1.0 where the completion hit max_new_tokens without a stop token.
    probe: the teacher-advantage probe (`fd_jax.rl.diagnostics.probe_batch`): each distilled row's teacher
    prompt with a verified-correct sibling's completion; None when no row has one."""

    batch: TrainBatch
    records: list[dict[str, Any]]
    timings: dict[str, float]
    counts: dict[str, float]
    truncated_B: np.ndarray
    probe: TrainBatch | None = None


def group_advantages(rewards_PG: np.ndarray, *, scale: str = "group", eps: float = 1e-4) -> np.ndarray:
    """`fd_jax.rl.losses.group_advantages` on host arrays: (r - mean_g r) / (std + eps), as float32 numpy."""
    return np.asarray(losses.group_advantages(np.asarray(rewards_PG, np.float32), scale=scale, eps=eps), np.float32)


def feedback_messages(verdict: Verdict) -> list[dict[str, Any]]:
    """The verifier's messages, or one synthetic error carrying the reason (rejected, timeout, crashed)."""
    if verdict.messages or not verdict.reason:
        return verdict.messages
    return [{"severity": "error", "pos": None, "endPos": None, "data": f"{verdict.status}: {verdict.reason}"}]


@dataclasses.dataclass
class _Checked:
    """What the host thread found out about one chunk: its verdicts (row order), the feedback on its
    failures (row b -> text) and how long each took."""

    verdicts: list[Verdict]
    feedback: dict[int, str]
    verify_s: float
    feedback_s: float


def _check_chunk(chunk: SampledChunk, provider: FeedbackProvider | None) -> _Checked:
    """Host thread: wait for the verdicts of a chunk, then ask for feedback on its failures."""
    verdicts = chunk.verdicts.result()
    verify_s = time.perf_counter() - chunk.submitted
    failed = [i for i, v in enumerate(verdicts) if v.status != VALID]
    feedback, feedback_s = {}, 0.0
    if provider is not None and failed:
        start = time.perf_counter()
        requests = [FeedbackRequest(chunk.tasks[i].statement, chunk.tasks[i].code, feedback_messages(verdicts[i]))
                    for i in failed]
        texts = provider.feedback(requests)
        feedback = {chunk.rows[i]: text for i, text in zip(failed, texts)}
        feedback_s = time.perf_counter() - start
    return _Checked(verdicts, feedback, verify_s, feedback_s)


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
    verifier: Verifier,
    provider: FeedbackProvider | None,
    config: RolloutConfig,
    generate_fn: Callable[..., Any],
    seed: int,
) -> _Samples:
    """`sample_chunks`, with each chunk's verdicts and feedback collected on a host thread meanwhile."""
    B = len(problems) * config.num_generations
    none: list = [None] * B
    s = _Samples([[]] * B, [[]] * B, [""] * B, [""] * B, list(none), list(none), {}, {})
    generate_s, checks = 0.0, []
    chunks = sample_chunks(problems, student_prompts, model=model, tokenizer=tokenizer, fmt=fmt, verifier=verifier,
                           generate_fn=generate_fn, n=config.num_generations, max_new_tokens=config.max_new_tokens,
                           temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, seed=seed,
                           chunk_problems=config.chunk_problems)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="rollout-host") as host:
        for chunk in chunks:
            generate_s += chunk.generate_s
            for i, b in enumerate(chunk.rows):
                s.completions[b], s.logprobs[b] = chunk.completions[i], chunk.logprobs[i]
                s.texts[b], s.finish[b], s.tasks[b] = chunk.texts[i], chunk.finish[i], chunk.tasks[i]
            checks.append((chunk.rows, host.submit(_check_chunk, chunk, provider)))
        start = time.perf_counter()
        checked = [(rows, future.result()) for rows, future in checks]
        wait_s = time.perf_counter() - start
    for rows, result in checked:
        for b, verdict in zip(rows, result.verdicts):
            s.verdicts[b] = verdict
        s.feedback.update(result.feedback)
    s.timings = {
        "generate_s": generate_s,
        "verify_s": sum(result.verify_s for _, result in checked),
        "feedback_s": sum(result.feedback_s for _, result in checked),
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
        solution = solved_reply = None
        if config.use_successful_as_teacher:
            solved = [j for j in range(p * G, p * G + G) if s.verdicts[j].status == VALID]
            if config.dont_reprompt_on_self_success:
                solved = [j for j in solved if j != b]
            if solved:
                solution = fmt.demonstration(s.tasks[solved[0]])  # the first solved sibling, as SDPO does
                solved_reply = s.texts[solved[0]]
        feedback = s.feedback.get(b)
        reprompt = None
        if feedback is not None or solution is not None:
            reprompt = build_reprompt(fmt, problems[p], feedback=feedback, solution=solution, encode=encode,
                                      templates=config.templates, max_len=config.max_reprompt_len,
                                      placement=config.context_placement, attempt=s.texts[b],
                                      solved_reply=solved_reply)
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
    verifier: Verifier,
    feedback: FeedbackProvider | None,
    config: RolloutConfig,
    generate_fn: Callable[..., Any] | None = None,
    seed: int = 0,
    step: int = 0,
    workdir: str | pathlib.Path | None = None,
) -> RolloutResult:
    """Roll out P problems x G samples and build the `TrainBatch` (rows b = p * G + g).

    generate_fn: `fd_jax.sampling.generate` by default, or any function with its signature: each prompt goes
      once with n=G (`SampleOutput` rows prompt-major, with tokens, logprobs, lengths, finish_reason).
    verifier: the task's `Verifier` (`fd_jax.verification`); it screens what it will not run itself.
    feedback: asked about failed rollouts when `config.request_feedback`; None = no feedback.
    The verifier's and provider's own failures arrive as verdicts / fallback texts; an exception here
    means a bug or a misconfiguration (e.g. an empty prompt).
    """
    if generate_fn is None:
        from fd_jax.rollout.sampling import generate as generate_fn
    total_start = time.perf_counter()
    G, P = config.num_generations, len(problems)
    B = P * G
    encode = lambda text: tokenizer.encode(text, add_special_tokens=fmt.add_special_tokens)  # noqa: E731
    student_texts = [fmt.render(p) for p in problems]
    student_prompts = [encode(t) for t in student_texts]
    provider = feedback if config.request_feedback else None
    s = _sample_and_check(
        problems, student_prompts, model=model, tokenizer=tokenizer, fmt=fmt, verifier=verifier,
        provider=provider, config=config, generate_fn=generate_fn, seed=seed,
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
        pad_id=batch_pad_id(tokenizer),
        pad_multiple=config.pad_multiple,
    )
    probe = probe_batch(
        student_prompts=[student_prompts[b // G] for b in range(B)], teacher_prompts=teacher_prompts,
        completions=s.completions, logprobs=s.logprobs, correct_B=np.array([v.status == VALID for v in s.verdicts]),
        distill_B=distill_B, group=G, pad_id=batch_pad_id(tokenizer), pad_multiple=config.pad_multiple,
    ) if distill_B.any() else None
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
    return RolloutResult(batch, records, timings, counts, truncated_B, probe)


def batch_pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
