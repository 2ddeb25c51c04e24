"""Orbax checkpoints of the training state: exact resume, another mesh, and crashes during a save."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from fd_jax import sharding
from fd_jax.checkpoint import Checkpointer
from fd_jax.models import ModelConfig, init_model
from fd_jax.optim import OptimConfig, make_optimizer
from fd_jax.train_step import StepConfig, TrainState, init_train_state, make_train_step
from test_train_step import KERNEL, _batch

CFG = ModelConfig.from_hf(transformers.LlamaConfig(
    vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=True))
STEP = StepConfig(distill_weight=0.5, teacher="ema", **KERNEL)


def _fresh(mesh=None):
    model = init_model(CFG, seed=0, mesh=mesh)
    graphdef, params = nnx.split(model)
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2, weight_decay=0.1))
    return graphdef, optimizer, init_train_state(params, optimizer, STEP)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_save_restore_continue_is_bit_identical(tmp_path):
    graphdef, optimizer, state = _fresh()
    step = make_train_step(graphdef, optimizer, STEP)
    batches = [_batch(seed=s) for s in range(3)]
    state, _ = step(state, batches[0])
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state, meta={"data_position": 4}, metrics={"reward_mean": 0.5})
        ckpt.wait()
        snapshot = jax.tree.map(np.asarray, state)
        for batch in batches[1:]:
            state, _ = step(state, batch)
        uninterrupted = _leaves(state)

    _, _, template = _fresh()
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() == 1
        restored, meta = ckpt.restore(template)
    assert meta == {"data_position": 4}
    for a, b in zip(_leaves(restored), jax.tree.leaves(snapshot)):
        np.testing.assert_array_equal(a, b)
    for batch in batches[1:]:
        restored, _ = step(restored, batch)
    for a, b in zip(_leaves(restored), uninterrupted):
        np.testing.assert_array_equal(a, b)


def test_restore_onto_another_mesh(tmp_path):
    mesh_a = sharding.make_mesh(data=1, fsdp=8, tensor=1)
    _, _, state = _fresh(mesh_a)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(3, state)
    mesh_b = sharding.make_mesh(data=2, fsdp=1, tensor=4)
    _, _, template = _fresh(mesh_b)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        restored, _ = ckpt.restore(template)
    q_before = state.params["layers"][0]["attn"]["q"].get_value()
    q_after = restored.params["layers"][0]["attn"]["q"].get_value()
    assert q_after.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
    assert q_before.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, None)
    np.testing.assert_array_equal(np.asarray(q_after), np.asarray(q_before))
    for a, b in zip(_leaves(restored), _leaves(state)):
        np.testing.assert_array_equal(a, b)


CRASHING_SAVER = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    from fd_jax.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, {"w": jnp.full((256, 256), 1.0)})
    ckpt.wait()
    ckpt.save(2, {"w": jnp.full((4096, 1024), 2.0)})   # asynchronous: returns while writing
    os._exit(9)                                          # the process dies mid-save, no clean-up
""")


def test_crash_during_async_save_keeps_previous_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", CRASHING_SAVER, str(directory)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    with Checkpointer(directory) as ckpt:
        assert ckpt.latest_step() == 1, sorted(os.listdir(directory))
        restored, _ = ckpt.restore({"w": jnp.zeros((256, 256))})
    np.testing.assert_array_equal(np.asarray(restored["w"]), 1.0)
