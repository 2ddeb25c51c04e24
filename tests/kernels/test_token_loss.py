"""`fused_token_loss` (the gradient inside the statistics pass) against autodiff through the naive reference.

The oracle: `reference_token_stats` (materialised [N, V] logits), the same per-token loss applied to its
statistics, and `jax.value_and_grad` of the masked sum. Tiny shapes (N=12, D=8, V=40) with token chunks of
5, so the last chunk is padded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fd_jax.kernels import token_kl as tk
from fd_jax.kernels.token_loss import default_loss_blocks, fused_token_loss

N, D, V, TOP_K = 12, 8, 40, 5
SETTINGS = (
    [("full", a, False) for a in (0.0, 0.5, 1.0)]
    + [("topk", a, tail) for a in (0.0, 1.0) for tail in (False, True)]
    + [("sampled_token", 1.0, False)]
)


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    hs = rng.normal(size=(N, D)).astype(np.float32)
    ht = (hs + 0.7 * rng.normal(size=(N, D))).astype(np.float32)
    w = rng.normal(size=(D, V)).astype(np.float32)
    wt = (w + 0.3 * rng.normal(size=(D, V))).astype(np.float32)  # an EMA teacher's own unembedding
    mask = (np.arange(N) % 5 != 3).astype(np.float32)  # tokens 3 and 8 are padding
    ids = rng.integers(0, V, size=N).astype(np.int32)
    aux = {"advantage": rng.normal(size=N).astype(np.float32),
           "old_logp": (rng.normal(size=N) - 4.0).astype(np.float32)}
    return hs, ht, w, wt, mask, ids, aux


DATA = _data()


def objective(stats: tk.TokenStats, aux) -> jax.Array:
    """A per-token loss that reads every statistic and both aux arrays, non-linearly, with a clipped
    stop-gradient importance weight: the shape of the train step's GRPO + FD mixture."""
    ratio = jnp.exp(stats.logprob - aux["old_logp"])
    grpo = -jnp.minimum(ratio * aux["advantage"], jnp.clip(ratio, 0.8, 1.2) * aux["advantage"])
    weight = jnp.minimum(jnp.exp(jax.lax.stop_gradient(stats.logprob) - aux["old_logp"]), 2.0)
    return 0.4 * grpo + 0.6 * stats.divergence * weight + 0.05 * stats.entropy**2


@functools.lru_cache(maxsize=None)
def _compiled(impl: str, mode: str | None, alpha: float, add_tail: bool, own_teacher_w: bool):
    """jit(hs, ht, w, wt, mask, ids, aux) -> (loss, stats, (d hs, d ht, d w, d wt)). mode None: no teacher."""
    kw = {} if mode is None else dict(alpha=alpha, mode=mode, top_k=TOP_K if mode == "topk" else None,
                                      add_tail=add_tail)

    def loss(hs, ht, w, wt, mask, ids, aux):
        w_teacher = wt if own_teacher_w else None
        if impl == "fused":
            return fused_token_loss(hs, None if mode is None else ht, w, mask, ids, objective, aux, token_chunk=5,
                                    vocab_tile=16,
                                    **kw, **({} if mode is None else {"w_teacher": w_teacher}))
        if mode is None:
            logp_NV = jax.nn.log_softmax(hs @ w, axis=1)
            stats = tk.TokenStats(jnp.zeros(N), jnp.take_along_axis(logp_NV, ids[:, None], 1)[:, 0],
                                  -jnp.sum(jnp.exp(logp_NV) * logp_NV, axis=1))
            stats = tk.TokenStats(*(jnp.where(mask > 0, x, 0.0) for x in stats))
        else:
            stats = tk.reference_token_stats(hs, ht, w, mask, ids, w_teacher=w_teacher, **kw)
        return jnp.sum(objective(stats, aux) * mask), stats

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    return jax.jit(lambda *args: (lambda out: (out[0][0], out[0][1], out[1]))(grad(*args)))


def _run(impl, setting, own_teacher_w=False, data=DATA):
    loss, stats, grads = _compiled(impl, *setting, own_teacher_w)(*data)
    return float(loss), [np.asarray(x) for x in stats], [np.asarray(g) for g in grads]


@pytest.mark.parametrize("setting", SETTINGS + [(None, 1.0, False)],
                         ids=[f"{m}-a{a}{'-tail' if t else ''}" for m, a, t in SETTINGS] + ["no-teacher"])
def test_value_and_gradients_equal_autodiff_of_the_reference(setting):
    want_loss, want_stats, want_grads = _run("reference", setting)
    loss, stats, grads = _run("fused", setting)
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5)
    for name, got, want in zip(tk.TokenStats._fields, stats, want_stats):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=name)
    for name, i in (("d_h_student", 0), ("d_w", 2)):
        np.testing.assert_allclose(grads[i], want_grads[i], rtol=2e-4, atol=2e-5, err_msg=name)
    np.testing.assert_array_equal(grads[1], 0.0)  # nothing reaches the teacher
    np.testing.assert_array_equal(grads[0][DATA[4] == 0], 0.0)  # nor masked tokens


@pytest.mark.parametrize("setting", [("full", 1.0, False), ("topk", 0.0, True)], ids=["full-rkl", "topk-tail"])
def test_masked_tokens_are_never_read(setting):
    """Only the counted tokens are computed (moved to the front; the rest of their chunk reads zeros): three
    counted tokens spread over the batch (one chunk of five), or none at all. Every masked token's hidden
    states are NaN: read, they would poison dW (NaN x 0)."""
    hs, ht, w, wt, _, ids, aux = DATA
    for kept in ([0, 7, 10], []):
        mask = np.isin(np.arange(N), kept).astype(np.float32)
        poisoned = [np.where(mask[:, None] == 0, np.nan, x).astype(np.float32) for x in (hs, ht)]
        want_loss, want_stats, want_grads = _run("reference", setting, data=(hs, ht, w, wt, mask, ids, aux))
        loss, stats, grads = _run("fused", setting, data=(*poisoned, w, wt, mask, ids, aux))
        np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=1e-7)
        for name, got, want in zip(tk.TokenStats._fields, stats, want_stats):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=name)
        for name, i in (("d_h_student", 0), ("d_w", 2)):
            np.testing.assert_allclose(grads[i], want_grads[i], rtol=2e-4, atol=2e-5, err_msg=name)
        np.testing.assert_array_equal(grads[0][mask == 0], 0.0)


def test_masked_tokens_keep_their_own_aux():
    """A chunk's rows past its counted tokens read zero hidden states but their own aux: a token loss that is
    finite on every real token's aux (here log of a positive scale) stays finite and exact."""
    hs, ht, w, _, _, ids, _ = DATA
    mask = np.isin(np.arange(N), [0, 7, 10]).astype(np.float32)  # one chunk: them and two masked rows
    scale = np.linspace(0.5, 2.0, N).astype(np.float32)

    def objective(stats, aux):
        return stats.divergence * jnp.log(aux) + stats.entropy

    def loss(hs, w):
        return fused_token_loss(hs, ht, w, mask, ids, objective, scale, token_chunk=5, vocab_tile=16)[0]

    def reference(hs, w):
        stats = tk.reference_token_stats(hs, ht, w, mask, ids)
        return jnp.sum(objective(stats, scale) * mask)

    got, want = jax.value_and_grad(loss, (0, 1))(hs, w), jax.value_and_grad(reference, (0, 1))(hs, w)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-5)
    for g, r in zip(got[1], want[1]):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-5)


def test_logit_buffers_are_rewritten_in_place():
    """The one pass keeps two [C, V] f32 logit buffers per chunk and rewrites them in place, tile by tile. Its
    temporary memory then grows by 2 x 4 bytes x V per token of chunk; a copy of the buffers (what XLA falls
    back to when nothing orders the read of a tile before its rewrite) doubles that. Measured as the growth
    from C = 80 to 160, so what does not scale with C drops out; the slack (25%) covers the [C, 256] tile
    temporaries that do."""
    num, dim, vocab = 600, 32, 8192
    rng = np.random.default_rng(0)
    hs, ht = (jnp.asarray(rng.normal(size=(num, dim)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(size=(dim, vocab)), jnp.float32)
    mask, ids = jnp.ones((num,), jnp.float32), jnp.zeros((num,), jnp.int32)

    def temp_bytes(chunk):
        def loss(hs, ht, w):
            divergence = lambda stats, aux: stats.divergence  # noqa: E731
            return fused_token_loss(hs, ht, w, mask, ids, divergence, token_chunk=chunk, vocab_tile=256)[0]

        value_and_grad = jax.value_and_grad(loss, (0, 2))
        return jax.jit(value_and_grad).lower(hs, ht, w).compile().memory_analysis().temp_size_in_bytes

    growth, buffers = temp_bytes(160) - temp_bytes(80), 2 * 80 * vocab * 4
    assert buffers <= growth <= 1.25 * buffers, f"grew {growth / 2**20:.2f} MiB for {buffers / 2**20} MiB of buffers"


def test_teacher_with_its_own_unembedding():
    setting = ("full", 1.0, False)
    want_loss, _, want_grads = _run("reference", setting, own_teacher_w=True)
    loss, _, grads = _run("fused", setting, own_teacher_w=True)
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5)
    np.testing.assert_allclose(grads[2], want_grads[2], rtol=2e-4, atol=2e-5)
    np.testing.assert_array_equal(grads[3], 0.0)  # the teacher's W is a constant


def test_value_without_gradient_equals_the_differentiated_value():
    hs, ht, w, wt, mask, ids, aux = DATA
    value = jax.jit(lambda *a: fused_token_loss(*a, objective, aux, token_chunk=5)[0])(hs, ht, w, mask, ids)
    loss, _, _ = _run("fused", ("full", 1.0, False))
    np.testing.assert_allclose(float(value), loss, rtol=1e-6)


def test_chunk_size_does_not_change_the_result():
    hs, ht, w, wt, mask, ids, aux = DATA
    grads = [jax.grad(lambda h: fused_token_loss(h, ht, w, mask, ids, objective, aux, token_chunk=c)[0])(hs)
             for c in (1, 7, N)]
    for g in grads[1:]:
        np.testing.assert_allclose(g, grads[0], rtol=1e-5, atol=1e-6)


def test_bf16_inputs_stay_close_to_f32():
    hs, ht, w, wt, mask, ids, aux = DATA
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    loss32, g32 = jax.value_and_grad(lambda h: fused_token_loss(h, ht, w, mask, ids, objective, aux)[0])(hs)
    loss16, g16 = jax.value_and_grad(
        lambda h: fused_token_loss(h, bf(ht), bf(w), mask, ids, objective, aux)[0])(bf(hs))
    assert g16.dtype == jnp.bfloat16
    # bf16 rounds h and W (8 bits of mantissa) before the f32 matmuls: logits move by ~1%.
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=5e-2)
    np.testing.assert_allclose(np.asarray(g16, np.float32), g32, atol=0.1 * np.abs(g32).max())


def test_bf16_inputs_equal_the_reference_on_the_same_bf16_inputs():
    """With bf16 h and W the kernel multiplies them as they are (f32 accumulation), like the reference: a
    bf16 x bf16 product is exact in f32, so only the summation order differs from autodiff through it."""
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    hs, ht, w, wt, mask, ids, aux = DATA
    hs, ht, w = bf(hs), bf(ht), bf(w)

    _assert_bf16_matches_reference(hs, ht, w, mask, ids, aux, token_chunk=5, vocab_tile=16)


def _assert_bf16_matches_reference(hs, ht, w, mask, ids, aux, **blocks):
    """Loss and gradients (w.r.t. hs and W) of the one pass against autodiff through the reference."""
    def fused(hs, w):
        return fused_token_loss(hs, ht, w, mask, ids, objective, aux, **blocks)[0]

    def reference(hs, w):
        return jnp.sum(objective(tk.reference_token_stats(hs, ht, w, mask, ids), aux) * mask)

    (loss, grads), (want, want_grads) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hs, w)
                                         for f in (fused, reference))
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    for got, ref in zip(grads, want_grads):
        assert got.dtype == jnp.bfloat16
        got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
        # both are f32 sums rounded once to bf16 (8 bits): at most a rounding step apart
        np.testing.assert_allclose(got, ref, rtol=2**-7, atol=1e-6 * np.abs(ref).max())


def test_bf16_default_blocks_equal_the_reference_over_several_chunks():
    """A 16-bit W gets its own default chunk (`default_loss_blocks`, larger than f32's). With N above it
    (a ragged last chunk, masked tokens spread over all chunks) the default equals the reference on the
    same bf16 inputs, as `test_bf16_inputs_equal_the_reference_on_the_same_bf16_inputs` bounds it."""
    chunk, _ = default_loss_blocks(jnp.bfloat16)
    num, dim, vocab = chunk + chunk // 3, 8, 40
    rng = np.random.default_rng(3)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    hs = bf(rng.normal(size=(num, dim)))
    ht = bf(np.asarray(hs, np.float32) + 0.7 * rng.normal(size=(num, dim)))
    w = bf(rng.normal(size=(dim, vocab)))
    mask = jnp.asarray(rng.random(num) > 0.2, jnp.float32)
    ids = jnp.asarray(rng.integers(0, vocab, size=num), jnp.int32)
    aux = {"advantage": jnp.asarray(rng.normal(size=num), jnp.float32),
           "old_logp": jnp.asarray(rng.normal(size=num) - 4.0, jnp.float32)}

    _assert_bf16_matches_reference(hs, ht, w, mask, ids, aux)  # the default blocks


def test_aux_arrays_must_be_per_token():
    hs, ht, w, wt, mask, ids, aux = DATA
    with pytest.raises(ValueError, match=r"aux array must be \[N=12"):
        fused_token_loss(hs, ht, w, mask, ids, objective, {"advantage": np.zeros(3, np.float32)})
