"""The multi-turn path on a CPU: the arithmetic test bed with a `calculator` tool (data.task=
arithmetic_tools), the smoke config's tiny random model and character tokenizer, episodes of up to 3 turns.
A random model rarely writes a well-formed call, so this checks the machinery (episodes on one KV cache,
tool output masked out of both losses, the trajectory in the feedback request, full episode logs in
rollouts.jsonl, checkpoints and resume, evaluation in episodes), not learning. A few minutes on a 2-core CPU.

    python scripts/train_tpu.py --config configs/arithmetic_tools_cpu.py --workdir runs/arith_tools
"""

from fd_jax.config.defaults import base_config


def get_config():
    config = base_config()
    config.algorithm = "fd"  # fd | grpo | fd_then_grpo
    config.total_steps = 10
    config.fd_steps = 5  # for --config.algorithm=fd_then_grpo

    config.model.source = "init"  # random weights (the base config's 2-layer Qwen3, d 64)
    config.model.tokenizer = "char"  # the built-in character tokenizer (116 tokens)

    config.data.task = "arithmetic_tools"  # arithmetic in episodes with a calculator tool
    config.data.level = "hard"  # "Compute 4831 * 27 - 903.": where a calculator matters
    config.data.prompt_format = "arithmetic"  # completion style; the task's template explains the call
    config.data.problems_per_step = 4  # P

    config.rollout.num_generations = 4  # G (16 episodes per step)
    config.rollout.pad_multiple = 64  # few distinct shapes

    config.episode.max_turns = 3  # a call, a second call or the answer, the answer
    config.episode.max_turn_tokens = 48  # a JSON call fits
    config.episode.max_obs_tokens = 32  # "<result>...</result>" of a number
    config.episode.max_episode_tokens = 160
    config.episode.tool_timeout_s = 10.0  # the calculator answers in microseconds

    config.step.token_chunk = 128  # small kernel blocks for tiny shapes
    config.step.vocab_tile = 128
    config.optim.learning_rate = 1e-3

    config.feedback.provider = "lean_errors"  # the checker's messages, no LLM

    config.checkpoint.every_steps = 2
    config.log.plot_every_steps = 5
    config.eval.every_steps = 5  # pass@k of the final answers of episodes (the rollout's sampler)
    config.eval.at_end = False
    config.eval.num_problems = 8
    config.eval.n = 4
    config.eval.ks = (1, 4)
    return config
