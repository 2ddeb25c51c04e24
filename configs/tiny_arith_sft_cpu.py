"""The FD mechanism test bed on a CPU: a tiny model trained from scratch by the supervised stage to answer
arithmetic questions and to use a teacher context (feedback on a wrong answer, or a solved copy of the
question placed as an earlier exchange), then trained by FD / GRPO from that checkpoint. A controlled test of
the mechanism at toy scale, not of the paper's.

    python scripts/train_tpu.py --config configs/tiny_arith_sft_cpu.py --workdir runs/tiny_sft
    python scripts/preflight.py --config configs/tiny_arith_sft_cpu.py --config.algorithm=fd \
        --config.model.source=hf --config.model.path=runs/tiny_sft/hf_final
    python scripts/train_tpu.py --config configs/tiny_arith_sft_cpu.py --workdir runs/tiny_fd \
        --config.algorithm=fd --config.total_steps=30 --config.model.source=hf \
        --config.model.path=runs/tiny_sft/hf_final --config.model.tokenizer= --config.optim.learning_rate=3e-4

FD from the SFT export: learning rate 3e-4 with the default EMA teacher (step.teacher=ema, ema_tau=0.05),
chosen by the sweep in docs/demo/README.md (1e-3 lowered the training reward, a live teacher collapsed below
the no-update control); this file's own 3e-3 is the supervised stage's, from scratch.
"""

from fd_jax.config.defaults import base_config


def get_config():
    config = base_config()
    config.algorithm = "sft"  # then fd | grpo | fd_then_grpo from DIR/hf_final
    config.total_steps = 300  # SFT steps of problems_per_step pairs
    config.model.source = "init"  # the base config's 2-layer Qwen3 (d 64), random
    config.model.tokenizer = "char"  # one token per character; its chat template renders "role: content" lines

    config.data.task = "arithmetic"
    config.data.level = "easy"  # "Compute 3 + 4."
    config.data.prompt_format = "arithmetic_chat"  # chat turns, so the teacher context can be placed as turns
    config.data.prompt_template = "{context}{statement}"  # short prompts: every character is a token
    config.data.exclude_eval_problems = True  # held-out questions are never trained on
    config.data.problems_per_step = 32  # SFT pairs per step (RL: P problems x G samples)

    config.sft.feedback_fraction = 0.3  # "That is not right: wrong answer 13: ..." then the question
    config.sft.hint_fraction = 0.3  # the question solved as an earlier exchange, then the question
    # Half the questions are never shown bare: with every question shown bare, the model answers from the
    # question and learns to ignore the context (measured: the teacher knew less than the student).
    config.sft.context_only_fraction = 0.5
    config.rollout.context_placement = "turns"  # the same placement for SFT pairs and FD teacher prompts
    config.rollout.use_successful_as_teacher = True  # FD: a solved sibling is shown as a worked exchange
    config.rollout.num_generations = 8
    config.rollout.max_new_tokens = 12  # "Answer: 17" and <eos>
    config.rollout.pad_multiple = 16  # short rows: the completion axis stays 16
    config.feedback.provider = "checker"  # the checker's sentences, no Lean-style listing

    config.step.token_chunk = 128  # tiny shapes
    config.step.vocab_tile = 128
    config.optim.learning_rate = 3e-3  # from scratch
    config.checkpoint.every_steps = 100
    config.log.plot_every_steps = 50
    config.eval.at_end = True
    config.eval.num_problems = 16
    config.eval.n = 16
    config.eval.ks = (1, 2, 4, 8, 16)
    config.eval.max_new_tokens = 12
    return config
