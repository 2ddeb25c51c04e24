"""What a task is: where its problems come from, how a problem becomes a prompt and a completion becomes
something to check, and who checks it.

A `Task` is looked up by name (`config.data.task`, `scripts/evaluate.py --task`) in `fd_jax.tasks.TASKS`;
nothing outside `fd_jax/tasks/` branches on the task's name. Its methods read the run's ml_collections config
(the `data.*` fields, and a task's own section such as `lean.*`) and raise `ConfigError` naming the field.

An episode is one turn without tools by default: render the problem, sample one completion, `extract` it
into a `ProofTask`, verify it, and give a verdict (and, for FD, feedback) on it. A task with tools sets
`episodic = True` and returns its tools from `make_tools` (name -> `fd_jax.tasks.tools.Tool`); the rollout
then runs episodes of several turns (`fd_jax.rollout.episodes`, budgets in `config.episode`): the model
writes until a tool call or a final answer, each tool result is appended to its context, and the final
answer (the `submit` call's, or the last turn's) is extracted and verified as a single-turn completion is,
with the tool output masked out of the loss. A single-turn task (`episodic = False`) takes the
single-turn path unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from ml_collections import config_dict

from fd_jax.config.errors import ConfigError
from fd_jax.data.problems import Problem
from fd_jax.data.prompts import PromptFormat
from fd_jax.verification import Verifier


class Task:
    """A verifiable task. Subclasses set the class attributes and implement the four methods."""

    name: ClassVar[str]
    prompt_formats: ClassVar[tuple[str, ...]]  # the values data.prompt_format may take; the first is the default
    count_lemmas: ClassVar[bool] = False  # diversity hook: evaluation counts the Mathlib lemmas of valid proofs
    default_num_problems: ClassVar[int] = 0  # scripts/evaluate.py's --num_problems 0: 0 = every problem of the source
    default_max_new_tokens: ClassVar[int] = 2048  # scripts/evaluate.py's completion budget for --model
    reads_problem_file: ClassVar[bool] = False  # whether the problems come from data.path (--problems)
    episodic: ClassVar[bool] = False  # episodes of several turns with the tools of `make_tools` (config.episode)
    supervised: ClassVar[bool] = False  # whether `sft_pair` gives (prompt, target) pairs for algorithm=sft

    def check(self, cfg: config_dict.ConfigDict) -> None:
        """Raises ConfigError for a setting this task cannot work with (called by config validation)."""
        d = cfg.data
        if d.prompt_format not in self.prompt_formats:
            raise fail("data.prompt_format", d.prompt_format,
                       f"data.task={self.name} needs {' | '.join(self.prompt_formats)}")
        tool_format = cfg.episode.tool_format if "episode" in cfg else "auto"
        if self.episodic and tool_format not in ("auto", "json_tag") and not d.prompt_format.endswith("_chat"):
            raise fail("episode.tool_format", tool_format, "a native tool format renders calls and results with the "
                       f"chat template; data.prompt_format = {d.prompt_format!r} is completion style (use a _chat "
                       "format, or json_tag / auto)")
        if cfg.algorithm == "sft" and not self.supervised:
            raise fail("algorithm", "sft", f"data.task={self.name} has no supervised targets")

    def problems(self, cfg: config_dict.ConfigDict, *, held_out: bool = False) -> list[Problem]:
        """The training problems, or the held-out ones (`eval.num_problems` of them) when `held_out`."""
        raise NotImplementedError

    def prompt_format(self, cfg: config_dict.ConfigDict, tokenizer: Any) -> PromptFormat:
        """The format named by `data.prompt_format` (rendering prompts, extracting ProofTasks)."""
        raise NotImplementedError

    def verifier(self, cfg: config_dict.ConfigDict) -> Verifier:
        """This host's checker (a context manager: the caller closes it)."""
        raise NotImplementedError

    def make_tools(self, cfg: config_dict.ConfigDict, verifier: Verifier) -> Mapping[str, Callable[..., str]]:
        """The tools of an episodic task (name -> `fd_jax.tasks.tools.Tool`), given this host's verifier."""
        return {}

    def tool_names(self, cfg: config_dict.ConfigDict) -> list[str]:
        """The names `make_tools` gives under this config (for the tool schemas of a native tool format)."""
        return []

    def source(self, cfg: config_dict.ConfigDict) -> str:
        """Where the problems come from, for reports."""
        raise NotImplementedError

    def sft_pair(self, cfg: config_dict.ConfigDict, fmt: PromptFormat, problem: Problem, *, rng: Any,
                 feedback_fn: Callable[[Any], str], templates: Any, placement: str) -> tuple[str, str]:
        """(prompt text, target text) of one supervised example of `problem` (tasks with `supervised`):
        a bare question or one with a teacher context (feedback written by `feedback_fn(FeedbackRequest)`,
        or a hint), rendered with `templates` and `placement` exactly as the FD teacher's prompts are."""
        raise NotImplementedError


def fail(path: str, value: Any, why: str) -> ConfigError:
    """`config.PATH = VALUE: why`, the shape of every config error."""
    return ConfigError(f"config.{path} = {value!r}: {why}")


def attach_tool_format(task: Task, cfg: config_dict.ConfigDict, tokenizer: Any, fmt: Any, *, json_template: str,
                       native_template: str) -> Any:
    """Sets `fmt.tool_format` (`episode.tool_format` resolved for this tokenizer, `fd_jax.tasks.tool_formats`)
    and, unless `data.prompt_template` overrides it, the template that explains the calls: `json_template`
    spells out the `<tool>` syntax; with a native format the chat template carries the tool schemas
    (`fmt.tools`) and `native_template` only says what to do. Returns fmt; ConfigError naming
    episode.tool_format when the prompt format or the tokenizer cannot take the format asked for."""
    from fd_jax.tasks.tool_formats import resolve
    from fd_jax.tasks.tools import tool_schemas

    schemas = tool_schemas(task.tool_names(cfg))
    chat = getattr(fmt, "tokenizer", None) is not None
    try:
        fmt.tool_format = resolve(cfg.episode.tool_format, tokenizer, schemas, chat=chat)
    except ValueError as e:
        raise fail("episode.tool_format", cfg.episode.tool_format, f"{e} (data.prompt_format = "
                   f"{cfg.data.prompt_format!r})") from None
    if fmt.tool_format.native:
        fmt.tools = tuple(schemas)
    if not cfg.data.prompt_template:
        fmt.template = native_template if fmt.tool_format.native else json_template
    return fmt


def format_options(cfg: config_dict.ConfigDict, tokenizer: Any) -> dict[str, Any]:
    """The options every prompt format takes from `data.*`: a template override and, for a chat format,
    the tokenizer and the system turn."""
    d = cfg.data
    options: dict[str, Any] = {"template": d.prompt_template} if d.prompt_template else {}
    if d.prompt_format.endswith("_chat"):
        options.update(tokenizer=tokenizer, system=d.system_prompt or None)
    return options
