"""One device mesh (`data`, `fsdp`, `tensor`) and the rules that place parameters and batches on it.

Parameters carry logical axis names (`fd_jax.models` puts them in each `nnx.Param`'s `axes` metadata);
`LOGICAL_RULES` maps each logical name to a mesh axis. A dimension that the mesh axis does not divide is
replicated instead (e.g. 2 KV heads on a tensor axis of 4), so every model fits every mesh.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # batches are split over both; fsdp also splits the weights

LOGICAL_RULES: Mapping[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor); one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices do not divide into {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but {len(devices)} devices are available "
            f"({dict(zip(MESH_AXES, sizes))})"
        )
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_RULES
) -> PartitionSpec:
    """The PartitionSpec for an array with logical `axes`; axes that do not divide evenly are replicated."""
    spec, used = [], set()
    for name, size in zip(axes, shape):
        mesh_axis = rules.get(name) if name is not None else None
        if mesh_axis is None or mesh_axis in used or size % mesh.shape[mesh_axis]:
            spec.append(None)
            continue
        used.add(mesh_axis)
        spec.append(mesh_axis if mesh.shape[mesh_axis] > 1 else None)
    return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
    value = variable.get_value()
    axes = variable.get_metadata().get("axes") or (None,) * np.ndim(value)
    return NamedSharding(mesh, logical_to_spec(axes, np.shape(value), mesh, rules))


def state_shardings(state, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings with the structure of `state` (params, teacher, optimizer moments alike): each nnx
    Variable by its logical axes; any other leaf (a step counter) replicated."""

    def one(x):
        if isinstance(x, nnx.Variable):
            return x.replace(variable_sharding(x, mesh, rules))
        return replicated(mesh)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(module: nnx.Module, mesh: Mesh, rules=LOGICAL_RULES) -> nnx.Module:
    """Moves every variable of `module` onto its sharding, in place; returns the module."""
    state = nnx.state(module)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(module, jax.device_put(state, shardings))
    return module


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows over (data, fsdp), everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch, mesh: Mesh):
    """Places every array of a pytree batch with its leading (row) axis split over the batch axes."""
    return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), batch)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize_distributed(mode: str = "auto") -> bool:
    """Calls `jax.distributed.initialize()` for multi-host runs.

    mode: "auto" initialises when the environment describes several hosts (a coordinator address, or a
    TPU pod slice whose TPU_WORKER_HOSTNAMES lists more than one host); "true" always; "false" never.
    Returns whether it initialised. Must run before any other JAX call.
    """
    if mode not in ("auto", "true", "false"):
        raise ValueError(f"multihost must be 'auto', 'true' or 'false', got {mode!r}")
    if mode == "false":
        return False
    pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if mode == "true" or pod or any(os.environ.get(k) for k in _MULTIHOST_ENV):
        jax.distributed.initialize()
        logging.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
        return True
    return False
