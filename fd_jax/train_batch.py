"""The public path of the batch contract; the code lives in `fd_jax.rl.batch`."""

from fd_jax.rl.batch import BATCH_FIELDS, TrainBatch, bucket_length, pack_train_batch, round_up

__all__ = ["BATCH_FIELDS", "TrainBatch", "bucket_length", "pack_train_batch", "round_up"]
