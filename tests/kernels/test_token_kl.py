"""The fused token divergence against its naive reference, and the reference against finite differences.

Tiny shapes (N=12 tokens, D=8, V=40) with token chunks of 5 and vocabulary tiles of 16, so that tokens are
padded and the last vocabulary tile is ragged. Every compiled function takes all arrays (including the
output cotangents) as arguments, so the tests that only change values reuse one compilation per setting.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fd_jax.kernels import token_kl as tk
from fd_jax.kernels import tiles, token_kl_pallas, token_kl_pallas_gpu, token_kl_xla
from fd_jax.kernels.divergences import categorical_divergence

N, D, V, TOP_K = 12, 8, 40, 5
CHUNKS = dict(token_chunk=5, vocab_tile=16)
SETTINGS = (
    [("full", a, False) for a in (0.0, 0.5, 1.0)]
    + [("topk", a, tail) for a in (0.0, 0.5, 1.0) for tail in (False, True)]
    + [("sampled_token", 1.0, False)]
)
IDS = [f"{m}-a{a}{'-tail' if t else ''}" for m, a, t in SETTINGS]
PALLAS_MODES = ("full", "sampled_token")


@pytest.fixture(autouse=True)
def _interpreted_pallas():
    """Every test runs the Pallas engine's TPU kernels through the interpreter, on any machine, unless it
    picks otherwise (compiled kernels: `test_compiled_pallas_kernels_equal_reference_on_this_accelerator`)."""
    with token_kl_pallas.build_for("tpu", interpret=True):
        yield


def _data(seed: int = 0, n: int = N, d: int = D, v: int = V):
    rng = np.random.default_rng(seed)
    hs = rng.normal(size=(n, d)).astype(np.float32)
    ht = (hs + 0.7 * rng.normal(size=(n, d))).astype(np.float32)  # a teacher close enough to be realistic
    w = (rng.normal(size=(d, v)) * np.sqrt(D / d)).astype(np.float32)  # logits of the same scale at any d
    mask = (np.arange(n) % 5 != 3).astype(np.float32)  # tokens 3, 8, ... are padding
    ids = rng.integers(0, v, size=n).astype(np.int32)
    cts = rng.normal(size=(3, n)).astype(np.float32)  # cotangents of divergence, logprob, entropy
    return hs, ht, w, mask, ids, cts


DATA = _data()


@functools.lru_cache(maxsize=None)
def _value_and_grads(impl: str, mode: str, alpha: float, add_tail: bool, token_chunk=5, vocab_tile=16):
    """jit(hs, ht, w, mask, ids, cts) -> (stats, (d hs, d ht, d w)) of L = Σ cts · stats."""
    kw = dict(alpha=alpha, mode=mode, top_k=TOP_K, add_tail=add_tail)
    if impl == "reference":
        stats_fn = functools.partial(tk.reference_token_stats, **kw)
    else:
        stats_fn = functools.partial(tk.fused_token_stats, backend=impl, token_chunk=token_chunk,
                                     vocab_tile=vocab_tile, **kw)

    def loss(hs, ht, w, mask, ids, cts):
        stats = stats_fn(hs, ht, w, mask, ids)
        return sum(jnp.sum(c * x.astype(jnp.float32)) for c, x in zip(cts, stats)), stats

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(lambda *args: (lambda out: (out[0][1], out[1]))(grad(*args)))


def _run(impl, setting, data=DATA, **chunks):
    stats, grads = _value_and_grads(impl, *setting, **chunks)(*data)
    return [np.asarray(x, np.float32) for x in stats], [np.asarray(g, np.float32) for g in grads]


def _run_uncached(impl, setting, data, **chunks):
    """`_run` traced afresh (inside a `token_kl_pallas.build_for` block, its kernels are the block's)."""
    stats, grads = _value_and_grads.__wrapped__(impl, *setting, **chunks)(*data)
    return [np.asarray(x, np.float32) for x in stats], [np.asarray(g, np.float32) for g in grads]


def _close(got, want, what, rtol=2e-5, atol=2e-5):
    for name, g, w in zip(what, got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_fused_and_pallas_equal_reference(setting):
    ref_stats, ref_grads = _run("reference", setting)
    impls = ["xla"] + (["pallas"] if setting[0] in PALLAS_MODES else [])
    for impl in impls:
        stats, grads = _run(impl, setting)
        _close(stats, ref_stats, [f"{impl} {k}" for k in tk.TokenStats._fields])
        _close([grads[0], grads[2]], [ref_grads[0], ref_grads[2]], [f"{impl} d_h_student", f"{impl} d_w"])
        np.testing.assert_array_equal(grads[1], 0.0, err_msg=f"{impl}: gradient reached the teacher")
    mask = DATA[3]
    for x in ref_stats:  # masked tokens: no value ...
        np.testing.assert_array_equal(x[mask == 0], 0.0)
    np.testing.assert_array_equal(ref_grads[0][mask == 0], 0.0)  # ... and no gradient
    if setting[0] != "sampled_token":  # a divergence, not an estimate: never negative
        assert ref_stats[0].min() >= -1e-6


# The GPU (Triton) kernels want D a multiple of 16 and power-of-two blocks: 20 tokens in 2 blocks of 16, D 48
# read in 3 slices of 16, V 40 in 3 tiles of 16 (the last ragged).
GPU_DATA = _data(3, n=20, d=48)
GPU_CHUNKS = dict(token_chunk=16, vocab_tile=16)
PALLAS_SETTINGS = [s for s in SETTINGS if s[0] in PALLAS_MODES]


@pytest.mark.parametrize("setting", PALLAS_SETTINGS, ids=[i for s, i in zip(SETTINGS, IDS) if s in PALLAS_SETTINGS])
def test_pallas_gpu_kernels_equal_reference(setting):
    """The GPU kernels (token_kl_pallas_gpu), run by the Pallas interpreter: stats and gradients equal the
    reference's, nothing reaches the teacher."""
    ref_stats, ref_grads = _run("reference", setting, GPU_DATA)
    with token_kl_pallas.build_for("gpu"):
        stats, grads = _run_uncached("pallas", setting, GPU_DATA, **GPU_CHUNKS)
    _close(stats, ref_stats, [f"gpu kernels {k}" for k in tk.TokenStats._fields])
    _close([grads[0], grads[2]], [ref_grads[0], ref_grads[2]], ["gpu kernels d_h_student", "gpu kernels d_w"])
    np.testing.assert_array_equal(grads[1], 0.0, err_msg="gpu kernels: gradient reached the teacher")


@pytest.mark.parametrize("programs", [1, 4])
def test_pallas_gpu_vocabulary_splits_merge_exactly(programs, monkeypatch):
    """The token-block kernels split the vocabulary over programs: 3 tiles in one run of 3 (programs=1)
    or in runs of 2 and 1 (programs=4, 2 token blocks); the merged statistics, the JSD's second-pass sums
    and d_h equal the reference's. (The default split, one tile per program here, is the test above.)"""
    monkeypatch.setattr(token_kl_pallas_gpu, "_PROGRAMS", programs)
    setting = ("full", 0.5, False)
    ref_stats, ref_grads = _run("reference", setting, GPU_DATA)
    with token_kl_pallas.build_for("gpu"):
        stats, grads = _run_uncached("pallas", setting, GPU_DATA, **GPU_CHUNKS)
    _close([*stats, grads[0], grads[2]], [*ref_stats, ref_grads[0], ref_grads[2]],
           ["divergence", "logprob", "entropy", "d_hs", "d_w"])


def test_pallas_gpu_kernels_without_teacher_and_with_its_own_unembedding():
    hs, ht, w, mask, ids, cts = GPU_DATA
    w_teacher = (w + 0.3 * np.random.default_rng(8).normal(size=w.shape)).astype(np.float32)

    def run(stats_fn, wt):
        def loss(hs, w):
            stats = stats_fn(hs, ht, w, mask, ids, w_teacher=wt, alpha=0.5, mode="full")
            return sum(jnp.sum(c * x) for c, x in zip(cts, stats)), stats
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(hs, w)

    def logp_entropy(h, w, **kw):
        return tk.token_logprobs_and_entropy(h, w, ids, mask, **kw)

    (_, want), want_grads = run(tk.reference_token_stats, w_teacher)
    want_lp = jax.jit(jax.value_and_grad(lambda h, w: sum(jnp.sum(x) for x in logp_entropy(h, w)), (0, 1)))(hs, w)
    with token_kl_pallas.build_for("gpu"):
        (_, got), got_grads = run(functools.partial(tk.fused_token_stats, backend="pallas", **GPU_CHUNKS), w_teacher)
        got_lp = jax.jit(jax.value_and_grad(
            lambda h, w: sum(jnp.sum(x) for x in logp_entropy(h, w, backend="pallas", **GPU_CHUNKS)), (0, 1)))(hs, w)
    _close([*got, *got_grads], [*want, *want_grads], ["divergence", "logprob", "entropy", "d_hs", "d_w"])
    _close([got_lp[0], *got_lp[1]], [want_lp[0], *want_lp[1]], ["no teacher: value", "d_hs", "d_w"])


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_pallas_kernels_lower_for_tpu_and_gpu(platform):
    """Compiled, not interpreted, the kernels pass Mosaic's (TPU) or Triton's (GPU) lowering and its checks
    (block shapes, supported operations) for every Pallas mode, f32 and bf16, at a SmolLM2-like D and a
    ragged vocabulary; no chip is needed to lower. Blocks Mosaic cannot take are refused by name."""
    num, dim, vocab = 256, 192, 1000
    target, lowering = {"tpu": ("tpu_custom_call", "tpu"), "gpu": ("__gpu$xla.gpu.triton", "cuda")}[platform]
    for dtype in (jnp.float32, jnp.bfloat16):
        hs = jnp.zeros((num, dim), dtype)
        w = jnp.zeros((dim, vocab), dtype)
        for mode, alpha, kernels in (("full", 0.5, 4), ("sampled_token", 1.0, 3)):  # the JSD: a second pass
            def loss(hs, w):
                stats = tk.fused_token_stats(hs, hs + 1, w, jnp.ones(num), jnp.zeros(num, jnp.int32), alpha=alpha,
                                             mode=mode, backend="pallas")
                return sum(jnp.sum(x) for x in stats)
            with token_kl_pallas.build_for(platform, interpret=False):
                text = jax.jit(jax.value_and_grad(loss, (0, 1))).trace(hs, w).lower(
                    lowering_platforms=(lowering,)).as_text()
            assert text.count(f"custom_call @{target}") == kernels, (platform, mode, dtype)
    if platform == "tpu":
        with token_kl_pallas.build_for("tpu", interpret=False), pytest.raises(ValueError, match="token_chunk"):
            jax.jit(lambda hs, w: tk.fused_divergence(hs, hs, w, jnp.ones(num), alpha=1.0, mode="full",
                                                      backend="pallas", token_chunk=100)).trace(hs, w)
    else:
        with token_kl_pallas.build_for("gpu"), pytest.raises(ValueError, match="D to be a multiple of 16"):
            tk.fused_divergence(hs[:, :40], hs[:, :40], w[:40], jnp.ones(num), alpha=1.0, mode="full",
                                backend="pallas")
        with token_kl_pallas.build_for("gpu"), pytest.raises(ValueError, match="token_chunk to be a power of two"):
            tk.fused_divergence(hs, hs, w, jnp.ones(num), alpha=1.0, mode="full", backend="pallas", token_chunk=100)


def test_online_merge_equals_one_pass():
    """Pass-one states of disjoint sets of columns, merged, equal one pass over all of them (the GPU
    kernels' vocabulary splits); a part that saw no column (the initial state) changes nothing."""
    rng = np.random.default_rng(4)
    s_CV, t_CV = (jnp.asarray(rng.normal(size=(6, 50)) * 3, jnp.float32) for _ in range(2))
    init = tiles.online_init(6, True, ("rev", "fwd"))
    whole = tiles.online_update(init, s_CV, t_CV, None)
    parts = [tiles.online_update(init, s_CV[:, a:b], t_CV[:, a:b], None) for a, b in ((0, 7), (7, 30), (30, 50))]
    merged = tiles.online_merge({k: jnp.stack([p[k] for p in [*parts, init]]) for k in init})
    assert set(merged) == set(whole)
    for k in whole:
        np.testing.assert_allclose(merged[k], whole[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"),
                    reason="compiled Pallas kernels need a GPU or TPU (on CPU they run interpreted above)")
@pytest.mark.parametrize("programs", [None, 1])
def test_compiled_pallas_kernels_equal_reference_on_this_accelerator(programs, monkeypatch):
    """The kernels compiled for this machine's chip (Triton on GPU, Mosaic on TPU), at their default
    blocks, ragged token blocks and vocabulary: stats and gradients equal the reference's in f32, with a
    teacher sharing W, with its own W and without a teacher; bf16 within the bound of
    `test_pallas_bf16_inputs_accumulate_in_f32`. programs=1: on GPU one split per token block, so d_h
    accumulates over every vocabulary tile inside one program."""
    if programs is not None:
        monkeypatch.setattr(token_kl_pallas_gpu, "_PROGRAMS", programs)
    hs, ht, w, mask, ids, cts = data = _data(5, n=300, d=256, v=1000)
    w_teacher = (w + 0.3 * np.random.default_rng(9).normal(size=w.shape)).astype(np.float32)
    with jax.default_matmul_precision("float32"), token_kl_pallas.build_for(jax.default_backend(), interpret=False):
        for setting in PALLAS_SETTINGS:
            ref_stats, ref_grads = _run_uncached("reference", setting, data)
            stats, grads = _run_uncached("pallas", setting, data, token_chunk=None, vocab_tile=None)
            _close([*stats, grads[0], grads[2]], [*ref_stats, ref_grads[0], ref_grads[2]],
                   [f"{setting} {k}" for k in ("divergence", "logprob", "entropy", "d_hs", "d_w")],
                   rtol=1e-3, atol=1e-3)
            bf = [jnp.asarray(x, jnp.bfloat16) for x in (hs, ht, w)]
            _, bf_grads = _value_and_grads.__wrapped__("pallas", *setting, None, None)(*bf, mask, ids, cts)
            _, bf_ref = _run_uncached("reference", setting, tuple(np.asarray(x, np.float32) for x in bf) + data[3:])
            for g, r in ((bf_grads[0], bf_ref[0]), (bf_grads[2], bf_ref[2])):
                np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=0, atol=1e-2 * np.abs(r).max())

        def own_w_and_no_teacher(stats_fn, **kw):
            def loss(hs, w):
                stats = stats_fn(hs, ht, w, mask, ids, w_teacher=w_teacher, alpha=0.5, mode="full", **kw)
                logp, ent = tk.token_logprobs_and_entropy(hs, w, ids, mask, **kw) if kw else \
                    tk.reference_token_stats(hs, hs, w, mask, ids)[1:]
                return sum(jnp.sum(c * x) for c, x in zip(cts, stats)) + jnp.sum(logp) + jnp.sum(ent)
            return jax.jit(jax.value_and_grad(loss, (0, 1)))(hs, w)

        want = own_w_and_no_teacher(tk.reference_token_stats)
        got = own_w_and_no_teacher(tk.fused_token_stats, backend="pallas")
        _close([got[0], *got[1]], [want[0], *want[1]], ["value", "d_hs", "d_w"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s[0] != "sampled_token"], ids=IDS[:-1])
def test_divergence_vanishes_when_teacher_is_student(setting):
    hs, _, w, mask, ids, cts = DATA
    only_div = cts * np.array([[1.0], [0.0], [0.0]], np.float32)
    stats, grads = _run("xla", setting, (hs, hs, w, mask, ids, only_div))
    np.testing.assert_allclose(stats[0], 0.0, atol=1e-5)
    np.testing.assert_allclose(grads[0], 0.0, atol=1e-5)  # a minimum: zero gradient too
    np.testing.assert_allclose(grads[2], 0.0, atol=1e-5)


def test_masked_tokens_do_not_move_the_gradient():
    hs, ht, w, mask, ids, cts = DATA
    junk = np.where(mask[:, None] == 0, 50.0, hs).astype(np.float32)
    for setting in (("full", 0.5, False), ("topk", 1.0, True)):
        _, grads = _run("xla", setting)
        _, grads_junk = _run("xla", setting, (junk, ht, w, mask, ids, cts))
        np.testing.assert_allclose(grads_junk[2], grads[2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("setting", [("full", 0.5, False), ("topk", 1.0, True)], ids=["full-jsd", "topk-tail"])
def test_masked_tokens_are_never_read(setting):
    """Masked tokens reach no statistic and no gradient, whatever they hold: three counted tokens spread over
    the batch (the XLA engine computes one chunk of five, two skipped), or none. Every masked token's hidden
    states are NaN: read, they would poison dW (NaN x 0)."""
    hs, ht, w, _, ids, cts = DATA
    for kept in ([1, 6, 11], []):
        mask = np.isin(np.arange(N), kept).astype(np.float32)
        poisoned = [np.where(mask[:, None] == 0, np.nan, x).astype(np.float32) for x in (hs, ht)]
        ref_stats, ref_grads = _run("reference", setting, (hs, ht, w, mask, ids, cts))
        for engine in ["xla"] + (["pallas"] if setting[0] in PALLAS_MODES else []):
            stats, grads = _run(engine, setting, (*poisoned, w, mask, ids, cts))
            _close(stats + grads, ref_stats + ref_grads, [f"{engine} {x}" for x in ("div", "logp", "entropy",
                                                                                      "d_hs", "d_ht", "d_w")])
            np.testing.assert_array_equal(grads[0][mask == 0], 0.0)


def test_compaction_puts_counted_tokens_first():
    order, restore, live = token_kl_xla.compaction(jnp.asarray([0, 1, 0, 1, 1, 0, 0], jnp.float32), 2)
    np.testing.assert_array_equal(order, [1, 3, 4, 0, 2, 5, 6])  # stable: counted, then masked, in order
    np.testing.assert_array_equal(order[restore], np.arange(7))  # the inverse permutation
    assert int(live) == 2  # three counted tokens fill two chunks of two
    assert int(token_kl_xla.compaction(jnp.zeros(4), 2)[2]) == 0


@pytest.mark.parametrize("setting, chunks", [
    (("full", 0.5, False), dict(token_chunk=3, vocab_tile=7)),  # many blocks, a ragged tile of 5 columns
    (("topk", 0.5, True), dict(token_chunk=12, vocab_tile=40)),  # one block: no padding, no raggedness
], ids=["full-jsd-small-blocks", "topk-tail-one-block"])
def test_chunk_sizes_do_not_change_results(setting, chunks):
    stats, grads = _run("xla", setting, **CHUNKS)
    other_stats, other_grads = _run("xla", setting, **chunks)
    _close(other_stats + other_grads, stats + grads, ["div", "logp", "entropy", "d_hs", "d_ht", "d_w"])


@pytest.mark.parametrize("setting", [("full", 1.0, False), ("topk", 0.5, True)],
                         ids=["full-rkl", "topk-tail"])
def test_bf16_inputs_accumulate_in_f32(setting):
    """bf16 hidden states and W. The kernel's own error (f32 accumulation, bf16 gradients) is measured
    against the reference on the same bf16-rounded values; against f32 inputs, the rounding of the inputs
    (2^-9 relative, logits of size ~5 here) dominates and the stated tolerance is 0.1 nats."""
    hs, ht, w, mask, ids, cts = DATA
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (hs, ht, w)]
    stats, grads = _value_and_grads("xla", *setting, **CHUNKS)(*bf, mask, ids, cts)
    assert grads[0].dtype == jnp.bfloat16 and grads[2].dtype == jnp.bfloat16
    rounded = tuple(np.asarray(x, np.float32) for x in bf) + (mask, ids, cts)
    ref_stats, ref_grads = _run("reference", setting, rounded)
    _close([np.asarray(x) for x in stats], ref_stats, tk.TokenStats._fields, rtol=1e-4, atol=1e-4)
    # The gradients are rounded to bf16 once (8 bits of mantissa): relative error below 2^-8.
    for name, g, r in (("d_hs", grads[0], ref_grads[0]), ("d_w", grads[2], ref_grads[2])):
        np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=2 ** -8, atol=1e-3, err_msg=name)
    f32_stats, _ = _run("reference", setting)
    _close([np.asarray(x) for x in stats], f32_stats, tk.TokenStats._fields, rtol=0.0, atol=0.1)


@pytest.mark.parametrize("family", ["tpu", "gpu"])
def test_pallas_bf16_inputs_accumulate_in_f32(family):
    """bf16 hidden states and W in either Pallas kernel family (interpreted): the stats equal the
    reference's on the same bf16-rounded values to f32 accuracy (bf16 products, f32 sums); the gradients
    come back in bf16 and, the logit gradient being rounded to bf16 before its matmuls (as flash-attention
    backward kernels do) and the result once more, stay within 1e-2 of their largest entry (measured:
    up to 5e-3)."""
    data, chunks = (DATA, CHUNKS) if family == "tpu" else (GPU_DATA, GPU_CHUNKS)
    hs, ht, w, mask, ids, cts = data
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (hs, ht, w)]
    rounded = tuple(np.asarray(x, np.float32) for x in bf) + (mask, ids, cts)
    for setting in PALLAS_SETTINGS:
        with token_kl_pallas.build_for(family):
            stats, grads = _value_and_grads.__wrapped__("pallas", *setting, **chunks)(*bf, mask, ids, cts)
        assert grads[0].dtype == jnp.bfloat16 and grads[2].dtype == jnp.bfloat16
        ref_stats, ref_grads = _run("reference", setting, rounded)
        _close([np.asarray(x) for x in stats], ref_stats, tk.TokenStats._fields, rtol=1e-4, atol=1e-4)
        for name, g, r in (("d_hs", grads[0], ref_grads[0]), ("d_w", grads[2], ref_grads[2])):
            np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=0, atol=1e-2 * np.abs(r).max(),
                                       err_msg=f"{family} {setting} {name}")


# Every divergence on the full support, each support kind, and each divergence on some top-k variant.
FD_SETTINGS = [s for s in SETTINGS if s[0] != "topk"] + [("topk", 0.0, True), ("topk", 0.5, False),
                                                         ("topk", 1.0, True)]
FD_IDS = [f"{m}-a{a}{'-tail' if t else ''}" for m, a, t in FD_SETTINGS]


@pytest.mark.parametrize("setting", FD_SETTINGS, ids=FD_IDS)
def test_reference_gradient_equals_finite_differences_f64(setting):
    mode, alpha, tail = setting
    with jax.enable_x64(True):
        hs, ht, w, mask, ids, cts = (np.asarray(x, np.float64) if x.dtype == np.float32 else x for x in DATA)
        if mode == "sampled_token":  # a surrogate: its gradient is not the derivative of its value
            cts = cts * np.array([[0.0], [1.0], [1.0]])
        kw = dict(alpha=alpha, mode=mode, top_k=TOP_K, add_tail=tail)

        t_NV = ht @ w  # the teacher's logits are a constant of the loss (its W too)

        def total(stats):
            return sum(jnp.sum(c * s) for c, s in zip(cts, stats))

        def split(x):  # x = (hs, w) flattened, so that one direction perturbs both
            return x[: N * D].reshape(N, D), x[N * D:].reshape(D, V)

        def loss_fixed_teacher(x):
            h_, w_ = split(x)
            return total(tk.reference_stats_from_logits(h_ @ w_, t_NV, mask, ids, **kw))

        def loss_public(x):  # the gradient under test: the public reference (teacher logits use W too)
            return total(tk.reference_token_stats(*split(x)[:1], ht, split(x)[1], mask, ids, **kw))

        @jax.jit
        def check(x, v_KX):
            eps = 1e-6
            plus = jax.vmap(lambda v: loss_fixed_teacher(x + eps * v))(v_KX)
            minus = jax.vmap(lambda v: loss_fixed_teacher(x - eps * v))(v_KX)
            return v_KX @ jax.grad(loss_public)(x), (plus - minus) / (2 * eps)

        x = np.concatenate([hs.ravel(), w.ravel()])
        analytic, numeric = check(x, np.random.default_rng(1).normal(size=(2, x.size)))
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_sampled_token_gradient_is_the_surrogate():
    """d/dθ of the sampled-token output = sg(log p_S(y) - log p_T(y)) · ∇ log p_S(y), checked through the
    log-prob output of the same reference (ct on divergence vs ct · estimate on log-prob)."""
    hs, ht, w, mask, ids, cts = DATA
    setting = ("sampled_token", 1.0, False)
    stats, _ = _run("reference", setting)
    on_div = cts * np.array([[1.0], [0.0], [0.0]], np.float32)
    on_logp = np.stack([np.zeros(N), cts[0] * stats[0], np.zeros(N)]).astype(np.float32)
    _, g_div = _run("reference", setting, (hs, ht, w, mask, ids, on_div))
    _, g_logp = _run("reference", setting, (hs, ht, w, mask, ids, on_logp))
    _close([g_div[0], g_div[2]], [g_logp[0], g_logp[2]], ["d_hs", "d_w"], rtol=1e-5, atol=1e-6)
    logp_s = np.log(_softmax(hs @ w))
    logp_t = np.log(_softmax(ht @ w))
    want = (logp_s - logp_t)[np.arange(N), ids] * mask
    np.testing.assert_allclose(stats[0], want, rtol=1e-5, atol=1e-5)


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_reference_formulas_in_numpy():
    """The reference's three divergences and the top-k projection, written again in numpy."""
    hs, ht, w, mask, ids, _ = DATA
    p, q = _softmax(hs.astype(np.float64) @ w), _softmax(ht.astype(np.float64) @ w)
    a = 0.5
    m = (1 - a) * p + a * q
    want = {
        0.0: np.sum(q * np.log(q / p), 1),
        1.0: np.sum(p * np.log(p / q), 1),
        a: (1 - a) * np.sum(p * np.log(p / m), 1) + a * np.sum(q * np.log(q / m), 1),
    }
    for alpha, expected in want.items():
        got = tk.reference_divergence(hs, ht, w, mask, alpha=alpha, mode="full")
        np.testing.assert_allclose(got, expected * mask, rtol=1e-4, atol=1e-5)
    top = np.argsort(-(hs @ w), axis=1)[:, :TOP_K]
    pk, qk = np.take_along_axis(p, top, 1), np.take_along_axis(q, top, 1)
    pt = np.concatenate([pk, 1 - pk.sum(1, keepdims=True)], 1)
    qt = np.concatenate([qk, 1 - qk.sum(1, keepdims=True)], 1)
    got = tk.reference_divergence(hs, ht, w, mask, alpha=1.0, mode="topk", top_k=TOP_K, add_tail=True)
    np.testing.assert_allclose(got, np.sum(pt * np.log(pt / qt), 1) * mask, rtol=1e-4, atol=1e-5)
    pr, qr = pk / pk.sum(1, keepdims=True), qk / qk.sum(1, keepdims=True)
    got = tk.reference_divergence(hs, ht, w, mask, alpha=0.0, mode="topk", top_k=TOP_K)
    np.testing.assert_allclose(got, np.sum(qr * np.log(qr / pr), 1) * mask, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(categorical_divergence(np.log(pt), np.log(pt), alpha=0.3), 0.0, atol=1e-6)


def test_logprobs_and_entropy_without_teacher():
    hs, ht, w, mask, ids, cts = DATA
    no_div = cts * np.array([[0.0], [1.0], [1.0]], np.float32)
    ref_stats, ref_grads = _run("reference", ("full", 1.0, False), (hs, ht, w, mask, ids, no_div))

    @jax.jit
    def run(hs, w, mask, ids, cts):
        def loss(hs, w):
            logp, ent = tk.token_logprobs_and_entropy(hs, w, ids, mask, backend="xla", **CHUNKS)
            return jnp.sum(cts[1] * logp) + jnp.sum(cts[2] * ent), (logp, ent)
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hs, w)

    (_, (logp, ent)), (d_hs, d_w) = run(hs, w, mask, ids, no_div)
    _close([logp, ent, d_hs, d_w], [ref_stats[1], ref_stats[2], ref_grads[0], ref_grads[2]],
           ["logprob", "entropy", "d_hs", "d_w"])


def test_errors_name_the_problem():
    hs, ht, w, mask, ids, _ = DATA
    cases = [
        (dict(alpha=1.0, mode="everything"), "mode='everything'"),
        (dict(alpha=0.5, mode="sampled_token", sampled_ids=ids), "needs alpha=1"),
        (dict(alpha=1.0, mode="sampled_token"), "needs sampled_ids"),
        (dict(alpha=1.5, mode="full"), "alpha=1.5"),
        (dict(alpha=1.0, mode="topk"), "top_k"),
        (dict(alpha=1.0, mode="topk", top_k=3, backend="pallas"), "backend='pallas'"),
        (dict(alpha=1.0, mode="full", backend="cuda"), "backend='cuda'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            tk.fused_divergence(hs, ht, w, mask, **kwargs)
    with pytest.raises(ValueError, match=r"w_unembed must be \[D=8, V\]"):
        tk.fused_divergence(hs, ht, w.T, mask, alpha=1.0, mode="full")


def test_contract_functions_agree():
    """The public contract pair: same signature, same per-token values (sampled_ids given as a keyword)."""
    hs, ht, w, mask, ids, _ = DATA
    kw = dict(alpha=1.0, mode="sampled_token", sampled_ids=ids)
    fused = jax.jit(lambda *a: tk.fused_divergence(*a, backend="xla", **CHUNKS, **kw))(hs, ht, w, mask)
    want = _run("reference", ("sampled_token", 1.0, False))[0][0]
    np.testing.assert_allclose(fused, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(tk.reference_divergence(hs, ht, w, mask, **kw), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("setting", [("full", 0.5, False), ("topk", 1.0, True)],
                         ids=["full-jsd", "topk-tail"])
def test_teacher_with_its_own_unembedding(setting):
    """An EMA teacher reads its own W: the fused engines equal the reference, and neither the teacher's
    hidden states nor its W get any gradient."""
    hs, ht, w, mask, ids, cts = DATA
    w_teacher = (w + 0.3 * np.random.default_rng(7).normal(size=w.shape)).astype(np.float32)
    mode, alpha, tail = setting
    kw = dict(alpha=alpha, mode=mode, top_k=TOP_K, add_tail=tail)

    def run(stats_fn):
        def loss(hs, ht, w, wt):
            stats = stats_fn(hs, ht, w, mask, ids, w_teacher=wt, **kw)
            return sum(jnp.sum(c * x) for c, x in zip(cts, stats)), stats
        (_, stats), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
            hs, ht, w, w_teacher)
        return stats, grads

    ref_stats, ref_grads = run(tk.reference_token_stats)
    for impl in ["xla"] + (["pallas"] if mode in PALLAS_MODES else []):
        stats, grads = run(functools.partial(tk.fused_token_stats, backend=impl, **CHUNKS))
        _close(stats, ref_stats, [f"{impl} {k}" for k in tk.TokenStats._fields])
        _close([grads[0], grads[2]], [ref_grads[0], ref_grads[2]], [f"{impl} d_hs", f"{impl} d_w"])
        for g in (grads[1], grads[3], ref_grads[1], ref_grads[3]):
            np.testing.assert_array_equal(g, 0.0)
    shared = _run("reference", setting)[0][0]
    assert np.abs(np.asarray(ref_stats[0]) - shared).max() > 1e-2  # the teacher's W really was used
