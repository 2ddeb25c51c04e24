"""The public path of the batch contract; the code lives in `fd_jax.rl.batch`."""

from fd_jax.rl.batch import TrainBatch, pack_train_batch, round_up

__all__ = ["TrainBatch", "pack_train_batch", "round_up"]
