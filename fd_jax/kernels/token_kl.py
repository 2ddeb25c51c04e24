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
  add_tail=False, sampled_ids=None) -> [N]`: the plain version, `[N, V]` logits in memory (test oracle).
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

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fd_jax.kernels import token_kl_pallas, token_kl_xla
from fd_jax.kernels.divergences import categorical_divergence, get_divergence
from fd_jax.kernels.tiles import KernelPlan

Array = jax.Array

TAIL_FLOOR = 1e-30  # the smallest tail mass of the top-k support, so that its log stays finite


class TokenStats(NamedTuple):
    """Per-token outputs of one kernel pass, each [N] f32, zero where mask = 0."""

    divergence: Array  # D_alpha(student || teacher) on the chosen support (nats)
    logprob: Array  # log p_S(sampled_ids) (nats)
    entropy: Array  # entropy of the student's full-vocabulary distribution (nats)


@dataclasses.dataclass(frozen=True)
class _Settings:
    alpha: float
    mode: str
    top_k: int | None
    add_tail: bool
    token_chunk: int
    vocab_tile: int
    backend: str


# ---------------------------------------------------------------------------------------------------------
# Supports (`mode`): what each asks of the engines, and how it turns their per-token statistics into the
# divergence and into the coefficients of its gradient w.r.t. the student logits.
# ---------------------------------------------------------------------------------------------------------


class _Support:
    pallas_ok = True  # whether the Pallas engine can run it

    def plan(self, st: _Settings) -> KernelPlan:
        """What the engine passes compute."""
        return KernelPlan(token_chunk=st.token_chunk, vocab_tile=st.vocab_tile, has_teacher=True)

    def value(self, st: _Settings, out: dict, logit_s_N: Array, logit_t_N: Array | None):
        """(divergence_N, residuals for `grad`) from the engine's statistics and the realised logits."""
        raise NotImplementedError

    def grad(self, st: _Settings, res: dict, c_div_N: Array):
        """The divergence's gradient w.r.t. the student logits, for cotangent c_div, as three parts:
        a_N (adds c · p to every logit), at_id_N (adds to the realised token's logit), and sparse
        (cols_NK, coef_NK) entries or None. The `full` support adds its dense term through the plan's
        `grad_div` instead."""
        return 0.0, 0.0, None


class _Full(_Support):
    def plan(self, st):
        div = get_divergence(st.alpha)
        return KernelPlan(token_chunk=st.token_chunk, vocab_tile=st.vocab_tile, has_teacher=True,
                          sums=(div.online_sum,) if div.online_sum else (),
                          pass2=div if div.needs_pass2 else None, grad_div=div)

    def value(self, st, out, logit_s_N, logit_t_N):
        div = get_divergence(st.alpha).value(out)
        return div, {"div": div, "lse_t": out["lse_t"], **({"kl_pm": out["kl_pm"]} if "kl_pm" in out else {})}


class _TopK(_Support):
    pallas_ok = False

    def plan(self, st):
        return KernelPlan(token_chunk=st.token_chunk, vocab_tile=st.vocab_tile, has_teacher=True,
                          top_k=st.top_k)

    def value(self, st, out, logit_s_N, logit_t_N):
        logp_NK = out["top_s"] - out["lse_s"][:, None]
        logq_NK = out["top_t"] - out["lse_t"][:, None]
        if st.add_tail:
            cats_NK = jnp.concatenate([logp_NK, _log_tail(logp_NK)], axis=1)
            logq_NK = jnp.concatenate([logq_NK, _log_tail(logq_NK)], axis=1)
        else:
            cats_NK, logq_NK = logp_NK, jax.nn.log_softmax(logq_NK, axis=1)

        def div_of(logits_NK):  # as a function of the category logits, so that vjp gives d D / d logit
            return categorical_divergence(jax.nn.log_softmax(logits_NK, axis=1), logq_NK, alpha=st.alpha)

        # d D / d (category logit) is exact for a support token; the tail's logit is the log-sum-exp of the
        # logits outside the support, so an outside token j gets ghat_tail · p_j / P_tail.
        div, vjp = jax.vjp(div_of, cats_NK)
        (ghat_NK,) = vjp(jnp.ones_like(div))
        k = logp_NK.shape[1]
        tail_unit = ghat_NK[:, k] / jnp.exp(cats_NK[:, k]) if st.add_tail else jnp.zeros_like(div)
        # The dense part c · tail_unit · p also lands on the support tokens; take it back there.
        support_unit = ghat_NK[:, :k] - jnp.exp(logp_NK) * tail_unit[:, None]
        return div, {"top_i": out["top_i"], "tail_unit": tail_unit, "support_unit": support_unit}

    def grad(self, st, res, c_div_N):
        return c_div_N * res["tail_unit"], 0.0, (res["top_i"], c_div_N[:, None] * res["support_unit"])


class _SampledToken(_Support):
    def value(self, st, out, logit_s_N, logit_t_N):
        est = (logit_s_N - out["lse_s"]) - (logit_t_N - out["lse_t"])
        return est, {"est": est}

    def grad(self, st, res, c_div_N):
        # sg(est) · (onehot(y) - p): the dense part through `a`, the one-hot part at y.
        return -c_div_N * res["est"], c_div_N * res["est"], None


class _NoTeacher(_Support):
    def plan(self, st):
        return KernelPlan(token_chunk=st.token_chunk, vocab_tile=st.vocab_tile, has_teacher=False)

    def value(self, st, out, logit_s_N, logit_t_N):
        return jnp.zeros_like(out["lse_s"]), {}


_SUPPORTS = {"full": _Full(), "topk": _TopK(), "sampled_token": _SampledToken()}
_NO_TEACHER = "_no_teacher"
_ALL_SUPPORTS = {**_SUPPORTS, _NO_TEACHER: _NoTeacher()}
# Each engine module provides forward, backward and default_blocks() -> (token_chunk, vocab_tile).
_ENGINES = {"xla": token_kl_xla, "pallas": token_kl_pallas}


def _log_tail(logp_NK: Array) -> Array:
    """[N, 1] log(1 - Σ_k p): the log-mass outside the support, floored at TAIL_FLOOR."""
    return jnp.log(jnp.maximum(1.0 - jnp.sum(jnp.exp(logp_NK), axis=1, keepdims=True), TAIL_FLOOR))


# ---------------------------------------------------------------------------------------------------------
# The fused custom_vjp.
# ---------------------------------------------------------------------------------------------------------


def _realised_logits(h_ND: Array, w_DV: Array, ids_N: Array) -> Array:
    """[N] f32 logit of each token's realised id, from a gather of N columns of W (never [N, V])."""
    return jnp.einsum("nd,dn->n", h_ND, jnp.take(w_DV, ids_N, axis=1), preferred_element_type=jnp.float32)


def _compacted(st: _Settings, mask) -> tuple[Array, Array, Array] | None:
    """(order, its inverse, live chunks) of `token_kl_xla.compaction` for the XLA engine; None for Pallas.
    Computed once in the forward and kept for the backward."""
    if st.backend != "xla":
        return None
    return token_kl_xla.compaction(mask, token_kl_xla._blocks(mask.shape[0], st.token_chunk)[0])


def _permuted(x, order):
    return None if x is None else x[order]


def _fused_forward(hs, ht, w, wt, mask, ids, st: _Settings):
    support = _ALL_SUPPORTS[st.mode]
    engine = _ENGINES[st.backend]
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
def _fused(hs, ht, w, wt, mask, ids, st: _Settings) -> TokenStats:
    return _fused_forward(hs, ht, w, wt, mask, ids, st)[0]


def gradient_terms(st: _Settings, res: dict, ids_N: Array, c_div_N: Array, c_logp_N: Array, c_ent_N: Array):
    """What the engines need to form d/ds of Σ_n (c_div·D + c_logp·log p_S(y) + c_ent·H) per token: the
    plan, the per-token terms `tok` of `tiles.logit_grad`, and the sparse entries (cols_NK, coef_NK).
    The cotangents must already be zero on masked tokens."""
    support = _ALL_SUPPORTS[st.mode]
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


def _fused_bwd(st: _Settings, saved, cts: TokenStats):
    hs, ht, w, wt, mask, ids, res, compact = saved
    on = (mask > 0).astype(jnp.float32)
    c_div, c_logp, c_ent = (jnp.asarray(ct, jnp.float32) * on for ct in cts)
    plan, tok, cols_NK, coef_NK = gradient_terms(st, res, ids, c_div, c_logp, c_ent)
    if compact is None:
        dh, dw = _ENGINES[st.backend].backward(hs, ht, w, wt, tok, cols_NK, coef_NK, plan)
    else:  # as in the forward: masked tokens have zero cotangents, so their chunks are skipped
        order, restore, live = compact
        tok, cols_NK, coef_NK = jax.tree.map(lambda x: x[order], (tok, cols_NK, coef_NK))
        dh, dw = _ENGINES[st.backend].backward(hs[order], _permuted(ht, order), w, wt, tok, cols_NK, coef_NK, plan,
                                               live_chunks=live)
        dh = dh[restore]
    zero_ids = np.zeros(ids.shape, dtype=jax.dtypes.float0)
    zeros = [None if x is None else jnp.zeros_like(x) for x in (ht, wt)]
    return dh.astype(hs.dtype), zeros[0], dw.astype(w.dtype), zeros[1], jnp.zeros_like(mask), zero_ids


_fused.defvjp(_fused_forward, _fused_bwd)


# ---------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------


def _check(h_student, h_teacher, w_unembed, mask, ids, *, alpha, mode, top_k, w_teacher=None):
    if mode not in _SUPPORTS:
        raise ValueError(f"token_kl: mode={mode!r} is unknown; use one of {sorted(_SUPPORTS)}")
    get_divergence(alpha)  # validates alpha
    if mode == "sampled_token" and float(alpha) != 1.0:
        raise ValueError(f"token_kl: mode='sampled_token' is the reverse-KL surrogate and needs alpha=1, "
                         f"got alpha={alpha!r}")
    if mode == "sampled_token" and ids is None:
        raise ValueError("token_kl: mode='sampled_token' needs sampled_ids[N] (the realised tokens)")
    if h_student.ndim != 2:
        raise ValueError(f"token_kl: h_student must be [N, D], got shape {tuple(h_student.shape)}")
    num, dim = h_student.shape
    if w_unembed.ndim != 2 or w_unembed.shape[0] != dim:
        raise ValueError(f"token_kl: w_unembed must be [D={dim}, V], got shape {tuple(w_unembed.shape)}")
    vocab = w_unembed.shape[1]
    for name, x, shape in (("h_teacher", h_teacher, (num, dim)), ("w_teacher", w_teacher, (dim, vocab)),
                           ("mask", mask, (num,)), ("sampled_ids", ids, (num,))):
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"token_kl: {name} must have shape {shape}, got {tuple(x.shape)}")
    if mode == "topk" and (top_k is None or not 1 <= int(top_k) <= vocab):
        raise ValueError(f"token_kl: mode='topk' needs 1 <= top_k <= V={vocab}, got top_k={top_k!r}")


def _resolve_backend(backend: str, mode: str) -> str:
    if backend == "auto":
        usable = jax.default_backend() == "tpu" and _ALL_SUPPORTS[mode].pallas_ok
        return "pallas" if usable else "xla"
    if backend not in _ENGINES:
        raise ValueError(f"token_kl: backend={backend!r} is unknown; use 'auto' or one of {sorted(_ENGINES)}")
    if backend == "pallas":
        if not _ALL_SUPPORTS[mode].pallas_ok:
            raise ValueError(f"token_kl: backend='pallas' supports modes 'full' and 'sampled_token', not "
                             f"{mode!r}; use backend='xla'")
    return backend


def _settings(alpha, mode, top_k, add_tail, token_chunk, vocab_tile, backend) -> _Settings:
    backend = _resolve_backend(backend, mode)
    default_chunk, default_tile = _ENGINES[backend].default_blocks()
    for name, value in (("token_chunk", token_chunk), ("vocab_tile", vocab_tile)):
        if value is not None and int(value) < 1:
            raise ValueError(f"token_kl: {name}={value!r} must be a positive block size")
    return _Settings(float(alpha), mode, None if top_k is None else int(top_k), bool(add_tail),
                     int(token_chunk or default_chunk), int(vocab_tile or default_tile), backend)


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
    _check(h_student, h_teacher, w_unembed, mask, sampled_ids, alpha=alpha, mode=mode, top_k=top_k,
           w_teacher=w_teacher)
    st = _settings(alpha, mode, top_k, add_tail, token_chunk, vocab_tile, backend)
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
    _check(h, None, w_unembed, mask, ids, alpha=1.0, mode="full", top_k=None)
    st = _settings(1.0, _NO_TEACHER, None, False, token_chunk, vocab_tile, backend)
    stats = _fused(h, None, w_unembed, None, mask, jnp.asarray(ids, jnp.int32), st)
    return stats.logprob, stats.entropy


# ---------------------------------------------------------------------------------------------------------
# The reference (materialises [N, V] logits; the oracle of the tests and the baseline of the benchmark).
# ---------------------------------------------------------------------------------------------------------


def _reference_support(mode: str, logp_NV, logq_NV, s_NV, ids_N, *, alpha, top_k, add_tail) -> Array:
    if mode == "full":
        return categorical_divergence(logp_NV, logq_NV, alpha=alpha)
    if mode == "topk":
        idx_NK = jax.lax.top_k(jax.lax.stop_gradient(s_NV), top_k)[1]
        logp_NK = jnp.take_along_axis(logp_NV, idx_NK, axis=1)
        logq_NK = jnp.take_along_axis(logq_NV, idx_NK, axis=1)
        if add_tail:
            logp_NK = jnp.concatenate([logp_NK, _log_tail(logp_NK)], axis=1)
            logq_NK = jnp.concatenate([logq_NK, _log_tail(logq_NK)], axis=1)
        else:
            logp_NK, logq_NK = jax.nn.log_softmax(logp_NK, axis=1), jax.nn.log_softmax(logq_NK, axis=1)
        return categorical_divergence(logp_NK, logq_NK, alpha=alpha)
    # sampled_token: value est, gradient sg(est) · ∇ log p_S(y).
    logp_y = jnp.take_along_axis(logp_NV, ids_N[:, None], axis=1)[:, 0]
    est = jax.lax.stop_gradient(logp_y - jnp.take_along_axis(logq_NV, ids_N[:, None], axis=1)[:, 0])
    return est + est * (logp_y - jax.lax.stop_gradient(logp_y))


def reference_stats_from_logits(s_NV: Array, t_NV: Array, mask: Array, sampled_ids: Array, *, alpha=1.0,
                                mode="full", top_k=None, add_tail=False) -> TokenStats:
    """TokenStats from materialised student and teacher logits [N, V]; the teacher side is a constant."""
    logp_NV = jax.nn.log_softmax(s_NV, axis=1)
    logq_NV = jax.nn.log_softmax(jax.lax.stop_gradient(t_NV), axis=1)
    ids_N = jnp.asarray(sampled_ids, jnp.int32)
    div = _reference_support(mode, logp_NV, logq_NV, s_NV, ids_N, alpha=alpha, top_k=top_k, add_tail=add_tail)
    logprob = jnp.take_along_axis(logp_NV, ids_N[:, None], axis=1)[:, 0]
    entropy = -jnp.sum(jnp.exp(logp_NV) * logp_NV, axis=1)
    on = jnp.asarray(mask) > 0
    return TokenStats(*(jnp.where(on, x, 0.0) for x in (div, logprob, entropy)))


def reference_token_stats(h_student, h_teacher, w_unembed, mask, sampled_ids, *, alpha=1.0, mode="full",
                          top_k=None, add_tail=False, w_teacher=None) -> TokenStats:
    """`fused_token_stats` computed plainly with [N, V] logits in f32 (f64 under x64); small shapes only."""
    _check(h_student, h_teacher, w_unembed, mask, sampled_ids, alpha=alpha, mode=mode, top_k=top_k,
           w_teacher=w_teacher)
    acc = jnp.promote_types(h_student.dtype, jnp.float32)
    s_NV = jnp.dot(h_student, w_unembed, preferred_element_type=acc)
    t_NV = jnp.dot(h_teacher, w_unembed if w_teacher is None else w_teacher, preferred_element_type=acc)
    return reference_stats_from_logits(s_NV, t_NV, mask, sampled_ids, alpha=alpha, mode=mode, top_k=top_k,
                                       add_tail=add_tail)


def reference_divergence(h_student: Array, h_teacher: Array, w_unembed: Array, mask: Array, *, alpha: float,
                         mode: str, top_k: int | None = None, add_tail: bool = False,
                         sampled_ids: Array | None = None, w_teacher: Array | None = None) -> Array:
    """per_token[N] divergence with materialised [N, V] logits; the oracle of `fused_divergence`."""
    ids = jnp.zeros(mask.shape, jnp.int32) if sampled_ids is None and mode != "sampled_token" else sampled_ids
    return reference_token_stats(h_student, h_teacher, w_unembed, mask, ids, alpha=alpha, mode=mode,
                                 top_k=top_k, add_tail=add_tail, w_teacher=w_teacher).divergence
