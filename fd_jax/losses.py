"""The public path of the losses; the code lives in `fd_jax.rl.losses`."""

from fd_jax.rl.losses import (
    LOSS_AGGS,
    LOSS_TYPES,
    clipped_surrogate,
    fd_aggregation_weights,
    fd_importance_weight,
    fd_loss,
    fd_loss_and_metrics,
    group_advantages,
    k3_kl,
    normaliser,
    policy_aggregation_weights,
    policy_loss,
    policy_loss_and_metrics,
)

__all__ = ["LOSS_AGGS", "LOSS_TYPES", "clipped_surrogate", "fd_aggregation_weights", 
           "fd_importance_weight", "fd_loss", "fd_loss_and_metrics", "group_advantages", "k3_kl", "normaliser",
           "policy_aggregation_weights", "policy_loss", "policy_loss_and_metrics"]
