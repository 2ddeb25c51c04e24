"""The stages of a run: one for `fd` or `grpo`, two for `fd_then_grpo` (FD, then GRPO initialised from the FD
stage's final checkpoint), each with the StepConfig, OptimConfig and RolloutConfig it trains with. The run
config's `step`, `optim` and `rollout` sections hold every field of those dataclasses; a stage decides only
what depends on it (the distillation weight and teacher, the GRPO learning rate, the schedule's length,
whether feedback is asked for)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ml_collections import config_dict

from fd_jax.config import schema
from fd_jax.config.errors import ConfigError
from fd_jax.config.schema import OptimConfig, RolloutConfig, StepConfig


def _settings(cls, section: str, cfg: config_dict.ConfigDict, **stage_values: Any):
    """`cls` built from `cfg.<section>` and the values the stage decides; errors name the config field."""
    try:
        return schema.from_section(cls, cfg[section], **stage_values)
    except ConfigError as e:
        raise ConfigError(f"config.{e}") from None
    except TypeError as e:
        raise ConfigError(f"config.{section}: {e}") from None


def stage_configs(cfg: config_dict.ConfigDict, stage: str, *,
                  steps: int) -> tuple[StepConfig, OptimConfig, RolloutConfig]:
    """(StepConfig, OptimConfig, RolloutConfig) of one stage (`fd` or `grpo`) lasting `steps` steps.

    A GRPO stage uses a live teacher: it neither reads nor stores one (the reference of beta > 0 is the
    stage's initial policy), and it asks no feedback provider.
    """
    step: dict[str, Any] = {}
    if cfg.step.distill_weight is None or (stage == "grpo" and cfg.algorithm == "fd_then_grpo"):
        step["distill_weight"] = 1.0 if stage == "fd" else 0.0
    if step.get("distill_weight", cfg.step.distill_weight) == 0.0:
        step["teacher"] = "live"
    step_cfg = _settings(StepConfig, "step", cfg, **step)

    optim: dict[str, Any] = {}
    if stage == "grpo" and cfg.algorithm == "fd_then_grpo" and cfg.grpo_learning_rate is not None:
        optim["learning_rate"] = cfg.grpo_learning_rate
    if not cfg.optim.total_steps:
        optim["total_steps"] = steps * cfg.num_iterations
    optim_cfg = _settings(OptimConfig, "optim", cfg, **optim)

    rollout_cfg = _settings(RolloutConfig, "rollout", cfg, request_feedback=step_cfg.distill_weight > 0)
    return step_cfg, optim_cfg, rollout_cfg


@dataclasses.dataclass(frozen=True)
class Stage:
    """Global steps first..last (1-based, inclusive) trained with these configs. `subdir`: where the stage
    keeps checkpoints and TensorBoard events ("" = the workdir itself). `init_from`: the stage whose final
    checkpoint gives the initial policy (None = the configured model)."""

    name: str
    first: int
    last: int
    step: StepConfig
    optim: OptimConfig
    rollout: RolloutConfig
    subdir: str
    init_from: str | None

    @property
    def num_steps(self) -> int:
        return self.last - self.first + 1


def stages(cfg: config_dict.ConfigDict) -> list[Stage]:
    """The run's stages in order (call `validate` first)."""
    if cfg.algorithm != "fd_then_grpo":
        configs = stage_configs(cfg, cfg.algorithm, steps=cfg.total_steps)
        return [Stage(cfg.algorithm, 1, cfg.total_steps, *configs, subdir="", init_from=None)]
    fd = stage_configs(cfg, "fd", steps=cfg.fd_steps)
    grpo = stage_configs(cfg, "grpo", steps=cfg.total_steps - cfg.fd_steps)
    return [
        Stage("fd", 1, cfg.fd_steps, *fd, subdir="fd", init_from=None),
        Stage("grpo", cfg.fd_steps + 1, cfg.total_steps, *grpo, subdir="grpo", init_from="fd"),
    ]
