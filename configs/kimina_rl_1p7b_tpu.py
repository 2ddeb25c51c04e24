"""Kimina-Prover-RL-1.7B (a Qwen3-1.7B) on miniF2F with the local Lean pool and Claude feedback, FD on a
TPU slice (v4-8 / v5e-8 or larger: f32 weights + EMA teacher + Adam moments ≈ 27 GB, sharded over chips).

    python scripts/train_tpu.py --config configs/kimina_rl_1p7b_tpu.py --workdir /mnt/runs/kimina_fd
    # GRPO baseline / FD then GRPO:  --config.algorithm=grpo | --config.algorithm=fd_then_grpo

Download the checkpoint first (fd_jax never downloads): `huggingface-cli download AI-MO/Kimina-Prover-RL-1.7B
--local-dir ~/models/Kimina-Prover-RL-1.7B`; set up Lean with scripts/setup_lean.sh. Qwen3-1.7B itself
works the same way (model.path to its directory).
"""

from fd_jax.config.defaults import lean_prover_config


def get_config():
    config = lean_prover_config("~/models/Kimina-Prover-RL-1.7B")  # a local Hugging Face directory
    config.total_steps = 300  # FD steps (fd_then_grpo: both stages)
    config.fd_steps = 150  # fd_then_grpo: the FD stage, then 150 GRPO steps

    config.data.prompt_format = "lean_chat"  # Kimina-Prover is a chat model that thinks, then writes a lean4 block
    config.data.system_prompt = "You are an expert in mathematics and Lean 4."  # a system turn in the style of Kimina's
    config.rollout.max_new_tokens = 8192  # thinking + proof
    config.rollout.temperature = 1.0  # old log-probs are those of the temperature-1 policy either way
    config.rollout.num_generations = 8  # G: the GRPO group and FD's samples per theorem

    config.mesh.data = 1  # replicas (raise on large slices when weights fit per fsdp group)
    config.mesh.fsdp = -1  # every remaining chip shards weights, optimizer state and rows
    config.mesh.tensor = 1  # heads/MLP split (useful for 8B+)

    config.eval.max_new_tokens = 8192  # same budget as training
    return config
