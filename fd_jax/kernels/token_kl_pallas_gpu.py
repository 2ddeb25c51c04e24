"""The Pallas engine's GPU kernels (Triton), selected by `token_kl_pallas` on GPU.

Same contract as `token_kl_pallas.forward/backward` and the same per-tile math (`tiles.py`). Triton runs a
grid's programs concurrently, so a reduction cannot be a grid axis that revisits an output block (the TPU
kernels' pattern): here every program owns its output rows or columns and loops over the reduction inside.

* `_stats_kernel`  one program per (token block, split), a loop over the split's vocabulary tiles: the
                   online statistics of those tiles;
* `_pass2_kernel`  the same loop: the JSD's second-pass sums KL(p||M), KL(q||M);
* `_dh_kernel`     the same programs: per vocabulary tile the logits and g again, d_h += g Wᵀ;
* `_dw_kernel`     one program per vocabulary tile: per token block the logits and g again, dW += hᵀ g.

Token blocks alone would be too few programs to fill a GPU (8192 tokens are 128 blocks of 64, for 132 SMs
on an H100), so the vocabulary of the token-block kernels is split over several programs (`_Grid.splits`,
about `_PROGRAMS` programs in all) whose partial results are merged by XLA: the online statistics by
`tiles.online_merge`, the sums and d_h (an f32 [splits, N, D] partial) by addition. As in the TPU kernels
the backward recomputes each tile's logits twice (once per gradient kernel).

Triton tensors have power-of-two dimensions and its matmuls want every side >= 16, so token blocks and
vocabulary tiles are powers of two >= 16 and every product loops over D in slices of `dim_block` (64, 32
or 16, whichever divides D first: D must be a multiple of 16). Operands stay in GPU memory (`pl.ANY`) and
are read and written by explicit slices; the last vocabulary tile is masked where it runs past V. d_h and
dW are accumulated in their f32 outputs by read-add-write of the program's own slices. f32 inputs are
multiplied at full f32 precision (Triton would otherwise use TF32); bf16 inputs use the tensor cores with
f32 accumulation, the gradient tile rounded to bf16 before its matmuls as in the TPU kernels.

Untimed: no GPU was at hand when this was written. `tests/kernels/test_token_kl.py` runs these kernels through the
Pallas interpreter against the reference and lowers them to Triton (`token_kl_pallas.build_for`);
`benchmarks/token_kl.py` times them against the XLA engine on a GPU, and until it has, `backend="auto"`
keeps XLA there. Where time will likely go: both gradient kernels read and write their f32 accumulators
in GPU memory, the dW kernel its [D, T] tile once per token block (8 N D V / token_chunk bytes in all),
the d_h kernel its [C, D] rows once per vocabulary tile (8 N D V / vocab_tile bytes): at 64 x 64 blocks
about 48 FLOP per byte, under what an H100 needs to stay compute-bound, so larger blocks in those two
kernels are the first thing to try. The d_h partials take splits x N x D x 4 bytes (about
`_PROGRAMS` x token_chunk x D x 4 while token blocks are fewer than `_PROGRAMS`: 0.5 GiB at D = 4096).
Lowered for CUDA only; on ROCm (also `jax.default_backend() == "gpu"`) these kernels are untried.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from fd_jax.kernels import tiles
from fd_jax.kernels.tiles import KernelPlan

Array = jax.Array

# (token block, vocabulary tile): the [64, 64] f32 student and teacher logit tiles take 32 registers per
# thread each at 4 warps. Untimed (see the module docstring).
DEFAULT_BLOCKS = (64, 64)
_COMPILER_PARAMS = dict(num_warps=4, num_stages=2)
_PROGRAMS = 512  # programs wanted per token-block kernel: about 4 per SM of an H100 / H200 (132 SMs)


def _power_of_two_block(name: str, block: int, size: int) -> int:
    """The block actually used: `block` (a power of two), shrunk to cover `size`, at least 16."""
    if block < 1 or block & (block - 1):
        raise ValueError(f"token_kl: the Pallas GPU kernels need {name} to be a power of two, got {block}")
    return max(16, min(block, pl.next_power_of_2(size)))


def dim_block(dim: int) -> int:
    """The slice of D each matmul step reads (ValueError unless D is a multiple of 16)."""
    for block in (64, 32, 16):
        if dim % block == 0:
            return block
    raise ValueError(f"token_kl: the Pallas GPU kernels need the hidden size D to be a multiple of 16, got "
                     f"D={dim}; use backend='xla'")


class _Grid:
    """Block sizes and padded shapes of one call."""

    def __init__(self, hs_ND: Array, w_DV: Array, plan: KernelPlan):
        self.num_tokens, self.dim = hs_ND.shape
        self.vocab = w_DV.shape[1]
        self.bn = _power_of_two_block("token_chunk", plan.token_chunk, self.num_tokens)
        self.bt = _power_of_two_block("vocab_tile", plan.vocab_tile, self.vocab)
        self.bk = dim_block(self.dim)
        self.n_blocks = pl.cdiv(self.num_tokens, self.bn)
        self.n_tiles = pl.cdiv(self.vocab, self.bt)
        self.rows = self.n_blocks * self.bn
        # The vocabulary loop of a token block split into `splits` runs of `tiles_per_split` tiles (the
        # last may be shorter, none is empty).
        self.tiles_per_split = pl.cdiv(self.n_tiles, min(self.n_tiles, pl.cdiv(_PROGRAMS, self.n_blocks)))
        self.splits = pl.cdiv(self.n_tiles, self.tiles_per_split)

    def split_tiles(self) -> tuple[Array, Array]:
        """[first, end) of the vocabulary tiles of this program's split (grid axis 1)."""
        first = pl.program_id(1) * self.tiles_per_split
        return first, jnp.minimum(first + self.tiles_per_split, self.n_tiles)


def _call(kernel, grid: tuple[int, ...], operands: dict, out_shapes: dict, interpret: bool, **static) -> dict:
    """pallas_call with every operand and output in GPU memory, passed by name: the kernel gets two dicts
    of refs (inputs without the absent optional ones, outputs)."""
    in_names, out_names = tuple(operands), tuple(out_shapes)

    def body(*refs):
        kernel(dict(zip(in_names, refs[:len(in_names)])), dict(zip(out_names, refs[len(in_names):])), **static)

    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    outs = pl.pallas_call(
        body, out_shape=list(out_shapes.values()), grid=grid, in_specs=[any_spec] * len(in_names),
        out_specs=[any_spec] * len(out_names), compiler_params=plt.CompilerParams(**_COMPILER_PARAMS),
        interpret=interpret)(*operands.values())
    return dict(zip(out_names, outs))


def _dot(a: Array, b: Array, contract=((1,), (0,))) -> Array:
    """a·b with f32 accumulation: bf16 on the tensor cores, f32 at full precision (no TF32)."""
    dtype = jnp.promote_types(a.dtype, b.dtype)
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return lax.dot_general(a.astype(dtype), b.astype(dtype), (contract, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _columns(g: _Grid, c0):
    """(slice of the vocabulary tile at column c0, its valid-column mask or None when V divides)."""
    valid_T = None if g.vocab % g.bt == 0 else (c0 + jnp.arange(g.bt, dtype=jnp.int32)) < g.vocab
    return pl.ds(c0, g.bt), valid_T


def _load(ref, rows, cols, valid_T):
    """ref[rows, cols], zero in the columns past V."""
    if valid_T is None:
        return ref[rows, cols]
    return plt.load(ref.at[rows, cols], mask=valid_T[None, :], other=0)


def _store(ref, rows, cols, valid_T, value):
    if valid_T is None:
        ref[rows, cols] = value
    else:
        plt.store(ref.at[rows, cols], value, mask=valid_T[None, :])


def _logits(refs, g: _Grid, r0, c0, teacher: bool):
    """(s_CT, t_CT or None, valid mask) of the token block at row r0 and the vocabulary tile at column c0."""
    rows, (cols, valid_T) = pl.ds(r0, g.bn), _columns(g, c0)
    teacher = teacher and "ht" in refs

    def step(k, acc):
        s_CT, t_CT = acc
        dims = pl.ds(k * g.bk, g.bk)
        w_KT = _load(refs["w"], dims, cols, valid_T)
        s_CT = s_CT + _dot(refs["hs"][rows, dims], w_KT)
        if teacher:
            wt_KT = _load(refs["wt"], dims, cols, valid_T) if "wt" in refs else w_KT
            t_CT = t_CT + _dot(refs["ht"][rows, dims], wt_KT)
        return s_CT, t_CT

    zeros = jnp.zeros((g.bn, g.bt), jnp.float32)
    s_CT, t_CT = lax.fori_loop(0, g.dim // g.bk, step, (zeros, zeros if teacher else None))
    return s_CT, t_CT, valid_T


# --------------------------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------------------------


def _stats_kernel(refs, outs, *, g: _Grid, sums):
    r0 = pl.program_id(0) * g.bn

    def tile(j, state):
        s_CT, t_CT, valid_T = _logits(refs, g, r0, j * g.bt, teacher=True)
        return tiles.online_update(state, s_CT, t_CT, valid_T)

    state = lax.fori_loop(*g.split_tiles(), tile, tiles.online_init(g.bn, "ht" in refs, sums))
    for name, ref in outs.items():
        ref[pl.program_id(1), pl.ds(r0, g.bn)] = state[name]


def _pass2_kernel(refs, outs, *, g: _Grid, div):
    rows = pl.ds(pl.program_id(0) * g.bn, g.bn)
    lse_s, lse_t = refs["lse_s"][rows], refs["lse_t"][rows]

    def tile(j, sums):
        s_CT, t_CT, valid_T = _logits(refs, g, rows.start, j * g.bt, teacher=True)
        return tiles.pass2_update(sums, s_CT, t_CT, lse_s, lse_t, valid_T, div)

    zeros = jnp.zeros((g.bn,), jnp.float32)
    kl_pm, kl_qm = lax.fori_loop(*g.split_tiles(), tile, (zeros, zeros))
    outs["kl_pm"][pl.program_id(1), rows], outs["kl_qm"][pl.program_id(1), rows] = kl_pm, kl_qm


def _pad_rows(x: Array, rows: int) -> Array:
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _operands(g: _Grid, hs_ND, ht_ND, w_DV, wt_DV, **per_token) -> dict:
    ops = {"hs": _pad_rows(hs_ND, g.rows), "w": w_DV}
    if ht_ND is not None:
        ops["ht"] = _pad_rows(ht_ND, g.rows)
        if wt_DV is not None:
            ops["wt"] = wt_DV
    return {**ops, **{k: _pad_rows(v, g.rows) for k, v in per_token.items()}}


def _partials(g: _Grid, names) -> dict:
    """Per-split [splits, rows] f32 outputs."""
    return {name: jax.ShapeDtypeStruct((g.splits, g.rows), jnp.float32) for name in names}


def forward(hs_ND: Array, ht_ND: Array | None, w_DV: Array, wt_DV: Array | None, plan: KernelPlan, *,
            interpret: bool) -> dict[str, Array]:
    """Per-token statistics as in `token_kl_xla.forward` (no top-k)."""
    g = _Grid(hs_ND, w_DV, plan)
    names = tuple(tiles.online_init(1, ht_ND is not None, plan.sums))  # the online state's entries
    grid = (g.n_blocks, g.splits)
    parts = _call(_stats_kernel, grid, _operands(g, hs_ND, ht_ND, w_DV, wt_DV), _partials(g, names), interpret,
                  g=g, sums=plan.sums)
    out = tiles.online_finish(tiles.online_merge({k: v[:, : g.num_tokens] for k, v in parts.items()}))
    if plan.pass2 is not None:
        operands = _operands(g, hs_ND, ht_ND, w_DV, wt_DV, lse_s=out["lse_s"], lse_t=out["lse_t"])
        sums = _call(_pass2_kernel, grid, operands, _partials(g, ("kl_pm", "kl_qm")), interpret, g=g,
                     div=plan.pass2)
        out.update({k: jnp.sum(v[:, : g.num_tokens], axis=0) for k, v in sums.items()})
    return out


# --------------------------------------------------------------------------------------------------------
# Backward.
# --------------------------------------------------------------------------------------------------------


def _tile_grad(refs, g: _Grid, r0, c0, names, div):
    """(g_CT rounded to W's dtype, valid mask) for one (token block, vocabulary tile)."""
    s_CT, t_CT, valid_T = _logits(refs, g, r0, c0, teacher=div is not None)
    rows = pl.ds(r0, g.bn)
    tok = {name: refs[name][rows] for name in names}
    g_CT = tiles.logit_grad(s_CT, t_CT, tok, div, valid_T)
    g_CT = tiles.add_column(g_CT, refs["col"][rows], tok["coef_id"], c0, valid_T)
    return g_CT.astype(refs["w"].dtype), valid_T


def _dh_kernel(refs, outs, *, g: _Grid, names, div):
    part, rows, dh = pl.program_id(1), pl.ds(pl.program_id(0) * g.bn, g.bn), outs["dh"]  # this split's partial

    def zero(k, _):
        dh[part, rows, pl.ds(k * g.bk, g.bk)] = jnp.zeros((g.bn, g.bk), jnp.float32)

    lax.fori_loop(0, g.dim // g.bk, zero, None)

    def tile(j, _):
        g_CT, valid_T = _tile_grad(refs, g, rows.start, j * g.bt, names, div)
        cols = pl.ds(j * g.bt, g.bt)

        def step(k, _):
            dims = pl.ds(k * g.bk, g.bk)
            w_KT = _load(refs["w"], dims, cols, valid_T)
            dh[part, rows, dims] += _dot(g_CT, w_KT, contract=((1,), (1,)))

        lax.fori_loop(0, g.dim // g.bk, step, None)

    lax.fori_loop(*g.split_tiles(), tile, None)


def _dw_kernel(refs, outs, *, g: _Grid, names, div):
    c0, dw = pl.program_id(0) * g.bt, outs["dw"]
    cols, valid_T = _columns(g, c0)

    def zero(k, _):
        _store(dw, pl.ds(k * g.bk, g.bk), cols, valid_T, jnp.zeros((g.bk, g.bt), jnp.float32))

    lax.fori_loop(0, g.dim // g.bk, zero, None)

    def block(b, _):
        rows = pl.ds(b * g.bn, g.bn)
        g_CT, _ = _tile_grad(refs, g, rows.start, c0, names, div)

        def step(k, _):
            dims = pl.ds(k * g.bk, g.bk)
            update = _dot(refs["hs"][rows, dims], g_CT, contract=((0,), (0,)))
            _store(dw, dims, cols, valid_T, _load(dw, dims, cols, valid_T) + update)

        lax.fori_loop(0, g.dim // g.bk, step, None)

    lax.fori_loop(0, g.n_blocks, block, None)


def backward(hs_ND: Array, ht_ND: Array | None, w_DV: Array, wt_DV: Array | None, tok: dict[str, Array],
             cols_NK: Array, coef_NK: Array, plan: KernelPlan, *, interpret: bool) -> tuple[Array, Array]:
    """(d_h [N, D] f32, dW [D, V] in W's dtype), as `token_kl_xla.backward`; one sparse column per token."""
    g = _Grid(hs_ND, w_DV, plan)
    per_token = {**{k: jnp.asarray(v, jnp.float32) for k, v in tok.items()},
                 "coef_id": coef_NK[:, 0].astype(jnp.float32), "col": cols_NK[:, 0].astype(jnp.int32)}
    names = (*tok, "coef_id")
    teacher = ht_ND if plan.grad_div is not None else None
    operands = _operands(g, hs_ND, teacher, w_DV, wt_DV, **per_token)
    kernel = functools.partial(_call, operands=operands, interpret=interpret, g=g, names=names, div=plan.grad_div)
    dh = kernel(_dh_kernel, (g.n_blocks, g.splits),
                out_shapes={"dh": jax.ShapeDtypeStruct((g.splits, g.rows, g.dim), jnp.float32)})
    dw = kernel(_dw_kernel, (g.n_tiles,), out_shapes={"dw": jax.ShapeDtypeStruct((g.dim, g.vocab), jnp.float32)})
    return jnp.sum(dh["dh"][:, : g.num_tokens], axis=0), dw["dw"].astype(w_DV.dtype)
