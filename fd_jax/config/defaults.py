"""Every knob of a training run, with its default and what it does: the one base that `configs/*.py` start
from (`config = base_config()`, then override). `fd_jax.config.validation.validate` checks the values; the
sections `step`, `optim` and `rollout` are derived from the dataclasses of `fd_jax.config.schema` (the
settings the library takes), whose own checks name the field.

Override anything on the command line: `--config.rollout.num_generations=8 --config.step.alpha=0.5`.
"""

from __future__ import annotations

from ml_collections import config_dict

from fd_jax.config.schema import EpisodeConfig, OptimConfig, RolloutConfig, StepConfig, config_section

placeholder = config_dict.placeholder  # a None default that still only accepts its type on override


def model_config() -> config_dict.ConfigDict:
    m = config_dict.ConfigDict()
    m.source = "hf"  # hf: a local Hugging Face dir (model.path) | init: random weights from model.init | smollm2_gguf
    m.path = ""  # source=hf: the local HF directory (config.json + safetensors); fd_jax never downloads
    m.cache_dir = "~/.cache/fd_jax"  # source=smollm2_gguf: where the GGUF is converted to an HF directory once
    m.tokenizer = ""  # "" = the model's own (model.path) | char: the built-in character tokenizer | a local dir
    m.dtype = "float32"  # compute dtype: float32 | bfloat16
    m.param_dtype = "float32"  # storage dtype of the weights (optimizer moments follow it)
    m.remat = False  # recompute each layer in the backward pass (saves activation memory)
    m.init_seed = 0  # source=init: seed of the random weights
    m.init = config_dict.ConfigDict()  # source=init: the architecture, Hugging Face config.json field names
    m.init.model_type = "qwen3"  # llama | qwen2 | qwen3 (qwen3 has QK-norm)
    m.init.hidden_size = 64  # d_model
    m.init.intermediate_size = 128  # SwiGLU width
    m.init.num_hidden_layers = 2  # decoder blocks
    m.init.num_attention_heads = 4  # query heads
    m.init.num_key_value_heads = 2  # KV heads (GQA)
    m.init.head_dim = 16  # per-head width
    m.init.tie_word_embeddings = True  # the unembedding is the embedding's transpose
    m.init.max_position_embeddings = 1024  # longest sequence (prompt + reprompt + completion)
    m.init.rope_theta = 10000.0  # RoPE base
    return m


def data_config() -> config_dict.ConfigDict:
    d = config_dict.ConfigDict()
    d.task = "arithmetic"  # arithmetic (test bed, no Lean) | lean
    d.path = ""  # task=lean: the problem file (JSONL / JSON / Parquet)
    d.format = "minif2f"  # task=lean: loader, minif2f | lean_workbook
    d.split = "valid"  # task=lean: training split ("" keeps every row)
    d.eval_path = ""  # task=lean: held-out problems ("" = data.path)
    d.eval_format = ""  # task=lean: loader of eval_path ("" = data.format)
    d.eval_split = "test"  # task=lean: held-out split
    d.level = "easy"  # task=arithmetic: easy | medium | hard
    d.num_problems = 1024  # task=arithmetic: training problems generated; task=lean: first N rows (0 = all)
    d.problem_seed = 0  # task=arithmetic: seed of the generated training problems
    d.eval_problem_seed = 1234  # task=arithmetic: seed of the held-out problems (another stream)
    d.exclude_eval_problems = False  # task=arithmetic: drop training problems whose question is a held-out one
    d.prompt_format = "arithmetic"  # arithmetic | arithmetic_chat | lean_completion | lean_chat
    d.prompt_template = ""  # template of the question: {context} {statement} {header} {informal} ("" = format default)
    d.system_prompt = ""  # lean_chat | arithmetic_chat: an optional system turn
    d.num_shots = 0  # task=arithmetic: solved examples of data.level shown before each question (never its own)
    d.problems_per_step = 8  # P problems per step over all hosts (each host rolls out P / hosts)
    d.shuffle_seed = 0  # seed of the epoch shuffles (the order resumes exactly from a checkpoint)
    return d


def rollout_config() -> config_dict.ConfigDict:
    """fd_jax.config.schema.RolloutConfig (every field, its default and comment are there)."""
    return config_section(RolloutConfig)


def step_config() -> config_dict.ConfigDict:
    """fd_jax.config.schema.StepConfig; distill_weight is set by `algorithm` (fd 1, grpo 0) unless overridden."""
    return config_section(StepConfig)


def optim_config() -> config_dict.ConfigDict:
    """fd_jax.config.schema.OptimConfig; total_steps 0 = the stage's steps x num_iterations."""
    return config_section(OptimConfig)


def lean_config() -> config_dict.ConfigDict:
    """The verifier of task=lean (fd_jax.lean.get_verifier)."""
    lean = config_dict.ConfigDict()
    lean.backend = "local"  # local (REPL pool on this host) | kimina (HTTP server) | leandojo
    lean.repl_command = "lake env repl"  # local: the command that starts one REPL (shell-split)
    lean.cwd = ""  # local: the Mathlib project the REPL runs in (printed by scripts/setup_lean.sh)
    lean.workers = 0  # local: REPL processes per host (0 = cores - 1); kimina: concurrent requests
    lean.timeout_s = 60.0  # wall-clock limit per proof
    lean.memory_limit_mb = 16384  # local: address-space limit per REPL (0 = none; recent Mathlib needs >= 9000)
    lean.max_uses = 100  # local: proofs before a REPL is recycled (its memory grows per command)
    lean.allow_native_decide = False  # accept proofs that use native_decide (trusts the compiler)
    lean.audit_axioms = True  # reject proofs whose axioms go beyond propext, Classical.choice, Quot.sound
    lean.kimina_url = "http://localhost:8000"  # kimina: the server's base URL
    lean.header = ""  # Lean header for problems without one ("" = fd_jax.lean.DEFAULT_HEADER)
    return lean


def feedback_config() -> config_dict.ConfigDict:
    """The feedback provider (fd_jax.feedback.get_provider); unused by GRPO."""
    f = config_dict.ConfigDict()
    f.provider = "lean_errors"  # lean_errors (no LLM) | checker (no LLM: message texts only) | openai | anthropic
    f.model = ""  # openai / anthropic: the model name
    f.base_url = ""  # openai / anthropic: endpoint ("" = the provider's public API)
    f.api_key_env = ""  # environment variable holding the API key ("" = OPENAI_API_KEY / ANTHROPIC_API_KEY)
    f.timeout_s = 120.0  # per HTTP attempt
    f.max_retries = 4  # retries on 429 / 5xx / timeouts
    f.max_concurrency = 8  # parallel requests per host
    f.max_tokens = 1024  # feedback length cap (tokens)
    f.temperature = 0.7  # feedback sampling temperature
    f.cache_dir = ""  # sqlite cache of answers ("" = none; relative paths are under the workdir)
    f.budget_usd = placeholder(float)  # stop calling the LLM once spent (None = no budget)
    f.usd_per_mtok_in = 0.0  # price per million prompt tokens, for the cost metric
    f.usd_per_mtok_out = 0.0  # price per million completion tokens
    return f


def base_config() -> config_dict.ConfigDict:
    """The full default configuration: a random tiny model on the arithmetic test bed, FD, 40 steps."""
    c = config_dict.ConfigDict()
    c.algorithm = "fd"  # fd | grpo | fd_then_grpo | sft (supervised targets of the task; see c.sft)
    c.seed = 0  # seeds the sampler (per step); model.init_seed and data.shuffle_seed seed the rest
    c.total_steps = 40  # training steps (one rollout batch each); fd_then_grpo: both stages together
    c.fd_steps = 20  # fd_then_grpo: steps of the FD stage (< total_steps); the GRPO stage runs the rest
    c.grpo_learning_rate = placeholder(float)  # fd_then_grpo: the GRPO stage's peak LR (None = optim.learning_rate)
    c.num_iterations = 1  # optimizer steps per rollout batch (2nd+ are off-policy, importance-corrected)
    c.multihost = "auto"  # jax.distributed.initialize(): auto (on pods) | true | false
    c.compilation_cache_dir = ""  # persistent XLA compilation cache ("" = off)
    c.preflight_problems = 0  # fresh FD runs: first check whether the teacher knows more, on N problems (0 = off)

    c.mesh = config_dict.ConfigDict()
    c.mesh.data = 1  # data-parallel axis (replicated weights)
    c.mesh.fsdp = -1  # fully sharded axis (-1 = the remaining devices)
    c.mesh.tensor = 1  # tensor-parallel axis (heads, MLP, vocabulary)

    c.sft = config_dict.ConfigDict()  # algorithm=sft: supervised (prompt, target) pairs from the task
    c.sft.feedback_fraction = 0.4  # share of examples whose prompt carries feedback on a wrong answer
    c.sft.hint_fraction = 0.2  # share whose prompt carries a solved copy of the problem (the rest: bare)
    c.sft.context_only_fraction = 0.0  # share of the questions never shown bare (only with feedback or a hint)

    c.model = model_config()  # the policy: where its weights and tokenizer come from, dtypes
    c.data = data_config()  # problems, prompt format, problems per step
    c.rollout = rollout_config()  # sampling, reprompts, advantages
    c.step = step_config()  # the loss and the teacher (fd_jax.rl.step.StepConfig)
    c.optim = optim_config()  # AdamW and its schedule (fd_jax.rl.optim.OptimConfig)
    c.lean = lean_config()  # the Lean verifier (data.task=lean)
    c.episode = config_section(EpisodeConfig)  # turns, budgets and tools of tasks with tools (arithmetic_tools)
    c.feedback = feedback_config()  # who writes the feedback the FD teacher reads

    c.checkpoint = config_dict.ConfigDict()
    c.checkpoint.every_steps = 50  # save every N steps (and always at the end of a stage and on SIGTERM)
    c.checkpoint.max_to_keep = 3  # checkpoints kept per stage
    c.checkpoint.async_save = True  # write while training goes on (saves are still atomic)

    c.log = config_dict.ConfigDict()
    c.log.every_steps = 1  # plain log line every N steps (when there is no progress bar)
    c.log.progress = "auto"  # progress bar: auto (on a terminal) | true | false
    c.log.plot_every_steps = 10  # refresh DIR/curves.png every N steps (and at the end)
    # teacher/* diagnostics: the batch's come from the train step's own statistics (one teacher-only vocabulary
    # pass); the probe costs a forward pass of each model on its rows (benchmarks/vs_trl.py FD rows include it).
    c.log.teacher_diagnostics = True  # FD stages: teacher/* metrics (see above)
    c.log.teacher_diagnostics_every_steps = 1  # ... on every Nth step only (N > 1 trades the curve for speed)
    c.log.teacher_diagnostics_first_k = 3  # teacher/kl_first_k_share: the share of the KL on the first k tokens
    c.log.tensorboard = True  # TensorBoard event files under DIR/tensorboard (needs tensorboardX)
    c.log.wandb_project = ""  # Weights & Biases project ("" = off; needs `pip install wandb`)
    c.log.wandb_entity = ""  # W&B entity ("" = your default)
    c.log.wandb_name = ""  # W&B run name ("" = the workdir's name)

    c.eval = config_dict.ConfigDict()
    c.eval.every_steps = 0  # pass@k on the held-out set every N steps (0 = off)
    c.eval.at_end = False  # also evaluate after the last step
    c.eval.num_problems = 32  # held-out problems (first N)
    c.eval.n = 8  # samples per problem
    c.eval.ks = (1, 4, 8)  # k values of pass@k (each <= n)
    c.eval.max_new_tokens = 256  # completion budget
    c.eval.temperature = 1.0  # sampling temperature
    c.eval.seed = 0  # sampling seed (the same at every evaluation, so steps are comparable)

    c.export_hf = True  # save the final policy as a Hugging Face directory DIR/hf_final (with the tokenizer)
    return c


def lean_prover_config(model_path: str) -> config_dict.ConfigDict:
    """What the TPU configs for real provers share: the checkpoint at `model_path`, bf16 compute with f32
    weights and optimizer state sharded over every chip, miniF2F (valid to train, test to evaluate), the
    local Lean pool and Claude feedback. Each config then sets its model's prompt format and lengths."""
    c = base_config()
    c.algorithm = "fd"
    c.total_steps = 200
    c.model.source = "hf"
    c.model.path = model_path
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.mesh.fsdp = -1  # every chip of the slice
    c.data.task = "lean"
    c.data.path = "data/minif2f.jsonl"  # DeepSeek-Prover's miniF2F JSONL (../shared/data in the dev workspace)
    c.data.format = "minif2f"
    c.data.split = "valid"
    c.data.eval_split = "test"
    c.data.num_problems = 0
    c.data.problems_per_step = 32
    c.rollout.num_generations = 8
    c.rollout.chunk_problems = 8  # Lean checks chunk i while chunk i+1 generates
    c.rollout.pad_multiple = 256
    c.rollout.max_reprompt_len = 4096
    c.step.teacher = "ema"
    c.step.micro_batches = 8
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.01
    c.lean.backend = "local"
    c.lean.repl_command = "~/.elan/bin/lake env ~/.cache/fd_jax/lean/repl/.lake/build/bin/repl"
    c.lean.cwd = "~/.cache/fd_jax/lean/mathlib_project"
    c.lean.workers = 0
    c.lean.timeout_s = 120.0
    c.lean.memory_limit_mb = 16384
    c.feedback.provider = "anthropic"
    c.feedback.model = "claude-sonnet-4-5"
    c.feedback.api_key_env = "ANTHROPIC_API_KEY"
    c.feedback.cache_dir = "feedback_cache"
    c.feedback.max_concurrency = 16
    c.checkpoint.every_steps = 25
    c.log.plot_every_steps = 5
    c.eval.every_steps = 50
    c.eval.at_end = True
    c.eval.num_problems = 244
    c.eval.n = 32
    c.eval.ks = (1, 8, 32)
    return c
