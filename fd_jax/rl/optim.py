"""The optimizer: AdamW with warm-up and a constant or cosine schedule, global-norm clipping, and no weight
decay on norms and biases."""

from __future__ import annotations

import jax
import optax

from fd_jax.config.schema import SCHEDULES, OptimConfig  # noqa: F401  (re-exported)

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
