"""KV-cache generation: one prefill over right-padded prompts, then one compiled decode loop.

`generate` is the host orchestration; `prefill` and `_decode` are the pure jitted programs it runs.

* Prefill: P prompts, right-padded to a bucketed length T (padding has position -1), run once against a
  T-slot cache. Its keys/values are then gathered into the decode cache, one row per sample, so `n`
  samples per prompt cost one prefill of P rows, not of P*n.
* Decode: a `lax.while_loop` over a static [B, T + N] cache (N = max_new_tokens bucketed), donated so it
  is updated in place; each row keeps its own positions (prompt length + step) while every row writes the
  same slot T + step. The loop stops when every row has finished or max_new_tokens is reached; nothing
  returns to the host until it ends.
* Shapes are bucketed to powers of two (prompt length, max_new_tokens, stop-id count), so jax.jit's own
  cache, keyed by shapes and the static sampling settings, recompiles rarely; temperature and top_p are
  traced values and never recompile.

Sampling applies, as transformers does: temperature, then top-k (keep logits >= the k-th largest), then
top-p (keep the smallest set of most probable tokens whose mass reaches top_p; the top token always
stays), and draws with the Gumbel-max trick from `jax.random.fold_in(key(seed), step)`. The top-k and
top-p thresholds are found by bisection over the values rather than by sorting the vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fd_jax import sharding as sharding_lib
from fd_jax.models.transformer import KVCache, Transformer

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
# Decode attention over a static prefix of the cache that grows in steps of this many slots (`decode_segments`);
# at most this many segments (copies of the decode body) per compiled loop.
DECODE_ATTEND_BLOCK = 64
MAX_DECODE_SEGMENTS = 4


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """Generated completions, B = len(prompts) * n rows, prompt-major (rows [p*n, (p+1)*n) are prompt p).

    tokens: int32 [B, N], N = max_new_tokens; row b's completion is `tokens[b, :lengths[b]]`, padded with
        `pad_id` after it. A stop token (or the token completing a stop string) is included.
    logprobs: float32 [B, N], log p(token) under the model at temperature 1 (log_softmax of the raw
        logits): what the losses compare with. 0 after the row's length.
    sampling_logprobs: float32 [B, N], log-prob under the distribution actually sampled from
        (temperature, top-k, top-p applied); equal to `logprobs` without them, 0 for greedy decoding.
    lengths: int32 [B] tokens generated per row.
    finish_reason: B strings, "stop" (a stop token or stop string) or "length" (max_new_tokens reached).
    prompt_index: int32 [B], the prompt of each row (b // n).
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    sampling_logprobs: np.ndarray
    lengths: np.ndarray
    finish_reason: list[str]
    prompt_index: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """bool [B, N]: True on generated tokens."""
        return np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]

    def token_lists(self) -> list[list[int]]:
        """Each row's completion as a list of token ids, without padding."""
        return [row[:length].tolist() for row, length in zip(self.tokens, self.lengths)]


@dataclasses.dataclass(frozen=True)
class Static:
    """Settings that change the compiled program (hashable: part of jax.jit's cache key)."""

    greedy: bool
    plain: bool  # temperature 1, no top-k/top-p: the sampling distribution is the model's
    top_k: int  # 0 = off
    use_top_p: bool
    prompt_bucket: int  # T: the first decode slot
    pad_id: int


def bucket(length: int, minimum: int = 16) -> int:
    """The padded size of `length`: the next power of two, at least `minimum`; keeps recompilations rare."""
    return max(minimum, 1 << max(0, int(length) - 1).bit_length())


# -- sampling from one step's logits ---------------------------------------------------------------------


def filter_logits(logits_BV, temperature, *, top_k: int, top_p=None):
    """The logits of the sampling distribution: / temperature, then top-k, then top-p; removed = -inf.

    logits_BV: f32 [B, V]; temperature > 0 (a scalar); top_k: 0 = off (static); top_p: None = off, else a
    scalar in (0, 1]. Top-k keeps the logits >= the k-th largest; top-p keeps the most probable tokens
    down to the first whose cumulative mass reaches top_p. Tokens tied with the last kept one stay too.
    Both thresholds are found by bisection, without sorting the vocabulary (a sort or lax.top_k of
    [8, 49152] took ~25 ms per step on CPU, as long as the model's forward pass).
    """
    scaled_BV = logits_BV.astype(jnp.float32) / temperature
    keys_BV = _ordered_keys(scaled_BV)
    if 0 < top_k < logits_BV.shape[-1]:
        kth_B = _largest_key(keys_BV, lambda kept_BV: jnp.sum(kept_BV, axis=-1) >= top_k)
        scaled_BV = jnp.where(keys_BV < kth_B[:, None], -jnp.inf, scaled_BV)
    if top_p is not None:
        probs_BV = jax.nn.softmax(scaled_BV, axis=-1)
        last_B = _largest_key(keys_BV, lambda kept_BV: jnp.sum(jnp.where(kept_BV, probs_BV, 0.0), axis=-1) >= top_p)
        scaled_BV = jnp.where(keys_BV < last_B[:, None], -jnp.inf, scaled_BV)
    return scaled_BV


def _ordered_keys(x_BV):
    """uint32 [B, V] that order like the float32 values (the sign bit flipped, negatives' bits inverted)."""
    bits_BV = jax.lax.bitcast_convert_type(x_BV, jnp.uint32)
    return jnp.where(bits_BV >> 31 == 1, ~bits_BV, bits_BV | jnp.uint32(1 << 31))


def _largest_key(keys_BV, holds):
    """Per row, the largest key t such that holds(keys_BV >= t), found in 32 halvings of the uint32 range.

    `holds` maps a [B, V] bool mask to [B] bools; it must be monotone (true for every smaller t) and true
    at the row's minimum. The answer is then one of the row's keys.
    """

    def halve(_, bounds):
        lo_B, hi_B = bounds
        mid_B = lo_B + (hi_B - lo_B) // 2 + (hi_B - lo_B) % 2  # upper middle, without overflow
        ok_B = holds(keys_BV >= mid_B[:, None])
        return jnp.where(ok_B, mid_B, lo_B), jnp.where(ok_B, hi_B, mid_B - 1)

    lo_B, _ = jax.lax.fori_loop(0, 32, halve, (jnp.min(keys_BV, axis=-1), jnp.max(keys_BV, axis=-1)))
    return lo_B


def argmax(x_BV):
    """int32 [B]: the first index of each row's maximum.

    Two plain reductions: XLA's CPU backend runs jnp.argmax's paired (value, index) reduction ~10x slower.
    """
    max_B1 = jnp.max(x_BV, axis=-1, keepdims=True)
    index_BV = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, 1)
    return jnp.min(jnp.where(x_BV == max_B1, index_BV, x_BV.shape[-1]), axis=-1)


def _draw(key, logits_BV):
    """One token per row from softmax(logits_BV), by the Gumbel-max trick."""
    return argmax(logits_BV + jax.random.gumbel(key, logits_BV.shape, logits_BV.dtype))


def token_logprob(logits_BV, token_B):
    """log p(token_B) under logits_BV, per row: [B]."""
    picked_B = jnp.take_along_axis(logits_BV, token_B[:, None], axis=-1)[:, 0]
    return picked_B - jax.nn.logsumexp(logits_BV, axis=-1)


def sample_tokens(key, logits_BV, temperature, top_p, static: Static):
    """(token_B, logprob_B at temperature 1, logprob_B under the sampling distribution)."""
    if static.greedy:
        token_B = argmax(logits_BV)
        return token_B, token_logprob(logits_BV, token_B), jnp.zeros(token_B.shape, jnp.float32)
    if static.plain:
        token_B = _draw(key, logits_BV)
        logprob_B = token_logprob(logits_BV, token_B)
        return token_B, logprob_B, logprob_B
    filtered_BV = filter_logits(logits_BV, temperature, top_k=static.top_k, top_p=top_p if static.use_top_p else None)
    token_B = _draw(key, filtered_BV)
    return token_B, token_logprob(logits_BV, token_B), token_logprob(filtered_BV, token_B)


# -- the compiled programs --------------------------------------------------------------------------------


def _constrain(x, mesh: Mesh | None, *spec):
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def _constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    if mesh is None:
        return cache
    kv_heads = cache.k[0].shape[1]  # [B, kv_heads, S, head_dim]
    heads_axis = "tensor" if kv_heads % mesh.shape["tensor"] == 0 else None
    spec = (sharding_lib.BATCH_AXES, heads_axis, None, None)
    return KVCache(
        k=tuple(_constrain(k, mesh, *spec) for k in cache.k),
        v=tuple(_constrain(v, mesh, *spec) for v in cache.v),
        positions_BS=_constrain(cache.positions_BS, mesh, sharding_lib.BATCH_AXES, None),
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "mesh"))
def prefill(graphdef, state, tokens_PT, positions_PT, prompt_len_P, row_prompt_B, *, cache_len: int, mesh):
    """Runs the prompts once; returns the decode cache ([B, cache_len] slots) and the next-token logits_BV."""
    model = nnx.merge(graphdef, state)
    num_prompts, prompt_bucket = tokens_PT.shape
    cache = model.init_cache(num_prompts, prompt_bucket)
    hidden_PTD, cache = model.cached_hidden_states(tokens_PT, positions_PT, cache, 0)
    last_P1D = hidden_PTD[jnp.arange(num_prompts), prompt_len_P - 1][:, None]
    logits_BV = model.logits_from_hidden(last_P1D)[:, 0][row_prompt_B]

    def grow(x, slot_axis, fill=0):  # one row per sample, and room for the completion
        pad_width = [(0, 0)] * x.ndim
        pad_width[slot_axis] = (0, cache_len - prompt_bucket)
        return jnp.pad(x[row_prompt_B], pad_width, constant_values=fill)

    cache = KVCache(tuple(grow(k_PGTK, 2) for k_PGTK in cache.k), tuple(grow(v_PGTK, 2) for v_PGTK in cache.v),
                    grow(cache.positions_BS, 1, fill=-1))
    return _constrain_cache(cache, mesh), _constrain(logits_BV, mesh, sharding_lib.BATCH_AXES, None)


class _Rows(NamedTuple):
    """What the decode loop accumulates per row; N = the bucket of max_new_tokens."""

    done_B: jax.Array  # finished (or a dummy row): nothing more is recorded
    stopped_B: jax.Array  # finished by a stop token
    lengths_B: jax.Array
    tokens_BN: jax.Array
    logprobs_BN: jax.Array
    sampling_logprobs_BN: jax.Array

    def record(self, step, token_B, logprob_B, sampling_logprob_B, stop_ids_BK, pad_id: int) -> _Rows:
        active_B = ~self.done_B
        hit_stop_B = active_B & jnp.any(token_B[:, None] == stop_ids_BK, axis=-1)

        def write(out_BN, x_B, fill):
            x_B = jnp.where(active_B, x_B, fill).astype(out_BN.dtype)
            return jax.lax.dynamic_update_slice(out_BN, x_B[:, None], (0, step))

        return _Rows(
            done_B=self.done_B | hit_stop_B,
            stopped_B=self.stopped_B | hit_stop_B,
            lengths_B=self.lengths_B + active_B,
            tokens_BN=write(self.tokens_BN, token_B, pad_id),
            logprobs_BN=write(self.logprobs_BN, logprob_B, 0.0),
            sampling_logprobs_BN=write(self.sampling_logprobs_BN, sampling_logprob_B, 0.0),
        )


def decode_segments(out_len: int, attend_block: int) -> tuple[int, ...]:
    """The ends (in decode steps, increasing, the last = out_len) of the decode loop's segments.

    Segment i runs the steps before ends[i] against a cache of prompt_bucket + ends[i] slots only (a
    static length, so the compiled attention reads no more; the cache grows between segments). Segments are multiples of
    `attend_block` long and at most MAX_DECODE_SEGMENTS: each is its own copy of the decode body in the
    compiled program (compile time grows with their number). attend_block <= 0, or out_len <= attend_block:
    one segment over the whole cache.
    """
    if attend_block <= 0 or out_len <= attend_block:
        return (out_len,)
    size = -(-out_len // MAX_DECODE_SEGMENTS)
    size = -(-size // attend_block) * attend_block
    return tuple(range(size, out_len, size)) + (out_len,)


@functools.partial(jax.jit, static_argnames=("graphdef", "static", "attend_block"), donate_argnames=("cache",))
def _decode(graphdef, state, cache, logits_BV, prompt_len_B, done_B, stop_ids_BK, key, max_new_tokens,
            temperature, top_p, *, static: Static, attend_block: int = 0) -> tuple[_Rows, KVCache]:
    """Samples up to max_new_tokens per row, the first from the prefill's logits_BV.

    The loop runs in `decode_segments(N, attend_block)`: segment i carries only the first T + ends[i]
    slots of the cache, which hold everything written so far (slot T + step - 1 is the newest), and pads
    it with empty slots (position -1) for the next. The outputs are those of attending over the whole cache
    (the other slots are empty, masked). A smaller carried cache rather than a slice of the whole one: XLA
    copies the whole cache at every step when the attention reads a slice of the buffer it updates.
    Returns the rows and the cache (returned so that the donated buffer is updated in place).
    """
    model = nnx.merge(graphdef, state)
    batch, cache_len = cache.positions_BS.shape
    out_len = cache_len - static.prompt_bucket
    sample = functools.partial(sample_tokens, temperature=temperature, top_p=top_p, static=static)
    record = functools.partial(_Rows.record, stop_ids_BK=stop_ids_BK, pad_id=static.pad_id)

    rows = _Rows(
        done_B=done_B,
        stopped_B=jnp.zeros((batch,), bool),
        lengths_B=jnp.zeros((batch,), jnp.int32),
        tokens_BN=jnp.full((batch, out_len), static.pad_id, jnp.int32),
        logprobs_BN=jnp.zeros((batch, out_len), jnp.float32),
        sampling_logprobs_BN=jnp.zeros((batch, out_len), jnp.float32),
    )
    token_B, *logprobs = sample(jax.random.fold_in(key, 0), logits_BV)
    rows = record(rows, 0, token_B, *logprobs)

    def cond(loop, end):
        step, _, _, rows = loop
        return (step < jnp.minimum(max_new_tokens, end)) & ~jnp.all(rows.done_B)

    def body(loop):
        step, cache, token_B, rows = loop
        # the previous token goes in at slot T + step - 1, each row at its own position
        positions_B1 = (prompt_len_B + step - 1)[:, None]
        hidden_B1D, cache = model.cached_hidden_states(token_B[:, None], positions_B1, cache,
                                                       static.prompt_bucket + step - 1)
        logits_BV = model.logits_from_hidden(hidden_B1D)[:, 0]
        token_B, *logprobs = sample(jax.random.fold_in(key, step), logits_BV)
        return step + 1, cache, token_B, record(rows, step, token_B, *logprobs)

    loop = (jnp.int32(1), cache, token_B, rows)
    for end in decode_segments(out_len, attend_block):  # steps [previous end, end): slots < T + end
        step, cache, token_B, rows = loop
        cache = _resize_cache(cache, static.prompt_bucket + end)
        loop = jax.lax.while_loop(functools.partial(cond, end=end), body, (step, cache, token_B, rows))
    _, cache, _, rows = loop
    return rows, cache


def _resize_cache(cache: KVCache, slots: int) -> KVCache:
    """The cache's first `slots` slots, or the cache padded with empty slots (position -1) to `slots`."""
    have = cache.positions_BS.shape[1]
    if slots == have:
        return cache

    def resize(x, axis, fill):
        if slots < have:
            return jax.lax.slice_in_dim(x, 0, slots, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, slots - have)
        return jnp.pad(x, pad, constant_values=fill)

    return KVCache(tuple(resize(k, 2, 0) for k in cache.k), tuple(resize(v, 2, 0) for v in cache.v),
                   resize(cache.positions_BS, 1, -1))


# -- host orchestration -----------------------------------------------------------------------------------


def _stop_ids_per_prompt(stop_token_ids, num_prompts: int) -> list[list[int]]:
    """A flat list of ids applies to every prompt; a list of lists gives one list per prompt."""
    items = list(stop_token_ids)
    if all(isinstance(i, (int, np.integer)) for i in items):
        return [[int(i) for i in items]] * num_prompts
    if len(items) != num_prompts or not all(isinstance(i, Sequence) for i in items):
        raise ValueError(
            f"stop_token_ids: give a list of ints (for every prompt) or one list per prompt "
            f"({num_prompts}); got {stop_token_ids!r}"
        )
    return [[int(i) for i in row] for row in items]


def _validate(prompts, vocab_size, max_new_tokens, temperature, top_p, top_k, n):
    if not prompts:
        raise ValueError("generate: prompts is empty")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"generate: prompts[{i}] is empty; every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"generate: prompts[{i}] has token ids {bad[:5]} outside [0, vocab_size={vocab_size})")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or int(top_k) != top_k:
        raise ValueError(f"generate: top_k must be an int >= 0 (0 = off), got {top_k}")
    if n < 1:
        raise ValueError(f"generate: n (samples per prompt) must be >= 1, got {n}")


def _to_host(x) -> np.ndarray:
    if jax.process_count() > 1:  # rows live on several hosts
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _first_stop_string_end(tokens: list[int], stop_strings, decode) -> int | None:
    """The fewest leading tokens whose text contains a stop string, or None (binary search on prefixes)."""
    found = lambda j: any(s in decode(tokens[:j]) for s in stop_strings)
    if not tokens or not found(len(tokens)):
        return None
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if found(mid) else (mid + 1, hi)
    return lo


class _Batch(NamedTuple):
    """The host-side inputs of one generate call; P prompts and B rows, both padded to the mesh."""

    tokens_PT: np.ndarray
    positions_PT: np.ndarray  # -1 on padding
    prompt_len_P: np.ndarray
    row_prompt_B: np.ndarray  # the prompt of each row
    prompt_len_B: np.ndarray
    done_B: np.ndarray  # True on dummy rows
    stop_ids_BK: np.ndarray  # -1 = no stop id


def _pack(prompts, n: int, stop_ids_P, shards: int, prompt_bucket: int) -> _Batch:
    """Right-pads the prompts; dummy prompts and rows fill a multiple of `shards`.

    Dummy prompts are one token long and their rows are finished from the start. Token 0 fills the padding:
    it is never attended to (position -1), and pad_id (for the outputs) need not be a valid id.
    """
    num_prompts, num_rows = len(prompts), len(prompts) * n
    prompts_padded, rows_padded = (-(-x // shards) * shards for x in (num_prompts, num_rows))
    tokens_PT = np.zeros((prompts_padded, prompt_bucket), np.int32)
    positions_PT = np.full((prompts_padded, prompt_bucket), -1, np.int32)
    positions_PT[:, 0] = 0
    prompt_len_P = np.ones((prompts_padded,), np.int32)
    for i, prompt in enumerate(prompts):
        tokens_PT[i, : len(prompt)] = prompt
        positions_PT[i, : len(prompt)] = np.arange(len(prompt))
        prompt_len_P[i] = len(prompt)
    row_prompt_B = np.zeros((rows_padded,), np.int32)
    row_prompt_B[:num_rows] = np.arange(num_rows) // n
    stop_ids_BK = np.full((rows_padded, bucket(max(map(len, stop_ids_P)), 8)), -1, np.int32)
    for b in range(num_rows):
        ids = stop_ids_P[b // n]
        stop_ids_BK[b, : len(ids)] = ids
    return _Batch(tokens_PT, positions_PT, prompt_len_P, row_prompt_B, prompt_len_P[row_prompt_B],
                  np.arange(rows_padded) >= num_rows, stop_ids_BK)


def _cut_at_stop_strings(rows: _Rows, stop_strings, decode, pad_id: int) -> _Rows:
    """Ends each row after the token that completes its first stop string (host numpy rows, in place)."""
    for b, length in enumerate(rows.lengths_B):
        end = _first_stop_string_end(rows.tokens_BN[b, :length].tolist(), stop_strings, decode)
        if end is not None:
            rows.lengths_B[b], rows.stopped_B[b] = end, True
            rows.tokens_BN[b, end:], rows.logprobs_BN[b, end:], rows.sampling_logprobs_BN[b, end:] = pad_id, 0, 0
    return rows


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: Sequence[Any] = (),
    seed: int = 0,
    n: int = 1,
    stop_strings: Sequence[str] = (),
    tokenizer: Any = None,
    mesh: Mesh | None = None,
    pad_id: int = 0,
    min_bucket: int = 16,
    attend_block: int = DECODE_ATTEND_BLOCK,
) -> SampleOutput:
    """Samples `n` completions for each prompt (token-id lists of any lengths) with a KV cache.

    temperature: 0 = greedy; top_k: 0 = off; top_p: 1 = off. stop_token_ids: ints for every prompt, or one
    list per prompt; a row ends after emitting one (included in its tokens). stop_strings: checked on the
    host after decoding with `tokenizer.decode(ids) -> str` (required then); a row is cut after the token
    that completes the first stop string. seed: the same seed, prompts and settings give the same samples.
    mesh: rows are split over its (data, fsdp) axes (padded with dummy rows to a multiple), the model
    must already be placed on it (`load_hf(..., mesh=mesh)`). pad_id fills the outputs after each row's
    end. Prompt lengths and max_new_tokens are padded to powers of two >= min_bucket for the compiled
    shapes. attend_block: decode steps attend to a static prefix of the cache that grows in blocks of this
    many slots (`decode_segments`; 0 = the whole cache at every step); the outputs are the same either way.
    Returns a `SampleOutput` of len(prompts) * n rows, prompt-major.
    """
    cfg = model.config
    _validate(prompts, cfg.vocab_size, max_new_tokens, temperature, top_p, top_k, n)
    if stop_strings and tokenizer is None:
        raise ValueError("generate: stop_strings need a tokenizer (anything with .decode(list[int]) -> str)")
    stop_ids_P = _stop_ids_per_prompt(stop_token_ids, len(prompts))

    shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in sharding_lib.BATCH_AXES]))
    batch = _pack(prompts, n, stop_ids_P, shards, bucket(max(map(len, prompts)), min_bucket))
    if mesh is not None:
        batch = batch._replace(**sharding_lib.shard_batch(batch._asdict(), mesh))
    prompt_bucket = batch.tokens_PT.shape[1]
    static = Static(greedy=temperature == 0, plain=temperature == 1 and not top_k and top_p == 1,
                     top_k=int(top_k), use_top_p=top_p < 1, prompt_bucket=prompt_bucket, pad_id=int(pad_id))

    graphdef, state = nnx.split(model)
    cache, logits_BV = prefill(graphdef, state, batch.tokens_PT, batch.positions_PT, batch.prompt_len_P,
                                batch.row_prompt_B, cache_len=prompt_bucket + bucket(max_new_tokens, min_bucket),
                                mesh=mesh)
    rows, _ = _decode(
        graphdef, state, cache, logits_BV, batch.prompt_len_B, batch.done_B, batch.stop_ids_BK,
        jax.random.key(seed), jnp.int32(max_new_tokens), jnp.float32(temperature or 1.0), jnp.float32(top_p),
        static=static, attend_block=int(attend_block),
    )
    num_rows = len(prompts) * n
    # real rows only, and max_new_tokens columns (the loop's buffers have the bucketed length)
    rows = jax.tree.map(lambda x: np.array(_to_host(x)[(slice(num_rows), slice(max_new_tokens))[: x.ndim]]), rows)
    if stop_strings:
        rows = _cut_at_stop_strings(rows, stop_strings, tokenizer.decode, pad_id)
    return SampleOutput(
        tokens=rows.tokens_BN,
        logprobs=rows.logprobs_BN,
        sampling_logprobs=rows.sampling_logprobs_BN,
        lengths=rows.lengths_B,
        finish_reason=[FINISH_STOP if s else FINISH_LENGTH for s in rows.stopped_B],
        prompt_index=np.arange(num_rows, dtype=np.int32) // n,
    )
