"""What changes when a run spans several hosts (a TPU pod slice): each host rolls out its own shard of the
step's problems with its own verifier and feedback threads, while generation and the train step are
single global programs over the whole mesh.

On one host (`jax.process_count() == 1`) every function here is the plain single-host operation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from fd_jax import sharding as sharding_lib
from fd_jax.rl.batch import TrainBatch

def is_writer() -> bool:
    """Whether this process writes logs, plots and exports (process 0)."""
    return jax.process_index() == 0


def host_shard(items: Sequence[Any]) -> list[Any]:
    """This host's contiguous share of `items` (whose length the process count divides)."""
    n, i = jax.process_count(), jax.process_index()
    if len(items) % n:
        raise ValueError(f"{len(items)} items do not split evenly over {n} hosts")
    size = len(items) // n
    return list(items[i * size : (i + 1) * size])


def _allgather(x: np.ndarray) -> np.ndarray:
    """[hosts, *x.shape]: every host's x."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def reduce_scalars(values: Mapping[str, float], how: Mapping[str, str]) -> dict[str, float]:
    """Combines per-host scalars: `how[key]` is "sum" or "max" (default "sum"). Every host must pass the
    same keys."""
    if jax.process_count() == 1:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    table = _allgather(np.array([float(values[k]) for k in keys], np.float64))  # [hosts, keys]
    return {k: float(table[:, j].max() if how.get(k) == "max" else table[:, j].sum()) for j, k in enumerate(keys)}


def global_batch(batch: TrainBatch, mesh: jax.sharding.Mesh, *, pad_id: int) -> dict[str, jax.Array]:
    """The step's inputs (`TrainBatch.step_inputs`) as global arrays with rows over the mesh's batch axes.
    With several hosts, each host's rows are padded to the longest S, U, C of any host first (by the
    batch's own padding rules; padding is masked out)."""
    if jax.process_count() == 1:
        return sharding_lib.shard_batch(batch.step_inputs(), mesh)
    mine = batch.lengths()
    axes = sorted(mine)
    agreed = dict(zip(axes, _allgather(np.array([mine[a] for a in axes])).max(axis=0).tolist()))
    local = batch.padded(agreed, pad_id=pad_id).step_inputs()
    return {
        k: jax.make_array_from_process_local_data(sharding_lib.batch_sharding(mesh, v.ndim), v)
        for k, v in local.items()
    }


def global_generate(generate_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a sampler so that each host passes its own prompts: they are gathered, generated as one
    global batch (the sampler's programs span every host's devices, so all hosts must call it with the
    same prompts), and each host gets back its own rows. Identity on one host."""
    if jax.process_count() == 1:
        return generate_fn

    def generate(model, prompts: Sequence[Sequence[int]], *, n: int = 1, **options):
        lengths_HP = _allgather(np.array([len(p) for p in prompts], np.int32))
        padded_PL = np.zeros((len(prompts), int(lengths_HP.max())), np.int32)
        for i, p in enumerate(prompts):
            padded_PL[i, : len(p)] = p
        tokens_HPL = _allgather(padded_PL)
        every = [tokens_HPL[h, i, : lengths_HP[h, i]].tolist() for h in range(len(lengths_HP))
                 for i in range(len(prompts))]
        out = generate_fn(model, every, n=n, **options)
        rows = slice(jax.process_index() * len(prompts) * n, (jax.process_index() + 1) * len(prompts) * n)
        fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        return dataclasses.replace(out, **{k: v[rows] for k, v in fields.items()})

    return generate
