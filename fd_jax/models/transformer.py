"""A Flax NNX decoder for the Llama, Qwen2 and Qwen3 families.

One module serves the three families; `ModelConfig` switches the differences (attention biases, QK-norm,
RoPE scaling, tied embeddings). Weights are stored in the layout that makes the einsums read naturally
(`q: [embed, heads, head_dim]`) and every parameter carries logical axis names in its `axes` metadata,
which `fd_jax.sharding` maps onto a device mesh.

Masking comes from positions alone: a token with position < 0 is padding, and a position of 0 starts a new
packed sequence. So right-padded, left-padded and packed rows need no extra mask argument.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fd_jax.models.config import ModelConfig
from fd_jax.models.rope import apply_rope, inverse_frequencies

_MASKED = -1e30  # finite, so a fully masked (padding) query row gives a uniform softmax rather than NaN


class KVCache(NamedTuple):
    """Static-size key/value cache: one [B, kv_heads, S, head_dim] array per layer, and per-slot positions.

    `positions_BS` is -1 on empty or padding slots; attention only reads slots whose position is >= 0 and
    <= the query's position, so rows of different lengths can share one write index. Heads come before
    slots so that both attention products are plain batched matrix products over (B, kv_heads): with
    slots first, XLA's CPU backend transposed the whole cache in every layer at every decode step.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    positions_BS: jax.Array


def _param(rngs: nnx.Rngs, shape, dtype, axes, *, init="normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.scale = _param(rngs, (dim,), param_dtype, ("norm",), init="ones")
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # Hugging Face rounds to the activation dtype before scaling; so do we, to match bf16 logits too.
        return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


def _linear(x, w, b=None, *, dtype, spec: str):
    y = jnp.einsum(spec, x.astype(dtype), w[...].astype(dtype))
    return y if b is None else y + b[...].astype(dtype)


def attention_mask(q_positions_BT, k_positions_BS, q_segments_BT=None, k_segments_BS=None):
    """[B, T, S] bool: key s is visible to query t (causal by position, same segment, not padding)."""
    mask_BTS = (k_positions_BS[:, None, :] >= 0) & (k_positions_BS[:, None, :] <= q_positions_BT[:, :, None])
    if q_segments_BT is not None:
        mask_BTS &= q_segments_BT[:, :, None] == k_segments_BS[:, None, :]
    return mask_BTS


def segments_from_positions(positions_BT):
    """Packed-sequence ids: a new segment starts wherever the position is 0."""
    return jnp.cumsum(positions_BT == 0, axis=1)


def dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS, dtype):
    """Grouped-query attention; softmax in f32. H query heads share G = kv_heads key/value heads."""
    b, t, h, hd = q_BTHK.shape
    g = k_BSGK.shape[2]
    q_BTGRK = q_BTHK.reshape(b, t, g, h // g, hd)
    scores = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_BTS[:, None, None], scores * hd**-0.5, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bgrts,bsgk->btgrk", probs, v_BSGK)
    return out.reshape(b, t, h, hd)


def blockwise_attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS, dtype, block: int):
    """`dot_product_attention` over blocks of `block` queries, each recomputed in the backward pass.

    The [B, heads, T, T] scores and probabilities of a whole layer never exist at once, and none are kept
    for the backward pass (only q, k, v are): on the training path this halves a step's peak memory at
    the price of recomputing QKᵀ and the softmax, as flash attention does. Falls back to the plain
    version when T is not a multiple of `block` (or block is 0).
    """
    b, t, h, hd = q_BTHK.shape
    if block <= 0 or t <= block or t % block:
        return dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS, dtype)
    n = t // block
    q_NBtHK = q_BTHK.reshape(b, n, block, h, hd).swapaxes(0, 1)
    mask_NBtS = mask_BTS.reshape(b, n, block, mask_BTS.shape[-1]).swapaxes(0, 1)
    one_block = jax.checkpoint(lambda q, mask, k, v: dot_product_attention(q, k, v, mask, dtype))
    out_NBtHK = jax.lax.map(lambda xs: one_block(xs[0], xs[1], k_BSGK, v_BSGK), (q_NBtHK, mask_NBtS))
    return out_NBtHK.swapaxes(0, 1).reshape(b, t, h, hd)


def cached_attention(q_BTHK, k_BGSK, v_BGSK, mask_BTS, dtype):
    """`dot_product_attention` against a cache laid out [B, kv_heads, S, head_dim]."""
    b, t, h, hd = q_BTHK.shape
    g = k_BGSK.shape[1]
    q_BGRTK = q_BTHK.reshape(b, t, g, h // g, hd).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bgrtk,bgsk->bgrts", q_BGRTK, k_BGSK, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_BTS[:, None, None], scores * hd**-0.5, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out_BGRTK = jnp.einsum("bgrts,bgsk->bgrtk", probs, v_BGSK)
    return out_BGRTK.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attention_block: int = 128):
        d, h, g, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        p = functools.partial(_param, rngs)
        self.q = p((d, h, hd), param_dtype, ("embed", "heads", "head_dim"))
        self.k = p((d, g, hd), param_dtype, ("embed", "kv_heads", "head_dim"))
        self.v = p((d, g, hd), param_dtype, ("embed", "kv_heads", "head_dim"))
        self.o = p((h, hd, d), param_dtype, ("heads", "head_dim", "embed"))
        self.q_bias = p((h, hd), param_dtype, ("heads", "head_dim"), init="zeros") if cfg.qkv_bias else None
        self.k_bias = p((g, hd), param_dtype, ("kv_heads", "head_dim"), init="zeros") if cfg.qkv_bias else None
        self.v_bias = p((g, hd), param_dtype, ("kv_heads", "head_dim"), init="zeros") if cfg.qkv_bias else None
        self.o_bias = p((d,), param_dtype, ("embed",), init="zeros") if cfg.o_bias else None
        norm = functools.partial(RMSNorm, hd, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_norm = norm() if cfg.qk_norm else None
        self.k_norm = norm() if cfg.qk_norm else None
        self.dtype = dtype
        self.attention_block = attention_block

    def __call__(self, x_BTD, positions_BT, mask_BTS, inv_freq, kv=None, write_index=None):
        dt = self.dtype
        q = _linear(x_BTD, self.q, self.q_bias, dtype=dt, spec="btd,dhk->bthk")
        k = _linear(x_BTD, self.k, self.k_bias, dtype=dt, spec="btd,dgk->btgk")
        v = _linear(x_BTD, self.v, self.v_bias, dtype=dt, spec="btd,dgk->btgk")
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions_BT, inv_freq)
        k = apply_rope(k, positions_BT, inv_freq)
        if kv is None:
            out = blockwise_attention(q, k.astype(dt), v.astype(dt), mask_BTS, dt, self.attention_block)
        else:  # write this chunk's keys/values into the static cache, attend over all of it
            cache_k, cache_v = kv
            write = lambda cache, x_BTGK: jax.lax.dynamic_update_slice(
                cache, x_BTGK.transpose(0, 2, 1, 3).astype(cache.dtype), (0, 0, write_index, 0)
            )
            kv = (write(cache_k, k), write(cache_v, v))
            out = cached_attention(q, kv[0].astype(dt), kv[1].astype(dt), mask_BTS, dt)
        return _linear(out, self.o, self.o_bias, dtype=dt, spec="bthk,hkd->btd"), kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, i = cfg.hidden_size, cfg.intermediate_size
        p = functools.partial(_param, rngs)
        self.gate = p((d, i), param_dtype, ("embed", "mlp"))
        self.up = p((d, i), param_dtype, ("embed", "mlp"))
        self.down = p((i, d), param_dtype, ("mlp", "embed"))
        bias = cfg.mlp_bias
        self.gate_bias = p((i,), param_dtype, ("mlp",), init="zeros") if bias else None
        self.up_bias = p((i,), param_dtype, ("mlp",), init="zeros") if bias else None
        self.down_bias = p((d,), param_dtype, ("embed",), init="zeros") if bias else None
        self.dtype = dtype

    def __call__(self, x_BTD):
        dt = self.dtype
        gate = _linear(x_BTD, self.gate, self.gate_bias, dtype=dt, spec="btd,di->bti")
        up = _linear(x_BTD, self.up, self.up_bias, dtype=dt, spec="btd,di->bti")
        return _linear(jax.nn.silu(gate) * up, self.down, self.down_bias, dtype=dt, spec="bti,id->btd")


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attention_block: int = 128):
        norm = functools.partial(RMSNorm, cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = norm(rngs=rngs)
        self.attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention_block=attention_block)
        self.mlp_norm = norm(rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BTD, positions_BT, mask_BTS, inv_freq, kv=None, write_index=None):
        attn_out, kv = self.attn(self.attn_norm(x_BTD), positions_BT, mask_BTS, inv_freq, kv, write_index)
        x_BTD = x_BTD + attn_out
        return x_BTD + self.mlp(self.mlp_norm(x_BTD)), kv


def _block_forward(block: Block, x_BTD, positions_BT, mask_BTS, inv_freq):
    return block(x_BTD, positions_BT, mask_BTS, inv_freq)[0]


class Transformer(nnx.Module):
    """The decoder. `dtype` is the compute dtype, `param_dtype` the storage dtype of the weights.

    `remat=True` recomputes each layer's activations in the backward pass (memory for compute).
    `attention_block`: queries per block of the memory-efficient attention of the training path (full
    sequences; 0 = plain attention); see `blockwise_attention`.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool = False,
        attention_block: int = 128,
        rngs: nnx.Rngs,
    ):
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), param_dtype, ("vocab", "embed"))
        self.layers = nnx.List(
            [Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention_block=attention_block)
             for _ in range(cfg.num_layers)]
        )
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else _param(rngs, (cfg.hidden_size, cfg.vocab_size), param_dtype, ("embed", "vocab"))
        )

    def _inverse_frequencies(self):
        # A trace-time numpy constant: cheap, and keeps the RoPE table out of the parameter state.
        cfg = self.config
        return inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    @property
    def unembedding(self) -> jax.Array:
        """[D, V]: the matrix that maps final hidden states to logits (the embedding's transpose if tied)."""
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def hidden_states(self, tokens_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
        """[B, T, D] final hidden states (after the last norm), without the LM head."""
        mask_BTS = attention_mask(
            positions_BT, positions_BT, segments_from_positions(positions_BT), segments_from_positions(positions_BT)
        )
        x_BTD = self.embed[...][tokens_BT].astype(self.dtype)
        inv_freq = self._inverse_frequencies()
        layer_fn = nnx.remat(_block_forward) if self.remat else _block_forward
        for block in self.layers:
            x_BTD = layer_fn(block, x_BTD, positions_BT, mask_BTS, inv_freq)
        return self.final_norm(x_BTD)

    def logits_from_hidden(self, hidden_BTD: jax.Array) -> jax.Array:
        """[B, T, V] f32 logits."""
        w_DV = self.unembedding.astype(self.dtype)
        return jnp.einsum("btd,dv->btv", hidden_BTD.astype(self.dtype), w_DV, preferred_element_type=jnp.float32)

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
        """[B, T, V] f32 logits for `tokens_BT` at `positions_BT` (position < 0 marks padding)."""
        return self.logits_from_hidden(self.hidden_states(tokens_BT, positions_BT))

    # -- incremental decoding ------------------------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache of `max_len` slots per row."""
        cfg = self.config
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        dtype = dtype or self.dtype
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                       positions_BS=jnp.full((batch, max_len), -1, jnp.int32))

    def cached_hidden_states(
        self, tokens_BT: jax.Array, positions_BT: jax.Array, cache: KVCache, write_index: jax.Array | int
    ) -> tuple[jax.Array, KVCache]:
        """Runs `tokens_BT` against `cache`, writing their keys/values at slots [write_index, write_index+T).

        Returns the [B, T, D] final hidden states and the updated cache. Rows may have different lengths:
        padding tokens (position < 0) are written but never attended to.
        """
        cache_positions_BS = jax.lax.dynamic_update_slice(
            cache.positions_BS, positions_BT.astype(jnp.int32), (0, write_index)
        )
        mask_BTS = attention_mask(positions_BT, cache_positions_BS)
        x_BTD = self.embed[...][tokens_BT].astype(self.dtype)
        inv_freq = self._inverse_frequencies()
        new_k, new_v = [], []
        for block, k, v in zip(self.layers, cache.k, cache.v):
            x_BTD, (k, v) = block(x_BTD, positions_BT, mask_BTS, inv_freq, (k, v), write_index)
            new_k.append(k)
            new_v.append(v)
        return self.final_norm(x_BTD), KVCache(tuple(new_k), tuple(new_v), cache_positions_BS)
