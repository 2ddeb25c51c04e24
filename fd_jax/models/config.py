"""The decoder's configuration, read from and written to Hugging Face `config.json` files."""

from __future__ import annotations

import dataclasses
from typing import Any

# Hugging Face architecture name -> (family, attention biases on q/k/v, bias on o, QK-norm).
# Llama's biases are switched by `attention_bias` (all four projections) instead.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the Flax decoder needs; `hf_config` keeps the original dict so `save_hf` round-trips.

    Build one from a Hugging Face config with `ModelConfig.from_hf(...)`.
    """

    family: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None or {"rope_type": "linear"|"llama3", "factor": ...}
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def num_params(self) -> int:
        d, i, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * i + 2 * d + (2 * hd if self.qk_norm else 0)
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + d

    @classmethod
    def from_hf(cls, hf_config: Any, *, source: str = "config") -> ModelConfig:
        """From a `transformers.PretrainedConfig` or its dict; `source` names the file in error messages."""
        d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        architectures = d.get("architectures") or [_MODEL_TYPES.get(d.get("model_type", ""), "")]
        arch = architectures[0]
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"{source}: architectures={architectures!r} (model_type={d.get('model_type')!r}) is not supported; "
                f"fd_jax supports {sorted(ARCHITECTURES)}"
            )
        family = ARCHITECTURES[arch]
        if d.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported (set it to false)")
        num_heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})  # transformers 5 vs 4
        rope_theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"{source}: rope_type={rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}")
        llama_bias = bool(d.get("attention_bias", False))
        return cls(
            family=family,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or hidden // num_heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if family == "qwen2" else llama_bias,
            o_bias=llama_bias if family == "llama" else False,
            mlp_bias=bool(d.get("mlp_bias", False)) if family == "llama" else False,
            qk_norm=family == "qwen3",
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            hf_config=d,
        )

    def to_hf(self):
        """A `transformers.PretrainedConfig` for this model (the loaded one, updated with our fields)."""
        import transformers

        model_type = self.hf_config.get("model_type", self.family)
        fields = {k: v for k, v in self.hf_config.items() if k not in ("model_type", "transformers_version")}
        rope = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        fields.update(
            architectures=[_MODEL_TYPES[self.family]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
        )
        fields.pop("rope_scaling", None)
        fields.pop("rope_theta", None)
        return transformers.AutoConfig.for_model(model_type, **fields)
