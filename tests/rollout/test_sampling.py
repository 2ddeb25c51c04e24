"""The sampler against transformers (greedy `generate`, logits, its logits warpers) and chi-square tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from fd_jax import sharding
from fd_jax.models import load_hf
from fd_jax.models.transformer import Transformer
from fd_jax.rollout.sampling import SampleOutput, argmax, bucket, decode_segments, filter_logits, generate

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
FAMILIES = {
    "llama": transformers.LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True),
    "qwen2": transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen3": transformers.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
}
RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(0, 97, size=n).tolist() for n in range(1, 10)]  # lengths 1..9 in one batch
NEW = 10


def _perturbed(hf_config, scale=0.2, seed=0):
    """Random weights, norms and biases included, large enough that greedy argmaxes are well separated."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else scale * torch.randn_like(p))
    return model


def _load(hf_model, path, **kw):
    hf_model.save_pretrained(path)
    return load_hf(path, dtype=jnp.float32, **kw)[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (transformers model, fd_jax model, checkpoint path) with the same weights."""
    out = {}
    for name, cfg in FAMILIES.items():
        hf_model, path = _perturbed(cfg), tmp_path_factory.mktemp(name)
        out[name] = (hf_model, _load(hf_model, path), path)
    return out


def _hf_logits(hf_model, rows):
    """f64 [R, L, V] logits of right-padded rows (an attention mask hides the padding)."""
    length = max(map(len, rows))
    ids = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        return hf_model(ids, attention_mask=mask).logits.double().numpy()


def _completion_logprobs(logits_RLV, prompts, out: SampleOutput):
    """The log-softmax of teacher-forced logits at each generated token, [R, N] (0 after the length)."""
    logp = logits_RLV - np.logaddexp.reduce(logits_RLV, axis=-1, keepdims=True)
    result = np.zeros(out.tokens.shape)
    for r, (prompt_id, tokens) in enumerate(zip(out.prompt_index, out.token_lists())):
        start = len(prompts[prompt_id]) - 1  # logits at t predict token t + 1
        result[r, : len(tokens)] = logp[r, start + np.arange(len(tokens)), tokens]
    return result


def _full_rows(prompts, out):
    return [prompts[p] + toks for p, toks in zip(out.prompt_index, out.token_lists())]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_greedy_equals_transformers_generate_and_logprobs_equal_teacher_forcing(models, name):
    hf_model, model, _ = models[name]
    out = generate(model, PROMPTS, max_new_tokens=NEW, temperature=0.0)
    assert out.tokens.shape == (len(PROMPTS), NEW)
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])  # an explicit mask: transformers would otherwise hide token 0 as padding
        expected = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            pad_token_id=0,
        )[0, len(prompt):].tolist()
        assert out.tokens[i].tolist() == expected, f"{name}: prompt of length {len(prompt)}"
    assert out.lengths.tolist() == [NEW] * len(PROMPTS)
    assert out.finish_reason == ["length"] * len(PROMPTS)
    assert (out.sampling_logprobs == 0).all()  # greedy: a point mass

    rows = _full_rows(PROMPTS, out)
    hf_logprobs = _completion_logprobs(_hf_logits(hf_model, rows), PROMPTS, out)
    np.testing.assert_allclose(out.logprobs, hf_logprobs, atol=1e-4, rtol=0)
    # fd_jax's own teacher-forced forward pass (no cache) over the same right-padded rows
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    positions = np.full(tokens.shape, -1, np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)], positions[i, : len(row)] = row, np.arange(len(row))
    fd_logits = np.asarray(jax.jit(lambda m, t, p: m(t, p))(model, tokens, positions), np.float64)
    np.testing.assert_allclose(out.logprobs, _completion_logprobs(fd_logits, PROMPTS, out), atol=1e-4, rtol=0)


def test_seed_reproducible_and_sampled_logprobs_match_transformers(models):
    hf_model, model, _ = models["qwen2"]
    kw = dict(max_new_tokens=NEW, temperature=1.0, n=4)
    a, b, c = generate(model, PROMPTS, seed=7, **kw), generate(model, PROMPTS, seed=7, **kw), generate(model, PROMPTS, seed=8, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.tokens != c.tokens).mean() > 0.5
    # n rows of one prompt are separate draws
    assert all(len({tuple(r) for r in a.token_lists()[p * 4 : p * 4 + 4]}) > 1 for p in range(len(PROMPTS)))
    expected = _completion_logprobs(_hf_logits(hf_model, _full_rows(PROMPTS, a)), PROMPTS, a)
    np.testing.assert_allclose(a.logprobs, expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(a.sampling_logprobs, a.logprobs)  # temperature 1, no filter


def test_decode_over_growing_cache_prefixes_equals_whole_cache(models):
    """Segments that attend to the first T + 64 k slots give the whole-cache loop's tokens and log-probs,
    and the log-probs are transformers' teacher-forced ones; a row's steps cross every segment boundary."""
    assert decode_segments(256, 64) == (64, 128, 192, 256)
    assert decode_segments(1024, 64) == (256, 512, 768, 1024)  # at most 4 copies of the loop body
    assert decode_segments(64, 64) == (64,) and decode_segments(256, 0) == (256,)
    assert decode_segments(200, 64) == (64, 128, 192, 200)
    hf_model, model, _ = models["llama"]
    prompts = PROMPTS[::4]
    kw = dict(max_new_tokens=150, temperature=1.0, n=2, seed=3)  # bucket 256: segments end at 64, 128, 192
    whole, segmented = generate(model, prompts, attend_block=0, **kw), generate(model, prompts, **kw)
    np.testing.assert_array_equal(segmented.tokens, whole.tokens)
    # Masked slots add exact zeros, but shorter rows are summed in another order: f32 rounding (~1e-6 here).
    np.testing.assert_allclose(segmented.logprobs, whole.logprobs, atol=1e-5, rtol=0)
    assert (segmented.lengths == 150).all()
    expected = _completion_logprobs(_hf_logits(hf_model, _full_rows(prompts, segmented)), prompts, segmented)
    np.testing.assert_allclose(segmented.logprobs, expected, atol=1e-4, rtol=0)


def _warped(logits_RV, temperature=1.0, top_k=0, top_p=1.0):
    """transformers' own warpers, in its order: temperature, top-k, top-p; removed tokens are -inf."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(None, torch.tensor(logits_RV)).numpy()


def test_filters_keep_exactly_what_transformers_warpers_keep():
    logits_RV = np.random.default_rng(1).normal(size=(512, 50)).astype(np.float32) * 2
    for settings in (dict(top_k=5), dict(temperature=0.7, top_p=0.9), dict(temperature=1.3, top_k=10, top_p=0.5),
                     dict(top_p=0.01), dict(top_k=49, top_p=0.999)):
        ours = np.asarray(jax.jit(functools.partial(
            filter_logits, temperature=settings.get("temperature", 1.0), top_k=settings.get("top_k", 0),
            top_p=settings.get("top_p"),
        ))(logits_RV))
        expected = _warped(logits_RV, **settings)
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected), err_msg=str(settings))
        kept = np.isfinite(expected)
        np.testing.assert_allclose(ours[kept], expected[kept], rtol=1e-6, err_msg=str(settings))


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A 12-token vocabulary: every token is drawn often enough for a chi-square test."""
    cfg = transformers.LlamaConfig(**{**TINY, "vocab_size": 12}, num_key_value_heads=2)
    hf_model = _perturbed(cfg, scale=0.08, seed=3)
    return hf_model, _load(hf_model, tmp_path_factory.mktemp("small_vocab"))


@pytest.mark.parametrize(
    "settings", [dict(), dict(temperature=0.6), dict(temperature=1.5, top_k=5), dict(temperature=1.2, top_p=0.7)],
    ids=["t1", "t0.6", "t1.5_topk5", "t1.2_topp0.7"],
)
def test_first_token_follows_the_model_distribution(small_vocab, settings):
    hf_model, model = small_vocab
    prompt, draws = [3, 1, 4, 1, 5], 4000
    out = generate(model, [prompt], max_new_tokens=1, n=draws, seed=11, **settings)
    warped_V = _warped(_hf_logits(hf_model, [prompt])[:, -1], **settings)[0]
    probs_V = np.exp(warped_V - np.logaddexp.reduce(warped_V))
    counts_V = np.bincount(out.tokens[:, 0], minlength=12)
    allowed = np.isfinite(warped_V)
    assert counts_V[~allowed].sum() == 0
    assert (probs_V[allowed] * draws >= 5).all(), "test set-up: expected counts too small for chi-square"
    p_value = scipy.stats.chisquare(counts_V[allowed], probs_V[allowed] * draws).pvalue
    assert p_value > 1e-3, (counts_V, probs_V * draws)
    np.testing.assert_allclose(out.sampling_logprobs[:, 0], np.log(probs_V[out.tokens[:, 0]]), atol=1e-4)


@pytest.mark.parametrize(
    "settings", [dict(temperature=0.8, top_k=6, top_p=0.8), dict(top_p=0.5), dict(temperature=2.0, top_k=3)],
    ids=["topk_topp", "topp_only", "topk_only"],
)
def test_top_k_top_p_never_emit_excluded_tokens(models, settings):
    hf_model, model, _ = models["qwen3"]
    prompts = PROMPTS[::3]
    out = generate(model, prompts, max_new_tokens=NEW, n=32, seed=5, **settings)
    logits_RLV = _hf_logits(hf_model, _full_rows(prompts, out))
    for r, (p, tokens) in enumerate(zip(out.prompt_index, out.token_lists())):
        steps = len(prompts[p]) - 1 + np.arange(len(tokens))
        warped = _warped(logits_RLV[r, steps], **settings)
        chosen = warped[np.arange(len(tokens)), tokens]
        assert np.isfinite(chosen).all(), f"row {r} emitted an excluded token"
        expected = chosen - np.logaddexp.reduce(warped, axis=-1)
        np.testing.assert_allclose(out.sampling_logprobs[r, : len(tokens)], expected, atol=1e-4)
    assert out.lengths.tolist() == [NEW] * len(out.lengths)


def test_stop_tokens_stop_strings_and_max_tokens(models):
    _, model, _ = models["qwen2"]
    free = generate(model, PROMPTS, max_new_tokens=7, temperature=0.0)
    assert free.tokens.shape == (len(PROMPTS), 7) and free.finish_reason == ["length"] * len(PROMPTS)
    stop = int(free.tokens[0, 3])

    def expected_length(row, stops):
        hits = [j for j, t in enumerate(row) if t in stops]
        return (hits[0] + 1, "stop") if hits else (len(row), "length")

    per_prompt = [[stop], [int(free.tokens[1, 0]), 96]] + [[]] * (len(PROMPTS) - 2)
    for stop_ids in ([stop], per_prompt):
        out = generate(model, PROMPTS, max_new_tokens=7, temperature=0.0, stop_token_ids=stop_ids, pad_id=-5)
        for i, row in enumerate(free.tokens.tolist()):
            stops = stop_ids if isinstance(stop_ids[0], int) else stop_ids[i]
            length, reason = expected_length(row, stops)
            assert (out.lengths[i], out.finish_reason[i]) == (length, reason), f"row {i}"
            assert out.tokens[i, :length].tolist() == row[:length]
            assert (out.tokens[i, length:] == -5).all() and (out.logprobs[i, length:] == 0).all()
            np.testing.assert_allclose(out.logprobs[i, :length], free.logprobs[i, :length], atol=1e-6)
    assert out.finish_reason[0] == "stop" and out.lengths[0] <= 4

    # every row stops at once: the loop exits early and still reports each row right
    firsts = sorted({int(t) for t in free.tokens[:, 0]})
    out = generate(model, PROMPTS, max_new_tokens=7, temperature=0.0, stop_token_ids=firsts)
    assert out.lengths.tolist() == [1] * len(PROMPTS) and out.finish_reason == ["stop"] * len(PROMPTS)

    class Letters:  # any object with .decode(ids) -> str
        @staticmethod
        def decode(ids):
            return "".join(chr(ord("a") + t % 26) for t in ids)

    stop_string = Letters.decode(free.tokens[2, 2:4].tolist())
    out = generate(model, PROMPTS, max_new_tokens=7, temperature=0.0, stop_strings=[stop_string], tokenizer=Letters)
    for i, row in enumerate(free.tokens.tolist()):
        ends = [j for j in range(1, 8) if stop_string in Letters.decode(row[:j])]
        assert out.lengths[i] == (ends[0] if ends else 7), f"row {i}"
        assert out.finish_reason[i] == ("stop" if ends else "length")
    assert out.lengths[2] <= 4


def test_n_samples_share_one_prefill(models, monkeypatch):
    _, model, _ = models["llama"]
    traced = []
    original = Transformer.cached_hidden_states

    def recording(self, tokens_BT, *args, **kwargs):
        traced.append(tokens_BT.shape)
        return original(self, tokens_BT, *args, **kwargs)

    monkeypatch.setattr(Transformer, "cached_hidden_states", recording)
    prompts = PROMPTS[:3]
    # min_bucket=32: shapes no other test compiles, so both programs are traced here
    greedy = generate(model, prompts, max_new_tokens=6, temperature=0.0, n=4, min_bucket=32)
    assert traced == [(3, 32), (12, 1)]  # the prefill sees the 3 prompts, never the 12 rows
    single = generate(model, prompts, max_new_tokens=6, temperature=0.0, min_bucket=32)
    assert greedy.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    np.testing.assert_array_equal(greedy.tokens, np.repeat(single.tokens, 4, axis=0))
    np.testing.assert_allclose(greedy.logprobs, np.repeat(single.logprobs, 4, axis=0), atol=1e-6)


def test_sharded_equals_unsharded(models):
    _, plain, path = models["qwen2"]
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = load_hf(path, dtype=jnp.float32, mesh=mesh)[0]
    prompts = PROMPTS[:5]  # 5 prompts x 3 samples: neither divides the 4 batch shards, so rows are padded
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, seed=3)):
        a = generate(plain, prompts, max_new_tokens=NEW, n=3, **kw)
        b = generate(sharded, prompts, max_new_tokens=NEW, n=3, mesh=mesh, **kw)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        assert a.lengths.tolist() == b.lengths.tolist()


def test_bucket_argmax_and_clear_errors(models):
    assert [bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    x = np.array([[0.0, 3.0, 3.0, -1.0], [-np.inf, -2.0, -np.inf, -3.0]], np.float32)
    assert np.asarray(argmax(jnp.asarray(x))).tolist() == np.argmax(x, axis=-1).tolist() == [1, 1]
    assert bucket(3, 1) == 4 and bucket(1, 1) == 1
    _, model, _ = models["qwen2"]
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompts\[0\] has token ids \[97\] outside"):
        generate(model, [[1, 97]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        generate(model, [[1]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        generate(model, [[1]], max_new_tokens=2, stop_strings=["x"])
    with pytest.raises(ValueError, match="one list per prompt"):
        generate(model, [[1], [2]], max_new_tokens=2, stop_token_ids=[[1]])
