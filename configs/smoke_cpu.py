"""The main command's config: the whole loop (rollout, verification, feedback, FD step, checkpoints, logs,
evaluation, export) with a tiny random Qwen3-style model (2 layers, d 64) and the character tokenizer on
the arithmetic test bed ("Compute 3 + 4."), with the checker's error messages as feedback. About a minute
on a 2-core CPU. It checks the machinery; a random model this small does not learn arithmetic in 100
steps (configs/smollm2_arith_cpu.py is the one that learns).

    python scripts/train_tpu.py --config configs/smoke_cpu.py --workdir runs/smoke
"""

from fd_jax.config.defaults import base_config


def get_config():
    config = base_config()
    config.algorithm = "fd"  # fd | grpo | fd_then_grpo
    config.total_steps = 100  # about a minute on 2 cores (a third of it compiling)
    config.fd_steps = 50  # for --config.algorithm=fd_then_grpo: 50 FD steps, then 50 GRPO steps

    config.model.source = "init"  # random weights from model.init (the base config's 2-layer Qwen3, d 64)
    config.model.tokenizer = "char"  # the built-in character tokenizer (116 tokens)

    config.data.task = "arithmetic"  # the CPU test bed: verifiable without Lean
    config.data.level = "easy"  # one-digit sums
    config.data.prompt_format = "arithmetic"  # "Compute 3 + 4.\nAnswer: " (completion style)
    config.data.problems_per_step = 8  # P

    config.rollout.num_generations = 4  # G (32 rollouts per step)
    config.rollout.max_new_tokens = 8  # an answer is at most 2 digits and <eos>
    config.rollout.pad_multiple = 64  # the reprompt's length varies with the feedback: few distinct shapes

    config.step.token_chunk = 128  # small kernel blocks for tiny shapes
    config.step.vocab_tile = 128  # the vocabulary (116) fits one tile
    config.optim.learning_rate = 1e-3  # a random tiny model needs a large learning rate

    config.feedback.provider = "lean_errors"  # the verifier's messages, no LLM

    config.checkpoint.every_steps = 25  # and at the end
    config.log.plot_every_steps = 20  # curves.png (drawing takes longer than a step here)

    config.eval.at_end = True  # pass@k of the final policy
    config.eval.num_problems = 16  # held-out problems
    config.eval.n = 4  # samples per problem
    config.eval.ks = (1, 2, 4)  # pass@k for these k
    config.eval.max_new_tokens = 8  # same budget as training
    return config
