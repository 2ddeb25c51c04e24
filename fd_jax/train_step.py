"""The public path of the training step; the code lives in `fd_jax.rl.step`."""

from fd_jax.rl.step import (
    BATCH_FIELDS,
    KERNEL_PASSES,
    TEACHERS,
    StepConfig,
    TrainState,
    init_train_state,
    make_train_step,
    micro_batch_loss,
)

__all__ = ["BATCH_FIELDS", "KERNEL_PASSES", "TEACHERS", "StepConfig", "TrainState", "init_train_state",
           "make_train_step", "micro_batch_loss"]
