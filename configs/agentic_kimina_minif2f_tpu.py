"""Kimina-Prover-RL-1.7B on miniF2F in the paper's agentic environment (data.task=lean_agentic): episodes of
up to 8 turns in which the prover compiles files with Lean (`lean_check`), searches and reads Mathlib's
sources (`mathlib_search`, `read_mathlib`) and submits (`submit`); each tool call is limited to 120 s. The
feedback LLM reads the whole trajectory; FD and GRPO train on the prover's own tokens only.

    python scripts/train_tpu.py --config configs/agentic_kimina_minif2f_tpu.py --workdir /mnt/runs/kimina_agent

Set up Lean with scripts/setup_lean.sh; the Mathlib sources are taken from the Lean project (lean.cwd,
`.lake/packages/mathlib`) unless episode.mathlib_dir names them. Tool calls take the model family's native format when its chat
template supports tools (episode.tool_format=auto: Qwen3-style templates give `hermes`), else `json_tag`.
Periodic evaluation runs episodes too (eval.every_steps); it is off here because an episode of miniF2F costs
as much as a rollout: evaluate the exported policy with scripts/evaluate.py --checkpoint DIR.
"""

from fd_jax.config.defaults import lean_prover_config


def get_config():
    config = lean_prover_config("~/models/Kimina-Prover-RL-1.7B")  # a local Hugging Face directory
    config.total_steps = 300  # FD steps (fd_then_grpo: both stages)
    config.fd_steps = 150  # fd_then_grpo: the FD stage, then 150 GRPO steps

    config.data.task = "lean_agentic"  # miniF2F in episodes with Lean and Mathlib tools
    config.data.prompt_format = "lean_chat"  # the tool instructions are a user turn (the task's template)
    config.data.system_prompt = "You are an expert in mathematics and Lean 4."  # a system turn in Kimina's style
    config.data.problems_per_step = 16  # P: episodes are longer than single proofs
    config.rollout.num_generations = 8  # G: the GRPO group and FD's samples per theorem
    config.rollout.temperature = 1.0  # old log-probs are those of the temperature-1 policy either way
    config.rollout.max_reprompt_len = 8192  # the critique of a whole trajectory is longer

    config.episode.max_turns = 8  # model turns per episode
    config.episode.max_turn_tokens = 4096  # thinking + a file or a call
    config.episode.max_obs_tokens = 1024  # Lean's messages, search matches or Mathlib lines
    config.episode.max_episode_tokens = 16384  # everything after the prompt
    config.episode.tool_timeout_s = 120.0  # the paper's limit per tool call
    config.episode.mathlib_dir = ""  # '' = <lean.cwd>/.lake/packages/mathlib
    config.episode.search_matches = 20  # mathlib_search: matches shown
    config.episode.read_lines = 80  # read_mathlib: lines per call
    config.episode.tool_format = "auto"  # the chat template's native tool calls if it has them, else json_tag

    config.mesh.fsdp = -1  # every chip shards weights, optimizer state and rows
    config.eval.every_steps = 0  # evaluation runs episodes (as costly as rollouts): off during training
    config.eval.at_end = False  # (use scripts/evaluate.py --checkpoint DIR)
    return config
