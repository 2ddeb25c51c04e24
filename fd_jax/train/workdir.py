"""Whether a command may use a training workdir, decided before anything is written into it.

A workdir with checkpoints belongs to the run that wrote them: its `config.json` says how. A command whose
config would restore a different training state (another algorithm, model, teacher, optimizer structure)
or lay the stages out differently is refused with one line naming each field that differs, its value in
the workdir and in the command, and what to do; the workdir is left byte for byte as it was. Fields that do
not change what a checkpoint holds (total_steps, learning rate, logging, ...) may change on resume.

Failure modes: `WorkdirError` (a `ConfigError`: the scripts print it as one line and exit non-zero).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from ml_collections import config_dict

from fd_jax.config.errors import ConfigError
from fd_jax.config.validation import config_from_json
from fd_jax.train.stages import stages

# What a workdir holds (metrics.jsonl and curves.png are named in fd_jax.train.metrics_log).
CONFIG_FILE = "config.json"  # the run's config, written once every check has passed
ROLLOUTS_FILE = "rollouts.jsonl"  # every rollout, one JSON object a line
CHECKPOINTS = "checkpoints"  # orbax checkpoints by step, in the stage's subdirectory when it has one
# Fields named first when two configs' training states differ: those that shape a checkpoint.
STATE_FIELDS = ("algorithm", "fd_steps", "model.", "step.teacher", "step.distill_weight", "step.beta", "optim.")


class WorkdirError(ConfigError):
    """A workdir that does not fit the command: the message names the directory, what differs and the fix."""


def read_config(workdir: str | pathlib.Path) -> config_dict.ConfigDict:
    """The config a workdir's run was trained with (DIR/config.json). Raises WorkdirError when the
    directory or its config.json is missing or unreadable."""
    workdir = pathlib.Path(workdir)
    path = workdir / CONFIG_FILE
    if not workdir.is_dir():
        raise WorkdirError(f"{workdir}: no such directory (a training workdir, as given to train_tpu.py --workdir)")
    if not path.is_file():
        raise WorkdirError(f"{workdir}: not a training workdir (it has no {CONFIG_FILE})")
    try:
        return config_from_json(path.read_text())
    except (ValueError, TypeError) as e:
        raise WorkdirError(f"{path}: unreadable ({e})") from None


def has_checkpoints(workdir: pathlib.Path) -> bool:
    """Whether any stage directory of the workdir holds a checkpoint (orbax names them by step)."""
    candidates = [workdir / CHECKPOINTS, *(d / CHECKPOINTS for d in workdir.iterdir() if d.is_dir())]
    return any(c.is_dir() and any(p.name.isdigit() for p in c.iterdir()) for c in candidates)


def _leaves(cfg: config_dict.ConfigDict) -> dict[str, Any]:
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = list(value) if isinstance(value, tuple) else value

    walk(json.loads(cfg.to_json_best_effort()), "")
    return out


def differing_fields(saved: config_dict.ConfigDict, cfg: config_dict.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """field -> (value in the workdir, value in the command), for every leaf that differs."""
    a, b = _leaves(saved), _leaves(cfg)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _state_signature(cfg: config_dict.ConfigDict) -> list[tuple[str, Any]]:
    """Per stage: its name, directory, and the tree structure, shapes and dtypes of its TrainState (built
    abstractly: no weights are read or computed)."""
    import jax
    from flax import nnx

    from fd_jax.train import components
    from fd_jax.rl.optim import make_optimizer
    from fd_jax.train.loop import abstract_state

    policy = components.build_policy(cfg, mesh=None, weights=False)
    params = nnx.split(policy.model)[1]
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    signature = []
    for stage in stages(cfg):
        state = abstract_state(shapes, make_optimizer(stage.optim), stage.step, None)
        leaves, treedef = jax.tree.flatten(state)
        signature.append((stage.name, stage.subdir, str(treedef), [(s.shape, str(s.dtype)) for s in leaves]))
    return signature


def check_resumable(cfg: config_dict.ConfigDict, workdir: pathlib.Path) -> None:
    """Raises WorkdirError when `workdir` holds checkpoints of a run that `cfg` cannot continue: another
    stage layout or another training state. A workdir without checkpoints (or without the config.json
    that says how they were written) passes."""
    if not workdir.is_dir() or not (workdir / CONFIG_FILE).is_file() or not has_checkpoints(workdir):
        return
    saved = read_config(workdir)
    try:
        same = _state_signature(saved) == _state_signature(cfg)
    except ConfigError:
        same = False  # the saved run's model cannot be built any more: name what differs
    if same:
        return
    differs = differing_fields(saved, cfg)
    named = {k: v for k, v in differs.items() if any(k == f or (f.endswith(".") and k.startswith(f))
                                                     for f in STATE_FIELDS)} or differs
    what = "; ".join(f"config.{k} = {theirs!r} there, {ours!r} here" for k, (theirs, ours) in named.items())
    raise WorkdirError(f"{workdir} holds checkpoints of another run ({what or 'its config.json differs'}): "
                       f"its training state cannot be restored with this config; set those fields back "
                       f"(or drop the overrides) to resume, or use a new --workdir")


def checkpoint_dir(workdir: pathlib.Path, stage) -> pathlib.Path:
    """Where a stage (`fd_jax.train.stages.Stage`) keeps its orbax checkpoints."""
    return (workdir / stage.subdir if stage.subdir else workdir) / CHECKPOINTS


def latest_step(directory: pathlib.Path) -> int | None:
    """The newest checkpoint's step in `directory`, or None when it holds none."""
    from fd_jax.train.checkpoint import Checkpointer

    if not directory.is_dir():
        return None
    with Checkpointer(directory, async_save=False) as ckpt:
        return ckpt.latest_step()


def restore_policy(workdir: str | pathlib.Path, step: int | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a training workdir's checkpoint: `step` (default: the latest of the last stage
    that has one), on the default device. dtype: the compute dtype (default: the run's)."""
    import jax.numpy as jnp
    from flax import nnx

    from fd_jax.rl.optim import make_optimizer
    from fd_jax.train import components
    from fd_jax.train.checkpoint import Checkpointer
    from fd_jax.train.loop import abstract_state

    workdir = pathlib.Path(workdir)
    cfg = read_config(workdir)  # WorkdirError when it is not a training workdir
    if dtype is not None:
        cfg.model.dtype = jnp.dtype(dtype).name
    plan = stages(cfg)
    chosen = None
    for stage in plan:
        directory = checkpoint_dir(workdir, stage)
        latest = latest_step(directory)
        if latest is None:
            continue
        if step is None or (stage.first - 1 <= step <= latest and (directory / str(step)).exists()):
            chosen = (stage, latest if step is None else step)
    if chosen is None:
        steps = sorted({int(p.name) for stage in plan if checkpoint_dir(workdir, stage).is_dir()
                        for p in checkpoint_dir(workdir, stage).iterdir() if p.name.isdigit()})
        raise WorkdirError(f"{workdir}: no checkpoint" + (f" of step {step}" if step is not None else "")
                                       + (f" (it has steps {steps})" if steps else ""))
    stage, chosen_step = chosen
    policy = components.build_policy(cfg, mesh=None, weights=False)
    graphdef, params = nnx.split(policy.model)
    target = abstract_state(params, make_optimizer(stage.optim), stage.step, None)
    with Checkpointer(checkpoint_dir(workdir, stage), async_save=False) as ckpt:
        state, _ = ckpt.restore(target, chosen_step)
    return nnx.merge(graphdef, state.params), policy.tokenizer
