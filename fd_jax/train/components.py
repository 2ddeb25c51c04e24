"""The parts of a run built from its config: the policy (model + tokenizer), the problems, the prompt
format, the verifier and the feedback provider. Nothing here trains; `fd_jax.train.loop` wires them up.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import config_dict

from fd_jax import sharding as sharding_lib
from fd_jax.config.errors import ConfigError
from fd_jax.data import Problem, PromptFormat
from fd_jax.models import ModelConfig, Transformer, init_model, load_hf, read_config
from fd_jax.tasks import get_task
from fd_jax.verification import Verifier

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SMOLLM2_DIR = "smollm2-135m-instruct"


@dataclasses.dataclass
class Policy:
    """The model being trained, its config (for `save_hf`) and its tokenizer."""

    model: Transformer
    config: ModelConfig
    tokenizer: Any


def model_dir(cfg: config_dict.ConfigDict) -> pathlib.Path | None:
    """The Hugging Face directory the weights come from (None for source=init); converts the SmolLM2 GGUF
    into `model.cache_dir` on first use."""
    if cfg.model.source == "hf":
        return pathlib.Path(cfg.model.path).expanduser()
    if cfg.model.source == "smollm2_gguf":
        from fd_jax.models.gguf import export_gguf_to_hf, smollm2_gguf_path

        out = pathlib.Path(cfg.model.cache_dir).expanduser() / SMOLLM2_DIR
        if jax.process_index() == 0 and not (out / "model.safetensors").exists():
            log.info("converting the SmolLM2-135M-Instruct GGUF into %s (once)", out)
        return export_gguf_to_hf(smollm2_gguf_path(), out)
    return None


def build_tokenizer(cfg: config_dict.ConfigDict) -> Any:
    name = cfg.model.tokenizer
    if name == "char":
        from fd_jax.data.char_tokenizer import build_char_tokenizer

        return build_char_tokenizer()
    import transformers

    source = pathlib.Path(name).expanduser() if name else model_dir(cfg)
    if source is None or not source.is_dir():
        raise ConfigError(f"config.model.tokenizer = {name!r}: no tokenizer directory at {source}")
    return transformers.AutoTokenizer.from_pretrained(source)


def model_config(cfg: config_dict.ConfigDict, tokenizer: Any) -> ModelConfig:
    """The architecture: from the HF directory, or for source=init from `model.init` (vocabulary: the
    tokenizer's)."""
    directory = model_dir(cfg)
    if directory is not None:
        return read_config(directory)
    fields = dict(cfg.model.init.to_dict(), vocab_size=len(tokenizer))
    return ModelConfig.from_hf(fields, source="config.model.init")


def abstract_model(cfg: config_dict.ConfigDict, model_cfg: ModelConfig) -> Transformer:
    """The model with ShapeDtypeStruct leaves: the target a checkpoint restores into, no weights computed."""
    dtype, param_dtype = DTYPES[cfg.model.dtype], DTYPES[cfg.model.param_dtype]
    return nnx.eval_shape(lambda: Transformer(model_cfg, dtype=dtype, param_dtype=param_dtype,
                                              remat=cfg.model.remat, rngs=nnx.Rngs(0)))


def build_policy(cfg: config_dict.ConfigDict, *, mesh: jax.sharding.Mesh | None, weights: bool = True) -> Policy:
    """The initial policy placed on `mesh`. weights=False gives an abstract model (the run resumes from a
    checkpoint, so reading or initialising weights would be wasted)."""
    tokenizer = build_tokenizer(cfg)
    model_cfg = model_config(cfg, tokenizer)
    if len(tokenizer) > model_cfg.vocab_size:
        raise ConfigError(f"config.model.tokenizer: the tokenizer has {len(tokenizer)} tokens but the model's "
                          f"vocabulary has {model_cfg.vocab_size}")
    if not weights:
        return Policy(abstract_model(cfg, model_cfg), model_cfg, tokenizer)
    dtype, param_dtype = DTYPES[cfg.model.dtype], DTYPES[cfg.model.param_dtype]
    directory = model_dir(cfg)
    if directory is None:
        model = init_model(model_cfg, seed=cfg.model.init_seed, dtype=dtype, param_dtype=param_dtype,
                           remat=cfg.model.remat, mesh=mesh)
    else:
        model, _ = load_hf(directory, dtype=dtype, param_dtype=param_dtype, mesh=mesh, remat=cfg.model.remat)
    return Policy(model, model_cfg, tokenizer)


# -- the task ---------------------------------------------------------------------------------------------


def build_problems(cfg: config_dict.ConfigDict, *, held_out: bool = False) -> list[Problem]:
    """Training problems, or the held-out ones (`eval.num_problems` of them) when `held_out`."""
    return get_task(cfg.data.task).problems(cfg, held_out=held_out)


def build_format(cfg: config_dict.ConfigDict, tokenizer: Any) -> PromptFormat:
    return get_task(cfg.data.task).prompt_format(cfg, tokenizer)


def build_verifier(cfg: config_dict.ConfigDict) -> Verifier:
    """The task's checker for this host (for Lean: a REPL pool per host, or a Kimina client)."""
    return get_task(cfg.data.task).verifier(cfg)


def build_episodes(cfg: config_dict.ConfigDict, verifier: Verifier):
    """The episode set-up (budgets of `config.episode`, the task's tools) of a task with tools; None for a
    single-turn task, whose rollouts then take the single-turn path."""
    task = get_task(cfg.data.task)
    if not task.episodic:
        return None
    if jax.process_count() > 1:  # the episode sampler runs each host's rows on its own, not as one program
        raise ConfigError(f"config.data.task = {cfg.data.task!r}: episodes with tools run on a single host so far; "
                          f"use one host (a single TPU VM or GPU machine)")
    from fd_jax.config.schema import EpisodeConfig, from_section
    from fd_jax.rollout.rollout import EpisodeSetup

    return EpisodeSetup(from_section(EpisodeConfig, cfg.episode), dict(task.make_tools(cfg, verifier)))


def build_feedback(cfg: config_dict.ConfigDict, workdir: pathlib.Path):
    """The feedback provider; an LLM provider's answers are cached under the workdir when asked."""
    from fd_jax.feedback import get_provider

    f = cfg.feedback
    cache_dir = None
    if f.cache_dir:
        cache_dir = str(workdir / f.cache_dir) if not pathlib.Path(f.cache_dir).is_absolute() else f.cache_dir
    common = dict(cache_dir=cache_dir, budget_usd=f.budget_usd, max_concurrency=f.max_concurrency,
                  usd_per_mtok_in=f.usd_per_mtok_in, usd_per_mtok_out=f.usd_per_mtok_out)
    if f.provider in ("lean_errors", "checker"):  # no LLM, nothing to configure
        return get_provider(f.provider)
    return get_provider(f.provider, model=f.model, base_url=f.base_url or None, api_key_env=f.api_key_env or None,
                        timeout_s=f.timeout_s, max_retries=f.max_retries, max_tokens=f.max_tokens,
                        temperature=f.temperature, **common)
