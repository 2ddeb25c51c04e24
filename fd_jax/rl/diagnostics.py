"""Teacher-advantage diagnostics: does the teacher, given its context, know more than the student?

FD can only distil an advantage the teacher has. These numbers say, every step, whether it has one, on the
batch the step trains on and before the step updates anything:

* on a *probe* — for each row with a verified-correct sibling, that correct completion scored after the
  row's teacher prompt and after the student prompt (`probe_batch`) — the teacher − student log-probability
  of the whole correct completion (`teacher/logp_gain_correct`, nats per completion, averaged over probe
  rows) and the share of probe rows where the teacher puts more mass on it (`teacher/better_frac`);
* on the distilled rows of the batch: the share of the divergence that sits on the first k completion
  tokens (`teacher/kl_first_k_share`: near 1 means FD mostly distils how an answer starts — a format clash
  between the two prompts — rather than its content), and the teacher's and student's mean entropy per
  token (`teacher/entropy`, `teacher/student_entropy`).

The batch's metrics cost almost nothing in training: the train step forms them from its own per-token
statistics (`make_train_step(..., diagnostics_first_k=k)`; `teacher_sums` / `teacher_metrics`), adding one
teacher-only vocabulary pass for the teacher's entropy and no forward pass of either model. The probe's
rows have the batch rows' prompts, so where the step shares prompts the probe rides on it
(`run(state, batch, probe)` of `make_train_step`, `step.with_probe`): its completions are packed into the
step's layout against the prefix caches the step builds anyway. Elsewhere it takes one forward pass of each
model on its rows (no gradient) and one vocabulary pass each: `make_diagnostics(graphdef, cfg)` gives a
jitted `diagnose(state, batch, probe) -> metrics`, where the trainer passes batch=None. `diagnostics(...)` with a
batch computes the batch's metrics too, plainly (full rows, the statistics kernel), which the tests hold
the step's against. `batch` and `probe` hold the arrays of `BATCH_FIELDS` (the probe's `distill_mask_B`
marks its real rows; None: no probe rows this step). Rows, not tokens, are the probe's unit, so one long
completion does not dominate it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fd_jax.config.schema import StepConfig
from fd_jax.kernels import token_kl
from fd_jax.rl.batch import BATCH_FIELDS, TrainBatch, pack_train_batch

FIRST_K = 3  # the measurement: 48-66% of each sequence's KL sat on the first three tokens


def _gather_BCD(hidden_BTD, index_BC):
    return jnp.take_along_axis(hidden_BTD, index_BC[:, :, None], axis=1)


def token_stats(graphdef: nnx.GraphDef, params, teacher_params, rows: dict, cfg: StepConfig) -> dict[str, jax.Array]:
    """Per completion token [B, C] (0 on padding): student and teacher log-probs of the completion token,
    their entropies, and the step's divergence (alpha, support of `cfg`) between them."""
    student, teacher = nnx.merge(graphdef, params), nnx.merge(graphdef, teacher_params)
    hs = _gather_BCD(student.hidden_states(rows["student_tokens_BS"], rows["student_positions_BS"]),
                     rows["student_index_BC"])
    ht = _gather_BCD(teacher.hidden_states(rows["teacher_tokens_BU"], rows["teacher_positions_BU"]),
                     rows["teacher_index_BC"])
    b, c, d = hs.shape
    mask_N = rows["completion_mask_BC"].reshape(-1).astype(jnp.float32)
    ids_N = rows["completion_tokens_BC"].reshape(-1)
    kernel = dict(token_chunk=cfg.token_chunk, vocab_tile=cfg.vocab_tile, backend=cfg.kernel_backend)
    stats = token_kl.fused_token_stats(
        hs.reshape(-1, d), ht.reshape(-1, d), student.unembedding, mask_N, ids_N, w_teacher=teacher.unembedding,
        alpha=cfg.alpha, mode=cfg.distill_mode, top_k=cfg.top_k if cfg.distill_mode == "topk" else None,
        add_tail=cfg.add_tail, **kernel)
    t_logp, t_ent = token_kl.token_logprobs_and_entropy(ht.reshape(-1, d), teacher.unembedding, ids_N, mask_N,
                                                        **kernel)
    out = {"student_logp": stats.logprob, "student_entropy": stats.entropy, "divergence": stats.divergence,
           "teacher_logp": t_logp, "teacher_entropy": t_ent}
    return {k: v.reshape(b, c) for k, v in out.items()}


def teacher_sums(divergence_BC, student_entropy_BC, teacher_entropy_BC, distill_BC,
                 first_k: int = FIRST_K) -> dict[str, jax.Array]:
    """The sums over the distilled tokens behind the batch's teacher/* metrics (they add over micro-batches);
    `teacher_metrics` turns them into the metrics."""
    first_BC = distill_BC * (jnp.arange(distill_BC.shape[1]) < first_k)[None, :]
    return {"kl": jnp.sum(divergence_BC * distill_BC), "kl_first_k": jnp.sum(divergence_BC * first_BC),
            "entropy": jnp.sum(teacher_entropy_BC * distill_BC),
            "student_entropy": jnp.sum(student_entropy_BC * distill_BC), "tokens": jnp.sum(distill_BC)}


def teacher_metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """`teacher/kl_first_k_share`, `teacher/entropy` and `teacher/student_entropy` from `teacher_sums`."""
    tokens = jnp.maximum(sums["tokens"], 1.0)
    kl = sums["kl"]
    return {"teacher/kl_first_k_share": jnp.where(kl > 0, sums["kl_first_k"] / jnp.maximum(kl, 1e-30), 0.0),
            "teacher/entropy": sums["entropy"] / tokens, "teacher/student_entropy": sums["student_entropy"] / tokens}


def probe_sums(student_h_BCD, teacher_h_BCD, w_DV, w_teacher_DV, probe: dict, kernel: dict) -> dict[str, jax.Array]:
    """The sums behind the probe's teacher/* metrics, from both models' hidden states at its completion
    positions: teacher − student log-probability of each real row's completion (one vocabulary pass each;
    log-probs need no divergence). `probe_metrics` turns them into the metrics."""
    ids_BC = probe["completion_tokens_BC"]
    b, c = ids_BC.shape
    valid_B = probe["distill_mask_B"].astype(jnp.float32)
    mask_N = (probe["completion_mask_BC"] * valid_B[:, None]).reshape(-1).astype(jnp.float32)
    s_logp, t_logp = (token_kl.token_logprobs_and_entropy(h.reshape(b * c, -1), jax.lax.stop_gradient(w),
                                                          ids_BC.reshape(-1), mask_N, **kernel)[0].reshape(b, c)
                      for h, w in ((student_h_BCD, w_DV), (teacher_h_BCD, w_teacher_DV)))
    gain_B = jnp.sum(t_logp - s_logp, axis=1)  # padding is 0 in both
    return {"gain": jnp.sum(gain_B * valid_B), "better": jnp.sum((gain_B > 0) * valid_B), "rows": jnp.sum(valid_B)}


def probe_metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """`teacher/logp_gain_correct`, `teacher/better_frac` and `teacher/probe_rows` from `probe_sums`."""
    rows = jnp.maximum(sums["rows"], 1.0)
    return {"teacher/logp_gain_correct": sums["gain"] / rows, "teacher/better_frac": sums["better"] / rows,
            "teacher/probe_rows": sums["rows"]}


def real_rows_only(probe: dict) -> dict:
    """Host side (numpy): the probe with its filler rows' completion masks zeroed, so that a shared-prompt
    layout computes none of their tokens (`probe_batch` repeats its first row up to B)."""
    probe = {k: np.asarray(v) for k, v in probe.items()}
    probe["completion_mask_BC"] = probe["completion_mask_BC"] * (probe["distill_mask_B"][:, None] > 0)
    return probe


def _probe_hidden(graphdef: nnx.GraphDef, params, teacher_params, probe: dict):
    """(student, teacher) hidden states [B, C, D] at the probe's completion positions: one forward pass of
    each model, through the step's shared-prompt layout where the probe carries one."""
    from fd_jax.rl import step as train_step  # the step imports this module for `teacher_sums`

    student, teacher = nnx.merge(graphdef, params), nnx.merge(graphdef, teacher_params)
    hs_BCD, _ = train_step._student_hidden(student, probe)
    if train_step._shares(probe, "teacher"):
        ht_BCD = train_step._shared_prefix_hidden(teacher, probe, "teacher", probe["completion_tokens_BC"].shape)
    else:
        ht_BCD = _gather_BCD(teacher.hidden_states(probe["teacher_tokens_BU"], probe["teacher_positions_BU"]),
                             probe["teacher_index_BC"])
    return hs_BCD, ht_BCD, student.unembedding, teacher.unembedding


def diagnostics(graphdef: nnx.GraphDef, params, teacher_params, batch: dict | None, probe: dict | None,
                cfg: StepConfig, first_k: int = FIRST_K) -> dict[str, jax.Array]:
    """The `teacher/*` scalars (see the module docstring); teacher_params None = the live student. batch
    None: the probe's alone (the train step gives the batch's)."""
    teacher_params = params if teacher_params is None else teacher_params
    out = {}
    if batch is not None:
        s = token_stats(graphdef, params, teacher_params, batch, cfg)
        distill_BC = batch["completion_mask_BC"].astype(jnp.float32) * batch["distill_mask_B"][:, None]
        out.update(teacher_metrics(teacher_sums(s["divergence"], s["student_entropy"], s["teacher_entropy"],
                                                distill_BC, first_k)))
    if probe is not None:
        kernel = dict(token_chunk=cfg.token_chunk, vocab_tile=cfg.vocab_tile, backend=cfg.kernel_backend)
        out.update(probe_metrics(probe_sums(*_probe_hidden(graphdef, params, teacher_params, probe), probe, kernel)))
    return out


def make_diagnostics(graphdef: nnx.GraphDef, cfg: StepConfig, *, first_k: int = FIRST_K
                     ) -> Callable[[object, dict | None, dict | None], dict[str, jax.Array]]:
    """A jitted `diagnose(state, batch, probe)` over a `TrainState` (read, never donated). Where the train
    step shares prompts (`StepConfig.share_prompts`), so does the probe's forward pass: its layout is built
    here on the host, with shapes that only grow over the run (as the step's)."""
    from fd_jax.rl import step as train_step  # the step imports this module for `teacher_sums`

    floors: dict = {}

    @jax.jit
    def run(params, teacher_params, batch, probe):
        return diagnostics(graphdef, params, teacher_params, batch, probe, cfg, first_k)

    def with_layout(probe: dict) -> dict:
        probe = real_rows_only(probe)
        layout = train_step.shared_prompt_inputs(probe, packing=cfg.prompt_packing, floors=floors,
                                                 frame_fraction=cfg.packing_frame, heads=cfg.prompt_heads)
        return {**{k: v for k, v in probe.items() if k not in train_step.SEQUENCE_FIELDS}, **layout}

    def diagnose(state, batch: dict | None, probe: dict | None) -> dict[str, jax.Array]:
        pick = lambda rows: None if rows is None else {k: rows[k] for k in BATCH_FIELDS}  # noqa: E731
        probe = pick(probe)
        if probe is not None and cfg.share_prompts:  # the probe is one batch on one host, never split
            probe = with_layout(jax.device_get(probe))
        if batch is None and probe is None:
            return {}
        as_arrays = lambda rows: None if rows is None else jax.tree.map(jnp.asarray, rows)  # noqa: E731
        return run(state.params, state.teacher, as_arrays(pick(batch)), as_arrays(probe))

    return diagnose


def probe_batch(
    *,
    student_prompts: Sequence[Sequence[int]],
    teacher_prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float]],
    correct_B: np.ndarray,
    distill_B: np.ndarray,
    group: int,
    pad_id: int,
    pad_multiple: int,
) -> TrainBatch | None:
    """The probe of a rollout batch (rows b = p * group + g): for every distilled row b whose group holds a
    verified-correct row j != b (the first one), the completion of j after b's teacher prompt and after the
    student prompt. Padded to B rows by repeating its first row, with `distill_mask_B` 1 on the real rows
    only (one shape per batch size, so no recompilation from step to step). None without such rows."""
    B = len(completions)
    picks = []
    for b in range(B):
        p = b // group
        solved = [j for j in range(p * group, p * group + group) if correct_B[j] and j != b]
        if distill_B[b] and solved:
            picks.append((b, solved[0]))
    if not picks:
        return None
    filler = [picks[0]] * (B - len(picks))
    rows = picks + filler
    return pack_train_batch(
        student_prompts=[student_prompts[b] for b, _ in rows],
        teacher_prompts=[teacher_prompts[b] for b, _ in rows],
        completions=[completions[j] for _, j in rows],
        old_logprobs=[logprobs[j] for _, j in rows],
        rewards_B=np.ones(B, np.float32),
        advantages_B=np.zeros(B, np.float32),
        distill_mask_B=np.array([1.0] * len(picks) + [0.0] * len(filler), np.float32),
        pad_id=pad_id,
        pad_multiple=pad_multiple,
    )
