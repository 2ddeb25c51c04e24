"""The training loop and what it owns: the parts built from a config (`components`), the loop (`loop`),
per-step metrics (`step_metrics`) and the run log (`metrics_log`), checkpoints and multi-host glue."""
