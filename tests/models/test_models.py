"""The decoder against Hugging Face transformers (torch) as the oracle, and checkpoint I/O."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from fd_jax import sharding
from fd_jax.models import ModelConfig, init_model, load_hf, save_hf

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)

# Each family with the features it is known for; together they cover tied/untied, GQA/MHA, RoPE scaling,
# attention/MLP biases, QK-norm and an explicit head_dim that differs from hidden/heads.
FAMILIES = {
    "llama_tied_gqa_llama3rope_biases": transformers.LlamaConfig(
        **TINY, num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8}, rope_theta=500000.0,
    ),
    "llama_untied_mha_linearrope": transformers.LlamaConfig(
        **TINY, num_key_value_heads=4, tie_word_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "qwen2_gqa_qkvbias": transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen3_qknorm_headdim": transformers.Qwen3Config(
        **TINY, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True
    ),
}


def _perturbed_hf_model(hf_config, seed=0):
    """A random HF model whose norms and biases are perturbed too, so a wrong mapping cannot hide."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def _hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].numpy()


ROWS = [list(range(3, 12)), [5, 90, 17, 2, 44], [7]]  # lengths 9, 5, 1: right-padded in one batch


def _right_padded(rows, pad_id=0):
    t = max(map(len, rows))
    tokens = np.full((len(rows), t), pad_id, np.int32)
    positions = np.full((len(rows), t), -1, np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
        positions[i, : len(row)] = np.arange(len(row))
    return tokens, positions


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    hf_model = _perturbed_hf_model(FAMILIES[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(path)
    return request.param, hf_model, path


def test_logits_match_transformers_with_right_padding(family):
    name, hf_model, path = family
    model, cfg = load_hf(path, dtype=jnp.float32)
    tokens, positions = _right_padded(ROWS)
    logits = np.asarray(jax.jit(lambda m, t, p: m(t, p))(model, tokens, positions))
    for i, row in enumerate(ROWS):
        np.testing.assert_allclose(logits[i, : len(row)], _hf_logits(hf_model, row), atol=1e-4, rtol=1e-4,
                                   err_msg=f"{name} row {i}")
    # hidden_states + the unembedding matrix give the same logits (the kernel's path)
    hidden = model.hidden_states(tokens, positions)
    np.testing.assert_allclose(np.asarray(hidden @ model.unembedding), logits, atol=1e-4, rtol=1e-4)


def test_save_hf_roundtrip_through_transformers(family, tmp_path):
    name, hf_model, _ = family
    cfg = ModelConfig.from_hf(hf_model.config)
    model = init_model(cfg, seed=1)
    save_hf(model, cfg, tmp_path / "out", max_shard_bytes=40_000)  # forces several shards + an index
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert (tmp_path / "out" / "generation_config.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens, positions = _right_padded(ROWS[:1])
    ours = np.asarray(model(tokens, positions))[0]
    np.testing.assert_allclose(ours, _hf_logits(reloaded, ROWS[0]), atol=1e-4, rtol=1e-4, err_msg=name)
    again, _ = load_hf(tmp_path / "out")
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_packed_rows_equal_separate_rows():
    cfg = ModelConfig.from_hf(FAMILIES["qwen3_qknorm_headdim"])
    model = init_model(cfg, seed=2)
    a, b = [4, 8, 15, 16], [23, 42, 7]
    packed_tokens = np.array([a + b], np.int32)
    packed_positions = np.array([list(range(len(a))) + list(range(len(b)))], np.int32)
    packed = np.asarray(model(packed_tokens, packed_positions))[0]
    for seq, sl in ((a, slice(0, 4)), (b, slice(4, 7))):
        alone = np.asarray(model(np.array([seq], np.int32), np.arange(len(seq))[None]))[0]
        np.testing.assert_allclose(packed[sl], alone, atol=1e-5, rtol=1e-5)


def test_bf16_forward_close_to_f32(family):
    _, _, path = family
    tokens, positions = _right_padded(ROWS)
    f32, _ = load_hf(path, dtype=jnp.float32)
    bf16, _ = load_hf(path, dtype=jnp.bfloat16)
    assert bf16.layers[0].attn.q[...].dtype == jnp.bfloat16
    ref = np.asarray(f32(tokens, positions))
    out = np.asarray(bf16(tokens, positions))
    valid = positions >= 0
    # bf16 keeps 8 bits of mantissa: errors of a few percent of the logit scale, through two layers.
    err = np.abs(out - ref)[valid].max() / np.abs(ref[valid]).max()
    assert err < 0.05, err
    # ... and the ranking of the top token survives almost everywhere
    agree = (out.argmax(-1) == ref.argmax(-1))[valid].mean()
    assert agree >= 0.9, agree


def test_sharded_model_matches_unsharded(tmp_path):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    hf_model = _perturbed_hf_model(FAMILIES["qwen2_gqa_qkvbias"])
    hf_model.save_pretrained(tmp_path)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded, cfg = load_hf(tmp_path, mesh=mesh)
    plain, _ = load_hf(tmp_path)
    q = sharded.layers[0].attn.q[...]  # [embed=32, heads=4, head_dim=8]: fsdp over embed, tensor over heads
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (16, 2, 8)
    assert sharded.layers[0].mlp.down[...].addressable_shards[0].data.shape == (24, 16)
    tokens, positions = _right_padded(ROWS + [[1, 2, 3]])
    batch = sharding.shard_batch({"t": tokens, "p": positions}, mesh)
    out = jax.jit(lambda m, t, p: m(t, p))(sharded, batch["t"], batch["p"])
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain(tokens, positions)), atol=1e-5, rtol=1e-5)


def test_uneven_axes_are_replicated():
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    spec = sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 2, 8), mesh)
    assert spec == jax.sharding.PartitionSpec("fsdp", None, None)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_hf(tmp_path / "nope")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config.json.*GPT2LMHeadModel.*not supported"):
        load_hf(gpt2)

    hf_model = _perturbed_hf_model(FAMILIES["qwen2_gqa_qkvbias"])
    hf_model.save_pretrained(tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    missing = dict(weights)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        load_hf(tmp_path / "m")
    wrong = dict(weights)
    wrong["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
    save_file(wrong, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(8, 32\)"):
        load_hf(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf(tmp_path / "m")


def test_blockwise_attention_equals_plain_attention_with_gradients():
    from fd_jax.models.transformer import attention_mask, blockwise_attention, dot_product_attention
    from fd_jax.models.transformer import segments_from_positions

    rng = np.random.default_rng(0)
    b, t, h, g, hd = 2, 16, 4, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((b, t, h, hd), (b, t, g, hd), (b, t, g, hd)))
    positions = np.array([list(range(16)), list(range(5)) + list(range(7)) + [-1] * 4])  # packed + padded
    seg = segments_from_positions(positions)
    mask = attention_mask(positions, positions, seg, seg)
    weights = jnp.asarray(rng.normal(size=(b, t, h, hd)), jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * weights)

    plain = lambda q, k, v: dot_product_attention(q, k, v, mask, jnp.float32)  # noqa: E731
    blocks = lambda q, k, v: blockwise_attention(q, k, v, mask, jnp.float32, block=4)  # noqa: E731
    np.testing.assert_allclose(blocks(q, k, v), plain(q, k, v), atol=1e-6)
    g_plain = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(q, k, v)
    g_blocks = jax.grad(lambda *a: loss(blocks, *a), argnums=(0, 1, 2))(q, k, v)
    for x, y in zip(g_blocks, g_plain):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_export_carries_the_tokenizers_special_tokens_and_a_readable_mode(tmp_path):
    """generate stops only at the eos id the exported config names (null ran to the token limit), and the
    weights are as readable as the directory's other files (safetensors alone writes them 0600)."""
    from fd_jax.data.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    cfg = ModelConfig.from_hf(dict(FAMILIES["qwen3_qknorm_headdim"].to_dict(), vocab_size=len(tokenizer)))
    out = save_hf(init_model(cfg, seed=0), cfg, tmp_path / "out", tokenizer=tokenizer)
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for name in ("bos", "eos", "pad"):
        want = getattr(tokenizer, f"{name}_token_id")
        assert config[f"{name}_token_id"] == generation[f"{name}_token_id"] == want, name
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes

    # A model config that names its own eos keeps it, and gains the tokenizer's (chat models stop at either).
    own = ModelConfig.from_hf(dict(cfg.hf_config, eos_token_id=7))
    again = save_hf(init_model(own, seed=0), own, tmp_path / "own", tokenizer=tokenizer)
    assert json.loads((again / "generation_config.json").read_text())["eos_token_id"] == [7, tokenizer.eos_token_id]
