"""The batches of the supervised stage (`algorithm=sft`): one (prompt, target) pair per problem of the step,
from the task's `sft_pair`, drawn with a generator seeded by (seed, step) so a resumed run draws the same."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from ml_collections import config_dict

from fd_jax.config.schema import RolloutConfig
from fd_jax.data.problems import Problem
from fd_jax.rl.batch import TrainBatch, pack_train_batch
from fd_jax.rollout.sample import derive_seed
from fd_jax.tasks import get_task


def sft_examples(cfg: config_dict.ConfigDict, problems: Sequence[Problem], *, fmt: Any, rollout: RolloutConfig,
                 feedback_fn: Callable[[Any], str], step: int) -> list[tuple[str, str]]:
    """[(prompt text, target text)] for the step's problems, in order."""
    rng = np.random.default_rng(derive_seed(cfg.seed, step))
    task = get_task(cfg.data.task)
    return [task.sft_pair(cfg, fmt, p, rng=rng, feedback_fn=feedback_fn, templates=rollout.templates,
                          placement=rollout.context_placement) for p in problems]


def sft_batch(examples: Sequence[tuple[str, str]], *, tokenizer: Any, fmt: Any, pad_multiple: int) -> TrainBatch:
    """The pairs as a TrainBatch: the prompt encoded as the rollout encodes it, the target without special
    tokens then the tokenizer's end-of-sequence token (so the model learns to stop)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = [tokenizer.encode(p, add_special_tokens=fmt.add_special_tokens) for p, _ in examples]
    targets = [tokenizer.encode(t, add_special_tokens=False) + eos for _, t in examples]
    n = len(examples)
    return pack_train_batch(student_prompts=prompts, teacher_prompts=prompts, completions=targets,
                            old_logprobs=[[0.0] * len(t) for t in targets], rewards_B=np.zeros(n),
                            advantages_B=np.zeros(n), distill_mask_B=np.zeros(n),
                            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                            pad_multiple=pad_multiple)
