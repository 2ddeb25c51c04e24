"""The learning algorithm on device: the batch (`batch`), the losses (`losses`), the optimizer (`optim`) and
the one jitted update (`step`)."""
