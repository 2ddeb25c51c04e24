"""Per-tile math of the fused divergence, shared by the XLA scans and the Pallas kernels.

A tile is a block of C tokens times T vocabulary columns of the student logits `s_CT = h_CD @ W_DT` and the
teacher logits `t_CT`. Every function here takes one tile (already multiplied out, in f32) plus per-token
state and returns the updated state; the engines (`token_kl_xla`, `token_kl_pallas`) only decide how tiles
are visited. Columns past the vocabulary (a ragged last tile) are excluded through `valid_T`.

First pass, online over the tiles of one token block (no normaliser is known yet), per token:
    m_s, z_s   running max and sum of exp(s - m_s)          -> lse_s = m_s + log z_s
    c_s        sum of exp(s - m_s) (s - m_s)                 -> entropy = log z_s - c_s / z_s
    m_t, z_t   the same for the teacher                      -> lse_t
    rev        sum of exp(s - m_s) (s - t)                   -> E_p[s - t]   (reverse KL)
    fwd        sum of exp(t - m_t) (t - s)                   -> E_q[t - s]   (forward KL)
Each sum is rescaled by exp(m_old - m_new) when the running max grows (the online log-sum-exp).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

from fd_jax.kernels.divergences import Divergence

Array = jax.Array

# A finite stand-in for -inf: exp(NEG - m) is 0 and NEG * 0 stays 0 (with -inf it would be NaN).
NEG = -1e30


def valid_columns(start, col0, tile: int, vocab: int) -> Array:
    """[T] bool: the tile's columns `start + i` that are in [col0, vocab).

    `start` may be below `col0` when a ragged last tile is read at a clamped position (its first columns
    then belong to the previous tile) and the tile may run past `vocab` when it is read out of bounds.
    """
    cols = start + jnp.arange(tile, dtype=jnp.int32)
    return (cols >= col0) & (cols < vocab)


def online_init(num_tokens: int, has_teacher: bool, sums: tuple[str, ...]) -> dict[str, Array]:
    """Pass-one state of a token block. `sums` names the cross sums wanted ("rev", "fwd")."""
    maxes = ("m_s", "m_t") if has_teacher else ("m_s",)
    state = {k: jnp.full((num_tokens,), NEG, jnp.float32) for k in maxes}
    for k in ("z_s", "c_s", *(("z_t", *sums) if has_teacher else ())):
        state[k] = jnp.zeros((num_tokens,), jnp.float32)
    return state


def online_update(state: Mapping[str, Array], s_CT: Array, t_CT: Array | None, valid_T: Array | None):
    """Fold one tile into the pass-one state. `t_CT` is None when there is no teacher."""
    if valid_T is not None:
        s_CT = jnp.where(valid_T, s_CT, NEG)
        t_CT = None if t_CT is None else jnp.where(valid_T, t_CT, NEG)
    out = {}
    m_s = jnp.maximum(state["m_s"], jnp.max(s_CT, axis=1))
    scale_s = jnp.exp(state["m_s"] - m_s)
    centred_s = s_CT - m_s[:, None]
    e_s = jnp.exp(centred_s)
    # sum exp(s - m)(s - m) after a shift of the max by d: scale * (old - d * z_old).
    out["c_s"] = scale_s * (state["c_s"] - (m_s - state["m_s"]) * state["z_s"]) + jnp.sum(e_s * centred_s, 1)
    out["z_s"] = scale_s * state["z_s"] + jnp.sum(e_s, axis=1)
    out["m_s"] = m_s
    if t_CT is None:
        return {**state, **out}
    m_t = jnp.maximum(state["m_t"], jnp.max(t_CT, axis=1))
    scale_t = jnp.exp(state["m_t"] - m_t)
    e_t = jnp.exp(t_CT - m_t[:, None])
    out["z_t"] = scale_t * state["z_t"] + jnp.sum(e_t, axis=1)
    out["m_t"] = m_t
    if "rev" in state:
        out["rev"] = scale_s * state["rev"] + jnp.sum(e_s * (s_CT - t_CT), axis=1)
    if "fwd" in state:
        out["fwd"] = scale_t * state["fwd"] + jnp.sum(e_t * (t_CT - s_CT), axis=1)
    return {**state, **out}


def online_merge(parts: Mapping[str, Array]) -> dict[str, Array]:
    """One pass-one state from states [S, C] of S disjoint sets of vocabulary tiles (a split reduction):
    each part's sums are rescaled from its own running max to the common one, as `online_update` does."""
    out = {}
    for side, sums in (("s", ("z_s", "rev")), ("t", ("z_t", "fwd"))):
        m_key = f"m_{side}"
        if m_key not in parts:
            continue
        m = jnp.max(parts[m_key], axis=0)
        scale = jnp.exp(parts[m_key] - m)
        out.update({k: jnp.sum(scale * parts[k], axis=0) for k in sums if k in parts})
        if side == "s":  # sum exp(x - m)(x - m) = scale * (c_part + (m_part - m) z_part)
            out["c_s"] = jnp.sum(scale * (parts["c_s"] + (parts["m_s"] - m) * parts["z_s"]), axis=0)
        out[m_key] = m
    return out


def online_finish(state: Mapping[str, Array]) -> dict[str, Array]:
    """Per-token lse_s, lse_t, entropy (nats) and the expectations `rev`, `fwd` from a finished pass one."""
    log_z_s = jnp.log(state["z_s"])
    out = {"lse_s": state["m_s"] + log_z_s, "entropy": log_z_s - state["c_s"] / state["z_s"]}
    if "z_t" in state:
        out["lse_t"] = state["m_t"] + jnp.log(state["z_t"])
    if "rev" in state:
        out["rev"] = state["rev"] / state["z_s"]
    if "fwd" in state:
        out["fwd"] = state["fwd"] / state["z_t"]
    return out


def topk_init(num_tokens: int, k: int) -> dict[str, Array]:
    """Running top-k of the student logits, with the teacher logits and vocabulary ids at those places."""
    return {
        "top_s": jnp.full((num_tokens, k), NEG, jnp.float32),
        "top_t": jnp.zeros((num_tokens, k), jnp.float32),
        "top_i": jnp.zeros((num_tokens, k), jnp.int32),
    }


def topk_update(top: Mapping[str, Array], s_CT, t_CT, cols_T, valid_T) -> dict[str, Array]:
    """Merge one tile into the running top-k: top-k of (running k) ∪ (tile), exact over all tiles."""
    if valid_T is not None:
        s_CT = jnp.where(valid_T, s_CT, NEG)
    k = top["top_s"].shape[1]
    cand_s = jnp.concatenate([top["top_s"], s_CT], axis=1)
    cand_t = jnp.concatenate([top["top_t"], t_CT], axis=1)
    cand_i = jnp.concatenate([top["top_i"], jnp.broadcast_to(cols_T, s_CT.shape)], axis=1)
    top_s, pos = jax.lax.top_k(cand_s, k)
    return {
        "top_s": top_s,
        "top_t": jnp.take_along_axis(cand_t, pos, axis=1),
        "top_i": jnp.take_along_axis(cand_i, pos, axis=1),
    }


def pass2_update(sums: tuple[Array, Array], s_CT, t_CT, lse_s_C, lse_t_C, valid_T, div: Divergence):
    """Add one tile's terms of the divergence's second pass (the JSD's KL(p||M), KL(q||M))."""
    a_CT, b_CT = div.pass2_terms(s_CT - lse_s_C[:, None], t_CT - lse_t_C[:, None])
    if valid_T is not None:
        a_CT, b_CT = jnp.where(valid_T, a_CT, 0.0), jnp.where(valid_T, b_CT, 0.0)
    return sums[0] + jnp.sum(a_CT, axis=1), sums[1] + jnp.sum(b_CT, axis=1)


def logit_grad(s_CT, t_CT, tok: Mapping[str, Array], div: Divergence | None, valid_T: Array | None) -> Array:
    """d loss / d s_CT for one tile, excluding the sparse (one column per token) terms.

    `tok` holds per-token [C] arrays: `lse_s`, `a`, `b` (the student terms p (a + b log p), which carry
    the entropy, the realised token's log-prob and the top-k tail), and, when `div` is given (support
    `full`), `c_div` (the divergence's cotangent), `lse_t` and what `div.logit_grad` reads.
    """
    logp = s_CT - tok["lse_s"][:, None]
    p = jnp.exp(logp)
    g = p * (tok["a"][:, None] + tok["b"][:, None] * logp)
    if div is not None:
        logq = t_CT - tok["lse_t"][:, None]
        g = g + tok["c_div"][:, None] * div.logit_grad(logp, logq, p, tok)
    if valid_T is not None:
        g = jnp.where(valid_T, g, 0.0)
    return g


def add_column(g_CT: Array, col_C: Array, coef_C: Array, start, valid_T: Array | None) -> Array:
    """g[c, col_c - start] += coef_c where column col_c is one of the tile's valid columns.

    One column per token (the realised token), written as a compare-and-select so that it fuses with
    `logit_grad` and runs inside Pallas kernels.
    """
    cols_T = start + jnp.arange(g_CT.shape[1], dtype=jnp.int32)
    hit_CT = cols_T[None, :] == col_C[:, None]
    if valid_T is not None:
        hit_CT = hit_CT & valid_T[None, :]
    return g_CT + jnp.where(hit_CT, coef_C[:, None], 0.0)


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """What the engines compute, decided once per call from the public settings.

    token_chunk, vocab_tile: block sizes (tokens C, vocabulary columns T).
    has_teacher: whether teacher logits exist at all (False for log-probs and entropy alone).
    sums: the online cross sums of pass one ("rev", "fwd").
    top_k: keep the student's running top-k in pass one (support `topk`), else None.
    pass2: the divergence whose second pass is needed (the JSD), else None.
    grad_div: the divergence whose dense gradient the backward adds (support `full`), else None; the
        backward reads teacher logits only then.
    """

    token_chunk: int
    vocab_tile: int
    has_teacher: bool
    sums: tuple[str, ...] = ()
    top_k: int | None = None
    pass2: Divergence | None = None
    grad_div: Divergence | None = None
