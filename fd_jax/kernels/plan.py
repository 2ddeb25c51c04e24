"""The kernels' internal planning, shared by `token_kl` (statistics and their custom_vjp) and `token_loss`
(a per-token loss with its gradient in the same pass): what a call asks for (`Settings`), how each support
(`mode`) turns the engines' per-token statistics into the divergence and its logit gradient, which engine
runs it (`resolve_backend`: XLA or Pallas), and the checks of the inputs. Not a public API: callers use
`fd_jax.kernels.token_kl` and `fd_jax.kernels.token_loss`; the train step asks `resolve_backend` which
engine a mode gets.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fd_jax.kernels import token_kl_pallas, token_kl_xla
from fd_jax.kernels.divergences import categorical_divergence, get_divergence
from fd_jax.kernels.tiles import KernelPlan

Array = jax.Array

TAIL_FLOOR = 1e-30  # the smallest tail mass of the top-k support, so that its log stays finite


class TokenStats(NamedTuple):
    """Per-token outputs of one kernel pass, each [N] f32, zero where mask = 0."""

    divergence: Array  # D_alpha(student || teacher) on the chosen support (nats)
    logprob: Array  # log p_S(sampled_ids) (nats)
    entropy: Array  # entropy of the student's full-vocabulary distribution (nats)


@dataclasses.dataclass(frozen=True)
class Settings:
    """One kernel call's static settings (hashable: they select the compiled program)."""

    alpha: float
    mode: str
    top_k: int | None
    add_tail: bool
    token_chunk: int
    vocab_tile: int
    backend: str


# ---------------------------------------------------------------------------------------------------------
# Supports (`mode`): what each asks of the engines, and how it turns their per-token statistics into the
# divergence and into the coefficients of its gradient w.r.t. the student logits.
# ---------------------------------------------------------------------------------------------------------


class _Support:
    pallas_ok = True  # whether the Pallas engine can run it

    def plan(self, st: Settings) -> KernelPlan:
        """What the engine passes compute."""
        return KernelPlan(token_chunk=st.token_chunk, vocab_tile=st.vocab_tile, has_teacher=True)

    def value(self, st: Settings, out: dict, logit_s_N: Array, logit_t_N: Array | None):
        """(divergence_N, residuals for `grad`) from the engine's statistics and the realised logits."""
        raise NotImplementedError

    def grad(self, st: Settings, res: dict, c_div_N: Array):
        """The divergence's gradient w.r.t. the student logits, for cotangent c_div, as three parts:
        a_N (adds c · p to every logit), at_id_N (adds to the realised token's logit), and sparse
        (cols_NK, coef_NK) entries or None. The `full` support adds its dense term through the plan's
        `grad_div` instead."""
        return 0.0, 0.0, None


class _Full(_Support):
    def plan(self, st):
        div = get_divergence(st.alpha)
        return KernelPlan(token_chunk=st.token_chunk, vocab_tile=st.vocab_tile, has_teacher=True,
                          sums=(div.online_sum,) if div.online_sum else (),
                          pass2=div if div.needs_pass2 else None, grad_div=div)

    def value(self, st, out, logit_s_N, logit_t_N):
        div = get_divergence(st.alpha).value(out)
        return div, {"div": div, "lse_t": out["lse_t"], **({"kl_pm": out["kl_pm"]} if "kl_pm" in out else {})}


class _TopK(_Support):
    pallas_ok = False

    def plan(self, st):
        return KernelPlan(token_chunk=st.token_chunk, vocab_tile=st.vocab_tile, has_teacher=True,
                          top_k=st.top_k)

    def value(self, st, out, logit_s_N, logit_t_N):
        logp_NK = out["top_s"] - out["lse_s"][:, None]
        logq_NK = out["top_t"] - out["lse_t"][:, None]
        if st.add_tail:
            cats_NK = jnp.concatenate([logp_NK, log_tail(logp_NK)], axis=1)
            logq_NK = jnp.concatenate([logq_NK, log_tail(logq_NK)], axis=1)
        else:
            cats_NK, logq_NK = logp_NK, jax.nn.log_softmax(logq_NK, axis=1)

        def div_of(logits_NK):  # as a function of the category logits, so that vjp gives d D / d logit
            return categorical_divergence(jax.nn.log_softmax(logits_NK, axis=1), logq_NK, alpha=st.alpha)

        # d D / d (category logit) is exact for a support token; the tail's logit is the log-sum-exp of the
        # logits outside the support, so an outside token j gets ghat_tail · p_j / P_tail.
        div, vjp = jax.vjp(div_of, cats_NK)
        (ghat_NK,) = vjp(jnp.ones_like(div))
        k = logp_NK.shape[1]
        tail_unit = ghat_NK[:, k] / jnp.exp(cats_NK[:, k]) if st.add_tail else jnp.zeros_like(div)
        # The dense part c · tail_unit · p also lands on the support tokens; take it back there.
        support_unit = ghat_NK[:, :k] - jnp.exp(logp_NK) * tail_unit[:, None]
        return div, {"top_i": out["top_i"], "tail_unit": tail_unit, "support_unit": support_unit}

    def grad(self, st, res, c_div_N):
        return c_div_N * res["tail_unit"], 0.0, (res["top_i"], c_div_N[:, None] * res["support_unit"])


class _SampledToken(_Support):
    def value(self, st, out, logit_s_N, logit_t_N):
        est = (logit_s_N - out["lse_s"]) - (logit_t_N - out["lse_t"])
        return est, {"est": est}

    def grad(self, st, res, c_div_N):
        # sg(est) · (onehot(y) - p): the dense part through `a`, the one-hot part at y.
        return -c_div_N * res["est"], c_div_N * res["est"], None


class _NoTeacher(_Support):
    def plan(self, st):
        return KernelPlan(token_chunk=st.token_chunk, vocab_tile=st.vocab_tile, has_teacher=False)

    def value(self, st, out, logit_s_N, logit_t_N):
        return jnp.zeros_like(out["lse_s"]), {}


SUPPORTS = {"full": _Full(), "topk": _TopK(), "sampled_token": _SampledToken()}
NO_TEACHER = "_no_teacher"
ALL_SUPPORTS = {**SUPPORTS, NO_TEACHER: _NoTeacher()}
# Each engine module provides forward, backward and default_blocks() -> (token_chunk, vocab_tile).
ENGINES = {"xla": token_kl_xla, "pallas": token_kl_pallas}


def log_tail(logp_NK: Array) -> Array:
    """[N, 1] log(1 - Σ_k p): the log-mass outside the support, floored at TAIL_FLOOR."""
    return jnp.log(jnp.maximum(1.0 - jnp.sum(jnp.exp(logp_NK), axis=1, keepdims=True), TAIL_FLOOR))


def check_inputs(h_student, h_teacher, w_unembed, mask, ids, *, alpha, mode, top_k, w_teacher=None):
    if mode not in SUPPORTS:
        raise ValueError(f"token_kl: mode={mode!r} is unknown; use one of {sorted(SUPPORTS)}")
    get_divergence(alpha)  # validates alpha
    if mode == "sampled_token" and float(alpha) != 1.0:
        raise ValueError(f"token_kl: mode='sampled_token' is the reverse-KL surrogate and needs alpha=1, "
                         f"got alpha={alpha!r}")
    if mode == "sampled_token" and ids is None:
        raise ValueError("token_kl: mode='sampled_token' needs sampled_ids[N] (the realised tokens)")
    if h_student.ndim != 2:
        raise ValueError(f"token_kl: h_student must be [N, D], got shape {tuple(h_student.shape)}")
    num, dim = h_student.shape
    if w_unembed.ndim != 2 or w_unembed.shape[0] != dim:
        raise ValueError(f"token_kl: w_unembed must be [D={dim}, V], got shape {tuple(w_unembed.shape)}")
    vocab = w_unembed.shape[1]
    for name, x, shape in (("h_teacher", h_teacher, (num, dim)), ("w_teacher", w_teacher, (dim, vocab)),
                           ("mask", mask, (num,)), ("sampled_ids", ids, (num,))):
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"token_kl: {name} must have shape {shape}, got {tuple(x.shape)}")
    if mode == "topk" and (top_k is None or not 1 <= int(top_k) <= vocab):
        raise ValueError(f"token_kl: mode='topk' needs 1 <= top_k <= V={vocab}, got top_k={top_k!r}")


def resolve_backend(backend: str, mode: str) -> str:
    if backend == "auto":
        usable = jax.default_backend() == "tpu" and ALL_SUPPORTS[mode].pallas_ok
        return "pallas" if usable else "xla"
    if backend not in ENGINES:
        raise ValueError(f"token_kl: backend={backend!r} is unknown; use 'auto' or one of {sorted(ENGINES)}")
    if backend == "pallas":
        if not ALL_SUPPORTS[mode].pallas_ok:
            raise ValueError(f"token_kl: backend='pallas' supports modes 'full' and 'sampled_token', not "
                             f"{mode!r}; use backend='xla'")
    return backend


def settings(alpha, mode, top_k, add_tail, token_chunk, vocab_tile, backend) -> Settings:
    backend = resolve_backend(backend, mode)
    default_chunk, default_tile = ENGINES[backend].default_blocks()
    for name, value in (("token_chunk", token_chunk), ("vocab_tile", vocab_tile)):
        if value is not None and int(value) < 1:
            raise ValueError(f"token_kl: {name}={value!r} must be a positive block size")
    return Settings(float(alpha), mode, None if top_k is None else int(top_k), bool(add_tail),
                     int(token_chunk or default_chunk), int(vocab_tile or default_tile), backend)
