"""DeepSeek-Prover-V2-7B (Llama architecture, non-CoT whole-proof completion) trained on Lean Workbook,
evaluated on miniF2F test, with the local Lean pool and Claude feedback; FD on a TPU slice (v4-32 / v5e-32
class: f32 weights + EMA teacher + Adam ≈ 110 GB sharded).

    python scripts/train_tpu.py --config configs/deepseek_prover_v2_7b_tpu.py --workdir /mnt/runs/dsp_fd

Needs ~/models/DeepSeek-Prover-V2-7B (a local HF directory) and a Lean Workbook file (JSON / JSONL /
Parquet, e.g. internlm/Lean-Workbook's `lean_workbook.json`).
"""

from fd_jax.config.defaults import lean_prover_config


def get_config():
    config = lean_prover_config("~/models/DeepSeek-Prover-V2-7B")  # a local Hugging Face directory
    config.total_steps = 400  # steps (fd_then_grpo: both stages)
    config.fd_steps = 200  # fd_then_grpo: FD stage length

    config.data.path = "data/lean_workbook.json"  # training problems (Lean Workbook, proved and unproved)
    config.data.format = "lean_workbook"  # loader of data.path
    config.data.split = ""  # Lean Workbook has no splits: keep every row
    config.data.eval_path = "data/minif2f.jsonl"  # held-out: miniF2F
    config.data.eval_format = "minif2f"  # loader of eval_path
    config.data.eval_split = "test"  # miniF2F test (244 theorems)
    config.data.prompt_format = "lean_completion"  # DeepSeek-Prover's "Complete the following Lean 4 code" format
    config.data.problems_per_step = 64  # P (64 x 8 = 512 rollouts per step)

    config.rollout.max_new_tokens = 2048  # non-CoT proofs are short
    config.rollout.num_generations = 8  # G

    config.mesh.data = 1  # replicas
    config.mesh.fsdp = -1  # shard weights and optimizer state over every chip
    config.mesh.tensor = 1  # raise to 2-4 when per-chip activations do not fit

    config.step.micro_batches = 16  # 512 rows in 16 accumulation steps
    config.eval.max_new_tokens = 2048  # same budget as training
    return config
