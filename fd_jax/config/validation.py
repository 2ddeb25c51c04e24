"""Checking a run's config at start-up and turning it into the dataclasses the library takes.

`validate(cfg)` raises `ConfigError` naming the field, its value and what is allowed, before anything is
built; `stages(cfg)` lays out the run: one stage for `fd` or `grpo`, two for `fd_then_grpo` (FD, then GRPO
initialised from the FD stage's final checkpoint), each with its own StepConfig, OptimConfig and
RolloutConfig.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from ml_collections import config_dict

from fd_jax.config.errors import ConfigError
from fd_jax.data.problems import LOADERS
from fd_jax.data.prompts import fill
from fd_jax.data.reprompt import RepromptTemplates
from fd_jax.rl.optim import SCHEDULES, OptimConfig
from fd_jax.rollout.rollout import RolloutConfig
from fd_jax.tasks import TASKS, get_task, prompt_format_names

ALGORITHMS = ("fd", "grpo", "fd_then_grpo")
MODEL_SOURCES = ("hf", "init", "smollm2_gguf")
DTYPES = ("float32", "bfloat16")
# The feedback providers a config can build (`local` needs a second model object, so it is library-only).
CONFIG_FEEDBACK_PROVIDERS = ("lean_errors", "openai", "anthropic")
HTTP_PROVIDERS = ("openai", "anthropic")

# field path -> allowed values. Registries are imported lazily in `_choices` (they pull in JAX).
_FIXED_CHOICES = {
    "algorithm": ALGORITHMS,
    "multihost": ("auto", "true", "false"),
    "model.source": MODEL_SOURCES,
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.init.model_type": ("llama", "qwen2", "qwen3"),
    "data.level": ("easy", "medium", "hard"),
    "rollout.scale_rewards": ("group", "batch", "none"),
    "step.distill_mode": ("full", "topk", "sampled_token"),
    "step.importance_sampling_level": ("token", "sequence"),
    "step.kernel_backend": ("auto", "xla", "pallas"),
    "step.kernel_passes": ("auto", "one", "two"),
    "optim.schedule": SCHEDULES,
    "feedback.provider": CONFIG_FEEDBACK_PROVIDERS,
    "log.progress": ("auto", "true", "false"),
}

# field path -> smallest allowed value
_MINIMUM = {
    "total_steps": 1, "num_iterations": 1, "data.problems_per_step": 1, "rollout.num_generations": 1,
    "rollout.max_new_tokens": 1, "rollout.pad_multiple": 1, "rollout.chunk_problems": 0,
    "step.micro_batches": 1, "step.top_k": 1,
    "checkpoint.every_steps": 0, "checkpoint.max_to_keep": 1, "log.every_steps": 1, "log.plot_every_steps": 1,
    "eval.every_steps": 0, "eval.num_problems": 1, "eval.n": 1, "eval.max_new_tokens": 1,
    "data.num_problems": 0, "data.num_shots": 0, "lean.workers": 0, "feedback.max_concurrency": 1,
}  # fmt: skip


def get(cfg: config_dict.ConfigDict, path: str) -> Any:
    value = cfg
    for key in path.split("."):
        value = value[key]
    return value


def _choices() -> dict[str, tuple[str, ...]]:
    from fd_jax.rl import losses
    from fd_jax.lean.backends import BACKENDS
    from fd_jax.rl.step import TEACHERS

    return {
        **_FIXED_CHOICES,
        "step.teacher": TEACHERS,
        "step.loss_type": losses.LOSS_TYPES,
        "step.loss_agg": losses.LOSS_AGGS,
        "data.format": tuple(sorted(LOADERS)),
        "data.eval_format": ("", *sorted(LOADERS)),
        "data.task": tuple(TASKS),
        "data.prompt_format": prompt_format_names(),
        "lean.backend": tuple(sorted(BACKENDS)),
    }


def _fail(path: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config.{path} = {value!r}: {why}")


def validate(cfg: config_dict.ConfigDict) -> None:
    """Raises ConfigError for the first value that cannot work (named as `config.FIELD = VALUE: why`)."""
    for path, allowed in _choices().items():
        value = get(cfg, path)
        if value not in allowed:
            raise _fail(path, value, f"must be one of {list(allowed)}")
    for path, minimum in _MINIMUM.items():
        value = get(cfg, path)
        if not isinstance(value, int) or value < minimum:
            raise _fail(path, value, f"must be an integer >= {minimum}")
    for path in ("step.token_chunk", "step.vocab_tile", "step.loss_chunk"):
        value = get(cfg, path)
        if value is not None and value < 1:
            raise _fail(path, value, "must be a positive block size, or None for the kernel's tuned default")
    if cfg.algorithm == "fd_then_grpo" and not 1 <= cfg.fd_steps < cfg.total_steps:
        raise _fail("fd_steps", cfg.fd_steps,
                    f"fd_then_grpo needs 1 <= fd_steps < total_steps ({cfg.total_steps}); the GRPO stage runs the rest")
    w = cfg.step.distill_weight
    if w is not None and not 0.0 <= w <= 1.0:
        raise _fail("step.distill_weight", w, "must be in [0, 1] (or None: 1 for fd, 0 for grpo)")
    if not 0.0 <= cfg.step.alpha <= 1.0:
        raise _fail("step.alpha", cfg.step.alpha, "must be in [0, 1] (0 forward KL, 1 reverse KL)")
    if cfg.step.distill_mode == "sampled_token" and cfg.step.alpha != 1.0:
        raise _fail("step.alpha", cfg.step.alpha, "distill_mode=sampled_token requires alpha = 1 (reverse KL)")
    if not 0.0 <= cfg.rollout.temperature:
        raise _fail("rollout.temperature", cfg.rollout.temperature, "must be >= 0 (0 = greedy)")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise _fail("rollout.top_p", cfg.rollout.top_p, "must be in (0, 1]")
    ks = tuple(cfg.eval.ks)
    if not ks or min(ks) < 1 or max(ks) > cfg.eval.n:
        raise _fail("eval.ks", ks, f"every k must be in [1, eval.n = {cfg.eval.n}]")
    if cfg.model.source == "hf":
        path = pathlib.Path(cfg.model.path).expanduser()
        if not cfg.model.path or not (path / "config.json").is_file():
            raise _fail("model.path", cfg.model.path, "model.source=hf needs a local Hugging Face directory "
                        "with config.json (fd_jax downloads nothing); or set model.source=init / smollm2_gguf")
    if cfg.model.source == "init" and cfg.model.tokenizer == "":
        raise _fail("model.tokenizer", "", "model.source=init has no tokenizer of its own: use 'char' or a local dir")
    d = cfg.data
    get_task(d.task).check(cfg)
    if d.prompt_template:
        try:
            fill(d.prompt_template, context="", statement="", header="", informal="")
        except ValueError as e:
            raise _fail("data.prompt_template", d.prompt_template, str(e).split(";")[0]) from None
    if d.system_prompt and not d.prompt_format.endswith("_chat"):
        raise _fail("data.system_prompt", d.system_prompt,
                    f"data.prompt_format={d.prompt_format} has no system turn; use a _chat format or ''")
    if cfg.feedback.provider in HTTP_PROVIDERS and not cfg.feedback.model and _uses_feedback(cfg):
        raise _fail("feedback.model", "", f"feedback.provider={cfg.feedback.provider} needs a model name")
    stages(cfg)  # the dataclasses' own checks, with the field named


def _uses_feedback(cfg) -> bool:
    return cfg.algorithm != "grpo" or (cfg.step.distill_weight or 0) > 0


def _dataclass(cls, prefix: str, values: dict[str, Any]):
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{prefix}: {e}") from None


def stage_configs(cfg: config_dict.ConfigDict, stage: str, *, steps: int) -> tuple[Any, OptimConfig, RolloutConfig]:
    """(StepConfig, OptimConfig, RolloutConfig) of one stage (`fd` or `grpo`) lasting `steps` steps.

    A GRPO stage uses a live teacher: it neither reads nor stores one (the reference of beta > 0 is the
    stage's initial policy), and it asks no feedback provider.
    """
    from fd_jax.rl.step import StepConfig  # JAX is imported only once a run is really built

    step = cfg.step.to_dict()
    if step["distill_weight"] is None or (stage == "grpo" and cfg.algorithm == "fd_then_grpo"):
        step["distill_weight"] = 1.0 if stage == "fd" else 0.0
    if step["distill_weight"] == 0.0:
        step["teacher"] = "live"
    step_cfg = _dataclass(StepConfig, "step", step)

    optim = cfg.optim.to_dict()
    if stage == "grpo" and cfg.algorithm == "fd_then_grpo" and cfg.grpo_learning_rate is not None:
        optim["learning_rate"] = cfg.grpo_learning_rate
    if not optim["total_steps"]:
        optim["total_steps"] = steps * cfg.num_iterations
    optim_cfg = _dataclass(OptimConfig, "optim", optim)

    r = cfg.rollout
    templates = _dataclass(RepromptTemplates, "rollout.*_template", dict(
        reprompt=r.reprompt_template, feedback=r.feedback_template, solution=r.solution_template))
    rollout_cfg = _dataclass(RolloutConfig, "rollout", dict(
        num_generations=r.num_generations, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
        top_p=r.top_p, top_k=r.top_k, chunk_problems=r.chunk_problems, pad_multiple=r.pad_multiple,
        request_feedback=step_cfg.distill_weight > 0, use_successful_as_teacher=r.use_successful_as_teacher,
        dont_reprompt_on_self_success=r.dont_reprompt_on_self_success, max_reprompt_len=r.max_reprompt_len,
        templates=templates, scale_rewards=r.scale_rewards, log_rollouts=r.log_rollouts))
    return step_cfg, optim_cfg, rollout_cfg


@dataclasses.dataclass(frozen=True)
class Stage:
    """Global steps first..last (1-based, inclusive) trained with these configs. `subdir`: where the stage
    keeps checkpoints and TensorBoard events ("" = the workdir itself). `init_from`: the stage whose final
    checkpoint gives the initial policy (None = the configured model)."""

    name: str
    first: int
    last: int
    step: Any
    optim: OptimConfig
    rollout: RolloutConfig
    subdir: str
    init_from: str | None

    @property
    def num_steps(self) -> int:
        return self.last - self.first + 1


def stages(cfg: config_dict.ConfigDict) -> list[Stage]:
    """The run's stages in order (call `validate` first)."""
    if cfg.algorithm != "fd_then_grpo":
        configs = stage_configs(cfg, cfg.algorithm, steps=cfg.total_steps)
        return [Stage(cfg.algorithm, 1, cfg.total_steps, *configs, subdir="", init_from=None)]
    fd = stage_configs(cfg, "fd", steps=cfg.fd_steps)
    grpo = stage_configs(cfg, "grpo", steps=cfg.total_steps - cfg.fd_steps)
    return [
        Stage("fd", 1, cfg.fd_steps, *fd, subdir="fd", init_from=None),
        Stage("grpo", cfg.fd_steps + 1, cfg.total_steps, *grpo, subdir="grpo", init_from="fd"),
    ]


def config_from_json(text: str) -> config_dict.ConfigDict:
    """A config written by the trainer (DIR/config.json) back as a ConfigDict over the defaults, so fields
    added to fd_jax since that run keep their defaults."""
    import json

    from fd_jax.config.defaults import base_config

    cfg = base_config()

    def merge(target, values, prefix):
        for key, value in values.items():
            if key not in target:
                continue  # a field this fd_jax no longer has
            if isinstance(target[key], config_dict.ConfigDict) and isinstance(value, dict):
                merge(target[key], value, f"{prefix}{key}.")
            else:
                target[key] = tuple(value) if isinstance(value, list) else value

    with cfg.ignore_type():
        merge(cfg, json.loads(text), "")
    return cfg
