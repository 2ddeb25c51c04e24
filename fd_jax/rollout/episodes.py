"""Episodes of several turns with tool calls, on one KV cache per row that lives across turns.

A row's episode is its prompt, then turns: the model writes until it ends a tool call (a stop string such
as `</tool>`), ends its answer (a stop token such as EOS) or runs out of budget; the host answers the call
(`Environment.react`) and the observation's tokens are appended; the model goes on. The whole batch moves
in *segments*: one compiled decode loop runs every row that is still in its episode until each has paused
or finished, then the host answers every paused row at once (the tools run concurrently), then one
compiled *append* writes each row's new tokens into its own cache, and the next segment starts from the
append's logits. Rows finish at different turns; finished rows ride along masked (position -1) and cost
nothing but their slot.

The cache (`fd_jax.models.transformer.KVCache`) is static: [B, S] slots that every row writes at the same
slot index, each row at its own positions; a slot with position -1 is never attended to. This is what
makes history reuse exact and cheap:

* a row that is not generating (paused, finished, a dummy) writes position -1, so its slots stay empty;
* the decode loop writes a token's keys/values one step after sampling it, so a row's last sampled token
  (the stop token, or the one that completed a stop string) is never in its cache when the segment ends:
  it is *pending* and goes first into the next append, followed by the observation's tokens;
* a stop string found on the host after the loop (a tag that tokenizes differently from its standalone
  token ids, which the loop also stops at) cuts the row; the slots of its tokens after the cut get
  position -1 (`_invalidate`), which is the same as never having written them.

So appending an observation of L tokens costs a prefill of L + 1 tokens, never of the history, and the
cache holds, in slot order, exactly the tokens of each row's transcript at positions 0, 1, 2, ...: what a
teacher-forced forward pass over the final transcript sees (`tests/rollout/test_episodes.py` checks the
tokens, masks and log-probs against one `model(tokens, positions)` to 1e-5).

Budgets: `max_turns` (segments a row takes part in), `max_turn_tokens` (model tokens per turn),
`max_obs_tokens` (an observation longer than this is cut), `max_episode_tokens` (everything after the
prompt, model and observation tokens). The cache starts with room for the prompt and one turn and is grown
(to the next power of two of slots, one copy) when the next segment or append would not fit: every decode
step attends over all slots, so a cache sized for the worst case of every budget would slow each of them.
Appends are padded to 16 x {1, 2, 3, 4, 6, 8, ...} tokens, so shapes (and compilations) stay few.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fd_jax.models.transformer import KVCache, Transformer
from fd_jax.rl.batch import bucket_length
from fd_jax.rollout.sampling import Static, bucket, prefill, sample_tokens, token_logprob

# Why an episode ended.
END_ANSWER = "stop"  # the model ended its answer (a stop token) without a tool call
END_SUBMIT = "submit"  # the environment closed the episode (e.g. the `submit` tool)
END_LENGTH = "length"  # a token budget ran out (turn or episode)
END_TURNS = "turns"  # max_turns turns, the last one a tool call


@dataclasses.dataclass
class Reaction:
    """The environment's answer to one turn of one row.

    observation: the text appended after the model's turn (the tool's result, wrapped as the model's
      format expects), or None when the episode is over (`done`).
    done: the episode ends after this turn (the model submitted, or answered without a call).
    call: what was called, for the logs ({"name": ..., "arguments": ...}), or None.
    time_s: wall-clock seconds the tool took.
    """

    observation: str | None = None
    done: bool = False
    call: dict[str, Any] | None = None
    time_s: float = 0.0


class Environment(Protocol):
    """What answers a turn. `react` gets every paused row at once (row indices, the text the row wrote in
    this turn, and whether the turn ended with a stop token rather than a stop string) and must return one
    `Reaction` per row; it never raises for a bad call (errors are observations)."""

    def react(self, rows: Sequence[int], turn_texts: Sequence[str], ended: Sequence[bool]) -> list[Reaction]: ...


@dataclasses.dataclass
class Turn:
    """One turn of one row: the model's text and tokens, then what the environment made of it."""

    text: str
    num_tokens: int
    call: dict[str, Any] | None
    observation: str | None
    observation_tokens: int
    tool_s: float


@dataclasses.dataclass
class EpisodeOutput:
    """B = len(prompts) * n episodes, prompt-major.

    tokens[b]: the transcript after the prompt (model and observation tokens interleaved).
    mask[b]: 1 on tokens the model sampled, 0 on observation tokens (same length as tokens[b]).
    logprobs[b]: log p(token) at temperature 1 of each model token; 0 on observation tokens.
    turns[b]: the row's turns. end[b]: END_* why the episode ended.
    stats: `segments`, `prefill_tokens` (prompt tokens + every appended token, real ones), `append_tokens`,
      `decode_steps`, seconds `prefill_s`, `generate_s` (decode loops), `append_s`, `tool_s` (wall time of
      the environment's calls), `host_s` (the rest: decoding text, bookkeeping), `total_s`, and
      `cache_slots` (S).
    segments: per segment (turn t of every row still in its episode): `rows`, `decode_steps`,
      `append_tokens` and seconds `generate_s`, `tool_s`, `append_s`, `host_s` (the rest of the segment).
    """

    tokens: list[list[int]]
    mask: list[list[int]]
    logprobs: list[list[float]]
    turns: list[list[Turn]]
    end: list[str]
    stats: dict[str, float]
    segments: list[dict[str, float]] = dataclasses.field(default_factory=list)


# -- the compiled programs --------------------------------------------------------------------------------


class _Seg(NamedTuple):
    """What a decode segment accumulates per row (N = the bucket of max_turn_tokens)."""

    done_B: jax.Array
    stopped_B: jax.Array  # ended by a stop token or stop sequence
    lengths_B: jax.Array
    tokens_BN: jax.Array
    logprobs_BN: jax.Array
    tail_BK: jax.Array  # the last K tokens (for stop sequences), -2 before any


def _ends_with(tail_BK, seqs_MK):
    """bool [B]: the row's last tokens equal one of the stop sequences (right-aligned, -1 = unused)."""
    used_MK = seqs_MK >= 0
    match_BMK = (tail_BK[:, None, :] == seqs_MK[None]) | ~used_MK[None]
    return jnp.any(jnp.all(match_BMK, axis=-1) & jnp.any(used_MK, axis=-1)[None], axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "static", "out_len"), donate_argnames=("cache",))
def _decode_segment(graphdef, state, cache, logits_BV, pos_B, active_B, budget_B, stop_ids_K, stop_seqs_MK,
                    forced_BN, key, slot0, temperature, top_p, *, static: Static, out_len: int):
    """Decodes every active row until it stops or has `budget_B` tokens; returns (segment, cache, steps).

    Token j of a row (sampled at step j) is fed at step j + 1: written into slot slot0 + j at position
    pos_B + j, or at position -1 (never attended to) when the row stopped on it or was not generating. forced_BN >= 0 replaces the sampled token (scripted turns); its log-prob is the
    model's. `steps - 1` slots from slot0 on were written.
    """
    model = nnx.merge(graphdef, state)
    batch = pos_B.shape[0]
    sample = functools.partial(sample_tokens, temperature=temperature, top_p=top_p, static=static)

    def choose(step, logits_BV):
        token_B, logprob_B, _ = sample(jax.random.fold_in(key, step), logits_BV)
        forced_B = jax.lax.dynamic_index_in_dim(forced_BN, jnp.minimum(step, out_len - 1), 1, keepdims=False)
        token_B = jnp.where(forced_B >= 0, forced_B, token_B)
        return token_B, jnp.where(forced_B >= 0, token_logprob(logits_BV, token_B), logprob_B)

    def record(seg: _Seg, step, token_B, logprob_B) -> _Seg:
        live_B = ~seg.done_B
        tail_BK = jnp.where(live_B[:, None], jnp.concatenate([seg.tail_BK[:, 1:], token_B[:, None]], 1), seg.tail_BK)
        stop_B = live_B & (jnp.any(token_B[:, None] == stop_ids_K[None], -1) | _ends_with(tail_BK, stop_seqs_MK))
        lengths_B = seg.lengths_B + live_B
        write = lambda out_BN, x_B, fill: jax.lax.dynamic_update_slice(
            out_BN, jnp.where(live_B, x_B, fill).astype(out_BN.dtype)[:, None], (0, step))
        return _Seg(seg.done_B | stop_B | (lengths_B >= budget_B), seg.stopped_B | stop_B, lengths_B,
                    write(seg.tokens_BN, token_B, -1), write(seg.logprobs_BN, logprob_B, 0.0), tail_BK)

    seg = _Seg(~active_B, jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32),
               jnp.full((batch, out_len), -1, jnp.int32), jnp.zeros((batch, out_len), jnp.float32),
               jnp.full((batch, stop_seqs_MK.shape[1]), -2, jnp.int32))
    token_B, logprob_B = choose(0, logits_BV)
    seg = record(seg, 0, token_B, logprob_B)

    def cond(loop):
        step, _, _, seg = loop
        return (step < out_len) & ~jnp.all(seg.done_B)

    def body(loop):
        step, cache, token_B, seg = loop
        positions_B1 = jnp.where(seg.done_B, -1, pos_B + step - 1)[:, None]
        hidden_B1D, cache = model.cached_hidden_states(token_B[:, None], positions_B1, cache, slot0 + step - 1)
        token_B, logprob_B = choose(step, model.logits_from_hidden(hidden_B1D)[:, 0])
        return step + 1, cache, token_B, record(seg, step, token_B, logprob_B)

    steps, cache, _, seg = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, token_B, seg))
    return seg, cache, steps


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _append(graphdef, state, cache, tokens_BL, positions_BL, last_B, slot):
    """Writes each row's new tokens (right-padded, position -1 on padding) at slots [slot, slot + L) and
    returns (cache, logits_BV of each row's last new token). Only these L tokens are computed."""
    model = nnx.merge(graphdef, state)
    hidden_BLD, cache = model.cached_hidden_states(tokens_BL, positions_BL, cache, slot)
    last_B1D = hidden_BLD[jnp.arange(tokens_BL.shape[0]), last_B][:, None]
    return cache, model.logits_from_hidden(last_B1D)[:, 0]


@functools.partial(jax.jit, static_argnames=("slots",))
def _grow(cache, *, slots: int):
    """The cache with `slots` slots per row: the new ones empty (position -1)."""
    pad = lambda x, fill: jnp.pad(x, [(0, 0)] * 2 + [(0, slots - x.shape[2])] + [(0, 0)] * (x.ndim - 3),
                                  constant_values=fill)
    return KVCache(tuple(pad(k, 0) for k in cache.k), tuple(pad(v, 0) for v in cache.v),
                   jnp.pad(cache.positions_BS, ((0, 0), (0, slots - cache.positions_BS.shape[1])), constant_values=-1))


@functools.partial(jax.jit, donate_argnames=("cache",))
def _invalidate(cache, from_B):
    """Empties (position -1) each row's slots from from_B[b] on."""
    slots_S = jnp.arange(cache.positions_BS.shape[1])
    return cache._replace(positions_BS=jnp.where(slots_S[None] >= from_B[:, None], -1, cache.positions_BS))


# -- host orchestration -----------------------------------------------------------------------------------


def _first_stop_string_end(tokens: list[int], stop_strings, decode) -> int | None:
    """The fewest leading tokens whose text contains a stop string, or None."""
    if not stop_strings or not tokens or not any(s in decode(tokens) for s in stop_strings):
        return None
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if any(s in decode(tokens[:mid]) for s in stop_strings) else (mid + 1, hi)
    return lo


def _stop_sequences(stop_strings, encode) -> np.ndarray:
    """int32 [M, K]: each stop string's standalone token ids, right-aligned, -1 in front (M, K >= 1)."""
    seqs = [list(encode(s)) for s in stop_strings if s]
    seqs = [s for s in seqs if s]
    width = bucket(max([len(s) for s in seqs] + [1]), 4)
    out = np.full((max(1, len(seqs)), width), -1, np.int32)
    for m, s in enumerate(seqs):
        out[m, width - len(s):] = s[-width:]
    return out


def run_episodes(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    env: Environment,
    *,
    decode: Any,
    encode: Any,
    n: int = 1,
    max_turns: int,
    max_turn_tokens: int,
    max_obs_tokens: int,
    max_episode_tokens: int,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    forced: Sequence[Sequence[Sequence[int]]] | None = None,
    device_stop_strings: bool = True,
    min_bucket: int = 16,
) -> EpisodeOutput:
    """Runs len(prompts) * n episodes (rows prompt-major) of at most `max_turns` turns each.

    decode(ids) -> str and encode(str) -> ids (no special tokens) turn the model's turns into text and the
    observations into tokens. stop_token_ids end an answer (EOS); stop_strings end a tool call (the turn
    pauses for `env.react`). forced[b][t]: tokens that row b's turn t starts with (scripted turns, for
    tests and demonstrations), sampled on after; None = sample everything. device_stop_strings: the
    decode loop also stops at each stop string's standalone token ids (False: only the host finds them,
    after the loop, and empties the cache slots written after them). Raises ValueError for empty
    prompts or budgets < 1.
    """
    total_start = time.perf_counter()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("run_episodes: every prompt needs at least one token")
    for name, value in dict(n=n, max_turns=max_turns, max_turn_tokens=max_turn_tokens,
                            max_obs_tokens=max_obs_tokens, max_episode_tokens=max_episode_tokens).items():
        if value < 1:
            raise ValueError(f"run_episodes: {name} must be >= 1, got {value}")
    B = len(prompts) * n
    out_len = bucket(max_turn_tokens, min_bucket)
    prompt_bucket = bucket(max(map(len, prompts)), min_bucket)
    cache_len = bucket(prompt_bucket + out_len, min_bucket)  # grown (doubled) when a segment needs more
    static = Static(greedy=temperature == 0, plain=temperature == 1 and not top_k and top_p == 1,
                     top_k=int(top_k), use_top_p=top_p < 1, prompt_bucket=prompt_bucket, pad_id=0)
    graphdef, state = nnx.split(model)
    stats = dict(segments=0, prefill_tokens=float(sum(map(len, prompts))), append_tokens=0.0, decode_steps=0.0,
                 prefill_s=0.0, generate_s=0.0, append_s=0.0, tool_s=0.0, cache_slots=float(cache_len))

    start = time.perf_counter()
    tokens_PT = np.zeros((len(prompts), prompt_bucket), np.int32)
    positions_PT = np.full((len(prompts), prompt_bucket), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens_PT[i, : len(p)], positions_PT[i, : len(p)] = p, np.arange(len(p))
    prompt_len_P = np.array([len(p) for p in prompts], np.int32)
    cache, logits_BV = prefill(graphdef, state, tokens_PT, positions_PT, prompt_len_P,
                                np.arange(B, dtype=np.int32) // n, cache_len=cache_len, mesh=None)
    logits_BV.block_until_ready()
    stats["prefill_s"] = time.perf_counter() - start

    def ensure(cache, needed: int):
        """The cache, grown to the next power of two of slots when fewer than `needed` are there."""
        if needed <= cache.positions_BS.shape[1]:
            return cache
        stats["cache_slots"] = float(bucket(needed, min_bucket))
        return _grow(cache, slots=bucket(needed, min_bucket))

    stop_ids_K = np.full((bucket(max(1, len(stop_token_ids)), 4),), -1, np.int32)
    stop_ids_K[: len(stop_token_ids)] = list(stop_token_ids)
    stop_seqs_MK = _stop_sequences(stop_strings if device_stop_strings else (), encode)
    stop_set = set(int(t) for t in stop_token_ids)

    tokens: list[list[int]] = [[] for _ in range(B)]
    mask: list[list[int]] = [[] for _ in range(B)]
    logprobs: list[list[float]] = [[] for _ in range(B)]
    turns: list[list[Turn]] = [[] for _ in range(B)]
    end = [""] * B
    pos_B = prompt_len_P[np.arange(B) // n].astype(np.int32)  # the next position each row writes
    slot = prompt_bucket  # the next free slot (shared by every row)
    key = jax.random.key(seed)
    segments: list[dict[str, float]] = []
    for t in range(max_turns):
        live = [b for b in range(B) if not end[b]]
        if not live:
            break
        segment_start = time.perf_counter()
        segment = dict(rows=float(len(live)), decode_steps=0.0, append_tokens=0.0, generate_s=0.0, tool_s=0.0,
                       append_s=0.0)
        segments.append(segment)
        budget_B = np.zeros((B,), np.int32)
        forced_BN = np.full((B, out_len), -1, np.int32)
        for b in live:
            budget_B[b] = min(max_turn_tokens, max_episode_tokens - len(tokens[b]))
            if forced is not None and t < len(forced[b]):
                script = list(forced[b][t])[:out_len]
                forced_BN[b, : len(script)] = script
        start = time.perf_counter()
        cache = ensure(cache, slot + out_len)
        seg, cache, steps = _decode_segment(
            graphdef, state, cache, logits_BV, pos_B, budget_B > 0, np.maximum(budget_B, 1), stop_ids_K,
            stop_seqs_MK, forced_BN, jax.random.fold_in(key, t), jnp.int32(slot), jnp.float32(temperature or 1.0),
            jnp.float32(top_p), static=static, out_len=out_len)
        seg = jax.tree.map(np.asarray, seg)
        steps = int(steps)
        segment["generate_s"] = time.perf_counter() - start
        stats["generate_s"] += segment["generate_s"]
        stats["decode_steps"] += steps
        segment["decode_steps"] = float(steps)
        stats["segments"] += 1

        # Cut at stop strings, record the turn, and find what each row appends next.
        invalid_from_B = np.full((B,), cache.positions_BS.shape[1], np.int32)
        paused, texts, ended = [], [], []
        for b in live:
            length = int(seg.lengths_B[b])
            if length == 0:  # no budget left for this row
                end[b] = END_LENGTH
                continue
            turn_tokens = seg.tokens_BN[b, :length].tolist()
            cut = _first_stop_string_end(turn_tokens, stop_strings, decode)
            if cut is not None and cut < length:
                turn_tokens = turn_tokens[:cut]
                invalid_from_B[b] = slot + cut - 1  # token j sits at slot + j; the last kept one is pending
            stopped = bool(seg.stopped_B[b]) or cut is not None
            tokens[b] += turn_tokens
            mask[b] += [1] * len(turn_tokens)
            logprobs[b] += seg.logprobs_BN[b, : len(turn_tokens)].tolist()
            pos_B[b] += len(turn_tokens) - 1  # the last token is pending
            turns[b].append(Turn(decode(turn_tokens), len(turn_tokens), None, None, 0, 0.0))
            if not stopped:
                end[b] = END_LENGTH
                continue
            paused.append(b)
            texts.append(turns[b][-1].text)
            ended.append(turn_tokens[-1] in stop_set and cut is None)
        slot += steps - 1
        if (invalid_from_B < cache.positions_BS.shape[1]).any():
            cache = _invalidate(cache, invalid_from_B)

        start = time.perf_counter()
        reactions = env.react(paused, texts, ended) if paused else []
        segment["tool_s"] = time.perf_counter() - start
        stats["tool_s"] += segment["tool_s"]
        appends: dict[int, list[int]] = {}
        for b, reaction in zip(paused, reactions):
            turn = turns[b][-1]
            turn.call, turn.tool_s = reaction.call, reaction.time_s
            if reaction.done or reaction.observation is None:
                end[b] = END_SUBMIT if reaction.call is not None else END_ANSWER
                continue
            if t + 1 == max_turns:
                end[b] = END_TURNS
                continue
            obs = list(encode(reaction.observation))[:max_obs_tokens]
            turn.observation, turn.observation_tokens = decode(obs), len(obs)
            if len(tokens[b]) + len(obs) >= max_episode_tokens:
                end[b] = END_LENGTH  # no room left for the model to answer the observation
                continue
            appends[b] = [tokens[b][-1]] + obs
            tokens[b] += obs
            mask[b] += [0] * len(obs)
            logprobs[b] += [0.0] * len(obs)
        if not appends:
            segment["host_s"] = time.perf_counter() - segment_start - segment["generate_s"] - segment["tool_s"]
            continue
        start = time.perf_counter()
        width = bucket_length(max(map(len, appends.values())), 16)  # 16, 32, 48, 64, 96, 128, 192, ...
        cache = ensure(cache, slot + width)
        tokens_BL = np.zeros((B, width), np.int32)
        positions_BL = np.full((B, width), -1, np.int32)
        last_B = np.zeros((B,), np.int32)
        for b, new in appends.items():
            tokens_BL[b, : len(new)] = new
            positions_BL[b, : len(new)] = pos_B[b] + np.arange(len(new))
            last_B[b] = len(new) - 1
            pos_B[b] += len(new)
            stats["append_tokens"] += len(new)
            segment["append_tokens"] += len(new)
        cache, logits_BV = _append(graphdef, state, cache, tokens_BL, positions_BL, last_B, jnp.int32(slot))
        logits_BV.block_until_ready()
        slot += width
        segment["append_s"] = time.perf_counter() - start
        stats["append_s"] += segment["append_s"]
        segment["host_s"] = (time.perf_counter() - segment_start - segment["generate_s"] - segment["tool_s"]
                             - segment["append_s"])
    for b in range(B):
        end[b] = end[b] or END_TURNS
    stats["prefill_tokens"] += stats["append_tokens"]
    stats["total_s"] = time.perf_counter() - total_start
    stats["host_s"] = stats["total_s"] - sum(stats[k] for k in ("prefill_s", "generate_s", "append_s", "tool_s"))
    return EpisodeOutput(tokens, mask, logprobs, turns, end, stats, segments)
