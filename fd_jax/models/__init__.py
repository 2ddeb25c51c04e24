"""The Llama / Qwen2 / Qwen3 decoder and its Hugging Face checkpoint I/O."""

from fd_jax.models.config import ModelConfig
from fd_jax.models.hf_io import init_model, load_hf, read_config, save_hf
from fd_jax.models.transformer import KVCache, Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer", "init_model", "load_hf", "read_config", "save_hf"]
