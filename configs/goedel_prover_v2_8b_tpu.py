"""Goedel-Prover-V2-8B (a Qwen3-8B with self-correction and long chain of thought) on miniF2F with the
local Lean pool and GPT-style feedback through an OpenAI-compatible endpoint; FD on a TPU slice (v4-32 /
v5p-16 class: f32 weights + EMA teacher + Adam ≈ 130 GB sharded, plus long-sequence activations).

    python scripts/train_tpu.py --config configs/goedel_prover_v2_8b_tpu.py --workdir /mnt/runs/goedel_fd

Needs ~/models/Goedel-Prover-V2-8B (a local HF directory). The feedback endpoint can be OpenAI itself or any
OpenAI-compatible server (vLLM, SGLang) at feedback.base_url.
"""

from fd_jax.config.defaults import lean_prover_config


def get_config():
    config = lean_prover_config("~/models/Goedel-Prover-V2-8B")  # a local Hugging Face directory
    config.total_steps = 300  # steps (fd_then_grpo: both stages)
    config.fd_steps = 150  # fd_then_grpo: FD stage length

    config.data.prompt_format = "lean_chat"  # chat turn asking for the complete lean4 code
    config.rollout.max_new_tokens = 16384  # Goedel-V2 thinks at length before the proof
    config.rollout.num_generations = 8  # G
    config.data.problems_per_step = 16  # P (long sequences: fewer problems per step)
    config.rollout.chunk_problems = 4  # overlap Lean checking with generation in smaller chunks

    config.mesh.data = 1  # replicas
    config.mesh.fsdp = -1  # shard weights and optimizer state over the remaining chips
    config.mesh.tensor = 4  # split heads/MLP/vocabulary: 16k-token sequences need activation memory

    config.step.micro_batches = 16  # 128 rows in 16 accumulation steps of 8
    config.step.token_chunk = 1024  # longer kernel blocks for long completions

    config.feedback.provider = "openai"  # an OpenAI-compatible chat-completions endpoint
    config.feedback.model = "gpt-5-mini"  # any chat model the endpoint serves
    config.feedback.base_url = ""  # "" = https://api.openai.com/v1; e.g. http://localhost:8000/v1 for vLLM
    config.feedback.api_key_env = "OPENAI_API_KEY"  # the environment variable that holds the key
    config.feedback.max_tokens = 2048  # room for a reasoning model's answer

    config.eval.max_new_tokens = 16384  # same budget as training
    return config
