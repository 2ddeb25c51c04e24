"""The optimizer: AdamW with warm-up and a constant or cosine schedule, global-norm clipping, and no weight
decay on norms and biases."""

from __future__ import annotations

import dataclasses

import jax
import optax

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-6  # peak learning rate
    schedule: str = "constant"  # after warm-up: "constant" or "cosine" (decays to end_lr_ratio * peak)
    warmup_steps: int = 0  # linear warm-up from 0 over this many optimizer steps
    total_steps: int = 1000  # length of the cosine schedule (warm-up included)
    end_lr_ratio: float = 0.0  # cosine: final learning rate as a fraction of the peak
    weight_decay: float = 0.0  # decoupled (AdamW) decay, never applied to norms or biases
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # global-norm clipping; 0 disables it

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.learning_rate < 0 or self.warmup_steps < 0:
            raise ValueError(f"optim: learning_rate and warmup_steps must be >= 0, got {self}")


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=cfg.learning_rate,
            warmup_steps=cfg.warmup_steps,
            decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
            end_value=cfg.learning_rate * cfg.end_lr_ratio,
        )
    if cfg.warmup_steps == 0:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps), optax.constant_schedule(cfg.learning_rate)],
        [cfg.warmup_steps],
    )


def decay_mask(params):
    """True for the weights that take weight decay: everything but norm scales and biases."""

    def decays(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return not any("norm" in n or n.endswith("bias") for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate=learning_rate_schedule(cfg),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw
