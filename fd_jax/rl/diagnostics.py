"""Teacher-advantage diagnostics: does the teacher, given its context, know more than the student?

FD can only distil an advantage the teacher has. These numbers say, every step, whether it has one, from one
extra forward pass of student and teacher (no gradient), on the batch the step trains on and before the
step updates anything:

* on a *probe* — for each row with a verified-correct sibling, that correct completion scored after the
  row's teacher prompt and after the student prompt (`probe_batch`) — the teacher − student log-probability
  of the whole correct completion (`teacher/logp_gain_correct`, nats per completion, averaged over probe
  rows) and the share of probe rows where the teacher puts more mass on it (`teacher/better_frac`);
* on the distilled rows of the batch: the share of the divergence that sits on the first k completion
  tokens (`teacher/kl_first_k_share`: near 1 means FD mostly distils how an answer starts — a format clash
  between the two prompts — rather than its content), and the teacher's and student's mean entropy per
  token (`teacher/entropy`, `teacher/student_entropy`).

`make_diagnostics(graphdef, cfg)` gives a jitted `diagnose(state, batch, probe) -> metrics`; `batch` and
`probe` hold the arrays of `BATCH_FIELDS` (the probe's `distill_mask_B` marks its real rows; None: no probe
rows this step). Rows, not tokens, are the probe's unit, so one long completion does not dominate it.
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


def diagnostics(graphdef: nnx.GraphDef, params, teacher_params, batch: dict, probe: dict | None, cfg: StepConfig,
                first_k: int = FIRST_K) -> dict[str, jax.Array]:
    """The `teacher/*` scalars (see the module docstring); teacher_params None = the live student."""
    teacher_params = params if teacher_params is None else teacher_params
    s = token_stats(graphdef, params, teacher_params, batch, cfg)
    distill_BC = batch["completion_mask_BC"].astype(jnp.float32) * batch["distill_mask_B"][:, None]
    tokens = jnp.maximum(distill_BC.sum(), 1.0)
    first_BC = distill_BC * (jnp.arange(distill_BC.shape[1]) < first_k)[None, :]
    kl = jnp.sum(s["divergence"] * distill_BC)
    out = {
        "teacher/kl_first_k_share": jnp.where(kl > 0, jnp.sum(s["divergence"] * first_BC) / jnp.maximum(kl, 1e-30),
                                              0.0),
        "teacher/entropy": jnp.sum(s["teacher_entropy"] * distill_BC) / tokens,
        "teacher/student_entropy": jnp.sum(s["student_entropy"] * distill_BC) / tokens,
    }
    if probe is not None:
        p = token_stats(graphdef, params, teacher_params, probe, cfg)
        valid_B = probe["distill_mask_B"].astype(jnp.float32)
        rows = jnp.maximum(valid_B.sum(), 1.0)
        gain_B = jnp.sum(p["teacher_logp"] - p["student_logp"], axis=1)  # padding is 0 in both
        out["teacher/logp_gain_correct"] = jnp.sum(gain_B * valid_B) / rows
        out["teacher/better_frac"] = jnp.sum((gain_B > 0) * valid_B) / rows
        out["teacher/probe_rows"] = valid_B.sum()
    return out


def make_diagnostics(graphdef: nnx.GraphDef, cfg: StepConfig, *, first_k: int = FIRST_K
                     ) -> Callable[[object, dict, dict | None], dict[str, jax.Array]]:
    """A jitted `diagnose(state, batch, probe)` over a `TrainState` (read, never donated)."""

    @jax.jit
    def run(params, teacher_params, batch, probe):
        return diagnostics(graphdef, params, teacher_params, batch, probe, cfg, first_k)

    def diagnose(state, batch: dict, probe: dict | None) -> dict[str, jax.Array]:
        pick = lambda rows: None if rows is None else {k: jnp.asarray(rows[k]) for k in BATCH_FIELDS}  # noqa: E731
        return run(state.params, state.teacher, pick(batch), pick(probe))

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
