"""TrainBatch carries its padding rules: the step's field list and cross-host padding follow from it."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from fd_jax.rl.batch import BATCH_FIELDS, TrainBatch, pack_train_batch


def _batch():
    return pack_train_batch(student_prompts=[[5, 6], [7]], teacher_prompts=[[1, 5, 6], [2, 2, 7]],
                            completions=[[9, 10, 11], [12]], old_logprobs=[[-1.0, -2.0, -3.0], [-0.5]],
                            rewards_B=np.array([1.0, 0.0]), advantages_B=np.array([0.7, -0.7]),
                            distill_mask_B=np.array([0.0, 1.0]), pad_id=3, pad_multiple=4)


def test_batch_fields_are_the_step_inputs_in_field_order():
    names = [f.name for f in dataclasses.fields(TrainBatch)]
    assert BATCH_FIELDS == tuple(n for n in names if n != "rewards_B")
    assert list(_batch().step_inputs()) == list(BATCH_FIELDS)
    rows = jax.tree.map(lambda x: x[:1], _batch())  # a pytree: one row of every field
    assert isinstance(rows, TrainBatch) and len(jax.tree.leaves(rows)) == len(names)
    assert all(leaf.shape[0] == 1 for leaf in jax.tree.leaves(rows))


def test_padded_extends_each_axis_with_its_own_value_and_keeps_the_rows():
    batch = _batch()
    assert batch.lengths() == {"S": 8, "U": 8, "C": 4}  # prompt + completion, rounded up to 4
    wide = batch.padded({"S": 10, "U": 9, "C": 5}, pad_id=3)
    assert wide.lengths() == {"S": 10, "U": 9, "C": 5}
    expected_pad = {"student_tokens_BS": 3, "student_positions_BS": -1, "teacher_tokens_BU": 3,
                    "teacher_positions_BU": -1, "completion_tokens_BC": 3, "completion_mask_BC": 0,
                    "student_index_BC": 0, "teacher_index_BC": 0, "old_logprobs_BC": 0}
    for name, pad in expected_pad.items():
        old, new = getattr(batch, name), getattr(wide, name)
        np.testing.assert_array_equal(new[:, : old.shape[1]], old)
        assert (new[:, old.shape[1]:] == pad).all(), name
        assert new.dtype == old.dtype
    for name in ("rewards_B", "advantages_B", "distill_mask_B"):
        np.testing.assert_array_equal(getattr(wide, name), getattr(batch, name))
