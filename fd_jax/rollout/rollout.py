"""One rollout step: sample -> extract -> verify -> feedback -> teacher reprompts -> TrainBatch.

Generation runs chunk by chunk in the calling thread (`fd_jax.rollout.sample.sample_chunks`). As soon as a
chunk is generated its proofs go to the verifier (`submit`) and a host thread waits for the verdicts and
asks the feedback provider about the failures, so verification and feedback of chunk i overlap generation
of chunk i+1.
Every rollout is appended to `{workdir}/rollouts.jsonl`.

A task with tools (`EpisodeSetup`) rolls out episodes of several turns instead (`_episodes_and_check`):
`fd_jax.rollout.episodes.run_episodes` with a `fd_jax.tasks.tools.ToolEnvironment`; the completion of a
row is its whole transcript after the prompt, masked to the model's own tokens, the final answer is
verified as a single-turn completion is, and the feedback request carries the trajectory. An episode
that ends without an answer (turn or token budget) is `rejected` without being checked: it fails closed.
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
from fd_jax.config.schema import EpisodeConfig, RolloutConfig
from fd_jax.data.control import neutralize, tokenizer_controls
from fd_jax.data.reprompt import build_reprompt
from fd_jax.feedback import FeedbackProvider, FeedbackRequest
from fd_jax.rollout.sample import SampledChunk, sample_chunks
from fd_jax.verification import REJECTED, VALID, ProofTask, Verdict, Verifier
from fd_jax.rl.batch import TrainBatch, pack_train_batch
from fd_jax.rl.diagnostics import probe_batch

__all__ = ["EpisodeSetup", "RolloutConfig", "RolloutResult", "TrainBatch", "group_advantages", "run_rollout",
           "sample_episodes"]


@dataclasses.dataclass
class EpisodeSetup:
    """What turns a rollout into episodes: the budgets and the task's tools (name -> Tool). script:
    (problem, sample) -> the tokens each turn starts with (scripted turns for tests and demonstrations,
    `run_episodes`' `forced`); None = the policy writes everything."""

    config: EpisodeConfig
    tools: dict[str, Any]
    script: Callable[[Problem, int], list[list[int]]] | None = None


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
    masks: list[list[int]] | None = None  # episodes: 1 on model tokens, 0 on tool output
    episodes: list[dict[str, Any]] | None = None  # episodes: per row, what rollouts.jsonl logs of it
    counts: dict[str, float] = dataclasses.field(default_factory=dict)


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


def _episodes_and_check(
    problems: Sequence[Problem],
    student_prompts: list[list[int]],
    *,
    model: Any,
    tokenizer: Any,
    fmt: PromptFormat,
    verifier: Verifier,
    provider: FeedbackProvider | None,
    config: RolloutConfig,
    setup: EpisodeSetup,
    seed: int,
) -> _Samples:
    """`sample_episodes` with the rollout's sampling settings."""
    return sample_episodes(problems, student_prompts, model=model, tokenizer=tokenizer, fmt=fmt, verifier=verifier,
                           provider=provider, setup=setup, n=config.num_generations, temperature=config.temperature,
                           top_p=config.top_p, top_k=config.top_k, seed=seed)


def sample_episodes(
    problems: Sequence[Problem],
    student_prompts: list[list[int]],
    *,
    model: Any,
    tokenizer: Any,
    fmt: PromptFormat,
    verifier: Verifier,
    setup: EpisodeSetup,
    n: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    provider: FeedbackProvider | None = None,
) -> _Samples:
    """Episodes for every row (n per problem, rows b = p * n + i), then their final answers verified and,
    for failures, feedback on the whole trajectory (when a provider is given). The training rollout and
    the periodic evaluation of an episodic task both sample through here. Returns per row the transcript
    tokens (`completions`), model-token `masks`, log-probs, texts, ProofTasks and verdicts."""
    from fd_jax.rollout.episodes import END_ANSWER, END_SUBMIT, run_episodes
    from fd_jax.tasks.tool_formats import JsonTagFormat
    from fd_jax.tasks.tools import ToolBox, ToolContext, ToolEnvironment

    G, ec = n, setup.config
    B = len(problems) * G
    tool_format = getattr(fmt, "tool_format", None) or JsonTagFormat()  # the task resolved episode.tool_format
    # A native format renders each result through the chat template after the row's messages so far.
    messages = [fmt.messages(problems[b // G]).as_list() for b in range(B)] if tool_format.native else None
    box = ToolBox(setup.tools, timeout_s=ec.tool_timeout_s, max_output_chars=ec.max_tool_output_chars,
                  workers=ec.tool_workers)
    encode = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    env = ToolEnvironment(box, [ToolContext(problems[b // G].statement, problems[b // G].id) for b in range(B)],
                          tool_format=tool_format, messages=messages, fit=(encode, ec.max_obs_tokens),
                          tokenizer=tokenizer)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    try:
        out = run_episodes(
            model, student_prompts, env, decode=decode, encode=encode,
            n=G, max_turns=ec.max_turns, max_turn_tokens=ec.max_turn_tokens, max_obs_tokens=ec.max_obs_tokens,
            max_episode_tokens=ec.max_episode_tokens, stop_token_ids=tool_format.stop_token_ids(tokenizer),
            stop_strings=list(tool_format.stop_strings), temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            forced=None if setup.script is None else [setup.script(problems[b // G], b % G) for b in range(B)])
    finally:
        box.close()
    texts = [decode(out.tokens[b]) for b in range(B)]
    answered = [out.end[b] in (END_ANSWER, END_SUBMIT) for b in range(B)]
    finals = [(env.final[b] or "") if answered[b] else "" for b in range(B)]
    tasks = [fmt.extract(problems[b // G], finals[b]) for b in range(B)]
    start = time.perf_counter()
    checked = verifier.verify_batch([tasks[b] for b in range(B) if answered[b]])
    verify_s = time.perf_counter() - start
    verdicts = [None] * B
    for b, verdict in zip([b for b in range(B) if answered[b]], checked):
        verdicts[b] = verdict
    for b in range(B):
        if verdicts[b] is None:
            verdicts[b] = Verdict(REJECTED, reason=f"the episode ended without an answer ({out.end[b]})")
    failed = [b for b in range(B) if verdicts[b].status != VALID]
    feedback, feedback_s = {}, 0.0
    if provider is not None and failed:
        start = time.perf_counter()
        requests = [FeedbackRequest(tasks[b].statement, tasks[b].code, feedback_messages(verdicts[b]),
                                    trajectory=trajectory_text(out.turns[b], env.controls, tool_format.call_tags))
                    for b in failed]
        feedback = dict(zip(failed, provider.feedback(requests)))
        feedback_s = time.perf_counter() - start
    episodes = [{"end": out.end[b], "turns": [dataclasses.asdict(t) for t in out.turns[b]], "calls": env.calls[b]}
                for b in range(B)]
    st = out.stats
    timings = {"generate_s": st["prefill_s"] + st["generate_s"] + st["append_s"], "tool_s": st["tool_s"],
               "episode_host_s": st["host_s"], "verify_s": verify_s, "feedback_s": feedback_s, "wait_s": 0.0}
    counts = {"turns": float(sum(len(t) for t in out.turns)),
              "tool_calls": float(sum(len(c) for c in env.calls)),
              "tool_errors": float(sum(not c["ok"] for calls in env.calls for c in calls)),
              "prefill_tokens": st["prefill_tokens"], "decode_steps": st["decode_steps"]}
    finish = ["length" if e == "length" else "stop" for e in out.end]
    return _Samples(out.tokens, out.logprobs, texts, finish, tasks, verdicts, feedback, timings,
                    masks=out.mask, episodes=episodes, counts=counts)


def trajectory_text(turns: Sequence[Any], controls: Sequence[str], call_tags: Sequence[str] = ()) -> str:
    """An episode as the feedback provider reads it: each turn's model text, then the environment's
    observation. The model's text has the control strings (result tags, chat markers, the feedback
    prompt's trajectory tags; not `call_tags`, its own to write) broken (`neutralize`), so a
    `<result>status: valid</result>` the model wrote itself cannot pass for a tool's result, nor a
    `</trajectory>` end the block; only the environment's observations carry them whole."""
    from fd_jax.feedback.base import TRAJECTORY_TAGS

    model_controls = [c for c in controls if c not in call_tags] + list(TRAJECTORY_TAGS)
    return "".join(neutralize(t.text, model_controls) + neutralize(t.observation or "", TRAJECTORY_TAGS)
                   for t in turns)


def _teacher_prompts(
    problems: Sequence[Problem],
    student_prompts: list[list[int]],
    s: _Samples,
    *,
    fmt: PromptFormat,
    encode: Callable[[str], list[int]],
    config: RolloutConfig,
    controls: Sequence[str] | None = None,
) -> tuple[list[list[int]], list[str | None], np.ndarray, int]:
    """Per row: teacher prompt ids (the student prompt when there is no context), the reprompt text or
    None, distill_mask_B, and how many reprompts had their feedback truncated. controls: the tokenizer's
    control strings, broken in the untrusted feedback / attempt / sibling texts (`build_reprompt`)."""
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
                                      solved_reply=solved_reply, controls=controls)
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
    episodes: EpisodeSetup | None = None,
) -> RolloutResult:
    """Roll out P problems x G samples and build the `TrainBatch` (rows b = p * G + g).

    generate_fn: `fd_jax.sampling.generate` by default, or any function with its signature: each prompt goes
      once with n=G (`SampleOutput` rows prompt-major, with tokens, logprobs, lengths, finish_reason).
    verifier: the task's `Verifier` (`fd_jax.verification`); it screens what it will not run itself.
    feedback: asked about failed rollouts when `config.request_feedback`; None = no feedback.
    The verifier's and provider's own failures arrive as verdicts / fallback texts; an exception here
    means a bug or a misconfiguration (e.g. an empty prompt).
    episodes: None = single-turn sampling through `generate_fn`; else multi-turn episodes with these
      budgets and tools (`generate_fn` is not used; the sampler seed is `seed`).
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
    if episodes is None:
        s = _sample_and_check(
            problems, student_prompts, model=model, tokenizer=tokenizer, fmt=fmt, verifier=verifier,
            provider=provider, config=config, generate_fn=generate_fn, seed=seed,
        )
    else:
        s = _episodes_and_check(problems, student_prompts, model=model, tokenizer=tokenizer, fmt=fmt,
                                verifier=verifier, provider=provider, config=config, setup=episodes, seed=seed)

    start = time.perf_counter()
    rewards_B = np.array([v.reward for v in s.verdicts], np.float32)
    advantages_B = group_advantages(rewards_B.reshape(P, G), scale=config.scale_rewards).reshape(B)
    teacher_prompts, contexts, distill_B, reprompts_cut = _teacher_prompts(
        problems, student_prompts, s, fmt=fmt, encode=encode, config=config,
        controls=tokenizer_controls(tokenizer),
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
        completion_masks=s.masks,
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
            **(s.episodes[b] if s.episodes is not None else {}),
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
        **s.counts,
    }
    for v in s.verdicts:
        counts[v.status] = counts.get(v.status, 0) + 1
    if provider is not None:
        counts.update({f"feedback_{k}": v for k, v in provider.stats.as_dict().items()})
    timings = {**s.timings, "batch_s": batch_s, "total_s": time.perf_counter() - total_start}
    return RolloutResult(batch, records, timings, counts, truncated_B, probe)


def batch_pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
