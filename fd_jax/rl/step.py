"""The one jitted update: teacher and student forward passes to final hidden states, the fused token-level
kernel, the FD and GRPO losses, gradients through the student only, AdamW, and the teacher update.

The step is a pure function of (TrainState, batch); the trainer owns everything else. Teacher kinds:

* `ema`: φ ← (1 − τ)·φ + τ·θ after every optimizer step, inside the same jitted call;
* `live`: φ = θ (no teacher parameters are stored); with `fuse_live_passes` student and teacher rows run as
  one forward pass over the concatenated batch;
* `base`: φ = θ₀, frozen.

The kernel (`kernel_passes`): `one` folds the loss into the kernel as per-token terms (the GRPO surrogate with
its aggregation weight, the importance-weighted divergence with its own), so the gradient is formed in the
statistics pass (`fd_jax.kernels.token_loss`); `two` takes per-token statistics from `fused_token_stats`
and forms the loss with `fd_jax.rl.losses`, whose backward recomputes the logits. Both give the same loss,
gradients and metrics; `auto` picks `one` unless the loss is GSPO's (sequence-level ratios) or the Pallas
engine runs (TPU).

Micro-batches (`micro_batches` > 1) are accumulated with `lax.scan`; each micro-batch's loss is weighted by
its share of the whole batch's normaliser (tokens, rows, ...), so k micro-batches give the update of one
batch up to float rounding.

On a mesh whose batch rows are split over devices, the kernels run under `shard_map` over those mesh axes
(`TokenAxes`, `data` and `fsdp`): each device loops over its own rows' tokens with the whole unembedding,
and the unembedding's gradient is summed over devices. Devices along the other axes (`tensor`) hold the same
rows and repeat their kernel. Left to XLA's partitioner, a kernel's loop over token chunks (a scan cannot be
split along its steps) would gather every token onto every device and repeat the whole computation there.
Micro-batches take every k-th row (`_split_micro`), so each stays spread over the devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fd_jax.rl import diagnostics, losses
from fd_jax.config.schema import (KERNEL_PASSES, PROMPT_PACKINGS, TEACHERS,  # noqa: F401  (re-exported)
                                  StepConfig)
from fd_jax.kernels import plan as kernel_plan
from fd_jax.kernels import token_kl, token_loss
from fd_jax.rl.batch import BATCH_FIELDS

# (mesh, axis names) over which the batch rows are split: the kernels then run on each device's rows
# (`_over_tokens`). None: they see all rows at once.
TokenAxes = tuple[jax.sharding.Mesh, tuple[str, ...]] | None



class TrainState(NamedTuple):
    """Everything an update reads and writes. `teacher` is None for a live teacher; `ref` (θ₀, for the
    GRPO KL penalty) is None unless beta > 0 and the teacher is not `base` (which is θ₀ itself)."""

    step: jax.Array
    params: nnx.State
    teacher: nnx.State | None
    ref: nnx.State | None
    opt_state: Any


def init_train_state(params: nnx.State, optimizer: optax.GradientTransformation, cfg: StepConfig) -> TrainState:
    copy = lambda s: jax.tree.map(jnp.copy, s)  # noqa: E731  (separate buffers: params get donated)
    teacher = None if cfg.teacher == "live" else copy(params)
    ref = copy(params) if cfg.beta > 0 and cfg.teacher != "base" else None
    return TrainState(jnp.zeros((), jnp.int32), params, teacher, ref, optimizer.init(params))


def _gather_BCD(hidden_BTD, index_BC):
    return jnp.take_along_axis(hidden_BTD, index_BC[:, :, None], axis=1)


def _pad_to(x_BT, length, value):
    return jnp.pad(x_BT, ((0, 0), (0, length - x_BT.shape[1])), constant_values=value)


PREFIX = "prefix/"  # batch keys of the shared-prompt layout (`shared_prompt_inputs`), added on the host
TEACHER_FIELDS = tuple(k for k in BATCH_FIELDS if k.startswith("teacher_"))  # read only by a teacher pass
# The full prompt + completion rows, which a shared-prompt layout replaces (`shared_prompt_inputs`).
SEQUENCE_FIELDS = tuple(k for k in BATCH_FIELDS if k.endswith(("_BS", "_BU")))
# The teacher-advantage probe (`fd_jax.rl.diagnostics.probe_batch`) riding on a step: its rows share the
# step's prompt prefixes, so its completions are packed into the step's layout (`with_probe`).
PROBE = "probe/"
PROBE_FIELDS = ("completion_tokens_BC", "completion_mask_BC", "distill_mask_B")


def _bucket_rows(n: int) -> int:
    """Distinct prompts padded to a power of two: few compiled shapes as their number varies by step."""
    return 1 << max(0, (n - 1).bit_length())


def _prefix_layout(tokens_BS, index_BC, mask_BC, *, multiple: int = 32, packing: str = "auto",
                   floor: dict | None = None, frame_fraction: float = StepConfig.packing_frame,
                   group_B=None) -> dict:
    """Host side (numpy) of one sequence family (student or teacher) for `_shared_prefix_hidden`.

    Row b's hidden states that predict its completion sit at positions index_BC[b] = prompt_len - 1 + c; the
    tokens before index_BC[b, 0] are its prompt minus the last token (the prefix). Rows whose prefixes are
    equal (the G samples of a problem) share one prefix row. The suffix tokens (the last prompt token and the
    completion but its last token, where mask_BC is 1) are packed into J rows of M tokens, each packed row
    attending to one prefix row's cache:

    * `rows`: J = B, M = C: one packed row per batch row (the batch's own layout);
    * `groups`: J = R, one packed row per prefix holding the suffixes of all its rows back to back (M = the
      most suffix tokens of a prefix, a power of two): the padding of short completions to C is not
      computed, but M follows the data;
    * `auto`: a frame whose shape the batch fixes, J = max(R, frame_fraction x B x C / M) rows of M = 2C
      tokens, each holding whole suffixes of one prefix (first fit, longest first); where they do not fit,
      `rows`. A run then compiles two programs at most (per prefix shape), and one when every batch fits.

    `group_B` (optional, -1 for none): rows whose prefixes begin alike (the G samples of a problem, whose
    teacher prompts differ only from the row's own attempt and feedback on). Each group's longest common
    prefix (its head) then runs once, and each distinct prefix only past it (its tail): `_head_layout`,
    taken where it computes fewer prompt tokens than whole prefixes do.

    `floor` (mutable, one per sequence family and train step) holds the largest prefix count and prefix
    length used so far (and `groups`' widest M, the heads' count and length, the tails' length): shapes never
    shrink below it, so the programs of a run are a short ladder of growing shapes, not every combination the
    data visit (each a new XLA compilation of the whole step). Once a run has split heads, it keeps them.

    Returns numpy arrays: tokens_RT / positions_RT: the R distinct prefixes (R a power of two, dummy rows all
    padding, position -1), or with heads their tails (positions from the head's length on); with heads,
    tokens_HT / positions_HT the H distinct heads and head_R the head of each prefix row; prefix_J: the
    prefix row of each packed row; tokens_JM / positions_JM: the packed suffix tokens (position -1:
    padding); row_JM / col_JM: the batch row and completion column of each (row -1: padding).
    """
    from fd_jax.rl.batch import bucket_length

    if packing not in PROMPT_PACKINGS:
        raise ValueError(f"packing {packing!r}: expected one of {PROMPT_PACKINGS}")
    tokens_BS, index_BC, mask_BC = map(np.asarray, (tokens_BS, index_BC, mask_BC))
    B, C = index_BC.shape
    prefix_len_B = index_BC[:, 0]
    real_BC = mask_BC > 0
    live_B = real_BC.any(1)  # a row without real tokens needs no prefix (its packed tokens are all padding)
    row_B = _prefix_ids(tokens_BS, prefix_len_B, live_B)
    first = {r: b for b, r in reversed(list(enumerate(row_B))) if r >= 0}
    prefixes = [tokens_BS[first[r], :prefix_len_B[first[r]]] for r in range(len(first))]
    floor = {} if floor is None else floor
    rows = max(_bucket_rows(max(1, len(first))), floor.get("rows", 0))
    floor["rows"] = rows
    out = None if group_B is None else _head_layout(
        prefixes, [int(group_B[first[r]]) for r in range(len(first))], rows, multiple, floor, tokens_BS.dtype)
    if out is None:
        longest = max((len(x) for x in prefixes), default=1)
        length = max(bucket_length(max(1, longest), multiple), floor.get("length", 0))
        floor["length"] = length
        out = {"tokens_RT": np.zeros((rows, length), tokens_BS.dtype),
               "positions_RT": np.full((rows, length), -1, np.int32)}
        for r, x in enumerate(prefixes):
            out["tokens_RT"][r, :len(x)], out["positions_RT"][r, :len(x)] = x, np.arange(len(x))
    members = None
    if packing == "groups":
        per_prefix = np.bincount(row_B[live_B], weights=real_BC[live_B].sum(1), minlength=rows)
        m = floor["m"] = max(_bucket_rows(max(1, int(per_prefix.max()))), floor.get("m", 0))
        members = [[(b, c) for b in np.flatnonzero(row_B == r) for c in np.flatnonzero(real_BC[b])]
                   for r in range(rows)]
        prefix_J = np.arange(rows, dtype=np.int32)
    elif packing == "auto":
        m, frames = 2 * C, max(rows, -(-int(frame_fraction * B * C) // (2 * C)))
        bins = _first_fit(row_B, real_BC.sum(1), m, frames) if frames * m < B * C else None
        if bins is not None:
            members = [[(b, c) for b in rows_ for c in np.flatnonzero(real_BC[b])] for _, rows_ in bins]
            prefix_J = np.array([r for r, _ in bins], np.int32)
    if members is None:  # `rows`, or `auto` where the frame does not hold the batch
        members = [[(b, c) for c in np.flatnonzero(real_BC[b])] for b in range(B)]
        prefix_J, m = np.maximum(row_B, 0), C  # a row without real tokens: any prefix, all padding
    tokens_JM = np.zeros((len(members), m), tokens_BS.dtype)
    positions_JM = np.full((len(members), m), -1, np.int32)
    row_JM = np.full((len(members), m), -1, np.int32)
    col_JM = np.zeros((len(members), m), np.int32)
    for j, tokens in enumerate(members):
        for k, (b, c) in enumerate(tokens):
            tokens_JM[j, k] = tokens_BS[b, index_BC[b, c]]
            positions_JM[j, k], row_JM[j, k], col_JM[j, k] = index_BC[b, c], b, c
    return {**out, "prefix_J": prefix_J, "tokens_JM": tokens_JM, "positions_JM": positions_JM, "row_JM": row_JM,
            "col_JM": col_JM}


def _prefix_ids(tokens_BS, prefix_len_B, live_B) -> np.ndarray:
    """[B] int32: the index of each live row's prefix (tokens_BS[b, :prefix_len_B[b]]) among the distinct
    ones in order of first appearance; -1 for the others."""
    ids: dict[bytes, int] = {}
    return np.array([ids.setdefault(tokens_BS[b, :prefix_len_B[b]].tobytes(), len(ids)) if live_B[b] else -1
                     for b in range(len(live_B))], np.int32)


def _head_layout(prefixes: list, groups: list[int], rows: int, multiple: int, floor: dict, dtype) -> dict | None:
    """The two-level prompts of `_prefix_layout`: each group's longest common prefix (head) once, each prefix
    as the tail past it. None where that computes no fewer prompt tokens than whole prefixes, counted at
    their padded shapes, and the run has not split heads yet. (The first batch that takes them compiles one
    more program of the step: a one-off cost that any saving repays over a run.)"""
    from fd_jax.rl.batch import bucket_length

    head_len_R = np.array([len(x) for x in prefixes], int)
    for g in set(groups):
        members = [r for r, h in enumerate(groups) if h == g]
        n = min(head_len_R[members])
        same = np.ones(n, bool)
        for r in members[1:]:
            same &= prefixes[r][:n] == prefixes[members[0]][:n]
        head_len_R[members] = n if same.all() else int(np.argmin(same))
    heads: dict[bytes, int] = {}
    head_R = [heads.setdefault(x[:n].tobytes(), len(heads)) for x, n in zip(prefixes, head_len_R)]
    n_heads = max(_bucket_rows(max(1, len(heads))), floor.get("heads", 0))
    head_len = max(bucket_length(max(1, max(head_len_R, default=1)), multiple), floor.get("head_length", 0))
    tail_len = max(bucket_length(max(1, max((len(x) - n for x, n in zip(prefixes, head_len_R)), default=1)),
                                 multiple), floor.get("tail_length", 0))
    whole = max(bucket_length(max(1, max((len(x) for x in prefixes), default=1)), multiple), floor.get("length", 0))
    if "tail_length" not in floor and n_heads * head_len + rows * tail_len >= rows * whole:
        return None
    floor.update(heads=n_heads, head_length=head_len, tail_length=tail_len)
    out = {"tokens_HT": np.zeros((n_heads, head_len), dtype),
           "positions_HT": np.full((n_heads, head_len), -1, np.int32), "head_R": np.zeros(rows, np.int32),
           "tokens_RT": np.zeros((rows, tail_len), dtype), "positions_RT": np.full((rows, tail_len), -1, np.int32)}
    for r, (x, n, h) in enumerate(zip(prefixes, head_len_R, head_R)):
        out["tokens_HT"][h, :n], out["positions_HT"][h, :n] = x[:n], np.arange(n)
        out["head_R"][r] = h
        out["tokens_RT"][r, :len(x) - n], out["positions_RT"][r, :len(x) - n] = x[n:], np.arange(n, len(x))
    return out


def _first_fit(row_B, tokens_B, width: int, frames: int) -> list[tuple[int, list[int]]] | None:
    """Whole batch rows into `frames` bins of `width` tokens, each bin one prefix's rows (first fit, longest
    first): [(prefix, rows)] padded with empty bins to `frames`, or None where they need more bins."""
    bins: list[tuple[int, list[int]]] = []
    for r in np.unique(row_B[row_B >= 0]):
        free: list[int] = []
        start = len(bins)
        for b in sorted(np.flatnonzero(row_B == r), key=lambda b: -tokens_B[b]):
            j = next((j for j, f in enumerate(free) if f >= tokens_B[b]), None)
            if j is None:
                bins.append((int(r), []))
                free.append(width)
                j = len(free) - 1
            bins[start + j][1].append(int(b))
            free[j] -= int(tokens_B[b])
        if len(bins) > frames:
            return None
    return bins + [(0, [])] * (frames - len(bins))


def shared_prompt_inputs(batch: dict, *, packing: str = "auto", floors: dict | None = None,
                         frame_fraction: float = StepConfig.packing_frame, teacher: bool = True,
                         heads: bool = StepConfig.prompt_heads) -> dict:
    """The extra batch arrays of `StepConfig.share_prompts` (numpy, host side), keyed `prefix/...`.

    `floors`: a dict the caller keeps across steps (`_prefix_layout`'s `floor`, per family); None: none.
    `teacher`: False for a step without a teacher pass (GRPO): the student's layout alone.
    `heads`: split the teacher's prompts of a problem's rows into their common head and each one's tail
    (`StepConfig.prompt_heads`).

    The teacher's layout holds only the rows that take the FD loss (`distill_mask_B`): every use of the
    teacher's states is weighted by it, so the others' (zeros) never count. This also bounds its number of
    distinct prompts: rows without a context (their teacher prompt is the student's) add none."""
    out = {}
    floors = {} if floors is None else floors
    mask_BC = np.asarray(batch["completion_mask_BC"])
    masks = {"student": mask_BC, "teacher": mask_BC * (np.asarray(batch["distill_mask_B"])[:, None] > 0)}
    families = {"student": ("student_tokens_BS", "student_index_BC")}
    if teacher:
        families["teacher"] = ("teacher_tokens_BU", "teacher_index_BC")
    # The teacher's prompts of a problem's rows (grouped by their student prompt) differ only from the
    # row's own context on (its attempt and the checker's feedback): their common head runs once.
    groups = {"teacher": _prefix_ids(np.asarray(batch["student_tokens_BS"]),
                                     np.asarray(batch["student_index_BC"])[:, 0], mask_BC.any(1))} if heads else {}
    for family, (tokens, index) in families.items():
        layout = _prefix_layout(batch[tokens], batch[index], masks[family], packing=packing,
                                floor=floors.setdefault(family, {}), frame_fraction=frame_fraction,
                                group_B=groups.get(family))
        out.update({f"{PREFIX}{family}/{k}": v for k, v in layout.items()})
    return out


def with_probe(batch: dict, probe: dict) -> tuple[dict, dict]:
    """Host side (numpy): the batch's rows followed by the probe's (its real rows only: the fillers' masks are
    zeroed), padded to common widths, for one shared-prompt layout over both (`shared_prompt_inputs`), plus
    the probe's `PROBE_FIELDS` under `probe/`. A probe row's prompts are its batch row's, so the probe adds
    no prefix: only its completion tokens are computed, against the caches the step builds anyway."""
    batch = {k: np.asarray(v) for k, v in batch.items()}
    probe = diagnostics.real_rows_only(probe)
    joint = dict(batch)
    for k, v in batch.items():
        if k in probe and v.ndim == 2:
            width = max(v.shape[1], probe[k].shape[1])
            joint[k] = np.concatenate([np.pad(x, ((0, 0), (0, width - x.shape[1]))) for x in (v, probe[k])])
        elif k in probe:
            joint[k] = np.concatenate([v, probe[k]])
    return joint, {f"{PROBE}{k}": probe[k] for k in PROBE_FIELDS}


def _layout_shape(mb) -> tuple[int, int]:
    """[rows, columns] of the hidden states a shared-prompt layout gives: the batch's, then a probe's."""
    b, c = mb["completion_tokens_BC"].shape
    if f"{PROBE}completion_tokens_BC" not in mb:
        return b, c
    bp, cp = mb[f"{PROBE}completion_tokens_BC"].shape
    return b + bp, max(c, cp)


def _split_probe(mb, h_XYD):
    """(the batch's rows [B, C, D], the probe's [Bp, Cp, D] or None) of `_layout_shape` hidden states."""
    b, c = mb["completion_tokens_BC"].shape
    if f"{PROBE}completion_tokens_BC" not in mb:
        return h_XYD, None
    cp = mb[f"{PROBE}completion_tokens_BC"].shape[1]
    return h_XYD[:b, :c], jax.lax.stop_gradient(h_XYD[b:, :cp])


def _shared_prefix_hidden(model, mb, family: str, shape_BC: tuple[int, int]):
    """[B, C, D] final hidden states at the positions that predict the completion (zeros where the layout's
    mask was 0: padding, and for the teacher the rows that take no FD loss), computed as: each distinct
    prompt prefix once (R rows) into a KV cache (with heads: each head once, its cache gathered to the R
    rows, then each prefix's tail against it), the cache gathered to the J packed rows, then only the
    packed suffix tokens against it (`_prefix_layout`), each attending to its prefix and to the earlier
    suffix tokens of its own batch row. Equal to `hidden_states` gathered at the index (up to float
    rounding); the G samples of a problem share their prompt's forward (and backward) pass, and with the
    packings `auto` and `groups` the padding of short completions is not computed."""
    get = lambda k: mb[f"{PREFIX}{family}/{k}"]  # noqa: E731
    take = lambda cache, rows: jax.tree.map(lambda x: jnp.take(x, rows, axis=0), cache)  # noqa: E731
    tokens_RT, row_JM, col_JM = get("tokens_RT"), get("row_JM"), get("col_JM")
    heads = f"{PREFIX}{family}/tokens_HT" in mb  # two levels: the heads, then each prefix's tail against its head
    h = get("tokens_HT").shape[1] if heads else 0
    t = h + tokens_RT.shape[1]
    cache = model.init_cache((get("tokens_HT") if heads else tokens_RT).shape[0], t + row_JM.shape[1])
    if heads:
        _, cache = model.cached_hidden_states(get("tokens_HT"), get("positions_HT"), cache, 0)
        cache = take(cache, get("head_R"))
    _, cache = model.cached_hidden_states(tokens_RT, get("positions_RT"), cache, h)
    cache = take(cache, get("prefix_J"))
    # Visible: the prefix (its real tokens) and the suffix tokens of the same batch row at earlier or equal
    # columns. Padding tokens (row -1) see the prefix and each other: they are dropped below.
    same_row = (row_JM[:, :, None] == row_JM[:, None, :]) & (col_JM[:, None, :] <= col_JM[:, :, None])
    prefix = jnp.broadcast_to((cache.positions_BS[:, None, :t] >= 0), (*row_JM.shape, t))
    mask_JMS = jnp.concatenate([prefix, same_row], axis=-1)
    hidden_JMD, _ = model.cached_hidden_states(get("tokens_JM"), get("positions_JM"), cache, t, mask_BTS=mask_JMS)
    b, c = shape_BC
    rows = jnp.where(row_JM >= 0, row_JM, b)  # padding: out of range, dropped
    return jnp.zeros((b, c, hidden_JMD.shape[-1]), hidden_JMD.dtype).at[rows, col_JM].set(hidden_JMD, mode="drop")


def _shares(mb, family: str) -> bool:
    return f"{PREFIX}{family}/row_JM" in mb


def _hidden_states(graphdef, params, teacher_params, mb, cfg: StepConfig):
    """(student h_BCD, teacher h_BCD, W, W_teacher, probe) at the positions that predict the completion
    tokens; probe: (student, teacher) hidden states of a probe riding on the step (`with_probe`), or None."""
    student = nnx.merge(graphdef, params)
    if cfg.teacher == "live" and cfg.fuse_live_passes:
        b = mb["student_tokens_BS"].shape[0]
        t = max(mb["student_tokens_BS"].shape[1], mb["teacher_tokens_BU"].shape[1])
        tokens = jnp.concatenate([_pad_to(mb["student_tokens_BS"], t, 0), _pad_to(mb["teacher_tokens_BU"], t, 0)])
        positions = jnp.concatenate(
            [_pad_to(mb["student_positions_BS"], t, -1), _pad_to(mb["teacher_positions_BU"], t, -1)]
        )
        hidden = student.hidden_states(tokens, positions)
        hs = _gather_BCD(hidden[:b], mb["student_index_BC"])
        ht = _gather_BCD(hidden[b:], mb["teacher_index_BC"])
        return hs, jax.lax.stop_gradient(ht), student.unembedding, jax.lax.stop_gradient(student.unembedding), None
    teacher = student if cfg.teacher == "live" else nnx.merge(graphdef, jax.lax.stop_gradient(teacher_params))
    hs, hs_probe, w_DV = _student_hidden(student, mb, probe=True)
    if _shares(mb, "teacher"):
        ht, ht_probe = _split_probe(mb, _shared_prefix_hidden(teacher, mb, "teacher", _layout_shape(mb)))
    else:
        ht, ht_probe = _gather_BCD(teacher.hidden_states(mb["teacher_tokens_BU"], mb["teacher_positions_BU"]),
                                   mb["teacher_index_BC"]), None
    probe = None if hs_probe is None or ht_probe is None else (hs_probe, jax.lax.stop_gradient(ht_probe))
    return hs, jax.lax.stop_gradient(ht), w_DV, jax.lax.stop_gradient(teacher.unembedding), probe


def _normalisers(mb, cfg: StepConfig):
    c = mb["completion_mask_BC"].shape[1]
    mask_BC = mb["completion_mask_BC"].astype(jnp.float32)
    distill_BC = mask_BC * mb["distill_mask_B"][:, None]
    length = cfg.max_completion_length or c
    return {
        "grpo": losses.normaliser(cfg.loss_type, mask_BC, max_completion_length=length),
        "fd": losses.normaliser(cfg.loss_agg, distill_BC, max_completion_length=length,
                                constant=cfg.loss_agg_constant),
    }


def _kernel_passes(cfg: StepConfig) -> str:
    """`one` (fused_token_loss: the gradient in the statistics pass) or `two` (fused_token_stats, whose
    backward recomputes the logits). One pass needs a loss that is a sum of per-token terms, which GSPO's
    sequence-level ratio is not; `auto` also keeps the Pallas engine (two passes) where it runs."""
    if cfg.kernel_passes != "auto":
        return cfg.kernel_passes
    if cfg.importance_sampling_level != "token":
        return "two"
    return "two" if kernel_plan.resolve_backend(cfg.kernel_backend, cfg.distill_mode) == "pallas" else "one"


def _token_objective(stats: token_kl.TokenStats, aux: dict, *, cfg: StepConfig) -> jax.Array:
    """The step's loss as per-token terms (elementwise; aux holds [N] arrays): the GRPO surrogate (+ k3
    KL) and the importance-weighted divergence, each times its aggregation weight."""
    w = cfg.distill_weight
    loss = jnp.zeros_like(stats.logprob)
    if w < 1:
        grpo = losses.clipped_surrogate(stats.logprob - aux["old_logp"], aux["advantage"], eps_low=cfg.eps_low,
                                        eps_high=cfg.eps_high)
        if cfg.beta > 0:
            grpo = grpo + cfg.beta * losses.k3_kl(stats.logprob, aux["ref_logp"])
        loss = loss + (1 - w) * aux["grpo_weight"] * grpo
    if w > 0:
        weight = losses.fd_importance_weight(stats.logprob, aux["old_logp"], is_clip=cfg.is_clip)
        loss = loss + w * aux["fd_weight"] * stats.divergence * weight
    return loss


def token_axes_of(batch: dict) -> TokenAxes:
    """The mesh axes that split the batch rows (from the completion tokens' sharding), or None when the
    rows sit whole on one device or are replicated."""
    sharding = getattr(batch["completion_tokens_BC"], "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding) or not sharding.spec or sharding.spec[0] is None:
        return None
    axes = sharding.spec[0] if isinstance(sharding.spec[0], tuple) else (sharding.spec[0],)
    return (sharding.mesh, tuple(axes)) if _shards(sharding.mesh, axes) > 1 else None


def _shards(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _over_tokens(fn, token_axes: TokenAxes, per_token: tuple, shared: tuple):
    """fn(*per_token, *shared) -> (sums, per-token outputs) on the tokens of a [B, C] grid (rows x
    completion positions), with the rows split over the devices of `token_axes` (`shard_map`) and the shared
    arguments (W) whole on each.

    per_token: [B, C, ...] arrays, pytrees of them or None; fn sees them flattened to [tokens, ...] and
    returns `sums` (a pytree of sums over tokens, added over devices) and per-token outputs ([tokens, ...],
    returned as [B, C, ...]). The shared arguments' gradients are summed over devices by shard_map's
    transpose. Without token axes fn runs on all rows at once; so it does, with a warning, when the devices
    do not divide B (every device then repeats the whole kernel).
    """
    rows, cols = per_token[0].shape[:2]

    def local(per_token, shared):
        sums, outputs = fn(*jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), per_token), *shared)
        return sums, jax.tree.map(lambda x: x.reshape(-1, cols, *x.shape[1:]), outputs)

    if token_axes is None:
        return local(per_token, shared)
    mesh, axes = token_axes
    if rows % _shards(mesh, axes):
        warnings.warn(f"a micro-batch of {rows} rows does not split over the {_shards(mesh, axes)} devices of mesh "
                      f"axes {axes}: every device computes the loss kernel of all rows. Make the rows per "
                      "micro-batch (rows per step / step.micro_batches) a multiple of mesh.data x mesh.fsdp.",
                      stacklevel=2)
        return local(per_token, shared)
    split, whole = jax.sharding.PartitionSpec(axes), jax.sharding.PartitionSpec()

    def on_device(per_token, shared):
        sums, outputs = local(per_token, shared)
        return jax.tree.map(lambda x: jax.lax.psum(x, axes), sums), outputs

    # check_vma=False: the kernels' loops carry per-device values started from constants.
    sharded = jax.shard_map(on_device, mesh=mesh, out_specs=(whole, split), check_vma=False,
                            in_specs=(jax.tree.map(lambda _: split, per_token), jax.tree.map(lambda _: whole, shared)))
    return sharded(per_token, shared)


def _reference_logprobs(graphdef, teacher_params, ref_params, mb, mask_BC, kernel, token_axes=None):
    """log π_ref of the completion tokens [B, C] (constant), for the k3 KL penalty."""
    ref = nnx.merge(graphdef, jax.lax.stop_gradient(teacher_params if ref_params is None else ref_params))
    h_ref, _ = _student_hidden(ref, mb)

    def logprobs(h_ND, ids_N, mask_N, w_DV):
        return (), token_kl.token_logprobs_and_entropy(h_ND, w_DV, ids_N, mask_N, **kernel)

    _, (ref_logp_BC, _) = _over_tokens(logprobs, token_axes, (h_ref, mb["completion_tokens_BC"], mask_BC),
                                       (ref.unembedding,))
    return jax.lax.stop_gradient(ref_logp_BC)


def _student_hidden(student, mb, *, probe: bool = False):
    """(h_BCD, W) of a model (the student, or the reference) on the student's rows; probe=True: (h_BCD,
    the rows of a probe riding on the step or None, W)."""
    h_probe = None
    if _shares(mb, "student"):
        h_BCD, h_probe = _split_probe(mb, _shared_prefix_hidden(student, mb, "student", _layout_shape(mb)))
    else:
        h_BCD = _gather_BCD(student.hidden_states(mb["student_tokens_BS"], mb["student_positions_BS"]),
                            mb["student_index_BC"])
    return (h_BCD, h_probe, student.unembedding) if probe else (h_BCD, student.unembedding)


def _teacher_entropy(ht_BCD, w_teacher_DV, mb, distill_BC, kernel, token_axes=None):
    """H(p_teacher) per completion token [B, C] (0 off the distilled tokens), a constant."""
    def entropy(h_ND, ids_N, mask_N, w_DV):
        return (), token_kl.token_logprobs_and_entropy(h_ND, w_DV, ids_N, mask_N, **kernel)

    _, (_, entropy_BC) = _over_tokens(entropy, token_axes, (ht_BCD, mb["completion_tokens_BC"], distill_BC),
                                      (w_teacher_DV,))
    return jax.lax.stop_gradient(entropy_BC)


def micro_batch_loss(params, teacher_params, ref_params, mb, totals, *, graphdef, cfg: StepConfig,
                     token_axes: TokenAxes = None, diagnostics_first_k: int | None = None):
    """The loss of one micro-batch, already scaled by its share of the whole batch, and its metrics as sums
    (weighted by tokens) and maxima, to be combined over micro-batches. token_axes: see `_over_tokens`.
    diagnostics_first_k: with a teacher, also the sums of the batch's teacher/* diagnostics
    (`diagnostics.teacher_sums`, under the key "teacher")."""
    b, c = mb["completion_tokens_BC"].shape
    mask_BC = mb["completion_mask_BC"].astype(jnp.float32)
    ids_BC = mb["completion_tokens_BC"]
    old_logp_BC = mb["old_logprobs_BC"].astype(jnp.float32)
    distill_BC = mask_BC * mb["distill_mask_B"][:, None]
    w = cfg.distill_weight
    kernel = dict(token_chunk=cfg.token_chunk, vocab_tile=cfg.vocab_tile, backend=cfg.kernel_backend)
    shares = _normalisers(mb, cfg)
    scale = {k: shares[k] / totals[k] for k in shares}
    ref_logp_BC = None
    if w < 1 and cfg.beta > 0:
        ref_logp_BC = _reference_logprobs(graphdef, teacher_params, ref_params, mb, mask_BC, kernel, token_axes)

    if w > 0:
        hs_BCD, ht_BCD, w_DV, w_teacher_DV, probe_h = _hidden_states(graphdef, params, teacher_params, mb, cfg)
    else:  # GRPO alone: no teacher pass at all
        (hs_BCD, w_DV), ht_BCD, w_teacher_DV = _student_hidden(nnx.merge(graphdef, params), mb), None, None
    divergence = dict(alpha=cfg.alpha, mode=cfg.distill_mode, top_k=cfg.top_k if cfg.distill_mode == "topk" else None,
                      add_tail=cfg.add_tail)

    one_pass_loss = None
    if _kernel_passes(cfg) == "one":
        length = cfg.max_completion_length or c
        aux = {"old_logp": old_logp_BC, "advantage": jnp.broadcast_to(mb["advantages_B"][:, None], (b, c)),
               "grpo_weight": losses.policy_aggregation_weights(cfg.loss_type, mask_BC,
                                                                max_completion_length=length) * scale["grpo"],
               "fd_weight": losses.fd_aggregation_weights(cfg.loss_agg, distill_BC,
                                                          normaliser=cfg.loss_agg_constant) * scale["fd"]}
        if ref_logp_BC is not None:
            aux["ref_logp"] = ref_logp_BC
        aux = {k: v.astype(jnp.float32) for k, v in aux.items()}
        objective = functools.partial(_token_objective, cfg=cfg)

        def one_pass(hs_ND, ht_ND, mask_N, ids_N, aux_N, w_DV, wt_DV):
            teacher = {} if ht_ND is None else dict(divergence, w_teacher=wt_DV)
            return token_loss.fused_token_loss(hs_ND, ht_ND, w_DV, mask_N, ids_N, objective, aux_N,
                                               token_chunk=cfg.loss_chunk, **teacher)

        one_pass_loss, stats = _over_tokens(one_pass, token_axes, (hs_BCD, ht_BCD, mask_BC, ids_BC, aux),
                                            (w_DV, w_teacher_DV))
    elif ht_BCD is not None:
        def two_pass(hs_ND, ht_ND, mask_N, ids_N, w_DV, wt_DV):
            return (), token_kl.fused_token_stats(hs_ND, ht_ND, w_DV, mask_N, ids_N, w_teacher=wt_DV, **divergence,
                                                  **kernel)

        _, stats = _over_tokens(two_pass, token_axes, (hs_BCD, ht_BCD, mask_BC, ids_BC), (w_DV, w_teacher_DV))
    else:
        def student_only(hs_ND, mask_N, ids_N, w_DV):
            return (), token_kl.token_logprobs_and_entropy(hs_ND, w_DV, ids_N, mask_N, **kernel)

        _, (logp_BC, entropy_BC) = _over_tokens(student_only, token_axes, (hs_BCD, mask_BC, ids_BC), (w_DV,))
        stats = token_kl.TokenStats(jnp.zeros_like(logp_BC), logp_BC, entropy_BC)
    logp_BC, entropy_BC, divergence_BC = stats.logprob, stats.entropy, stats.divergence

    # With one pass, the stats are constants here: the losses below give the metrics (and the same value).
    loss = jnp.zeros((), jnp.float32)
    sums = {"tokens": jnp.sum(mask_BC), "distill_tokens": jnp.sum(distill_BC),
            "entropy": jnp.sum(entropy_BC * mask_BC), "kl": jnp.sum(divergence_BC * distill_BC)}
    maxes = {"kl_max": jnp.max(jnp.where(distill_BC > 0, divergence_BC, 0.0))}
    if w < 1:
        grpo, grpo_metrics = losses.policy_loss_and_metrics(
            logp_BC, old_logp_BC, mb["advantages_B"], mask_BC, loss_type=cfg.loss_type, eps_low=cfg.eps_low,
            eps_high=cfg.eps_high, importance_sampling_level=cfg.importance_sampling_level,
            max_completion_length=cfg.max_completion_length or c, beta=cfg.beta, ref_logp_BT=ref_logp_BC)
        grpo = grpo * scale["grpo"]
        loss += (1 - w) * grpo
        sums["grpo_loss"] = jax.lax.stop_gradient(grpo)
        sums.update({f"grpo/{k}": v * sums["tokens"] for k, v in grpo_metrics.items() if not k.endswith("_max")})
        maxes.update({f"grpo/{k}": v for k, v in grpo_metrics.items() if k.endswith("_max")})
    if w > 0:
        fd, fd_metrics = losses.fd_loss_and_metrics(
            divergence_BC, logp_BC, old_logp_BC, distill_BC, is_clip=cfg.is_clip, loss_agg=cfg.loss_agg,
            normaliser=cfg.loss_agg_constant)
        fd = fd * scale["fd"]
        loss += w * fd
        sums["fd_loss"] = jax.lax.stop_gradient(fd)
        for k in ("fd/is_weight_mean", "fd/is_clip_frac"):
            sums[k] = fd_metrics[k] * sums["distill_tokens"]
        maxes["fd/is_weight_max"] = fd_metrics["fd/is_weight_max"]
        if diagnostics_first_k is not None:  # from this pass's statistics: no extra forward of either model
            teacher_entropy_BC = _teacher_entropy(ht_BCD, w_teacher_DV, mb, distill_BC, kernel, token_axes)
            sums["teacher"] = diagnostics.teacher_sums(divergence_BC, entropy_BC, teacher_entropy_BC, distill_BC,
                                                       diagnostics_first_k)
        if probe_h is not None:
            probe = {k: mb[f"{PROBE}{k}"] for k in PROBE_FIELDS}
            sums["probe"] = diagnostics.probe_sums(*probe_h, w_DV, w_teacher_DV, probe, kernel)
    return (loss if one_pass_loss is None else one_pass_loss), (sums, maxes)


def _uses_shared_prompts(cfg: StepConfig, token_axes: TokenAxes) -> bool:
    """share_prompts applies to one micro-batch with unsplit rows on one host (its prefix rows are not
    split by rows), and not to a live teacher's fused pass (one forward over student and teacher rows)."""
    fused_live = cfg.teacher == "live" and cfg.fuse_live_passes and cfg.distill_weight > 0
    return (cfg.share_prompts and cfg.micro_batches == 1 and token_axes is None and not fused_live
            and jax.process_count() == 1)  # the layout is built from the whole batch on the host


def _split_micro(batch, k):
    """[B, ...] -> [k, B / k, ...], micro-batch j taking rows j, j + k, ...: rows split in contiguous blocks
    over devices leave every micro-batch spread over all of them."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(
    graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, cfg: StepConfig,
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None, *, diagnostics_first_k: int | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """A jitted `step(state, batch) -> (state, metrics)`; `batch` holds the arrays named in BATCH_FIELDS.

    The state is donated: its buffers are reused for the new state. diagnostics_first_k: an FD step also
    returns the batch's teacher/* diagnostics (`fd_jax.rl.diagnostics`, with this k), taken from its own
    statistics before the update.
    """
    if cfg.distill_weight == 0:
        diagnostics_first_k = None  # no teacher to diagnose

    def step(state: TrainState, batch: dict, token_axes: TokenAxes = None):
        loss_fn = functools.partial(micro_batch_loss, graphdef=graphdef, cfg=cfg, token_axes=token_axes,
                                    diagnostics_first_k=diagnostics_first_k)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        batch = {k: jnp.asarray(batch[k]) for k in BATCH_FIELDS + tuple(k for k in batch if k.startswith((PREFIX, PROBE)))
                 if k in batch}
        b = batch["completion_tokens_BC"].shape[0]
        if b % cfg.micro_batches:
            raise ValueError(f"batch rows {b} are not divisible by step.micro_batches={cfg.micro_batches}")
        totals = jax.tree.map(lambda x: jnp.maximum(x, 1e-9), _normalisers(batch, cfg))

        def accumulate(carry, mb):
            grads, sums, maxes = carry
            (_, (mb_sums, mb_maxes)), mb_grads = grad_fn(state.params, state.teacher, state.ref, mb, totals)
            return (jax.tree.map(jnp.add, grads, mb_grads), jax.tree.map(jnp.add, sums, mb_sums),
                    jax.tree.map(jnp.maximum, maxes, mb_maxes)), None

        micro = _split_micro(batch, cfg.micro_batches)
        first = jax.tree.map(lambda x: x[0], micro)
        _, (sums0, maxes0) = jax.eval_shape(loss_fn, state.params, state.teacher, state.ref, first, totals)
        init = (
            jax.tree.map(jnp.zeros_like, state.params),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums0),
            jax.tree.map(lambda s: jnp.full(s.shape, -jnp.inf, s.dtype), maxes0),
        )
        (grads, sums, maxes), _ = jax.lax.scan(accumulate, init, micro)

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        teacher = state.teacher
        if cfg.teacher == "ema":
            tau = cfg.ema_tau
            teacher = jax.tree.map(lambda phi, theta: ((1 - tau) * phi + tau * theta).astype(phi.dtype),
                                   teacher, params)
        teacher_sums, probe_sums = sums.pop("teacher", None), sums.pop("probe", None)
        tokens = jnp.maximum(sums.pop("tokens"), 1.0)
        distill_tokens = jnp.maximum(sums.pop("distill_tokens"), 1.0)
        metrics = {
            "loss": (1 - cfg.distill_weight) * sums.get("grpo_loss", 0.0) + cfg.distill_weight * sums.get("fd_loss", 0.0),
            "entropy": sums.pop("entropy") / tokens,
            "kl_mean": sums.pop("kl") / distill_tokens,
            "grad_norm": optax.global_norm(grads),
            "completion_tokens": tokens,
            "distill_tokens": distill_tokens,
            **maxes,
        }
        for key, value in sums.items():
            if key.startswith("grpo/"):
                metrics[key] = value / tokens
            elif key.startswith("fd/"):
                metrics[key] = value / distill_tokens
            else:
                metrics[key] = value
        if teacher_sums is not None:
            metrics.update(diagnostics.teacher_metrics(teacher_sums))
        if probe_sums is not None:
            metrics.update(diagnostics.probe_metrics(probe_sums))
        if learning_rate_fn is not None:
            metrics["learning_rate"] = learning_rate_fn(state.step)
        return TrainState(state.step + 1, params, teacher, state.ref, opt_state), metrics

    compiled: dict = {}
    floors: dict = {}  # share_prompts: the shared-prompt layout's shapes never shrink within this step's run

    def run(state: TrainState, batch: dict, probe: dict | None = None) -> tuple[TrainState, dict]:
        """probe: the rows of `diagnostics.probe_batch` (BATCH_FIELDS), scored in this step before its update
        (`teacher/logp_gain_correct` and co. in the metrics) where `takes_probe(batch)`; else ignored."""
        # The new state keeps the shardings of the old one. Left to propagation, XLA may pick other layouts
        # for some outputs (e.g. split 1-D norm scales), which recompiles the next step and defeats donation.
        # Only mesh placements are pinned; single-device (possibly uncommitted) leaves stay free.
        shardings = jax.tree.map(
            lambda x: x.sharding if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding) else None,
            state)
        token_axes = token_axes_of(batch)
        distills = cfg.distill_weight > 0
        if not distills:  # GRPO never reads the teacher's arrays; passed in, their shapes would recompile it
            batch = {k: v for k, v in batch.items() if not k.startswith(TEACHER_FIELDS)}
        if _uses_shared_prompts(cfg, token_axes):
            rows, probe_fields = jax.device_get(batch), {}
            if probe is not None and distills:
                rows, probe_fields = with_probe(rows, jax.device_get(probe))
            layout = shared_prompt_inputs(rows, packing=cfg.prompt_packing, floors=floors,
                                          frame_fraction=cfg.packing_frame, teacher=distills,
                                          heads=cfg.prompt_heads)
            layout.update(probe_fields)
            # The layout replaces the full rows: passed in as well, their widths (which follow the prompts, a
            # teacher's checker feedback above all) would compile a new program for arrays never read.
            batch = {**{k: batch[k] for k in BATCH_FIELDS if k in batch and k not in SEQUENCE_FIELDS}, **layout}
        key = (jax.tree.structure(state), tuple(jax.tree.leaves(shardings)), token_axes)
        if key not in compiled:
            compiled[key] = jax.jit(functools.partial(step, token_axes=token_axes), donate_argnums=0,
                                    out_shardings=(shardings, None))
        return compiled[key](state, batch)

    def takes_probe(batch: dict) -> bool:
        """Whether `run(state, batch, probe)` scores the probe (an FD step sharing prompts): else the caller
        scores it apart (`diagnostics.make_diagnostics`)."""
        return cfg.distill_weight > 0 and _uses_shared_prompts(cfg, token_axes_of(batch))

    run.takes_probe = takes_probe
    return run
