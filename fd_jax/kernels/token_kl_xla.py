"""The XLA engine of the fused divergence: `lax.scan` loops over token chunks and vocabulary tiles.

Forward: token chunks outside (`lax.map`), vocabulary tiles inside (online log-sum-exp), so per-token state
stays small. Backward: vocabulary tiles outside, token chunks inside, so `dW` is accumulated in f32 one
`[D, T]` tile at a time (a full f32 `[D, V]` accumulator would cost as much memory as the logits we avoid
when the weights are bf16) while `d_h` is a small `[N, D]` f32 carry. Nothing of shape `[N, V]` is built.

A ragged last vocabulary tile is read at the clamped position `V - T` and its columns below `j * T` (already
seen) are masked, so `W` is never padded or copied.

Masked tokens have zero statistics and cotangents, so the caller (`token_kl.fused_forward`) moves the
counted tokens to the front (`compaction`) and both loops visit only the chunks that hold any
(`live_chunks`): right-padding costs no matmuls.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from jax import lax

from fd_jax.kernels import tiles
from fd_jax.kernels.tiles import KernelPlan

Array = jax.Array

# (token_chunk, vocab_tile): on a 2-core CPU every setting from 256x512 to 1024x1024 ran within noise of
# each other (benchmarks/token_kl.py); 512x1024 keeps the [C, T] f32 temporaries at 2 MiB.
DEFAULT_BLOCKS = (512, 1024)


def default_blocks() -> tuple[int, int]:
    return DEFAULT_BLOCKS


def blocks(num: int, block: int) -> tuple[int, int]:
    """(block size, number of blocks) with the block no larger than `num`."""
    block = max(1, min(block, num))
    return block, -(-num // block)


def _to_bits(x: Array) -> Array:
    """16-bit floats viewed as uint16 (free). XLA:CPU computes bf16 slices by converting the whole operand
    to f32 first, and then hoists that conversion out of the loop: a full f32 copy of W. Slicing the
    integer view keeps every conversion tile-sized."""
    return lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def _from_bits(x: Array, dtype) -> Array:
    return lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 and dtype != jnp.uint16 else x


def _slice_columns(x_DV: Array, start, tile: int, dtype, widen: bool = True) -> Array:
    """x[:, start:start + tile] in f32 (widen=False: in `dtype`), where x_DV may be the `_to_bits` view of an
    array of `dtype`."""
    x_DT = _from_bits(lax.dynamic_slice_in_dim(x_DV, start, tile, axis=1), dtype)
    return x_DT.astype(jnp.float32) if widen else x_DT


def columns(w_DV: Array, cols: Array) -> Array:
    """W's columns at the vocabulary ids `cols` ([...] int), in f32: [D, ...] (gathered from the bits of a
    16-bit W: see `_to_bits`)."""
    return _from_bits(jnp.take(_to_bits(w_DV), cols, axis=1), w_DV.dtype).astype(jnp.float32)


class Unembedding:
    """The student's W and the teacher's (the same array unless the teacher has its own), read by tiles."""

    def __init__(self, w_DV: Array, wt_DV: Array | None, tile: int):
        self.vocab, self.tile = w_DV.shape[1], tile
        self.dtypes = (w_DV.dtype, w_DV.dtype if wt_DV is None else wt_DV.dtype)
        self.bits = (_to_bits(w_DV), None if wt_DV is None else _to_bits(wt_DV))

    def position(self, j):
        """(first column, valid-column mask or None) of tile j; a ragged last tile is read at V - T."""
        if self.vocab % self.tile == 0:
            return j * self.tile, None
        start = jnp.minimum(j * self.tile, self.vocab - self.tile)
        return start, tiles.valid_columns(start, j * self.tile, self.tile, self.vocab)

    def student(self, start, widen: bool = True) -> Array:
        """The student's tile in f32; widen=False: in W's own dtype (for a logit matmul whose other operand
        has that dtype too: a bf16 x bf16 product with f32 accumulation is exact in f32, and the CPU's bf16
        dot instructions then run it without an f32 copy of the tile)."""
        return _slice_columns(self.bits[0], start, self.tile, self.dtypes[0], widen)

    def teacher(self, start, w_DT: Array, widen: bool = True) -> Array:
        """The teacher's tile; `w_DT` (the student's, already read) when W is shared."""
        if self.bits[1] is None:
            return w_DT
        return _slice_columns(self.bits[1], start, self.tile, self.dtypes[1], widen)


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def compaction(mask_N: Array, chunk: int) -> tuple[Array, Array, Array]:
    """(order, restore, live chunks): a stable permutation that puts the counted tokens (mask > 0) first,
    its inverse (x[order][restore] == x), and the number of token chunks that then hold any. Masked tokens
    get zero statistics and gradients, so the chunks after the live ones need not be computed: the loss
    mask of a right-padded batch (and the 10% of the benchmark) costs nothing."""
    counted = mask_N > 0
    order = jnp.argsort(~counted, stable=True)
    restore = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return order, restore, (jnp.sum(counted, dtype=jnp.int32) + chunk - 1) // chunk


def chunked(x: Array | None, chunk: int, num_chunks: int) -> Array | None:
    """[N, ...] -> [num_chunks, chunk, ...], zero-padded."""
    if x is None:
        return None
    pad = num_chunks * chunk - x.shape[0]
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(num_chunks, chunk, *x.shape[1:])


def forward(hs_ND: Array, ht_ND: Array | None, w_DV: Array, wt_DV: Array | None,
            plan: KernelPlan, live_chunks: Array | None = None) -> dict[str, Array]:
    """Per-token statistics: lse_s, entropy, and with a teacher lse_t, the cross sums of `plan.sums`,
    `top_s/top_t/top_i` [N, k] when `plan.top_k`, `kl_pm/kl_qm` when `plan.pass2`. All f32.
    wt_DV: the teacher's own unembedding, or None when it shares W. live_chunks: compute only the first
    this many token chunks (see `compaction`); the others get zeros (top-k logits `tiles.NEG`): finite
    placeholders for masked tokens."""
    num_tokens = hs_ND.shape[0]
    chunk, num_chunks = blocks(num_tokens, plan.token_chunk)
    tile, num_tiles = blocks(w_DV.shape[1], plan.vocab_tile)
    unembed = Unembedding(w_DV, wt_DV, tile)

    def logits(start, hs_CD, ht_CD):
        w_DT = unembed.student(start)
        t_CT = None if ht_CD is None else _dot(ht_CD, unembed.teacher(start, w_DT))
        return _dot(hs_CD, w_DT), t_CT

    def one_chunk(args):
        hs_CD, ht_CD = args

        def pass1(carry, j):
            state, top = carry
            start, valid_T = unembed.position(j)
            s_CT, t_CT = logits(start, hs_CD, ht_CD)
            state = tiles.online_update(state, s_CT, t_CT, valid_T)
            if top is not None:
                cols_T = start + jnp.arange(tile, dtype=jnp.int32)
                top = tiles.topk_update(top, s_CT, t_CT, cols_T, valid_T)
            return (state, top), None

        init = (tiles.online_init(chunk, plan.has_teacher, plan.sums),
                None if plan.top_k is None else tiles.topk_init(chunk, plan.top_k))
        (state, top), _ = lax.scan(pass1, init, jnp.arange(num_tiles))
        out = {**tiles.online_finish(state), **(top or {})}
        if plan.pass2 is not None:

            def pass2(sums, j):
                start, valid_T = unembed.position(j)
                s_CT, t_CT = logits(start, hs_CD, ht_CD)
                sums = tiles.pass2_update(sums, s_CT, t_CT, out["lse_s"], out["lse_t"], valid_T, plan.pass2)
                return sums, None

            zeros = jnp.zeros((chunk,), jnp.float32)
            (out["kl_pm"], out["kl_qm"]), _ = lax.scan(pass2, (zeros, zeros), jnp.arange(num_tiles))
        return out

    chunks = (chunked(hs_ND, chunk, num_chunks), chunked(ht_ND, chunk, num_chunks))
    if live_chunks is None:
        out = lax.map(one_chunk, chunks)
    else:
        shapes = jax.eval_shape(one_chunk, jax.tree.map(lambda x: x[0], chunks))
        out = {k: jnp.full((num_chunks, *v.shape), tiles.NEG if k == "top_s" else 0, v.dtype)
               for k, v in shapes.items()}

        def live_chunk(c, out):
            out_c = one_chunk(jax.tree.map(lambda x: x[c], chunks))
            return {k: out[k].at[c].set(out_c[k]) for k in out}

        out = lax.fori_loop(0, live_chunks, live_chunk, out)
    return {k: v.reshape(num_chunks * chunk, *v.shape[2:])[:num_tokens] for k, v in out.items()}


def add_sparse(g_CT, cols_CK, coef_CK, start, col0, valid_T):
    """Add the per-token sparse gradient entries (coef at vocabulary column col) that fall in this tile."""
    if cols_CK.shape[1] == 1:
        return tiles.add_column(g_CT, cols_CK[:, 0], coef_CK[:, 0], start, valid_T)
    tile = g_CT.shape[1]
    local_CK = cols_CK - start
    inside_CK = (cols_CK >= col0) & (local_CK < tile)
    rows_C1 = jnp.arange(g_CT.shape[0])[:, None]
    return g_CT.at[rows_C1, jnp.where(inside_CK, local_CK, tile)].add(coef_CK, mode="drop")


def backward(hs_ND: Array, ht_ND: Array | None, w_DV: Array, wt_DV: Array | None, tok: Mapping[str, Array],
             cols_NK: Array, coef_NK: Array, plan: KernelPlan,
             live_chunks: Array | None = None) -> tuple[Array, Array]:
    """(d_h [N, D] f32, dW [D, V] in W's dtype) for d loss / d s = `tiles.logit_grad` + sparse entries.

    tok: per-token [N] f32 arrays read by `tiles.logit_grad`; cols_NK / coef_NK: K sparse gradient entries
    per token (the realised token, the top-k support), added to the logit gradient of their tile.
    live_chunks: only the first this many token chunks have nonzero cotangents (see `compaction`); the
    others are skipped and get d_h = 0.
    """
    num_tokens, dim = hs_ND.shape
    chunk, num_chunks = blocks(num_tokens, plan.token_chunk)
    tile, num_tiles = blocks(w_DV.shape[1], plan.vocab_tile)
    hs_cCD = chunked(hs_ND, chunk, num_chunks)
    ht_cCD = chunked(ht_ND, chunk, num_chunks) if plan.grad_div is not None else None
    tok_c = {k: chunked(v, chunk, num_chunks) for k, v in tok.items()}
    cols_cCK, coef_cCK = chunked(cols_NK, chunk, num_chunks), chunked(coef_NK, chunk, num_chunks)

    unembed = Unembedding(w_DV, wt_DV, tile)

    def one_tile(carry, j):
        dh_cCD, dw_bits_DV = carry
        start, valid_T = unembed.position(j)
        w_DT = unembed.student(start)
        wt_DT = None if ht_cCD is None else unembed.teacher(start, w_DT)

        def one_chunk(carry, c):
            dh_cCD, dw_DT = carry
            hs_CD = hs_cCD[c]
            s_CT = _dot(hs_CD, w_DT)
            t_CT = None if ht_cCD is None else _dot(ht_cCD[c], wt_DT)
            g_CT = tiles.logit_grad(s_CT, t_CT, {k: v[c] for k, v in tok_c.items()}, plan.grad_div, valid_T)
            # Materialised once (XLA:CPU would otherwise fuse the chain into both matmuls and compute it twice).
            g_CT = lax.optimization_barrier(add_sparse(g_CT, cols_cCK[c], coef_cCK[c], start, j * tile, valid_T))
            dh_cCD = dh_cCD.at[c].add(_dot(g_CT, w_DT.T))
            return (dh_cCD, dw_DT + _dot(hs_CD.T.astype(jnp.float32), g_CT)), None

        # Starting from the stored tile keeps the columns a clamped ragged tile shares with its neighbour.
        dw_DT = _slice_columns(dw_bits_DV, start, tile, w_DV.dtype)
        if live_chunks is None:
            (dh_cCD, dw_DT), _ = lax.scan(one_chunk, (dh_cCD, dw_DT), jnp.arange(num_chunks))
        else:
            dh_cCD, dw_DT = lax.fori_loop(0, live_chunks, lambda c, carry: one_chunk(carry, c)[0], (dh_cCD, dw_DT))
        dw_bits_DT = _to_bits(dw_DT.astype(w_DV.dtype))
        return (dh_cCD, lax.dynamic_update_slice_in_dim(dw_bits_DV, dw_bits_DT, start, axis=1)), None

    init = (jnp.zeros((num_chunks, chunk, dim), jnp.float32), _to_bits(jnp.zeros_like(w_DV)))
    (dh_cCD, dw_bits_DV), _ = lax.scan(one_tile, init, jnp.arange(num_tiles))
    return dh_cCD.reshape(num_chunks * chunk, dim)[:num_tokens], _from_bits(dw_bits_DV, w_DV.dtype)
