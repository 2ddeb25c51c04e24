"""Pre-flight check: does the teacher know more than the student, before a day of training says so?

FD moves the student toward what the teacher (the same model, reading feedback or a solved sibling in its
prompt) predicts. That helps only if the context makes the teacher put more probability on correct answers
than the student puts without it. This check rolls out a sample of problems once (the rollout of the run's
first stage: sampling, verification, feedback, teacher prompts with the configured placement), then scores
a correct completion of each problem that has a teacher prompt, after the teacher prompt and after the bare
student prompt, with the same weights:

    gain = log p(correct | teacher prompt) − log p(correct | student prompt)     (nats, whole completion)

The correct completion is the format's `reference_completion(problem)` when it has one (the arithmetic test
bed: "Answer: N"), else a verified-correct sibling's completion; rows with neither are not scored.
`PreflightReport.line()` is the one-line verdict: the mean gain over scored rows and the share of problems
whose mean gain is positive.

It also reports the mean gain over the rows that have a verified-correct sibling only (`sibling_rows`):
those are the rows the in-training diagnostic `teacher/logp_gain_correct` scores (it needs a correct
completion from the batch itself), so at step 1 of a run (teacher = student weights) on the same batch the
two agree. The full mean also counts rows whose only context is feedback on a failure, which on the test
bed gain the most (docs/demo/README.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from fd_jax.config.schema import RolloutConfig, StepConfig
from fd_jax.data.problems import Problem
from fd_jax.rl.batch import pack_train_batch
from fd_jax.rl.diagnostics import token_stats
from fd_jax.verification import VALID

ROWS_PER_PASS = 16  # rows scored per forward pass (the last pass is padded to this: one compilation)


@dataclasses.dataclass(frozen=True)
class PreflightReport:
    """gains_R: per scored row, teacher − student log-prob of the correct completion (nats); problem_R: the
    problem index of each row; teacher_logp_R / student_logp_R: the two log-probs; sibling_R: whether the row
    has a verified-correct sibling (the rows `teacher/logp_gain_correct` scores; None: not recorded)."""

    gains_R: np.ndarray
    problem_R: np.ndarray
    teacher_logp_R: np.ndarray
    student_logp_R: np.ndarray
    placement: str
    sibling_R: np.ndarray | None = None

    @property
    def sibling_gain(self) -> tuple[float, int]:
        """(mean gain, rows) over the rows with a verified-correct sibling; (nan, 0) without such rows."""
        if self.sibling_R is None or not np.any(self.sibling_R):
            return float("nan"), 0
        keep = np.asarray(self.sibling_R, bool)
        return float(self.gains_R[keep].mean()), int(keep.sum())

    @property
    def rows(self) -> int:
        return int(len(self.gains_R))

    @property
    def mean_gain(self) -> float:
        return float(self.gains_R.mean()) if self.rows else float("nan")

    def problem_gains(self) -> np.ndarray:
        """Mean gain per problem (problems with scored rows, in index order)."""
        return np.array([self.gains_R[self.problem_R == p].mean() for p in np.unique(self.problem_R)])

    @property
    def problems_better(self) -> tuple[int, int]:
        gains = self.problem_gains()
        return int((gains > 0).sum()), int(len(gains))

    def teacher_knows_more(self) -> bool:
        better, total = self.problems_better
        return self.rows > 0 and self.mean_gain > 0 and 2 * better > total

    def line(self) -> str:
        if not self.rows:
            return ("preflight: no row had a teacher context and a correct completion to score (no failures with "
                    "feedback, no solved sibling, no reference answer): nothing to say")
        better, total = self.problems_better
        verdict = "KNOWS MORE than" if self.teacher_knows_more() else "does NOT know more than"
        return (f"preflight: the teacher {verdict} the student: log p(correct) with context − without = "
                f"{self.mean_gain:+.3f} nats per completion (teacher {self.teacher_logp_R.mean():.3f}, student "
                f"{self.student_logp_R.mean():.3f}); teacher better on {better}/{total} problems "
                f"({better / total:.0%}); {self.rows} rows, placement={self.placement}{self._sibling_note()}")

    def _sibling_note(self) -> str:
        gain, rows = self.sibling_gain
        return f"; on the {rows} rows with a solved sibling {gain:+.3f}" if rows else ""

    def as_dict(self) -> dict[str, Any]:
        better, total = self.problems_better
        sibling_gain, sibling_rows = self.sibling_gain
        return {"preflight/logp_gain": self.mean_gain, "preflight/problems_better": better,
                "preflight/logp_gain_sibling_rows": sibling_gain, "preflight/sibling_rows": sibling_rows,
                "preflight/problems": total, "preflight/rows": self.rows,
                "preflight/teacher_logp": float(self.teacher_logp_R.mean()) if self.rows else float("nan"),
                "preflight/student_logp": float(self.student_logp_R.mean()) if self.rows else float("nan")}


def score_rows(model: Any, student_prompts: Sequence[Sequence[int]], teacher_prompts: Sequence[Sequence[int]],
               completions: Sequence[Sequence[int]], *, step_cfg: StepConfig = StepConfig(), pad_id: int = 0,
               pad_multiple: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(teacher log p [R], student log p [R]) of each whole completion after its teacher / student prompt,
    both with `model`'s weights."""
    graphdef, params = nnx.split(model)
    score = jax.jit(lambda params, rows: token_stats(graphdef, params, params, rows, step_cfg))
    teacher, student = [], []
    for start in range(0, len(completions), ROWS_PER_PASS):
        idx = list(range(start, min(start + ROWS_PER_PASS, len(completions))))
        idx += [idx[0]] * (ROWS_PER_PASS - len(idx))
        batch = pack_train_batch(
            student_prompts=[student_prompts[i] for i in idx], teacher_prompts=[teacher_prompts[i] for i in idx],
            completions=[completions[i] for i in idx], old_logprobs=[[0.0] * len(completions[i]) for i in idx],
            rewards_B=np.zeros(len(idx)), advantages_B=np.zeros(len(idx)), distill_mask_B=np.ones(len(idx)),
            pad_id=pad_id, pad_multiple=pad_multiple)
        stats = jax.device_get(score(params, batch.step_inputs()))
        n = min(ROWS_PER_PASS, len(completions) - start)
        teacher.append(stats["teacher_logp"].sum(1)[:n])
        student.append(stats["student_logp"].sum(1)[:n])
    if not teacher:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(teacher).astype(np.float64), np.concatenate(student).astype(np.float64)


def preflight(
    problems: Sequence[Problem],
    *,
    model: Any,
    tokenizer: Any,
    fmt: Any,
    verifier: Any,
    feedback: Any,
    config: RolloutConfig,
    step_cfg: StepConfig = StepConfig(),
    generate_fn: Any = None,
    seed: int = 0,
) -> PreflightReport:
    """Roll out `problems` once with `config` and score their correct completions (module docstring)."""
    from fd_jax.rollout.rollout import batch_pad_id, run_rollout

    config = dataclasses.replace(config, log_rollouts=False, request_feedback=feedback is not None)
    result = run_rollout(problems, model=model, tokenizer=tokenizer, fmt=fmt, verifier=verifier, feedback=feedback,
                         config=config, generate_fn=generate_fn, seed=seed)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=fmt.add_special_tokens)  # noqa: E731
    reference = getattr(fmt, "reference_completion", None)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    G, batch = config.num_generations, result.batch
    generated = [list(batch.completion_tokens_BC[b][batch.completion_mask_BC[b] > 0])
                 for b in range(len(result.records))]
    students, teachers, targets, problem_R, sibling_R = [], [], [], [], []
    for b, record in enumerate(result.records):
        if not record["distilled"]:
            continue
        p = b // G
        text = reference(problems[p]) if reference is not None else None
        solved = [j for j in range(p * G, p * G + G) if j != b and result.records[j]["status"] == VALID]
        if text is not None:
            target = tokenizer.encode(text, add_special_tokens=False) + eos
        else:
            if not solved:
                continue
            target = generated[solved[0]]
        students.append(encode(record["prompt"]))
        teachers.append(encode(record["teacher_prompt"]))
        targets.append(target)
        problem_R.append(p)
        sibling_R.append(bool(solved))
    t, s = score_rows(model, students, teachers, targets, step_cfg=step_cfg, pad_id=batch_pad_id(tokenizer),
                      pad_multiple=config.pad_multiple)
    from fd_jax.data.reprompt import resolve_placement

    return PreflightReport(t - s, np.array(problem_R, np.int64), t, s,
                           resolve_placement(fmt, config.context_placement), np.array(sibling_R, bool))
