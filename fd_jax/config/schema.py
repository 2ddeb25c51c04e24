"""The settings the library takes, each written once: its default, a one-line comment and its allowed
values. The step, the optimizer and the rollout receive these dataclasses; the run config's `step`, `optim`
and `rollout` sections are derived from them (`config_section`), so a knob is added in one place. No JAX here:
a config is checked before anything heavy is imported.

A field is declared with `knob(default, doc, ...)`; `choices`, `minimum` and `check` are validated when the
dataclass is built, and a bad value raises ConfigError naming `section.field = value: why` (the config
validation prefixes `config.`). `run_default` is the value a run config starts from when it differs from the
library default (it is resolved per stage, see `fd_jax.train.stages`); `run_default=NOT_IN_CONFIG` keeps a
field out of the run config (the stage sets it).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from ml_collections import config_dict

from fd_jax.config.errors import ConfigError
from fd_jax.data.reprompt import (FEEDBACK_TEMPLATE, PLACEMENTS, REPROMPT_TEMPLATE, RETRY_TEMPLATE, SOLUTION_TEMPLATE,
                                  RepromptTemplates)

_SAME = object()
NOT_IN_CONFIG = object()

# Allowed values that name a registry elsewhere (kernels, losses); those modules check that they agree.
TEACHERS = ("ema", "live", "base")
PROMPT_PACKINGS = ("rows", "groups", "auto")  # `step.prompt_packing`: `fd_jax.rl.step._prefix_layout`
KERNEL_PASSES = ("auto", "one", "two")
KERNEL_BACKENDS = ("auto", "xla", "pallas")
DISTILL_MODES = ("full", "topk", "sampled_token")
IS_LEVELS = ("token", "sequence")
LOSS_TYPES = ("bnpo", "dapo", "dr_grpo", "grpo")  # fd_jax.rl.losses' policy aggregations
LOSS_AGGS = ("constant", "seq_mean", "token_mean")  # fd_jax.rl.losses' FD aggregations
SCHEDULES = ("constant", "cosine")
REWARD_SCALES = ("group", "batch", "none")
TOOL_FORMATS = ("auto", "json_tag", "hermes", "llama3_json")  # fd_jax.tasks.tool_formats' registry


def knob(default: Any, doc: str, *, choices: Sequence[Any] | None = None, minimum: int | None = None,
         check: tuple[Callable[[Any], bool], str] | None = None, run_default: Any = _SAME) -> Any:
    """A dataclass field with its one-line `doc` and the rules its value must follow."""
    return dataclasses.field(default=default, metadata=dict(doc=doc, choices=choices, minimum=minimum,
                                                            check=check, run_default=run_default))


def check_fields(obj: Any, section: str) -> None:
    """Raises ConfigError for the first field of `obj` that breaks its knob's rules."""
    for f in dataclasses.fields(obj):
        value, m = getattr(obj, f.name), f.metadata
        where = f"{section}.{f.name} = {value!r}"
        if m.get("choices") is not None and value not in m["choices"]:
            raise ConfigError(f"{where}: must be one of {list(m['choices'])}")
        minimum = m.get("minimum")
        if minimum is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            raise ConfigError(f"{where}: must be an integer >= {minimum}")
        if m.get("check") is not None and not m["check"][0](value):
            raise ConfigError(f"{where}: {m['check'][1]}")


def _positive_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int) and value >= 1)


_BLOCK = (_positive_or_none, "must be a positive block size, or None for the kernel's tuned default")
_UNIT = "must be in [0, 1]"


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The jitted training step's settings (`fd_jax.rl.step.make_train_step`)."""

    distill_weight: float = knob(1.0, "w in (1-w)·L_GRPO + w·L_FD: 1 = FD, 0 = GRPO (run config: None = from "
                                 "algorithm)", check=(lambda w: 0.0 <= w <= 1.0, _UNIT), run_default=None)
    teacher: str = knob("ema", "ema | live | base (GRPO stages always use live: no teacher pass, no copy)",
                        choices=TEACHERS)
    ema_tau: float = knob(0.05, "EMA rate of the teacher: φ ← (1-τ)φ + τθ after every optimizer step",
                          check=(lambda t: 0.0 < t <= 1.0, "must be in (0, 1]"))
    fuse_live_passes: bool = knob(True, "live teacher: one forward pass over student + teacher rows")
    share_prompts: bool = knob(True, "run each distinct prompt once and only the completions, packed, against "
                               "it (the G samples of a problem share their prompt's keys/values; exact; "
                               "micro_batches 1, one device; others ignore it)")
    prompt_packing: str = knob("auto", "share_prompts: how the completion tokens are laid out against their "
                               "prompt's cache. auto: whole completions of a prompt back to back in a frame of "
                               "rows of 2C tokens whose shape the batch fixes (packing_frame), else one row per "
                               "completion: two programs at most; rows: one row per completion; groups: one "
                               "row per prompt, its width following the data (a new program each time it "
                               "grows)", choices=PROMPT_PACKINGS)
    prompt_heads: bool = knob(True, "share_prompts: the teacher prompts of a problem's rows (which differ from "
                              "the row's own attempt and feedback on) run their common head once and each "
                              "one's tail against it, where that computes fewer tokens (exact)")
    packing_frame: float = knob(0.75, "prompt_packing=auto: the frame's size as a share of the batch's completion "
                                "slots (rows x C); a batch whose completions need more runs one row per "
                                "completion", check=(lambda f: 0.0 < f < 1.0, "must be in (0, 1)"))
    alpha: float = knob(1.0, "divergence: 0 forward KL, 1 reverse KL, between: generalized JSD",
                        check=(lambda a: 0.0 <= a <= 1.0, "must be in [0, 1] (0 forward KL, 1 reverse KL)"))
    distill_mode: str = knob("full", "support: full | topk | sampled_token", choices=DISTILL_MODES)
    top_k: int = knob(20, "support size of distill_mode=topk", minimum=1)
    add_tail: bool = knob(True, "topk: add the tail bucket log(1-Σp) instead of renormalising")
    is_clip: float = knob(2.0, "FD importance weights min(exp(logp - old_logp), is_clip)")
    loss_agg: str = knob("token_mean", "FD aggregation: token_mean | seq_mean | constant", choices=LOSS_AGGS)
    loss_agg_constant: float | None = knob(None, "the normaliser of loss_agg=constant (None: rows x C)")
    loss_type: str = knob("dapo", "GRPO family: grpo | dr_grpo | dapo | bnpo", choices=LOSS_TYPES)
    eps_low: float = knob(0.2, "GRPO ratio clip below 1")
    eps_high: float = knob(0.2, "GRPO ratio clip above 1 (DAPO's clip-higher: e.g. 0.28)")
    importance_sampling_level: str = knob("token", "token | sequence (GSPO)", choices=IS_LEVELS)
    max_completion_length: int | None = knob(None, "dr_grpo's constant normaliser (None: C of the batch)")
    beta: float = knob(0.0, "weight of the k3 KL to the reference policy in GRPO (0 = no reference pass)")
    micro_batches: int = knob(1, "gradient accumulation over this many row slices of the batch", minimum=1)
    token_chunk: int | None = knob(None, "tokens per block of the fused divergence kernel (None = tuned default)",
                                   check=_BLOCK)
    vocab_tile: int | None = knob(None, "vocabulary tile of the fused divergence kernel (None = tuned default)",
                                  check=_BLOCK)
    kernel_backend: str = knob("auto", "auto | xla | pallas", choices=KERNEL_BACKENDS)
    # one: the gradient is formed inside the kernel's statistics pass (4 instead of 6 [N,D]x[D,V] matmuls,
    # memory loss_chunk x V + an f32 [D, V] accumulator); two: the backward recomputes the logits (memory
    # token_chunk x vocab_tile); auto: one, except for GSPO (sequence ratios) and the Pallas engine.
    kernel_passes: str = knob("auto", "auto | one | two", choices=KERNEL_PASSES)
    loss_chunk: int | None = knob(None, "tokens per chunk of the one-pass kernel (None = tuned default)",
                                  check=_BLOCK)

    def __post_init__(self):
        check_fields(self, "step")
        if self.distill_mode == "sampled_token" and self.alpha != 1.0:
            raise ConfigError(f"step.alpha = {self.alpha!r}: distill_mode=sampled_token requires alpha = 1 "
                              f"(reverse KL)")
        if self.kernel_passes == "one" and self.importance_sampling_level != "token":
            raise ConfigError("step.kernel_passes = 'one': needs importance_sampling_level='token' (GSPO's "
                              "sequence ratio is not a sum of per-token terms); use 'two' or 'auto'")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule (`fd_jax.rl.optim.make_optimizer`)."""

    learning_rate: float = knob(1e-6, "peak learning rate", check=(lambda x: x >= 0, "must be >= 0"))
    schedule: str = knob("constant", "after warm-up: constant | cosine (decays to end_lr_ratio x peak)",
                         choices=SCHEDULES)
    warmup_steps: int = knob(0, "linear warm-up from 0 over this many optimizer steps", minimum=0)
    total_steps: int = knob(1000, "cosine length in optimizer steps, warm-up included (run config: 0 = the "
                            "stage's steps x num_iterations)", run_default=0)
    end_lr_ratio: float = knob(0.0, "cosine: final learning rate as a fraction of the peak")
    weight_decay: float = knob(0.0, "AdamW decoupled decay (never on norms and biases)")
    b1: float = knob(0.9, "Adam β1")
    b2: float = knob(0.999, "Adam β2")
    eps: float = knob(1e-8, "Adam ε")
    max_grad_norm: float = knob(1.0, "global-norm clipping (0 = off)")

    def __post_init__(self):
        check_fields(self, "optim")


@dataclasses.dataclass
class RolloutConfig:
    """One rollout step's settings (`fd_jax.rollout.run_rollout`; `asynchronous` is the loop's)."""

    num_generations: int = knob(4, "G samples per problem (the GRPO group)", minimum=1)
    max_new_tokens: int = knob(256, "completion budget per sample", minimum=1)
    temperature: float = knob(1.0, "sampling temperature (old log-probs are always those of the "
                              "temperature-1 policy)", check=(lambda t: t >= 0.0, "must be >= 0 (0 = greedy)"))
    top_p: float = knob(1.0, "nucleus sampling (1 = off)", check=(lambda p: 0.0 < p <= 1.0, "must be in (0, 1]"))
    top_k: int = knob(0, "top-k sampling (0 = off)")
    chunk_problems: int = knob(0, "problems per generate call; >0 overlaps checking with generation (0 = all)",
                               minimum=0)
    pad_multiple: int = knob(32, "padded lengths are this times 2**k or 3 * 2**k: few shapes, few recompilations",
                             minimum=1)
    request_feedback: bool = knob(True, "ask the feedback provider about failed rollouts (the stage sets it: "
                                  "off for pure GRPO)", run_default=NOT_IN_CONFIG)
    use_successful_as_teacher: bool = knob(False, "show the teacher a solved sibling as a demonstration")
    dont_reprompt_on_self_success: bool = knob(True, "a rollout's own success is never its demonstration")
    max_reprompt_len: int | None = knob(None, "cap on teacher prompt tokens, feedback truncated to fit "
                                        "(None = none)")
    scale_rewards: str = knob("group", "GRPO advantage scaling: group | batch | none", choices=REWARD_SCALES)
    log_rollouts: bool = knob(True, "append every rollout to DIR/rollouts.jsonl")
    asynchronous: bool = knob(False, "generate step t+1's batch while step t trains (one step off-policy, "
                              "IS-corrected)")
    reprompt_template: str = knob(REPROMPT_TEMPLATE, "teacher context: fields {solution} and {feedback}")
    feedback_template: str = knob(FEEDBACK_TEMPLATE, "the feedback block: field {feedback}")
    solution_template: str = knob(SOLUTION_TEMPLATE, "the demonstration block: field {solution}")
    context_placement: str = knob("auto", "where the teacher's context goes: auto (the format's measured default: "
                                  "arithmetic chat turns, else user) | user (in the question's turn) | "
                                  "system (chat) | turns (chat: worked-example / retry exchanges)", choices=PLACEMENTS)
    retry_template: str = knob(RETRY_TEMPLATE, "context_placement=turns: before the retried question, field "
                               "{feedback}")

    def __post_init__(self):
        check_fields(self, "rollout")

    @property
    def templates(self) -> RepromptTemplates:
        return RepromptTemplates(self.reprompt_template, self.feedback_template, self.solution_template,
                                 self.retry_template)


@dataclasses.dataclass(frozen=True)
class EpisodeConfig:
    """Multi-turn episodes with tools (`fd_jax.rollout.episodes`); used by tasks that have tools
    (`Task.episodic`). Budgets bound every row; the cache is sized for all of them at once."""

    max_turns: int = knob(4, "model turns per episode (each but the last may end in a tool call)", minimum=1)
    max_turn_tokens: int = knob(256, "model tokens per turn", minimum=1)
    max_obs_tokens: int = knob(512, "tokens of one tool result (longer results are cut)", minimum=1)
    max_episode_tokens: int = knob(2048, "tokens after the prompt, model and tool output together", minimum=1)
    tool_timeout_s: float = knob(120.0, "wall-clock limit of every tool call (the paper's environment: 120 s)",
                                 check=(lambda t: t > 0, "must be > 0"))
    max_tool_output_chars: int = knob(4000, "a tool's text result is cut to this many characters", minimum=1)
    tool_workers: int = knob(8, "tool calls run concurrently on this many host threads", minimum=1)
    mathlib_dir: str = knob("", "Mathlib source tree of mathlib_search / read_mathlib ('' = those tools off)")
    search_matches: int = knob(20, "mathlib_search: at most this many matches", minimum=1)
    read_lines: int = knob(80, "read_mathlib: at most this many lines per call", minimum=1)
    tool_format: str = knob("auto", "how calls and results are written: auto (the chat template's native format if it "
                            "supports tools, else json_tag) | json_tag | hermes | llama3_json", choices=TOOL_FORMATS)

    def __post_init__(self):
        check_fields(self, "episode")


def _base_type(annotation: Any) -> type:
    """`float` of `float | None`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def config_section(cls: type) -> config_dict.ConfigDict:
    """The run-config section of a settings dataclass: every field with its run default (a None default
    becomes a typed placeholder, so an override must still have the field's type)."""
    hints = typing.get_type_hints(cls)
    section = config_dict.ConfigDict()
    for f in dataclasses.fields(cls):
        value = f.metadata.get("run_default", _SAME)
        if value is NOT_IN_CONFIG:
            continue
        value = f.default if value is _SAME else value
        section[f.name] = config_dict.placeholder(_base_type(hints[f.name])) if value is None else value
    return section


def from_section(cls: type, section: config_dict.ConfigDict | dict, **stage_values: Any):
    """The dataclass of a run-config section, with the fields the stage decides (`stage_values`)."""
    values = section.to_dict() if isinstance(section, config_dict.ConfigDict) else dict(section)
    return cls(**{**values, **stage_values})


def docs(cls: type) -> dict[str, str]:
    """field -> its one-line comment."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}
