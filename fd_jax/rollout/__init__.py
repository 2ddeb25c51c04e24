"""From problems to a train batch: the sampler (`sampling`) and one rollout step (`rollout`: sample, verify,
feedback, teacher reprompts, batch)."""

from fd_jax.rollout.rollout import RolloutConfig, RolloutResult, TrainBatch, group_advantages, run_rollout

__all__ = ["RolloutConfig", "RolloutResult", "TrainBatch", "group_advantages", "run_rollout"]
