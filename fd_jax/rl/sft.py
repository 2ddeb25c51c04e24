"""Supervised fine-tuning on (prompt, target) pairs: the jitted step of `algorithm=sft`.

The loss is the mean negative log-likelihood of the target tokens (every target token of the batch weighs
the same; prompts are not scored). The batch is a `TrainBatch` whose completions are the targets (the
student rows are read; teacher rows, advantages and old log-probs are not), and the state is the RL
stages' `TrainState` with a live teacher, so checkpoints, resume and the Hugging Face export are the same.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fd_jax.config.schema import StepConfig
from fd_jax.kernels import token_kl
from fd_jax.rl.batch import BATCH_FIELDS
from fd_jax.rl.step import TrainState


def sft_loss(params, graphdef: nnx.GraphDef, batch: dict, cfg: StepConfig) -> tuple[jax.Array, dict]:
    """(mean NLL per target token, {"tokens", "entropy"}) of `batch`'s completions after its student prompts."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(batch["student_tokens_BS"], batch["student_positions_BS"])
    h_BCD = jnp.take_along_axis(hidden, batch["student_index_BC"][:, :, None], axis=1)
    b, c, d = h_BCD.shape
    mask_N = batch["completion_mask_BC"].reshape(-1).astype(jnp.float32)
    logp_N, entropy_N = token_kl.token_logprobs_and_entropy(
        h_BCD.reshape(-1, d), model.unembedding, batch["completion_tokens_BC"].reshape(-1), mask_N,
        token_chunk=cfg.token_chunk, vocab_tile=cfg.vocab_tile, backend=cfg.kernel_backend)
    tokens = jnp.maximum(mask_N.sum(), 1.0)
    loss = -jnp.sum(logp_N * mask_N) / tokens
    return loss, {"tokens": mask_N.sum(), "entropy": jax.lax.stop_gradient(jnp.sum(entropy_N * mask_N) / tokens)}


def make_sft_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, cfg: StepConfig,
                  learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None
                  ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """A jitted `step(state, batch) -> (state, metrics)` (metrics: loss, entropy, grad_norm, completion_tokens,
    learning_rate); the state is donated."""

    def step(state: TrainState, batch: dict):
        batch = {k: jnp.asarray(batch[k]) for k in BATCH_FIELDS}
        (loss, aux), grads = jax.value_and_grad(sft_loss, has_aux=True)(state.params, graphdef, batch, cfg)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "entropy": aux["entropy"], "grad_norm": optax.global_norm(grads),
                   "completion_tokens": aux["tokens"]}
        if learning_rate_fn is not None:
            metrics["learning_rate"] = learning_rate_fn(state.step)
        return TrainState(state.step + 1, params, state.teacher, state.ref, opt_state), metrics

    compiled: dict = {}

    def run(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # As in `fd_jax.rl.step`: the new state keeps the old one's mesh placements (no recompilation, and
        # donation works); single-device leaves stay free.
        shardings = jax.tree.map(
            lambda x: x.sharding if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding) else None,
            state)
        key = (jax.tree.structure(state), tuple(jax.tree.leaves(shardings)))
        if key not in compiled:
            compiled[key] = jax.jit(step, donate_argnums=0, out_shardings=(shardings, None))
        return compiled[key](state, batch)

    return run
