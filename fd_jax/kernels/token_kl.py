"""Token-level divergence between student and teacher, from hidden states, never materialising logits.

For N completion tokens with student hidden states h_S [N, D], teacher hidden states h_T [N, D] (the same
network reading the reprompt) and the unembedding matrix W [D, V] (for tied embeddings, embedᵀ), the logits
are s = h_S W and t = h_T W and, per token n,

    divergence[n] = D_alpha( softmax(s_n) restricted to the support || softmax(t_n) on it )

with alpha 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher), in between the
generalized JSD (see `divergences.py`), and the support (`mode`):

* `full`: the whole vocabulary;
* `topk`: the student's `top_k` highest logits; the teacher is projected onto the same tokens (log-probs
  gathered from its full-vocabulary log-softmax); with `add_tail` both get a tail bucket log(1 - Σ p) (the
  mass outside the top k; clamped at 1e-30), else both are renormalised over the k tokens;
* `sampled_token`: only the realised token y = `sampled_ids[n]`: the value is the reverse-KL estimate
  log p_S(y) - log p_T(y) and the gradient is sg(log p_S(y) - log p_T(y)) · ∇ log p_S(y). alpha must be 1.

The teacher side never receives gradient (its hidden states and its use of W are treated as constants).
An EMA or frozen teacher has its own unembedding: pass it as `w_teacher` (default: the student's W).
`mask[N]` (float) zeroes the outputs and the gradients of padded tokens.

API
---
* `reference_divergence(h_student, h_teacher, w_unembed, mask, *, alpha, mode, top_k=None,
  add_tail=False, sampled_ids=None) -> [N]`: the plain version, `[N, V]` logits in memory (test oracle;
  defined in `fd_jax.kernels.reference` with `reference_token_stats`, re-exported here).
* `fused_divergence(...)`: same signature plus `w_teacher`, `token_chunk`, `vocab_tile`, `backend`; same
  values and gradients, memory O(N·D + D·V + chunk·tile).
* `fused_token_stats(h_student, h_teacher, w_unembed, mask, sampled_ids, *, alpha, mode, ...)
  -> TokenStats(divergence, logprob, entropy)`, each [N] f32, from one kernel pass: what the train step
  needs (the divergence for FD, log p_S(sampled_ids) for the GRPO ratios, the student entropy to log).
  All three are differentiable w.r.t. h_student and w_unembed (any mix of cotangents).
  `reference_token_stats` is its oracle.
* `token_logprobs_and_entropy(h, w_unembed, ids, mask=None) -> (logprob[N], entropy[N])`: the same
  without a teacher (GRPO alone).

For the train step: flatten `h_BCD` at completion positions to `[B*C, D]`, pass `completion_mask_BC` and
`completion_ids_BC` flattened likewise, and reshape the outputs back to `[B, C]`.

How (fused)
-----------
A `jax.custom_vjp`. The forward visits token chunks × vocabulary tiles once with an online log-sum-exp,
producing per token both log-normalisers, the entropy and the divergence (the JSD needs a second pass over
the tiles, as log M needs both normalisers). It keeps only [N]-sized statistics. The backward recomputes each
tile's logits and adds the gradient `g = dL/ds` (closed forms in `divergences.py`, `tiles.logit_grad`) into
d_h (`g Wᵀ`) and dW (`hᵀ g`, accumulated per vocabulary tile in f32). Matmuls accumulate in f32 for bf16
inputs; gradients come back in the inputs' dtypes. `backend` picks the engine: `xla` (`lax.scan`, every
platform and mode), `pallas` (Pallas kernels, modes `full` and `sampled_token`: Mosaic on TPU, Triton on
GPU with D a multiple of 16, `interpret=True` on CPU for tests), `auto` (Pallas on TPU, else XLA: the
Triton kernels have not been timed against XLA on a GPU yet).

Cost: value and gradient take six [N, D] x [D, V] matmuls (two forward, four backward; eight for the
JSD) against the naive version's four, the price of never storing logits; on CPU the naive version's
memory traffic over [N, V] arrays costs more than that (benchmarks/token_kl.py). The gradient cannot be
formed inside this forward: dW = Σ_n ct_n h_n g_nᵀ needs the per-token cotangents, known only in the
backward. When the caller's loss is a sum of per-token terms, `token_loss.fused_token_loss` knows them
during the pass and needs four matmuls; the train step uses it unless the loss is GSPO's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fd_jax.kernels import token_kl_xla
from fd_jax.kernels.plan import (ALL_SUPPORTS, ENGINES, NO_TEACHER, TAIL_FLOOR, Settings, TokenStats, check_inputs,
                                 settings)
from fd_jax.kernels.reference import reference_divergence, reference_stats_from_logits, reference_token_stats

Array = jax.Array

__all__ = ["TAIL_FLOOR", "TokenStats", "fused_divergence", "fused_token_stats", "gradient_terms",
           "reference_divergence", "reference_stats_from_logits", "reference_token_stats", "token_logprobs_and_entropy"]


# ---------------------------------------------------------------------------------------------------------
# The fused custom_vjp.
# ---------------------------------------------------------------------------------------------------------


def _realised_logits(h_ND: Array, w_DV: Array, ids_N: Array) -> Array:
    """[N] f32 logit of each token's realised id, from a gather of N columns of W (never [N, V])."""
    return jnp.einsum("nd,dn->n", h_ND, jnp.take(w_DV, ids_N, axis=1), preferred_element_type=jnp.float32)


def _compacted(st: Settings, mask) -> tuple[Array, Array, Array] | None:
    """(order, its inverse, live chunks) of `token_kl_xla.compaction` for the XLA engine; None for Pallas.
    Computed once in the forward and kept for the backward."""
    if st.backend != "xla":
        return None
    return token_kl_xla.compaction(mask, token_kl_xla.blocks(mask.shape[0], st.token_chunk)[0])


def _permuted(x, order):
    return None if x is None else x[order]


def fused_forward(hs, ht, w, wt, mask, ids, st: Settings):
    # Masked tokens are never read: whatever their hidden states hold (NaN included) reaches no statistic
    # and no gradient (their cotangents are zero, but NaN x 0 is NaN).
    on_N1 = (mask > 0)[:, None]
    hs = jnp.where(on_N1, hs, 0)
    ht = None if ht is None else jnp.where(on_N1, ht, 0)
    support = ALL_SUPPORTS[st.mode]
    engine = ENGINES[st.backend]
    plan = support.plan(st)
    compact = _compacted(st, mask)
    if compact is None:
        out = engine.forward(hs, ht, w, wt, plan)
    else:  # the counted tokens first, and only the chunks holding them computed
        order, restore, live = compact
        out = engine.forward(hs[order], _permuted(ht, order), w, wt, plan, live_chunks=live)
        out = {k: v[restore] for k, v in out.items()}
    logit_s = _realised_logits(hs, w, ids)
    logit_t = None if ht is None else _realised_logits(ht, w if wt is None else wt, ids)
    div, res = support.value(st, out, logit_s, logit_t)
    on = mask > 0
    stats = TokenStats(jnp.where(on, div, 0.0), jnp.where(on, logit_s - out["lse_s"], 0.0),
                       jnp.where(on, out["entropy"], 0.0))
    res.update(lse_s=out["lse_s"], entropy=out["entropy"])
    return stats, (hs, ht, w, wt, mask, ids, res, compact)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fused(hs, ht, w, wt, mask, ids, st: Settings) -> TokenStats:
    return fused_forward(hs, ht, w, wt, mask, ids, st)[0]


def gradient_terms(st: Settings, res: dict, ids_N: Array, c_div_N: Array, c_logp_N: Array, c_ent_N: Array):
    """What the engines need to form d/ds of Σ_n (c_div·D + c_logp·log p_S(y) + c_ent·H) per token: the
    plan, the per-token terms `tok` of `tiles.logit_grad`, and the sparse entries (cols_NK, coef_NK).
    The cotangents must already be zero on masked tokens."""
    support = ALL_SUPPORTS[st.mode]
    plan = support.plan(st)
    a_extra, at_id, sparse = support.grad(st, res, c_div_N)
    # d/ds of (c_logp log p_y + c_ent H) = c_logp (onehot_y - p) - c_ent p (log p + H).
    tok = {"lse_s": res["lse_s"], "a": a_extra - c_logp_N - c_ent_N * res["entropy"], "b": -c_ent_N}
    if plan.grad_div is not None:
        tok.update(c_div=c_div_N, **{k: res[k] for k in ("div", "lse_t", "kl_pm") if k in res})
    cols_NK, coef_NK = ids_N[:, None].astype(jnp.int32), (c_logp_N + at_id)[:, None]
    if sparse is not None:
        cols_NK = jnp.concatenate([cols_NK, sparse[0]], axis=1)
        coef_NK = jnp.concatenate([coef_NK, sparse[1]], axis=1)
    return plan, tok, cols_NK, coef_NK


def _fused_bwd(st: Settings, saved, cts: TokenStats):
    hs, ht, w, wt, mask, ids, res, compact = saved
    on = (mask > 0).astype(jnp.float32)
    c_div, c_logp, c_ent = (jnp.asarray(ct, jnp.float32) * on for ct in cts)
    plan, tok, cols_NK, coef_NK = gradient_terms(st, res, ids, c_div, c_logp, c_ent)
    if compact is None:
        dh, dw = ENGINES[st.backend].backward(hs, ht, w, wt, tok, cols_NK, coef_NK, plan)
    else:  # as in the forward: masked tokens have zero cotangents, so their chunks are skipped
        order, restore, live = compact
        tok, cols_NK, coef_NK = jax.tree.map(lambda x: x[order], (tok, cols_NK, coef_NK))
        dh, dw = ENGINES[st.backend].backward(hs[order], _permuted(ht, order), w, wt, tok, cols_NK, coef_NK, plan,
                                               live_chunks=live)
        dh = dh[restore]
    zero_ids = np.zeros(ids.shape, dtype=jax.dtypes.float0)
    zeros = [None if x is None else jnp.zeros_like(x) for x in (ht, wt)]
    return dh.astype(hs.dtype), zeros[0], dw.astype(w.dtype), zeros[1], jnp.zeros_like(mask), zero_ids


_fused.defvjp(fused_forward, _fused_bwd)


# ---------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------


def fused_token_stats(h_student: Array, h_teacher: Array, w_unembed: Array, mask: Array, sampled_ids: Array,
                      *, alpha: float = 1.0, mode: str = "full", top_k: int | None = None,
                      add_tail: bool = False, w_teacher: Array | None = None, token_chunk: int | None = None,
                      vocab_tile: int | None = None, backend: str = "auto") -> TokenStats:
    """Divergence, log p_S(sampled_ids) and student entropy per token, in one chunked pass (see module doc).

    h_student, h_teacher: [N, D] (f32 or bf16); w_unembed: [D, V]; mask: [N] (1 = score the token);
    sampled_ids: [N] int, the realised tokens; w_teacher: [D, V], the teacher's own unembedding (an EMA
    or frozen teacher), None when it uses w_unembed. Returns TokenStats of [N] f32 arrays, zero where
    mask = 0, differentiable w.r.t. h_student and w_unembed (never through the teacher). ValueError for
    an unknown mode/backend, alpha outside [0, 1], sampled_token with alpha != 1, top_k outside [1, V] in
    mode topk, or mismatched shapes.
    `add_tail` only matters in mode topk. token_chunk / vocab_tile: block sizes (None: the engine's
    `default_blocks()`, for XLA tuned by benchmarks/token_kl.py on CPU; the Pallas GPU kernels want powers
    of two, the TPU ones multiples of 8 and 128); results do not depend on them beyond rounding.
    """
    check_inputs(h_student, h_teacher, w_unembed, mask, sampled_ids, alpha=alpha, mode=mode, top_k=top_k,
           w_teacher=w_teacher)
    st = settings(alpha, mode, top_k, add_tail, token_chunk, vocab_tile, backend)
    w_teacher = None if w_teacher is None else jax.lax.stop_gradient(w_teacher)
    return _fused(h_student, jax.lax.stop_gradient(h_teacher), w_unembed, w_teacher,
                  jnp.asarray(mask, jnp.float32), jnp.asarray(sampled_ids, jnp.int32), st)


def fused_divergence(h_student: Array, h_teacher: Array, w_unembed: Array, mask: Array, *, alpha: float,
                     mode: str, top_k: int | None = None, add_tail: bool = False,
                     sampled_ids: Array | None = None, w_teacher: Array | None = None,
                     token_chunk: int | None = None, vocab_tile: int | None = None,
                     backend: str = "auto") -> Array:
    """per_token[N] f32 divergence of `fused_token_stats`, never materialising [N, V] logits."""
    ids = jnp.zeros(mask.shape, jnp.int32) if sampled_ids is None else sampled_ids
    if mode == "sampled_token" and sampled_ids is None:
        ids = None  # let the check raise its message
    return fused_token_stats(h_student, h_teacher, w_unembed, mask, ids, alpha=alpha, mode=mode, top_k=top_k,
                             add_tail=add_tail, w_teacher=w_teacher, token_chunk=token_chunk,
                             vocab_tile=vocab_tile, backend=backend).divergence


def token_logprobs_and_entropy(h: Array, w_unembed: Array, ids: Array, mask: Array | None = None, *,
                               token_chunk: int | None = None, vocab_tile: int | None = None,
                               backend: str = "auto") -> tuple[Array, Array]:
    """(log p(ids) [N], entropy [N]) f32 from hidden states h [N, D] and W [D, V], chunked, differentiable
    w.r.t. h and w_unembed; zero where mask = 0 (mask defaults to all ones)."""
    mask = jnp.ones(h.shape[:1], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    check_inputs(h, None, w_unembed, mask, ids, alpha=1.0, mode="full", top_k=None)
    st = settings(1.0, NO_TEACHER, None, False, token_chunk, vocab_tile, backend)
    stats = _fused(h, None, w_unembed, None, mask, jnp.asarray(ids, jnp.int32), st)
    return stats.logprob, stats.entropy
