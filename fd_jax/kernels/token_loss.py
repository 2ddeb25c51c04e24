"""A per-token loss of the student-teacher statistics, with its gradient computed in the same pass.

`fused_token_stats` (token_kl.py) returns per-token statistics and leaves the loss to the caller; its
backward cannot know the per-token cotangents before the loss is formed, so it recomputes every logit tile:
six [N, D] x [D, V] matmuls per value-and-grad (teacher and student logits twice, d_h, dW). When the loss
is a sum of per-token terms,

    loss = Σ_n mask_n · token_loss(stats_n, aux_n),     stats_n = (D_alpha, log p_S(y_n), H(p_S)) of token n,

each token's cotangent is known as soon as its own statistics are, so one pass suffices: for a chunk of C
tokens the student and teacher logits [C, V] are formed once (tile by tile, kept in two [C, V] buffers),
the statistics and `jax.vjp(token_loss)` give the cotangents, and the logit gradient goes straight into
d_h (`g Wᵀ`) and an f32 dW accumulator (`hᵀ g`): four matmuls, nothing recomputed. The gradient sweep
of one chunk and the logit sweep of the next share one loop over the vocabulary tiles, so W is read once
per chunk and the buffers are rewritten in place. The sparse entries of the gradient (the realised
token's column, the top-k support) are added once per chunk, through K gathered columns of W and a
scatter into dW. Memory is the chunk's [C, V] rows plus the [D, V] accumulator (aliased with dW's output
when W is f32) instead of [N, V]; `benchmarks/token_kl.py` measures both. Masked tokens cost nothing and
are never read: each chunk gathers the next C counted tokens (`token_kl_xla.compaction`), zeros past the
last one, scatters its outputs back in place, and only the chunks holding any are visited.

`token_loss(stats: TokenStats, aux) -> [C]` must be elementwise over tokens: token n's term may read only
stats[n] and aux[n] (aux is any pytree of [N, ...] arrays, a constant: no gradient flows into it). The
GRPO family with token-level importance ratios and the FD loss are of this form once their aggregation
weights (which read only masks) are folded into aux; GSPO's sequence-level ratio is not, and the train step
then uses `fused_token_stats`. Called without differentiation, only the statistics pass runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fd_jax.kernels import plan as kernel_plan
from fd_jax.kernels import tiles, token_kl, token_kl_xla
from fd_jax.kernels.token_kl import TokenStats

Array = jax.Array
TokenLoss = Callable[[TokenStats, Any], Array]

# (tokens C, vocabulary tile T) by W's itemsize. C x V f32 logits of both sides are kept per chunk, and every
# chunk reads W once and dW once (tile copies, the accumulator's read-modify-write): the larger C, the fewer
# of these memory-bound sweeps, up to what the memory allows. f32: 160 x 1024 keeps temporaries at 4.5% of
# the reference's at SmolLM2's D 576, V 49152 (the issue 19 target is 5%); 176 x 1024, 192 x 1024 and
# 160 x 2048 ran within noise of it (benchmarks/token_kl.py, docs/benchmarks.md). A 16-bit W gets more
# tokens: its logit matmuls run on the CPU's bf16 dot instructions (as the floor's do), so what each chunk
# adds beyond the matmul rate weighs more: d_h's matmul g Wᵀ at only C rows, the f32 widening of every W
# tile for it, the read-modify-write of the f32 dW accumulator per tile. 384 x 2048 took the one pass from
# 1.21x to 1.05x the floor; with the sweeps of two chunks sharing one loop, 384 x 1024 ran 4-11% faster
# still (a tile then takes 1.1 MiB in bf16 and 2.3 MiB widened at D 576). The cost is 2 x 384 x V f32 of logit
# buffers (144 MiB at that V), where bf16 has no memory target.
DEFAULT_LOSS_BLOCKS = {4: (160, 1024), 2: (384, 1024)}
DEFAULT_LOSS_CHUNK, DEFAULT_LOSS_TILE = DEFAULT_LOSS_BLOCKS[4]


def default_loss_blocks(w_dtype) -> tuple[int, int]:
    """(token chunk, vocabulary tile) that `fused_token_loss` uses for a W of this dtype by default."""
    return DEFAULT_LOSS_BLOCKS.get(jnp.dtype(w_dtype).itemsize, DEFAULT_LOSS_BLOCKS[4])


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _value(hs, ht, w, wt, mask, ids, aux, st, token_loss):
    """The loss and stats without gradients (the statistics pass of the XLA engine)."""
    stats, _ = token_kl.fused_forward(hs, ht, w, wt, mask, ids, st)
    stats = jax.tree.map(jax.lax.stop_gradient, stats)
    return jnp.sum(token_loss(stats, aux) * (mask > 0)), stats


def _value_and_grad(hs, ht, w, wt, mask, ids, aux, st, token_loss):
    """(loss, stats, d_h, dW), chunk by chunk, the next chunk's logits formed while this one's gradient is.

    Each chunk of C counted tokens (`token_kl_xla.compaction`: the chunks after the last counted token are
    never visited) goes through:

    * pass A over the vocabulary tiles: the tile's logits (one matmul for both sides when they share W)
      update the online statistics while still in cache and are stored in the [C, V] buffers;
    * the middle: statistics, token losses, their cotangents (`jax.vjp(token_loss)`), the per-token terms
      of the logit gradient;
    * pass B over the tiles of the buffers: the logit gradient g, d_h += g Wᵀ, dW[:, tile] += hᵀ g; then
      the sparse entries (the realised token, the top-k support) once, through K gathered columns of W.

    Pass B of chunk c and pass A of chunk c + 1 run in one loop over the tiles: each tile of W is read once
    for both, and the buffers are rewritten in place, tile by tile, right after the tile's g is formed (a
    data dependence on g orders the write after the read: see `pass_ba`). Only the first chunk's pass A and
    the last chunk's pass B run alone. A ragged last tile is read at V - T with its already-seen columns masked; pass
    B's mask zeroes g on those columns, which by then hold the next chunk's logits.
    """
    num, dim = hs.shape
    vocab = w.shape[1]
    chunk, num_chunks = token_kl_xla.blocks(num, st.token_chunk)
    tile, num_tiles = token_kl_xla.blocks(vocab, st.vocab_tile)
    order, _, live_chunks = token_kl_xla.compaction(mask, chunk)
    order = jnp.pad(order, (0, num_chunks * chunk - num), constant_values=num)  # padding: out of range
    # Rows past the counted tokens read zero hidden states (whatever a masked token holds, NaN included,
    # never reaches dW) and write no output; their ids, mask and aux are their own, so token_loss sees the
    # values it would see unchunked. A batch with nothing counted runs chunk 0 on such rows: zero
    # cotangents, nothing written.
    counted_order = jnp.where(jnp.arange(num_chunks * chunk) < jnp.sum(mask > 0), order, num)
    support = kernel_plan.ALL_SUPPORTS[st.mode]
    plan = support.plan(st)
    unembed = token_kl_xla.Unembedding(w, wt, tile)
    # Hidden states and W of one 16-bit dtype multiply as they are (f32 accumulation): the reference's logits,
    # and no f32 copy of the tile. A 16-bit W is widened tile by tile for d_h: an f32 copy of W would cost
    # as much memory as the chunk buffers.
    native = hs.dtype == w.dtype and (ht is None or ht.dtype == hs.dtype) and (wt is None or wt.dtype == w.dtype)
    stacked = ht is not None and wt is None and ht.dtype == hs.dtype

    def chunk_inputs(c):
        rows_C = lax.dynamic_slice_in_dim(counted_order, c * chunk, chunk)
        take = lambda rows: lambda x: jnp.take(x, rows, axis=0, mode="fill", fill_value=0)  # noqa: E731
        own = jax.tree.map(take(lax.dynamic_slice_in_dim(order, c * chunk, chunk)), (ids, mask, aux))
        hs_CD, ht_CD = jax.tree.map(take(rows_C), (hs, ht))
        # A shared W: both sides' rows in one [2C, D] operand (once per chunk), so each W tile is read once.
        hst_2CD = jnp.concatenate([hs_CD, ht_CD]) if stacked else None
        return rows_C, (hs_CD, ht_CD, *own, hst_2CD)

    def read_w(j):
        start, valid_T = unembed.position(j)
        w_DT = unembed.student(start, widen=not native)
        return start, valid_T, w_DT, w_DT.astype(jnp.float32)

    def logits(w_DT, start, xs):
        hs_CD, ht_CD, hst_2CD = xs[0], xs[1], xs[-1]
        if stacked:  # one [2C, D] x [D, T] matmul for both sides: W's tile is streamed once
            st_2CT = _dot(hst_2CD, w_DT)
            return st_2CT[:chunk], st_2CT[chunk:]
        t_CT = None if ht is None else _dot(ht_CD, unembed.teacher(start, w_DT, widen=not native))
        return _dot(hs_CD, w_DT), t_CT

    def a_init():
        return (tiles.online_init(chunk, plan.has_teacher, plan.sums),
                None if plan.top_k is None else tiles.topk_init(chunk, plan.top_k))

    def a_update(a, s_CT, t_CT, start, valid_T):
        state, top = a
        state = tiles.online_update(state, s_CT, t_CT, valid_T)
        if top is not None:
            top = tiles.topk_update(top, s_CT, t_CT, start + jnp.arange(tile, dtype=jnp.int32), valid_T)
        return state, top

    def store(bufs, s_CT, t_CT, start):
        s_CV, t_CV = bufs
        s_CV = lax.dynamic_update_slice_in_dim(s_CV, s_CT, start, axis=1)
        t_CV = None if t_CV is None else lax.dynamic_update_slice_in_dim(t_CV, t_CT, start, axis=1)
        return s_CV, t_CV

    def middle(a, bufs, xs):
        """The chunk's loss and stats, and what its pass B needs (`pending`)."""
        (state, top), (s_CV, t_CV) = a, bufs
        hs_CD, _, ids_C, mask_C, aux_C, _ = xs
        out = {**tiles.online_finish(state), **(top or {})}
        if plan.pass2 is not None:
            zeros = jnp.zeros((chunk,), jnp.float32)
            out["kl_pm"], out["kl_qm"] = tiles.pass2_update((zeros, zeros), s_CV, t_CV, out["lse_s"],
                                                            out["lse_t"], None, plan.pass2)
        logit_s = jnp.take_along_axis(s_CV, ids_C[:, None], axis=1)[:, 0]
        logit_t = None if t_CV is None else jnp.take_along_axis(t_CV, ids_C[:, None], axis=1)[:, 0]
        div, res = support.value(st, out, logit_s, logit_t)
        res.update(lse_s=out["lse_s"], entropy=out["entropy"])
        on = mask_C > 0
        stats = TokenStats(jnp.where(on, div, 0.0), jnp.where(on, logit_s - out["lse_s"], 0.0),
                           jnp.where(on, out["entropy"], 0.0))
        weight_C = on.astype(jnp.float32)
        loss_C, vjp = jax.vjp(lambda stats: token_loss(stats, aux_C), stats)
        # Cotangent weight_C: masked tokens get none (token_loss is elementwise).
        c_div, c_logp, c_ent = (jnp.asarray(ct, jnp.float32) for ct in vjp(weight_C)[0])
        _, tok, cols_CK, coef_CK = token_kl.gradient_terms(st, res, ids_C, c_div, c_logp, c_ent)
        pending = {"hs32_DC": hs_CD.T.astype(jnp.float32), "tok": tok, "cols": cols_CK, "coef": coef_CK}
        return jnp.sum(loss_C * weight_C), stats, pending

    def b_update(b, pending, bufs, w32_DT, start, valid_T):
        """Pass B on one tile: the new (d_h, dW), and g (which the buffers' rewrite must wait for)."""
        dh_CD, dw_DV = b
        s_CT = lax.dynamic_slice_in_dim(bufs[0], start, tile, axis=1)
        t_CT = None if bufs[1] is None else lax.dynamic_slice_in_dim(bufs[1], start, tile, axis=1)
        # Materialise g once: left alone, XLA:CPU fuses its elementwise chain (exp included) into both
        # matmuls' operands and computes it twice.
        g_CT = lax.optimization_barrier(tiles.logit_grad(s_CT, t_CT, pending["tok"], plan.grad_div, valid_T))
        dw_DT = lax.dynamic_slice_in_dim(dw_DV, start, tile, axis=1) + _dot(pending["hs32_DC"], g_CT)
        return (dh_CD + _dot(g_CT, w32_DT.T), lax.dynamic_update_slice_in_dim(dw_DV, dw_DT, start, axis=1)), g_CT

    def b_finish(b, pending):
        """The sparse entries, once per chunk rather than a compare-and-select over every tile: d_h gathers
        their K columns of W, dW scatters into them."""
        dh_CD, dw_DV = b
        coef_CK = pending["coef"]
        dh_CD = dh_CD + jnp.einsum("ck,dck->cd", coef_CK, token_kl_xla.columns(w, pending["cols"]))
        dw_DV = dw_DV.at[:, pending["cols"]].add(pending["hs32_DC"][:, :, None] * coef_CK[None])
        return dh_CD, dw_DV

    def pass_a(a, bufs, xs):
        def one_tile(carry, j):
            a, bufs = carry
            start, valid_T, w_DT, _ = read_w(j)
            s_CT, t_CT = logits(w_DT, start, xs)
            return (a_update(a, s_CT, t_CT, start, valid_T), store(bufs, s_CT, t_CT, start)), None
        return lax.scan(one_tile, (a, bufs), jnp.arange(num_tiles))[0]

    def pass_b(b, pending, bufs):
        def one_tile(b, j):
            start, valid_T, _, w32_DT = read_w(j)
            return b_update(b, pending, bufs, w32_DT, start, valid_T)[0], None
        return b_finish(lax.scan(one_tile, b, jnp.arange(num_tiles))[0], pending)

    def pass_ba(b, pending, a, bufs, xs):
        """Pass B of the chunk in the buffers and pass A of the next one (xs), in one sweep over W."""
        def one_tile(carry, j):
            b, a, bufs = carry
            start, valid_T, w_DT, w32_DT = read_w(j)
            b, g_CT = b_update(b, pending, bufs, w32_DT, start, valid_T)
            s_CT, t_CT = logits(w_DT, start, xs)
            a = a_update(a, s_CT, t_CT, start, valid_T)
            # The new logits overwrite the tile that g has just read. Only a data dependence on g orders
            # the two for XLA (an optimization_barrier does not survive to its copy insertion, which then
            # copies both [C, V] buffers on every tile): the tile is written through a select on g, which
            # passes the new logits unchanged wherever g is a number (where it is NaN, so is the loss).
            nan_CT = jnp.isnan(g_CT)
            s_CT = jnp.where(nan_CT, g_CT, s_CT)
            t_CT = None if t_CT is None else jnp.where(nan_CT, g_CT, t_CT)
            return (b, a, store(bufs, s_CT, t_CT, start)), None
        b, a, bufs = lax.scan(one_tile, (b, a, bufs), jnp.arange(num_tiles))[0]
        return b_finish(b, pending), a, bufs

    def scatter(outs, rows_C, stats=None, dh_CD=None):
        out_stats, out_dh = outs
        if stats is not None:
            out_stats = jax.tree.map(lambda buf, x: buf.at[rows_C].set(x, mode="drop"), out_stats, stats)
        if dh_CD is not None:
            out_dh = out_dh.at[rows_C].set(dh_CD, mode="drop")
        return out_stats, out_dh

    def next_chunk(c, carry):
        """Chunk c - 1's pass B with chunk c's pass A, then chunk c's middle."""
        loss, dw_DV, rows_C, pending, bufs, outs = carry
        next_rows_C, xs = chunk_inputs(c)
        (dh_CD, dw_DV), a, bufs = pass_ba((dh0_CD, dw_DV), pending, a_init(), bufs, xs)
        outs = scatter(outs, rows_C, dh_CD=dh_CD)
        loss_c, stats, pending = middle(a, bufs, xs)
        return loss + loss_c, dw_DV, next_rows_C, pending, bufs, scatter(outs, next_rows_C, stats)

    buffer = jnp.zeros((chunk, vocab), jnp.float32)  # the chunk's logits, reused by every chunk
    bufs = (buffer, None if ht is None else buffer)
    outs = (TokenStats(*(jnp.zeros((num,), jnp.float32) for _ in range(3))), jnp.zeros((num, dim), jnp.float32))
    dh0_CD = jnp.zeros((chunk, dim), jnp.float32)
    dw0_DV = jnp.zeros((dim, vocab), jnp.float32)  # the f32 accumulator: dW's own buffer when W is f32

    rows_C, xs = chunk_inputs(0)
    a, bufs = pass_a(a_init(), bufs, xs)
    loss, stats, pending = middle(a, bufs, xs)
    init = (loss, dw0_DV, rows_C, pending, bufs, scatter(outs, rows_C, stats))
    loss, dw_DV, rows_C, pending, bufs, outs = lax.fori_loop(1, live_chunks, next_chunk, init)
    dh_CD, dw_DV = pass_b((dh0_CD, dw_DV), pending, bufs)
    return loss, *scatter(outs, rows_C, dh_CD=dh_CD), dw_DV


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _token_loss(hs, ht, w, wt, mask, ids, aux, st, token_loss):
    return _value(hs, ht, w, wt, mask, ids, aux, st, token_loss)


def _token_loss_fwd(hs, ht, w, wt, mask, ids, aux, st, token_loss):
    loss, stats, dh, dw = _value_and_grad(hs, ht, w, wt, mask, ids, aux, st, token_loss)
    # Empty arrays carry the input dtypes to the backward (residuals must be arrays).
    return (loss, stats), (dh, dw, ht, wt, mask, ids, aux, jnp.zeros((0,), hs.dtype), jnp.zeros((0,), w.dtype))


def _token_loss_bwd(st, token_loss, saved, cts):
    dh, dw, ht, wt, mask, ids, aux, h_like, w_like = saved
    c_loss = jnp.asarray(cts[0], jnp.float32)  # the stats are outputs without gradient
    zeros = [None if x is None else jnp.zeros_like(x) for x in (ht, wt)]
    return ((c_loss * dh).astype(h_like.dtype), zeros[0], (c_loss * dw).astype(w_like.dtype), zeros[1],
            jnp.zeros_like(mask), np.zeros(ids.shape, dtype=jax.dtypes.float0), jax.tree.map(jnp.zeros_like, aux))


_token_loss.defvjp(_token_loss_fwd, _token_loss_bwd)


def fused_token_loss(h_student: Array, h_teacher: Array | None, w_unembed: Array, mask: Array,
                     sampled_ids: Array, token_loss: TokenLoss, aux: Any = None, *, alpha: float = 1.0,
                     mode: str = "full", top_k: int | None = None, add_tail: bool = False,
                     w_teacher: Array | None = None, token_chunk: int | None = None,
                     vocab_tile: int | None = None) -> tuple[Array, TokenStats]:
    """(Σ_n mask_n · token_loss(stats, aux)[n], stats) with the gradient formed in the same pass.

    h_student: [N, D]; h_teacher: [N, D] or None (no teacher: the divergence is 0, only log-probs and
    entropy); w_unembed: [D, V]; mask: [N] (1 = the token counts); sampled_ids: [N] the realised tokens;
    token_loss(stats, aux) -> [C], elementwise over tokens (see the module doc), a pure function: close
    over Python numbers only and pass arrays through `aux` (a pytree of [N, ...] arrays, no gradient).
    alpha / mode / top_k / add_tail / w_teacher as in `fused_token_stats`. token_chunk, vocab_tile: block
    sizes (default `default_loss_blocks(w_unembed.dtype)`: 160 x 1024, 384 x 1024 for a 16-bit W); memory
    grows as 2 x chunk x V f32 plus an f32 [D, V] accumulator (the gradient itself when W is f32).
    Returns the scalar loss (differentiable w.r.t. h_student and w_unembed) and the TokenStats (constants,
    zero where mask = 0).
    """
    default_chunk, default_tile = default_loss_blocks(w_unembed.dtype)
    token_chunk, vocab_tile = token_chunk or default_chunk, vocab_tile or default_tile
    if h_teacher is None:
        kernel_plan.check_inputs(h_student, None, w_unembed, mask, sampled_ids, alpha=1.0, mode="full", top_k=None)
        st = kernel_plan.settings(1.0, kernel_plan.NO_TEACHER, None, False, token_chunk, vocab_tile, "xla")
    else:
        kernel_plan.check_inputs(h_student, h_teacher, w_unembed, mask, sampled_ids, alpha=alpha, mode=mode,
                                 top_k=top_k, w_teacher=w_teacher)
        st = kernel_plan.settings(alpha, mode, top_k, add_tail, token_chunk, vocab_tile, "xla")
        h_teacher = jax.lax.stop_gradient(h_teacher)
    w_teacher = None if w_teacher is None else jax.lax.stop_gradient(w_teacher)
    aux = jax.tree.map(jax.lax.stop_gradient, aux)
    num = h_student.shape[0]
    for leaf in jax.tree.leaves(aux):
        if leaf.ndim < 1 or leaf.shape[0] != num:
            raise ValueError(f"fused_token_loss: every aux array must be [N={num}, ...], got shape {leaf.shape}")
    loss, stats = _token_loss(h_student, h_teacher, w_unembed, w_teacher, jnp.asarray(mask, jnp.float32),
                              jnp.asarray(sampled_ids, jnp.int32), aux, st, token_loss)
    return loss, jax.tree.map(jax.lax.stop_gradient, stats)
