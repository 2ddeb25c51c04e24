"""The batch the train step consumes, and how ragged rollouts are packed into it (numpy, host side)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np


PAD_ID = "pad_id"  # a field padded with the tokenizer's pad id (known when the batch is packed or padded)


def _field(time_axis: str | None = None, pad: int | float | str | None = None, *, step: bool = True):
    """A TrainBatch array: `time_axis` names its padded second axis (S, U or C; None for [B] arrays), `pad`
    the value its padding holds, `step` whether the train step reads it (BATCH_FIELDS)."""
    return dataclasses.field(metadata=dict(time_axis=time_axis, pad=pad, step=step))


@dataclasses.dataclass
class TrainBatch:
    """B = P*G rollouts, row b = problem b // G, sample b % G. Padded lengths S, U, C are each the
    rollout's `pad_multiple` times 2**k or 3 * 2**k (`bucket_length`), so the jitted step sees a small known
    set of shapes: about 2 log2(longest / pad_multiple) + 1 lengths per axis. Each field carries its padding
    rule (`_field`), so padding to agreed lengths (`padded`) and the step's inputs (`BATCH_FIELDS`,
    `step_inputs`) follow from this one list; adding a field is one line here plus its packing below.

    student_tokens_BS: prompt + completion, right-padded with the pad id.
    student_positions_BS: 0..len-1 on tokens, -1 on padding (the model derives its attention mask from it).
    teacher_tokens_BU / teacher_positions_BU: the reprompt + the same completion (for a row without teacher
      context, the student row itself), same conventions.
    completion_tokens_BC: the generated tokens; completion_mask_BC: 1.0 on them (stop token included),
      0.0 on padding.
    student_index_BC / teacher_index_BC: the position in S / U whose hidden state predicts completion
      token c, i.e. prompt_len - 1 + c (clipped into range on padding, where the mask is 0).
    old_logprobs_BC: the sampler's log-probs of the completion tokens (0 on padding).
    rewards_B, advantages_B: verifier reward and group advantage (the step reads only the advantage).
    distill_mask_B: 1.0 where the row has a teacher context and takes the FD loss.
    """

    student_tokens_BS: np.ndarray = _field("S", PAD_ID)
    student_positions_BS: np.ndarray = _field("S", -1)
    teacher_tokens_BU: np.ndarray = _field("U", PAD_ID)
    teacher_positions_BU: np.ndarray = _field("U", -1)
    completion_tokens_BC: np.ndarray = _field("C", PAD_ID)
    completion_mask_BC: np.ndarray = _field("C", 0)
    student_index_BC: np.ndarray = _field("C", 0)
    teacher_index_BC: np.ndarray = _field("C", 0)
    old_logprobs_BC: np.ndarray = _field("C", 0)
    rewards_B: np.ndarray = _field(step=False)
    advantages_B: np.ndarray = _field()
    distill_mask_B: np.ndarray = _field()

    def step_inputs(self) -> dict[str, np.ndarray]:
        """The arrays the train step reads, by name (BATCH_FIELDS)."""
        return {name: getattr(self, name) for name in BATCH_FIELDS}

    def lengths(self) -> dict[str, int]:
        """The padded length of each time axis: {"S": ..., "U": ..., "C": ...}."""
        return {f.metadata["time_axis"]: getattr(self, f.name).shape[1] for f in _padded_fields()}

    def padded(self, lengths: dict[str, int], *, pad_id: int) -> TrainBatch:
        """The batch with each time axis right-padded to `lengths[axis]` (>= its length) by the fields'
        rules; padding is masked out, so the step's result does not change."""
        arrays = {}
        for f in _padded_fields():
            x, axis, pad = getattr(self, f.name), f.metadata["time_axis"], f.metadata["pad"]
            fill = pad_id if pad == PAD_ID else pad
            arrays[f.name] = np.pad(x, ((0, 0), (0, lengths[axis] - x.shape[1])), constant_values=fill)
        return dataclasses.replace(self, **arrays)


# One pytree: jax.tree.map / device_put take the whole batch (every field is an array leaf).
jax.tree_util.register_dataclass(TrainBatch, data_fields=[f.name for f in dataclasses.fields(TrainBatch)],
                                 meta_fields=[])


def _padded_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainBatch) if f.metadata["time_axis"] is not None]


# The names of the arrays the train step reads (`fd_jax.rl.step.make_train_step`'s `batch` keys).
BATCH_FIELDS = tuple(f.name for f in dataclasses.fields(TrainBatch) if f.metadata["step"])


def round_up(n: int, multiple: int) -> int:
    """The smallest positive multiple of `multiple` that is >= n."""
    return max(multiple, -(-n // multiple) * multiple)


def bucket_length(n: int, multiple: int) -> int:
    """The smallest of `multiple` x {1, 2, 3, 4, 6, 8, 12, 16, ...} (2**k and 3 * 2**k) that is >= n.

    Rounding up to a multiple of `multiple` alone gives a new shape, so a new compilation of the train
    step, whenever the longest reprompt crosses a multiple (a 10-18 s stall mid-run on a CPU, minutes on a
    TPU). These buckets bound the shapes to about 2 log2(longest / multiple) + 1 per axis; beyond 2 x
    `multiple` a length is padded by at most 1.5x (doubling buckets would pad by up to 2x)."""
    units = 1  # 1, 2, 3, 4, 6, 8, ...: from 2**k (k >= 1) to 3 * 2**(k-1), from there to 2**(k+1)
    while units * multiple < n:
        units = units * 3 // 2 if units >= 2 and units & (units - 1) == 0 else (units * 4 // 3 if units % 3 == 0 else 2)
    return units * multiple


def _pack_rows(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, multiple: int, C: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens [B,T], positions [B,T] and the predicting index [B,C] of prompt + completion rows."""
    B = len(prompts)
    T = bucket_length(max(len(p) + len(c) for p, c in zip(prompts, completions)), multiple)
    tokens_BT = np.full((B, T), pad_id, np.int32)
    positions_BT = np.full((B, T), -1, np.int32)
    for b, (prompt, completion) in enumerate(zip(prompts, completions)):
        n = len(prompt) + len(completion)
        tokens_BT[b, : len(prompt)] = prompt
        tokens_BT[b, len(prompt) : n] = completion
        positions_BT[b, :n] = np.arange(n)
    prompt_len_B = np.array([len(p) for p in prompts], np.int32)
    index_BC = np.minimum(prompt_len_B[:, None] - 1 + np.arange(C, dtype=np.int32)[None, :], T - 1)
    return tokens_BT, positions_BT, index_BC.astype(np.int32)


def pack_train_batch(
    *,
    student_prompts: Sequence[Sequence[int]],
    teacher_prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    old_logprobs: Sequence[Sequence[float]],
    rewards_B: np.ndarray,
    advantages_B: np.ndarray,
    distill_mask_B: np.ndarray,
    pad_id: int,
    pad_multiple: int = 32,
    completion_masks: Sequence[Sequence[float]] | None = None,
) -> TrainBatch:
    """Pack B ragged rows (token id lists) into a `TrainBatch`.

    Every prompt must be non-empty (the first completion token is predicted from the last prompt token)
    and `old_logprobs[b]` as long as `completions[b]`. Raises ValueError naming the row otherwise.
    completion_masks[b]: 1 on the tokens the losses train on, 0 on the others (a multi-turn episode's tool
    output and scaffolding, which stay in the context of both the student and the teacher); None = every
    completion token (single-turn rollouts).
    """
    B = len(completions)
    if not B == len(student_prompts) == len(teacher_prompts) == len(old_logprobs):
        raise ValueError(
            f"pack_train_batch: row counts differ: {len(student_prompts)} student prompts, "
            f"{len(teacher_prompts)} teacher prompts, {B} completions, {len(old_logprobs)} logprob rows"
        )
    for b in range(B):
        if not student_prompts[b] or not teacher_prompts[b]:
            raise ValueError(f"pack_train_batch: row {b} has an empty student or teacher prompt")
        if len(old_logprobs[b]) != len(completions[b]):
            raise ValueError(
                f"pack_train_batch: row {b} has {len(completions[b])} completion tokens but "
                f"{len(old_logprobs[b])} log-probs"
            )
        if completion_masks is not None and len(completion_masks[b]) != len(completions[b]):
            raise ValueError(f"pack_train_batch: row {b} has {len(completions[b])} completion tokens but a mask "
                             f"of {len(completion_masks[b])}")
    C = bucket_length(max(len(c) for c in completions), pad_multiple)
    student_tokens, student_positions, student_index = _pack_rows(
        student_prompts, completions, pad_id, pad_multiple, C
    )
    teacher_tokens, teacher_positions, teacher_index = _pack_rows(
        teacher_prompts, completions, pad_id, pad_multiple, C
    )
    completion_tokens = np.full((B, C), pad_id, np.int32)
    completion_mask = np.zeros((B, C), np.float32)
    logprobs = np.zeros((B, C), np.float32)
    for b, completion in enumerate(completions):
        completion_tokens[b, : len(completion)] = completion
        completion_mask[b, : len(completion)] = 1.0 if completion_masks is None else completion_masks[b]
        logprobs[b, : len(completion)] = old_logprobs[b]
    return TrainBatch(
        student_tokens_BS=student_tokens,
        student_positions_BS=student_positions,
        teacher_tokens_BU=teacher_tokens,
        teacher_positions_BU=teacher_positions,
        completion_tokens_BC=completion_tokens,
        completion_mask_BC=completion_mask,
        student_index_BC=student_index,
        teacher_index_BC=teacher_index,
        old_logprobs_BC=logprobs,
        rewards_B=np.asarray(rewards_B, np.float32),
        advantages_B=np.asarray(advantages_B, np.float32),
        distill_mask_B=np.asarray(distill_mask_B, np.float32),
    )
