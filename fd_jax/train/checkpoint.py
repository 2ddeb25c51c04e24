"""Checkpoints of the whole training state with orbax: params, teacher params, optimizer state, step, RNG,
and a JSON sidecar (data position, metrics, the resolved config).

Saves are asynchronous (training continues while the arrays are written) and atomic: orbax writes into a
temporary directory and renames it only once complete, so a crash mid-save leaves the previous checkpoint as
the latest one. `restore` takes an abstract target whose leaves carry shardings, so a checkpoint written on
one mesh restores onto another.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Keep-N (plus the best by a metric) orbax checkpoints under `directory`.

    best_metric: a key of the `metrics` passed to `save`; with it, the best checkpoint is kept even when
    older than the last `max_to_keep` (best_mode "max" or "min").
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
    ):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            best_fn=(lambda m: float(m[best_metric])) if best_metric else None,
            best_mode=best_mode,
            keep_checkpoints_without_metrics=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # remove what an interrupted save left behind
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, meta: dict | None = None, metrics: dict | None = None,
             force: bool = False) -> bool:
        """Starts saving `state` (any pytree of arrays) and `meta` (JSON) as `step`; returns at once."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {}))
        return self._manager.save(step, args=args, metrics=metrics, force=force)

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, meta) of `step` (default: the latest). `target`: a pytree like the saved state whose
        leaves are arrays or `jax.ShapeDtypeStruct`s with the wanted shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return restored["state"], dict(restored["meta"] or {})

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
