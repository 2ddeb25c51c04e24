"""The fused train step against plain forward passes, and its invariants (teacher kinds, accumulation,
sharding)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

from fd_jax import sharding
from fd_jax.rl import losses
from fd_jax.models import ModelConfig, init_model
from fd_jax.rl.optim import OptimConfig, make_optimizer
from fd_jax.rl.batch import pack_train_batch
from fd_jax.rl.step import (StepConfig, _normalisers, _over_tokens, init_train_state, make_train_step,
                               micro_batch_loss, token_axes_of)

CFG = ModelConfig.from_hf(transformers.Qwen3Config(
    vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, tie_word_embeddings=False))
OPT = OptimConfig(learning_rate=1e-2, max_grad_norm=1.0, weight_decay=0.01)
KERNEL = dict(token_chunk=8, vocab_tile=32)  # several chunks and a ragged vocabulary tile
SHARED_CFG = StepConfig(distill_weight=0.5, teacher="ema", loss_type="grpo", loss_agg="seq_mean", **KERNEL)


def _batch(seed=0, rows=4):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(1, 61, rng.integers(2, 7))) for _ in range(rows)]
    feedback = [list(rng.integers(1, 61, rng.integers(3, 12))) for _ in range(rows)]
    completions = [list(rng.integers(1, 61, rng.integers(1, 9))) for _ in range(rows)]
    old = [list(rng.normal(-4.0, 0.3, len(c))) for c in completions]
    batch = pack_train_batch(
        student_prompts=prompts, teacher_prompts=[p + f for p, f in zip(prompts, feedback)],
        completions=completions, old_logprobs=old, rewards_B=np.zeros(rows),
        advantages_B=rng.normal(size=rows), distill_mask_B=np.array([1, 1, 0, 1][:rows] + [1] * (rows - 4)),
        pad_id=0, pad_multiple=8)
    return {k: np.asarray(v) for k, v in dataclasses.asdict(batch).items()}


@pytest.fixture(scope="module")
def setup():
    model = init_model(CFG, seed=0)
    graphdef, params = nnx.split(model)
    return graphdef, params, _batch()


def _state(params, cfg, teacher_seed=None, optimizer=None):
    # Comparisons of updates use plain SGD: Adam's g / sqrt(v) would blow f32 rounding in near-zero
    # gradients up to learning-rate-sized steps.
    optimizer = optimizer or make_optimizer(OPT)
    state = init_train_state(jax.tree.map(jnp.array, params), optimizer, cfg)
    if teacher_seed is not None and state.teacher is not None:  # a teacher that differs from the student
        _, other = nnx.split(init_model(CFG, seed=teacher_seed))
        state = state._replace(teacher=other)
    return state, optimizer


_STEPS: dict = {}


def cached_step(graphdef, cfg: StepConfig, sgd: bool = False):
    """One compiled step per (config, optimizer) for the whole test session: compiling dominates test time."""
    key = (cfg, sgd)
    if key not in _STEPS:
        optimizer = optax.sgd(0.1) if sgd else make_optimizer(OPT)
        _STEPS[key] = (make_train_step(graphdef, optimizer, cfg), optimizer)
    return _STEPS[key]


def _loss_and_grads(graphdef, params, teacher, batch, cfg):
    totals = _normalisers(jax.tree.map(jnp.asarray, batch), cfg)
    fn = lambda p, t: micro_batch_loss(p, t, None, jax.tree.map(jnp.asarray, batch), totals,  # noqa: E731
                                       graphdef=graphdef, cfg=cfg)[0]
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(params, teacher)


def test_step_loss_equals_losses_module_on_plain_forward(setup):
    """No hidden shortcut: materialised logits + the losses module give the step's loss."""
    graphdef, params, batch = setup
    cfg = StepConfig(distill_weight=0.5, teacher="ema", alpha=0.5, loss_type="grpo", **KERNEL)
    _, teacher = nnx.split(init_model(CFG, seed=3))
    loss, _ = _loss_and_grads(graphdef, params, teacher, batch, cfg)

    def logits_at(p, tokens, positions, index):
        logits = nnx.merge(graphdef, p)(tokens, positions)
        return np.take_along_axis(np.asarray(logits), index[:, :, None], axis=1)

    s = logits_at(params, batch["student_tokens_BS"], batch["student_positions_BS"], batch["student_index_BC"])
    t = logits_at(teacher, batch["teacher_tokens_BU"], batch["teacher_positions_BU"], batch["teacher_index_BC"])
    logp = jax.nn.log_softmax(s.astype(np.float64))
    logq = jax.nn.log_softmax(t.astype(np.float64))
    p, q = np.exp(logp), np.exp(logq)
    m = 0.5 * p + 0.5 * q
    jsd = 0.5 * np.sum(p * (logp - np.log(m)), -1) + 0.5 * np.sum(q * (logq - np.log(m)), -1)
    logp_tok = np.take_along_axis(np.asarray(logp), batch["completion_tokens_BC"][:, :, None], -1)[..., 0]
    mask = batch["completion_mask_BC"]
    grpo = losses.policy_loss(jnp.asarray(logp_tok, jnp.float32), batch["old_logprobs_BC"], batch["advantages_B"],
                              mask, loss_type="grpo", eps_low=0.2, eps_high=0.2)
    fd = losses.fd_loss(jnp.asarray(jsd, jnp.float32), jnp.asarray(logp_tok, jnp.float32), batch["old_logprobs_BC"],
                        mask * batch["distill_mask_B"][:, None], is_clip=2.0, loss_agg="token_mean")
    np.testing.assert_allclose(float(loss), 0.5 * float(grpo) + 0.5 * float(fd), rtol=2e-5, atol=1e-6)


def test_teacher_gets_no_gradient_and_live_fusion_is_exact(setup):
    graphdef, params, batch = setup
    _, teacher = nnx.split(init_model(CFG, seed=3))
    cfg = StepConfig(distill_weight=1.0, teacher="ema", alpha=1.0, **KERNEL)
    (_, (g_student, g_teacher)) = _loss_and_grads(graphdef, params, teacher, batch, cfg)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))
    assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(g_student))

    fused = StepConfig(distill_weight=0.7, teacher="live", fuse_live_passes=True, alpha=0.0, **KERNEL)
    separate = dataclasses.replace(fused, fuse_live_passes=False)
    (l1, (g1, _)) = _loss_and_grads(graphdef, params, None, batch, fused)
    (l2, (g2, _)) = _loss_and_grads(graphdef, params, None, batch, separate)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_ema_and_base_teachers(setup):
    graphdef, params, batch = setup
    for kind in ("ema", "base"):
        cfg = StepConfig(teacher=kind, ema_tau=0.25, **KERNEL)
        state, optimizer = _state(params, cfg, teacher_seed=5)
        teacher_before = jax.tree.map(np.asarray, state.teacher)
        step = make_train_step(graphdef, optimizer, cfg)
        new, metrics = step(state, batch)
        assert np.isfinite(float(metrics["loss"])) and float(metrics["kl_mean"]) > 0
        for phi, theta, phi_new in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(new.params),
                                       jax.tree.leaves(new.teacher)):
            expected = phi if kind == "base" else 0.75 * phi + 0.25 * np.asarray(theta)
            np.testing.assert_allclose(np.asarray(phi_new), expected, rtol=1e-6, atol=1e-7)


def test_micro_batches_give_the_same_update(setup):
    graphdef, params, _ = setup
    batch = _batch(seed=1, rows=8)
    results = []
    for k in (1, 4):
        cfg = dataclasses.replace(SHARED_CFG, micro_batches=k)
        step, optimizer = cached_step(graphdef, cfg, sgd=True)
        state, _ = _state(params, cfg, optimizer=optimizer)
        results.append(step(state, batch))
    (a, ma), (b, mb) = results
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(ma["grad_norm"]), float(mb["grad_norm"]), rtol=1e-4)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [
    SHARED_CFG,  # one pass
    StepConfig(distill_weight=0.5, teacher="live", importance_sampling_level="sequence", beta=0.1, **KERNEL),
    StepConfig(distill_weight=0.0, micro_batches=2, loss_type="dapo", **KERNEL),  # no teacher; 4 rows each
], ids=["one-pass", "two-pass-gspo-reference", "grpo-alone-micro-batches"])
def test_sharded_step_equals_single_device(setup, cfg):
    """The kernels run per device on their rows (`_over_tokens`): the same update as on one device."""
    graphdef, params, _ = setup
    batch = _batch(seed=2, rows=8)
    step, optimizer = cached_step(graphdef, cfg, sgd=True)
    state, _ = _state(params, cfg, optimizer=optimizer)
    single, m1 = step(state, batch)
    single = jax.tree.map(np.asarray, single)

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    model = sharding.shard_module(init_model(CFG, seed=0), mesh)
    _, sharded_params = nnx.split(model)
    assert sharded_params["layers"][0]["mlp"]["up"].get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    state2, _ = _state(sharded_params, cfg, optimizer=optimizer)
    new, m2 = step(state2, sharding.shard_batch(batch, mesh))  # same program, re-specialised to the shardings
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(single.params), jax.tree.leaves(new.params)):
        np.testing.assert_allclose(x, np.asarray(y), rtol=1e-5, atol=1e-6)


def test_kernels_run_on_each_devices_tokens():
    """On a mesh that splits the batch rows, `_over_tokens` gives each device its own rows' tokens (the
    kernels' chunk loops would otherwise run over every token on every device) with the same values and
    gradients, the shared W's gradient summed over devices."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    batch = sharding.shard_batch(_batch(seed=2, rows=8), mesh)
    token_axes = token_axes_of(batch)
    assert token_axes == (mesh, ("data", "fsdp"))
    assert token_axes_of(_batch(seed=2, rows=8)) is None  # host arrays: nothing to split
    rng = np.random.default_rng(0)
    h, w = jnp.asarray(rng.normal(size=(8, 6, 4)), jnp.float32), jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    seen = []

    def kernel(h, w):
        seen.append(h.shape)
        y = jnp.tanh(h @ w)
        return jnp.sum(y**2), y[:, 0]

    def loss_of_y(y):  # the loss below as a function of y = tanh(h @ w) [8, 6, 5]
        return jnp.sum(y**2) + jnp.sum(y[..., 0] * jnp.arange(48.0).reshape(8, 6))

    def loss(h, w, axes):
        total, first = _over_tokens(kernel, axes, (h,), (w,))
        return total + jnp.sum(first * jnp.arange(48.0).reshape(8, 6)), first

    (want, want_first), want_grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, w, None)
    (got, got_first), grads = jax.jit(jax.value_and_grad(functools.partial(loss, axes=token_axes), argnums=(0, 1),
                                                         has_aux=True))(h, w)
    assert seen[0] == (48, 4) and seen[-1] == (12, 4)  # 8 rows x 6 tokens over data x fsdp = 4 devices
    assert got_first.shape == (8, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_first, want_first, rtol=1e-5, atol=1e-6)
    # The two sides sum the same float32 terms in different orders (per-device partial sums then a psum,
    # against one reduction whose blocking depends on XLA's threading and the core count). A sum of N
    # terms reordered moves by about sqrt(N) * eps * sum|term| (random-walk rounding; the worst case is N
    # * eps), so the tolerance is that, per element, with a factor 4 for the terms' own rounding. A term
    # is dL/dy * (1 - tanh^2) times h or w; 1 - tanh^2 is only accurate to a few eps absolutely (it
    # cancels where tanh is near 1), so a term's size is taken with |dL/dy| in place of |dL/d(h @ w)|.
    # A missing psum or a dropped device's rows would change the sums by whole terms, far above this.
    dz = np.abs(np.asarray(jax.grad(loss_of_y)(jnp.tanh(h @ w)))).reshape(48, 5)  # |dL/dy| >= |dL/d(h @ w)|
    magnitude = [(dz @ np.abs(np.asarray(w)).T).reshape(8, 6, 4), np.abs(np.asarray(h)).reshape(48, 4).T @ dz]
    terms = [5, 48]  # dL/dh sums over w's 5 columns, dL/dw over the 48 tokens
    eps = np.finfo(np.float32).eps
    for g, g_want, m, n in zip(grads, want_grads, magnitude, terms):
        assert np.all(np.abs(np.asarray(g) - np.asarray(g_want)) <= 4 * np.sqrt(n) * eps * m)
    with pytest.warns(UserWarning, match="micro_batches"):  # 6 rows do not split over 4 devices
        total, _ = jax.jit(lambda h, w: _over_tokens(kernel, token_axes, (h,), (w,)))(h[:6], w)
    assert seen[-1] == (36, 4)
    np.testing.assert_allclose(total, kernel(h[:6].reshape(36, 4), w)[0], rtol=1e-5)


@pytest.mark.parametrize("overrides", [
    dict(distill_weight=0.5, teacher="ema", alpha=0.5, loss_type="grpo", loss_agg="seq_mean"),
    dict(distill_weight=0.0, teacher="live", loss_type="dapo", beta=0.1),
    dict(distill_weight=0.3, teacher="live", fuse_live_passes=True, distill_mode="topk", top_k=5, loss_type="dr_grpo"),
    dict(distill_weight=1.0, teacher="ema", distill_mode="sampled_token", loss_agg="constant"),
], ids=["jsd-grpo-seq_mean", "grpo-alone-beta", "topk-live-dr_grpo", "sampled_token-constant"])
def test_one_pass_kernel_gives_the_two_pass_loss_gradients_and_metrics(setup, overrides):
    """The per-token loss folded into the kernel (one pass) against fused_token_stats + fd_jax.rl.losses."""
    graphdef, params, batch = setup
    _, teacher = nnx.split(init_model(CFG, seed=3))
    totals = _normalisers(jax.tree.map(jnp.asarray, batch), StepConfig(**overrides))
    out = {}
    for passes in ("one", "two"):
        cfg = StepConfig(kernel_passes=passes, loss_chunk=8, **KERNEL, **overrides)
        fn = lambda p, t: micro_batch_loss(p, t, t, jax.tree.map(jnp.asarray, batch), totals,  # noqa: E731
                                           graphdef=graphdef, cfg=cfg)
        out[passes] = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(params, teacher)
    (loss1, (sums1, maxes1)), grads1 = out["one"]
    (loss2, (sums2, maxes2)), grads2 = out["two"]
    np.testing.assert_allclose(float(loss1), float(loss2), rtol=1e-5, atol=1e-7)
    for key in sums2:
        np.testing.assert_allclose(sums1[key], sums2[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for key in maxes2:
        np.testing.assert_allclose(maxes1[key], maxes2[key], rtol=1e-5, atol=1e-6, err_msg=key)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads2[0]))
    assert scale > 0
    for g1, g2 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads2)):
        np.testing.assert_allclose(g1, g2, atol=1e-5 * scale)


def test_one_pass_needs_token_level_ratios():
    with pytest.raises(ValueError, match="kernel_passes = 'one': needs importance_sampling_level='token'"):
        StepConfig(kernel_passes="one", importance_sampling_level="sequence")


def test_batch_padded_by_its_own_rules_trains_the_same(setup):
    """What multihost.global_batch does across hosts: every time axis padded further by TrainBatch.padded.
    The padding is masked out, so the step's loss and gradient norm do not move (grpo and seq_mean do not
    depend on C)."""
    graphdef, params, _ = setup
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(1, 61, 4)) for _ in range(4)]
    completions = [list(rng.integers(1, 61, n)) for n in (3, 5, 2, 7)]
    batch = pack_train_batch(
        student_prompts=prompts, teacher_prompts=[p + [7, 8, 9] for p in prompts], completions=completions,
        old_logprobs=[list(rng.normal(-4.0, 0.3, len(c))) for c in completions], rewards_B=np.zeros(4),
        advantages_B=rng.normal(size=4), distill_mask_B=np.array([1.0, 0.0, 1.0, 1.0]), pad_id=0, pad_multiple=8)
    wider = batch.padded({axis: n + 8 for axis, n in batch.lengths().items()}, pad_id=0)
    assert {k: v.shape[1] for k, v in wider.step_inputs().items() if v.ndim == 2} != {
        k: v.shape[1] for k, v in batch.step_inputs().items() if v.ndim == 2}
    step, optimizer = cached_step(graphdef, SHARED_CFG)
    metrics = [step(_state(params, SHARED_CFG, optimizer=optimizer)[0], b.step_inputs())[1] for b in (batch, wider)]
    for key in ("loss", "kl_mean", "grad_norm"):
        np.testing.assert_allclose(float(metrics[1][key]), float(metrics[0][key]), rtol=2e-5, atol=1e-7)


def test_grpo_step_ignores_the_teacher_arrays_shapes(setup):
    """GRPO runs no teacher pass: a batch whose teacher prompts are longer (a wider U) must reuse the
    compiled step (no new XLA program) and give the same metrics."""
    from fd_jax.train import compilations

    compilations.install()
    graphdef, params, _ = setup
    batch = _grouped_batch()
    cfg = StepConfig(distill_weight=0.0, teacher="live", **KERNEL)
    wide = {**batch, **{k: np.pad(batch[k], ((0, 0), (0, 32)), constant_values=pad)
                        for k, pad in (("teacher_tokens_BU", 0), ("teacher_positions_BU", -1))}}
    step, optimizer = cached_step(graphdef, cfg)
    first = step(_state(params, cfg, optimizer=optimizer)[0], batch)[1]
    programs = compilations.totals()["compile/count"]
    second = step(_state(params, cfg, optimizer=optimizer)[0], wide)[1]
    assert compilations.totals()["compile/count"] == programs
    for key in ("loss", "grad_norm", "entropy"):
        assert float(second[key]) == float(first[key]), key


def test_shared_prompts_ignore_the_widths_of_the_full_rows(setup):
    """With share_prompts the layout replaces the full prompt + completion rows (the reference model of the
    KL penalty reads it too): a batch whose rows are wider (S and U padded further, as a longer checker
    feedback elsewhere in the batch makes them) must reuse the compiled step (no new XLA program) and give
    the same metrics, which equal those of the step without shared prompts."""
    from fd_jax.train import compilations

    compilations.install()
    graphdef, params, _ = setup
    batch = _grouped_batch()
    cfg = dataclasses.replace(SHARED_CFG, beta=0.1)
    wide = {**batch, **{k: np.pad(batch[k], ((0, 0), (0, 32)), constant_values=pad) for k, pad in (
        ("student_tokens_BS", 0), ("student_positions_BS", -1), ("teacher_tokens_BU", 0), ("teacher_positions_BU", -1))}}
    step, optimizer = cached_step(graphdef, cfg)

    def state(cfg):  # a reference model other than the student, so that the penalty is not zero
        return _state(params, cfg, optimizer=optimizer)[0]._replace(ref=nnx.split(init_model(CFG, seed=5))[1])

    first = step(state(cfg), batch)[1]
    programs = compilations.totals()["compile/count"]
    second = step(state(cfg), wide)[1]
    assert compilations.totals()["compile/count"] == programs
    for key in ("loss", "grad_norm", "entropy", "kl_mean", "grpo/kl"):
        assert float(second[key]) == float(first[key]), key
    assert float(first["grpo/kl"]) > 0
    plain = dataclasses.replace(cfg, share_prompts=False)
    unshared = cached_step(graphdef, plain)[0](state(plain), batch)[1]
    for key in ("loss", "grad_norm", "entropy", "kl_mean", "grpo/kl"):
        np.testing.assert_allclose(float(unshared[key]), float(first[key]), rtol=2e-5, atol=1e-7, err_msg=key)


def _problem_batch(problems, generations, seed, prompt, context, own=None):
    """P problems x G samples: the G rows of a problem share the student prompt (`prompt`: its length range).
    Row 0 of a problem takes no FD loss (its teacher prompt is the student's); the others' teacher prompt is
    the student's with the problem's context (a demonstration), then, with `own`, a context of the row's own
    (its attempt and the checker's feedback): as run_rollout builds them."""
    rng = np.random.default_rng(seed)
    student, teacher, completions = [], [], []
    for _ in range(problems):
        student_prompt = list(rng.integers(1, 61, rng.integers(*prompt)))
        shared = student_prompt + list(rng.integers(1, 61, rng.integers(*context)))
        for g in range(generations):
            student.append(student_prompt)
            if g == 0:
                teacher.append(student_prompt)
            else:
                teacher.append(shared + ([] if own is None else list(rng.integers(1, 61, rng.integers(*own)))))
            completions.append(list(rng.integers(1, 61, rng.integers(1, 7))))
    rows = problems * generations
    batch = pack_train_batch(
        student_prompts=student, teacher_prompts=teacher, completions=completions,
        old_logprobs=[list(rng.normal(-4.0, 0.3, len(c))) for c in completions], rewards_B=np.zeros(rows),
        advantages_B=rng.normal(size=rows), distill_mask_B=np.array([t != p for t, p in zip(teacher, student)], float),
        pad_id=0, pad_multiple=8)
    return {k: np.asarray(v) for k, v in dataclasses.asdict(batch).items()}


def _grouped_batch():
    """3 problems x 3 rows: a problem's teacher prompts take two values (none, or the demonstration)."""
    return _problem_batch(3, 3, seed=7, prompt=(3, 9), context=(2, 6))


def _feedback_batch():
    """4 x 8 rows, as checker feedback builds them: a long common head per problem (the prompt and a
    demonstration), then each distilled row's own attempt and feedback, so each its own teacher prompt."""
    return _problem_batch(4, 8, seed=11, prompt=(30, 40), context=(30, 45), own=(3, 12))


def test_teacher_prompt_heads_layout():
    """The teacher prompts of a problem's rows run their common head once and each row's own tail against it
    (4 heads of 96 slots, 28 tails of 32, padded to 32 rows), where that computes fewer tokens than whole
    prompts (32 x 96); prompts alike to their end, or `heads=False`, keep whole prompts; a run that split
    them keeps splitting (the shapes of its programs)."""
    from fd_jax.rl.step import shared_prompt_inputs

    batch = _feedback_batch()
    layout = shared_prompt_inputs(batch)
    assert layout["prefix/teacher/tokens_HT"].shape == (4, 96)
    assert layout["prefix/teacher/tokens_RT"].shape == (32, 32)
    head_R, tails = layout["prefix/teacher/head_R"], layout["prefix/teacher/positions_RT"]
    assert list(head_R[:28]) == [h for h in range(4) for _ in range(7)]  # 7 distilled rows per problem
    heads = layout["prefix/teacher/tokens_HT"]
    head_len = (layout["prefix/teacher/positions_HT"] >= 0).sum(1)
    for b in np.flatnonzero(batch["distill_mask_B"]):  # head + tail is the row's prompt minus its last token
        r = layout["prefix/teacher/prefix_J"][np.flatnonzero((layout["prefix/teacher/row_JM"] == b).any(1))[0]]
        n = batch["teacher_index_BC"][b, 0]
        h, t = head_len[head_R[r]], (tails[r] >= 0).sum()
        assert h + t == n and tails[r, 0] == h
        np.testing.assert_array_equal(np.r_[heads[head_R[r], :h], layout["prefix/teacher/tokens_RT"][r, :t]],
                                      batch["teacher_tokens_BU"][b, :n])
    assert "prefix/student/tokens_HT" not in layout  # one prompt per problem: nothing to split
    assert "prefix/teacher/tokens_HT" not in shared_prompt_inputs(batch, heads=False)
    one = {**batch, "distill_mask_B": batch["distill_mask_B"] * (np.arange(32) % 8 == 1)}  # one per problem
    assert "prefix/teacher/tokens_HT" not in shared_prompt_inputs(one)  # nothing shared: 4 x 96 + 4 x 32 > 4 x 96
    two = {**batch, "distill_mask_B": batch["distill_mask_B"] * (np.arange(32) % 8 < 3)}  # two per problem
    assert "prefix/teacher/tokens_HT" in shared_prompt_inputs(two)  # 4 x 96 + 8 x 32 < 8 x 96
    alike = _grouped_batch()  # a problem's teacher prompts: the same demonstration, so one prompt each
    floors: dict = {}
    assert "prefix/teacher/tokens_HT" not in shared_prompt_inputs(alike, floors={})
    assert "prefix/teacher/tokens_HT" in shared_prompt_inputs(batch, floors=floors)
    assert "prefix/teacher/tokens_HT" in shared_prompt_inputs(alike, floors=floors)


FD_CFG = StepConfig(distill_weight=1.0, teacher="ema", loss_agg="seq_mean", **KERNEL)


@pytest.mark.parametrize("cfg,make", [
    (FD_CFG, "grouped"),
    (StepConfig(distill_weight=0.0, teacher="live", **KERNEL), "grouped"),  # GRPO: no teacher pass
    (FD_CFG, "feedback"),  # each teacher prompt its own: a problem's common head once, each row's tail
])
def test_shared_prompts_give_the_same_step(setup, cfg, make):
    """share_prompts runs each distinct prompt once and the completions against its cached keys/values: the
    same loss, metrics and update as one full forward per row (plain SGD, so rounding is not amplified)."""
    from fd_jax.rl.step import shared_prompt_inputs

    graphdef, params, _ = setup
    batch = {"grouped": _grouped_batch, "feedback": _feedback_batch}[make]()
    layout = shared_prompt_inputs(batch)
    assert layout["prefix/student/tokens_RT"].shape[0] == 4  # 3 or 4 distinct prompts: a power of two
    teacher_rows = [sorted(set(r) - {-1}) for r in layout["prefix/teacher/row_JM"]]
    if make == "grouped":
        # A prompt's completions back to back in one packed row (4 x 16 tokens < 9 rows x C = 8): the padding
        # of short completions is not computed. The teacher holds only the 6 rows that take the FD loss, with
        # their 3 distinct prompts (the others' teacher prompt is the student's and is not run): 4 packed rows.
        assert layout["prefix/student/row_JM"].shape == (4, 16)
        assert ([sorted(set(r) - {-1}) for r in layout["prefix/student/row_JM"]]
                == [[0, 1, 2], [3, 4, 5], [6, 7, 8], []])
        assert teacher_rows == [[1, 2], [4, 5], [7, 8], []]
    else:  # the 28 rows that take the FD loss, each its own teacher prompt (one head per problem): own rows
        assert sorted(r for rows in teacher_rows for r in rows) == [b for b in range(32) if b % 8]
        assert all(len(rows) <= 1 for rows in teacher_rows)
    assert ("prefix/teacher/tokens_HT" in layout) == (make == "feedback")
    results = []
    # One full forward per row; then shared prompts with the completions in the default frame (a prompt's
    # completions back to back) and one row per completion.
    variants = [dataclasses.replace(cfg, share_prompts=False), dataclasses.replace(cfg, prompt_packing="auto")]
    for c in variants + ([dataclasses.replace(cfg, prompt_packing="rows")] if make == "grouped" else []):
        step, optimizer = cached_step(graphdef, c, sgd=True)
        state, _ = _state(params, c, teacher_seed=5, optimizer=optimizer)
        results.append(step(state, batch))
    (a, ma), *shared = results
    assert float(ma["grad_norm"]) > 0
    for b, mb in shared:
        for key in ("loss", "grad_norm", "entropy", "kl_mean"):
            np.testing.assert_allclose(float(mb[key]), float(ma[key]), rtol=2e-5, atol=1e-7, err_msg=key)
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)


def test_shared_prompt_shapes_never_shrink_within_a_run():
    """The layout's shapes follow the data (distinct prompts, prompt length, packed width); with the step's
    `floors` a later batch that needs less keeps the shapes already compiled instead of a new program."""
    from fd_jax.rl.step import shared_prompt_inputs

    def shapes(layout):
        return {k: v.shape for k, v in layout.items()}

    big = _grouped_batch()
    big["distill_mask_B"] = np.ones_like(big["distill_mask_B"])  # every row's teacher runs: 6 distinct prompts
    # The same rows whose teachers saw no context: 3 distinct teacher prompts instead of 6.
    small = {**big, "teacher_tokens_BU": big["student_tokens_BS"], "teacher_index_BC": big["student_index_BC"]}
    def changes(floors, packing="auto"):
        seen = [shapes(shared_prompt_inputs(b, packing=packing, floors=floors)) for b in (big, small, big, small, big)]
        return sum(a != b for a, b in zip(seen, seen[1:]))

    for packing in ("auto", "groups", "rows"):  # without floors every alternation is a new shape (a program)
        assert changes(None, packing) == 4, packing
    # With them the teacher's prefix rows stay at 8: the frame (`auto`) and one row per completion (`rows`)
    # then keep one shape; `groups` grows its packed width once (the short batch's prompts hold more tokens).
    for packing, expected in (("auto", 0), ("rows", 0), ("groups", 1)):
        floors: dict = {}
        assert changes(floors, packing) == expected, packing
        assert floors["teacher"]["rows"] == 8 and floors["student"]["rows"] == 4


def test_shared_prompt_frame_shape_is_fixed_by_the_batch():
    """`auto` packs whole completions of a prompt into a frame whose shape follows from the batch's (B, C)
    and prefix rows, not from the completions' lengths; a batch that does not fit runs one row per
    completion (the only other shape)."""
    from fd_jax.rl.step import _prefix_layout

    rng = np.random.default_rng(0)
    B, C, G = 16, 8, 4
    tokens_BS = np.repeat(rng.integers(1, 50, (B // G, 9 + C)), G, axis=0)  # 4 prompts of 9 tokens, G rows each
    index_BC = 9 + np.arange(C)[None, :].repeat(B, 0)
    seen = set()
    for lengths in (rng.integers(1, 5, B), rng.integers(1, 5, B), np.full(B, 4), np.r_[np.full(B - 1, 1), 8]):
        mask_BC = (np.arange(C)[None, :] < lengths[:, None]).astype(np.float32)
        layout = _prefix_layout(tokens_BS, index_BC, mask_BC, packing="auto", multiple=8)
        seen.add(layout["row_JM"].shape)
        packed = [(b, c) for b, c in zip(layout["row_JM"].ravel(), layout["col_JM"].ravel()) if b >= 0]
        assert sorted(packed) == sorted(zip(*np.nonzero(mask_BC)))  # every real token once
        for j, r in enumerate(layout["prefix_J"]):  # a packed row holds rows of its own prefix, whole
            rows_j = set(layout["row_JM"][j][layout["row_JM"][j] >= 0].tolist())
            assert all(b // G == r for b in rows_j)
            assert sum(mask_BC[b].sum() for b in rows_j) == (layout["row_JM"][j] >= 0).sum()
    assert seen == {(6, 2 * C)}  # a frame of 6 rows of 2C: 3/4 of B x C (step.packing_frame's default)
    long_BC = np.ones((B, C), np.float32)  # every completion at the budget: 4 prompts x 2 rows > 6 rows
    assert _prefix_layout(tokens_BS, index_BC, long_BC, packing="auto", multiple=8)["row_JM"].shape == (B, C)


@pytest.mark.parametrize("packing,floor,make", [
    ("groups", None, "grouped"), ("rows", None, "grouped"), ("auto", None, "grouped"),
    ("groups", {"rows": 16, "length": 40, "m": 32}, "grouped"),
    ("auto", None, "feedback"), ("rows", {"heads": 8, "head_length": 128, "tail_length": 48}, "feedback")])
def test_shared_prefix_hidden_states_equal_full_forward(setup, packing, floor, make):
    """Either packing of the suffix tokens (a prompt's completions back to back in one row, or one row per
    completion), with whole prompts or with a problem's common head run once and each row's tail against it,
    gives the hidden states of one full forward per row at every completion position of the rows that take
    the FD loss, and zeros elsewhere (oracle: `hidden_states` over prompt + completion, gathered)."""
    from fd_jax.rl.step import _shared_prefix_hidden, shared_prompt_inputs

    graphdef, params, _ = setup
    batch = {"grouped": _grouped_batch, "feedback": _feedback_batch}[make]()
    floors = None if floor is None else {"teacher": dict(floor)}  # shapes held above what the batch needs
    mb = {**batch, **shared_prompt_inputs(batch, packing=packing, floors=floors)}
    assert ("prefix/teacher/tokens_HT" in mb) == (make == "feedback")
    if floor is not None and make == "grouped":
        assert mb["prefix/teacher/tokens_RT"].shape == (16, 40)
    if floor is not None and make == "feedback":
        assert mb["prefix/teacher/tokens_HT"].shape == (8, 128) and mb["prefix/teacher/tokens_RT"].shape == (32, 48)
    model = nnx.merge(graphdef, params)
    packed_BCD = jax.jit(lambda mb: _shared_prefix_hidden(model, mb, "teacher", batch["completion_mask_BC"].shape))(mb)
    full_BTD = model.hidden_states(jnp.asarray(batch["teacher_tokens_BU"]), jnp.asarray(batch["teacher_positions_BU"]))
    expected_BCD = jnp.take_along_axis(full_BTD, jnp.asarray(batch["teacher_index_BC"])[:, :, None], axis=1)
    counted_BC = batch["completion_mask_BC"] * batch["distill_mask_B"][:, None]
    assert 0 < counted_BC.sum() < batch["completion_mask_BC"].sum()
    mask_BC1 = counted_BC[:, :, None]
    np.testing.assert_allclose(np.asarray(packed_BCD) * mask_BC1, np.asarray(expected_BCD) * mask_BC1,
                               rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(packed_BCD)[counted_BC == 0] == 0)
    assert np.abs(np.asarray(expected_BCD) * mask_BC1).max() > 0.1
