"""fd_jax: post-training of Lean 4 theorem provers with Feedback Distillation and GRPO, in JAX/Flax."""

__version__ = "0.1.0"
