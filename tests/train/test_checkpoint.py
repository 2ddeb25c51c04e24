"""Orbax checkpoints of the training state: exact resume, another mesh, and crashes during a save."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fd_jax import sharding
from fd_jax.train.checkpoint import Checkpointer
from fd_jax.models import init_model
from fd_jax.rl.step import init_train_state
from test_train_step import CFG, SHARED_CFG as STEP, _batch, cached_step


def _fresh(mesh=None):
    model = init_model(CFG, seed=0, mesh=mesh)
    graphdef, params = nnx.split(model)
    step, optimizer = cached_step(graphdef, STEP)  # Adam: its moments must survive the round trip too
    return graphdef, step, init_train_state(params, optimizer, STEP)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_save_restore_continue_is_bit_identical(tmp_path):
    graphdef, step, state = _fresh()
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
    from fd_jax.train.checkpoint import Checkpointer
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
