"""The Pallas engine of the fused divergence (supports `full` and `sampled_token`): TPU kernels here, GPU
kernels in `token_kl_pallas_gpu`.

Same contract as `token_kl_xla` (`forward`, `backward`) and the same per-tile math (`tiles.py`); only the
iteration is a `pl.pallas_call` grid. Each kernel has a parallel axis and a reduction axis, the reduction
axis last and sequential ("arbitrary"), accumulating into an output block that stays resident while only
the reduction index moves (the Pallas TPU accumulator pattern):

* `_stats_kernel`   grid (token blocks, vocab tiles): the online pass-one statistics per token;
* `_pass2_kernel`   grid (token blocks, vocab tiles): the JSD's sums KL(p||M), KL(q||M);
* `_dh_kernel`      grid (token blocks, vocab tiles): d_h += g Wᵀ;
* `_dw_kernel`      grid (vocab tiles, token blocks): dW += hᵀ g.
The backward recomputes each tile's logits twice (once per gradient kernel), as flash-attention backward
kernels do, instead of sharing d_h partial sums across vocabulary tiles.

Tokens are zero-padded to whole blocks; the last vocabulary tile may run past V (its out-of-bounds
columns are masked, and W's are zeroed before they meet a matmul).

On GPU, Pallas runs a grid's programs concurrently (Triton), so a sequential reduction axis with a revisited
output block would race: there `forward` and `backward` hand over to `token_kl_pallas_gpu`, whose programs
own their outputs and loop over the reduction inside. On CPU the TPU kernels run with `interpret=True`
(tests); `build_for` picks the other family or lowers for a chip that is not there.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fd_jax.kernels import tiles, token_kl_pallas_gpu
from fd_jax.kernels.tiles import KernelPlan

Array = jax.Array

# (token_chunk, vocab_tile): a [256, D] hidden block and a [D, 512] W tile, double-buffered, fit the
# scoped VMEM of current TPUs for D up to ~4096 in bf16; multiples of 128 as Mosaic wants. Untimed.
DEFAULT_BLOCKS = (256, 512)
_STATE = ("m_s", "z_s", "c_s", "m_t", "z_t", "rev", "fwd")  # columns of the pass-one state array


_TARGET: tuple[str, bool] | None = None  # (kernel family, interpret) set by `build_for`


@contextlib.contextmanager
def build_for(platform: str, *, interpret: bool | None = None):
    """Build the kernels of `platform` ("tpu" or "gpu") inside this block, whatever the default backend.

    interpret: run them through the Pallas interpreter (default: unless the default backend is that
    platform). With interpret=False on a machine without the chip only lowering works, and it is the
    point: `jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",))` (or `("cuda",)`) runs Mosaic's (or
    Triton's) lowering with its block-shape and operation checks on a CPU. Applies to what is traced inside
    the block: JAX reuses an earlier trace of the same Python function at the same shapes (by any
    `jax.jit` of it), and that keeps the kernels it was traced with; use a fresh function or
    `jax.clear_caches()`. A backward is traced when it is first called: call it inside the block too.
    """
    global _TARGET
    if platform not in ("tpu", "gpu"):
        raise ValueError(f"token_kl_pallas.build_for: platform must be 'tpu' or 'gpu', got {platform!r}")
    previous = _TARGET
    _TARGET = (platform, jax.default_backend() != platform if interpret is None else bool(interpret))
    try:
        yield
    finally:
        _TARGET = previous


def _target() -> tuple[str, bool]:
    """(kernel family "tpu" or "gpu", interpret): from `build_for`, else the default backend (the TPU
    kernels, interpreted, off TPU and GPU)."""
    if _TARGET is not None:
        return _TARGET
    backend = jax.default_backend()
    return ("gpu", False) if backend == "gpu" else ("tpu", backend != "tpu")


def default_blocks() -> tuple[int, int]:
    """(token_chunk, vocab_tile) of the kernel family in use."""
    return token_kl_pallas_gpu.DEFAULT_BLOCKS if _target()[0] == "gpu" else DEFAULT_BLOCKS


def _interpret() -> bool:
    return _target()[1]


def _vmem(shape):
    """An f32 scratch buffer in TPU VMEM (the interpreter allocates it too)."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.VMEM(shape, jnp.float32)


def _params():
    if _interpret():
        return None
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _pad_rows(x: Array, rows: int) -> Array:
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _tile_view(w_ref, vocab: int, tile: int, j):
    """W's tile j (its own dtype) with out-of-vocabulary columns zeroed, its first column, the valid mask."""
    w_DT = w_ref[...]
    start = j * tile
    if vocab % tile == 0:
        return w_DT, start, None
    valid_T = tiles.valid_columns(start, start, tile, vocab)
    return jnp.where(valid_T[None, :], w_DT, jnp.zeros((), w_DT.dtype)), start, valid_T


def _dot(a, b):
    """Matmul in the operands' dtype with f32 accumulation: the MXU's native bf16 path for bf16 inputs
    (gradient tiles are rounded to bf16 before their matmuls, as flash-attention backward kernels do)."""
    dtype = jnp.promote_types(a.dtype, b.dtype)
    return jnp.dot(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


class _Grid:
    """Block sizes and padded shapes of one call."""

    def __init__(self, hs_ND: Array, w_DV: Array, plan: KernelPlan):
        self.num_tokens, self.dim = hs_ND.shape
        self.vocab = w_DV.shape[1]
        self.bn = min(plan.token_chunk, self.num_tokens)
        self.bt = min(plan.vocab_tile, self.vocab)
        self.n_blocks = pl.cdiv(self.num_tokens, self.bn)
        self.n_tiles = pl.cdiv(self.vocab, self.bt)
        self.rows = self.n_blocks * self.bn
        if not _interpret():  # Mosaic's block rule: rows by 8, columns by 128, or the whole dimension
            for name, block, size, unit in (("token_chunk", self.bn, self.num_tokens, 8),
                                            ("vocab_tile", self.bt, self.vocab, 128)):
                if block % unit and block != size:
                    raise ValueError(f"token_kl: on TPU the Pallas engine needs {name} to be a multiple of "
                                     f"{unit} (or at least the whole dimension, {size}), got {block}")

    def rows_spec(self, width: int, token_axis: int = 0):
        """Blocks of `bn` rows (all columns) of a [rows, width] array; `token_axis` is the grid axis."""
        return pl.BlockSpec((self.bn, width), lambda *ij: (ij[token_axis], 0))

    def w_spec(self, vocab_axis: int = 1):
        return pl.BlockSpec((self.dim, self.bt), lambda *ij: (0, ij[vocab_axis]))


# --------------------------------------------------------------------------------------------------------
# Calls: operands are passed by name; a kernel gets its refs back as a dict (optional operands are absent).
# --------------------------------------------------------------------------------------------------------


def _call(kernel, g: _Grid, operands: dict, *, out_shape, out_spec, vocab_major: bool = False, scratch_shapes=(),
          **static):
    """pallas_call over (token blocks, vocab tiles), or (vocab tiles, token blocks) when `vocab_major`.

    operands: name -> array, blocked by rows of tokens (`hs`, `ht`, per-token arrays) or, for `w` and `wt`,
    by vocabulary tiles. The second grid axis is the reduction one.
    """
    token_axis, vocab_axis = (1, 0) if vocab_major else (0, 1)
    names = tuple(operands)
    specs = [g.w_spec(vocab_axis) if name in ("w", "wt") else g.rows_spec(x.shape[1], token_axis)
             for name, x in operands.items()]

    def body(*refs):
        inputs, outputs = refs[:len(names)], refs[len(names):]
        kernel(dict(zip(names, inputs)), *outputs, **static)  # the output ref, then any scratch refs

    grid = (g.n_tiles, g.n_blocks) if vocab_major else (g.n_blocks, g.n_tiles)
    return pl.pallas_call(body, out_shape=out_shape, grid=grid, in_specs=specs, out_specs=out_spec,
                          scratch_shapes=scratch_shapes, compiler_params=_params(),
                          interpret=_interpret())(*operands.values())


def _logits(refs, *, vocab: int, tile: int, j, teacher: bool = True):
    """(s_CT, t_CT or None, the student's W tile, first column, valid mask) of tile j."""
    w_DT, start, valid_T = _tile_view(refs["w"], vocab, tile, j)
    t_CT = None
    if teacher and "ht" in refs:
        wt_DT = _tile_view(refs["wt"], vocab, tile, j)[0] if "wt" in refs else w_DT
        t_CT = _dot(refs["ht"][...], wt_DT)
    return _dot(refs["hs"][...], w_DT), t_CT, w_DT, start, valid_T


def _init_on_first(out_ref, axis: int, value):
    @pl.when(pl.program_id(axis) == 0)
    def _init():
        out_ref[...] = value


def _pack(values: dict, names, width: int) -> Array:
    cols = [values[k] for k in names]
    cols += [jnp.zeros_like(cols[0])] * (width - len(cols))
    return jnp.stack(cols, axis=1)


def _unpack(x: Array, names) -> dict[str, Array]:
    return {k: x[:, i] for i, k in enumerate(names)}


def _token_operands(g: _Grid, hs_ND, ht_ND, w_DV, wt_DV, **per_token) -> dict:
    ops = {"hs": _pad_rows(hs_ND, g.rows)}
    if ht_ND is not None:
        ops["ht"] = _pad_rows(ht_ND, g.rows)
    ops["w"] = w_DV
    if wt_DV is not None and ht_ND is not None:
        ops["wt"] = wt_DV
    return {**ops, **{k: _pad_rows(v, g.rows) for k, v in per_token.items()}}


# --------------------------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------------------------


def _stats_kernel(refs, out_ref, *, names, sums, vocab, tile):
    has_teacher = "ht" in refs
    init = tiles.online_init(out_ref.shape[0], has_teacher, sums)
    _init_on_first(out_ref, 1, _pack(init, names, out_ref.shape[1]))
    s_CT, t_CT, _, _, valid_T = _logits(refs, vocab=vocab, tile=tile, j=pl.program_id(1))
    state = tiles.online_update(_unpack(out_ref[...], names), s_CT, t_CT, valid_T)
    out_ref[...] = _pack(state, names, out_ref.shape[1])


def _pass2_kernel(refs, out_ref, *, div, vocab, tile):
    _init_on_first(out_ref, 1, jnp.zeros(out_ref.shape, jnp.float32))
    s_CT, t_CT, _, _, valid_T = _logits(refs, vocab=vocab, tile=tile, j=pl.program_id(1))
    lse, acc = refs["lse"][...], out_ref[...]
    kl_pm, kl_qm = tiles.pass2_update((acc[:, 0], acc[:, 1]), s_CT, t_CT, lse[:, 0], lse[:, 1], valid_T, div)
    out_ref[...] = jnp.stack([kl_pm, kl_qm], axis=1)


def forward(hs_ND: Array, ht_ND: Array | None, w_DV: Array, wt_DV: Array | None,
            plan: KernelPlan) -> dict[str, Array]:
    """Per-token statistics as in `token_kl_xla.forward` (no top-k)."""
    if plan.top_k is not None:
        raise ValueError("token_kl: the Pallas engine has no top-k support; use backend='xla'")
    platform, interpret = _target()
    if platform == "gpu":
        return token_kl_pallas_gpu.forward(hs_ND, ht_ND, w_DV, wt_DV, plan, interpret=interpret)
    g = _Grid(hs_ND, w_DV, plan)
    names = _STATE[:3] + ((*_STATE[3:5], *plan.sums) if ht_ND is not None else ())
    operands = _token_operands(g, hs_ND, ht_ND, w_DV, wt_DV)
    width = len(_STATE)
    state = _call(_stats_kernel, g, operands, out_shape=jax.ShapeDtypeStruct((g.rows, width), jnp.float32),
                  out_spec=g.rows_spec(width), names=names, sums=plan.sums, vocab=g.vocab, tile=g.bt)
    out = tiles.online_finish(_unpack(state[: g.num_tokens], names))
    if plan.pass2 is not None:
        lse = jnp.stack([out["lse_s"], out["lse_t"]], axis=1)
        operands = _token_operands(g, hs_ND, ht_ND, w_DV, wt_DV, lse=lse)
        sums = _call(_pass2_kernel, g, operands, out_shape=jax.ShapeDtypeStruct((g.rows, 2), jnp.float32),
                     out_spec=g.rows_spec(2), div=plan.pass2, vocab=g.vocab, tile=g.bt)
        out["kl_pm"], out["kl_qm"] = sums[: g.num_tokens, 0], sums[: g.num_tokens, 1]
    return out


# --------------------------------------------------------------------------------------------------------
# Backward.
# --------------------------------------------------------------------------------------------------------


def _tile_grad(refs, *, names, div, vocab, tile, j):
    """(g_CT, W tile) for one (token block, vocabulary tile): `tiles.logit_grad` plus the realised column."""
    s_CT, t_CT, w_DT, start, valid_T = _logits(refs, vocab=vocab, tile=tile, j=j, teacher=div is not None)
    tok = _unpack(refs["tok"][...], names)
    g_CT = tiles.logit_grad(s_CT, t_CT, tok, div, valid_T)
    g_CT = tiles.add_column(g_CT, refs["col"][...][:, 0], tok["coef_id"], start, valid_T)
    return g_CT, w_DT


def _dh_kernel(refs, out_ref, **static):
    _init_on_first(out_ref, 1, jnp.zeros(out_ref.shape, jnp.float32))
    g_CT, w_DT = _tile_grad(refs, j=pl.program_id(1), **static)
    out_ref[...] += _dot(g_CT.astype(w_DT.dtype), w_DT.T)


def _dw_kernel(refs, out_ref, acc_ref, **static):
    """dW's tile accumulates in an f32 VMEM scratch over the token blocks and is written, in W's dtype,
    after the last one."""
    _init_on_first(acc_ref, 1, jnp.zeros(acc_ref.shape, jnp.float32))
    g_CT, _ = _tile_grad(refs, j=pl.program_id(0), **static)
    hs_CD = refs["hs"][...]
    acc_ref[...] += _dot(hs_CD.T, g_CT.astype(hs_CD.dtype))

    @pl.when(pl.program_id(1) == pl.num_programs(1) - 1)
    def _write():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def backward(hs_ND: Array, ht_ND: Array | None, w_DV: Array, wt_DV: Array | None, tok: dict[str, Array],
             cols_NK: Array, coef_NK: Array, plan: KernelPlan) -> tuple[Array, Array]:
    """(d_h [N, D] f32, dW [D, V] in W's dtype), as `token_kl_xla.backward`; one sparse column per token.

    dW is accumulated tile by tile in an f32 VMEM scratch and written in W's dtype: no f32 [D, V] array."""
    if cols_NK.shape[1] != 1:
        raise ValueError("token_kl: the Pallas engine takes one sparse column per token; use backend='xla'")
    platform, interpret = _target()
    if platform == "gpu":
        return token_kl_pallas_gpu.backward(hs_ND, ht_ND, w_DV, wt_DV, tok, cols_NK, coef_NK, plan,
                                            interpret=interpret)
    g = _Grid(hs_ND, w_DV, plan)
    names = tuple(tok) + ("coef_id",)
    tok_NP = jnp.stack([*tok.values(), coef_NK[:, 0]], axis=1).astype(jnp.float32)
    teacher = ht_ND if plan.grad_div is not None else None
    operands = _token_operands(g, hs_ND, teacher, w_DV, wt_DV, tok=tok_NP, col=cols_NK.astype(jnp.int32))
    static = dict(names=names, div=plan.grad_div, vocab=g.vocab, tile=g.bt)
    dh = _call(_dh_kernel, g, operands, out_shape=jax.ShapeDtypeStruct((g.rows, g.dim), jnp.float32),
               out_spec=g.rows_spec(g.dim), **static)
    dw = _call(_dw_kernel, g, operands, out_shape=jax.ShapeDtypeStruct((g.dim, g.vocab), w_DV.dtype),
               out_spec=g.w_spec(0), vocab_major=True, scratch_shapes=[_vmem((g.dim, g.bt))], **static)
    return dh[: g.num_tokens], dw
