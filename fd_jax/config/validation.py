"""Checking a run's config at start-up: `validate(cfg)` raises `ConfigError` naming the field, its value and
what is allowed, before anything is built. The fields of `step`, `optim` and `rollout` are checked by their
dataclasses (`fd_jax.config.schema`) as the stages are laid out (`fd_jax.train.stages`); the task's fields by
the task (`fd_jax.tasks`); the rest here. No JAX is imported.
"""

from __future__ import annotations

import pathlib
from typing import Any

from ml_collections import config_dict

from fd_jax.config.errors import ConfigError
from fd_jax.config.schema import EpisodeConfig, from_section
from fd_jax.data.problems import LOADERS
from fd_jax.data.prompts import fill
from fd_jax.tasks import TASKS, get_task, prompt_format_names
from fd_jax.train.stages import stages

ALGORITHMS = ("fd", "grpo", "fd_then_grpo", "sft")
MODEL_SOURCES = ("hf", "init", "smollm2_gguf")
DTYPES = ("float32", "bfloat16")
# The feedback providers a config can build (`local` needs a second model object, so it is library-only).
CONFIG_FEEDBACK_PROVIDERS = ("lean_errors", "checker", "openai", "anthropic")
HTTP_PROVIDERS = ("openai", "anthropic")

# field path -> allowed values (those that name a registry are added in `_choices`).
_FIXED_CHOICES = {
    "algorithm": ALGORITHMS,
    "multihost": ("auto", "true", "false"),
    "model.source": MODEL_SOURCES,
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.init.model_type": ("llama", "qwen2", "qwen3"),
    "data.level": ("easy", "medium", "hard"),
    "feedback.provider": CONFIG_FEEDBACK_PROVIDERS,
    "log.progress": ("auto", "true", "false"),
}

# field path -> smallest allowed value
_MINIMUM = {
    "total_steps": 1, "num_iterations": 1, "data.problems_per_step": 1,
    "checkpoint.every_steps": 0, "checkpoint.max_to_keep": 1, "log.every_steps": 1, "log.plot_every_steps": 1,
    "eval.every_steps": 0, "eval.num_problems": 1, "eval.n": 1, "eval.max_new_tokens": 1,
    "data.num_problems": 0, "data.num_shots": 0, "lean.workers": 0, "feedback.max_concurrency": 1,
    "log.teacher_diagnostics_first_k": 1, "log.teacher_diagnostics_every_steps": 1,
    "preflight_problems": 0,
}  # fmt: skip


def get(cfg: config_dict.ConfigDict, path: str) -> Any:
    value = cfg
    for key in path.split("."):
        value = value[key]
    return value


def _choices() -> dict[str, tuple[str, ...]]:
    from fd_jax.lean.backends import BACKENDS

    return {
        **_FIXED_CHOICES,
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
    if cfg.algorithm == "fd_then_grpo" and not 1 <= cfg.fd_steps < cfg.total_steps:
        raise _fail("fd_steps", cfg.fd_steps,
                    f"fd_then_grpo needs 1 <= fd_steps < total_steps ({cfg.total_steps}); the GRPO stage runs the rest")
    for path in ("sft.feedback_fraction", "sft.hint_fraction", "sft.context_only_fraction"):
        if not 0.0 <= get(cfg, path) <= 1.0:
            raise _fail(path, get(cfg, path), "must be in [0, 1]")
    if cfg.sft.feedback_fraction + cfg.sft.hint_fraction > 1.0:
        raise _fail("sft.hint_fraction", cfg.sft.hint_fraction,
                    "sft.feedback_fraction + sft.hint_fraction must be <= 1")
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
    if cfg.rollout.context_placement not in ("user", "auto") and not d.prompt_format.endswith("_chat"):
        raise _fail("rollout.context_placement", cfg.rollout.context_placement,
                    f"data.prompt_format={d.prompt_format} has no chat turns; use a _chat format or 'user'")
    if cfg.feedback.provider in HTTP_PROVIDERS and not cfg.feedback.model and _uses_feedback(cfg):
        raise _fail("feedback.model", "", f"feedback.provider={cfg.feedback.provider} needs a model name")
    stages(cfg)  # the step, optim and rollout dataclasses check their fields, named
    from_section(EpisodeConfig, cfg.episode)  # and so do the episode budgets


def _uses_feedback(cfg) -> bool:
    return cfg.algorithm != "grpo" or (cfg.step.distill_weight or 0) > 0


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
