"""Prompt formats (the Lean ones; each task owns its formats, see `fd_jax.tasks`): how a `Problem` (plus optional teacher context) becomes model text, and how the model's
completion becomes a `ProofTask`.

A format renders `render(problem, context="")`: the student sees `context=""`, the teacher sees the feedback
and demonstration blocks of `fd_jax.data.reprompt` in `context`. Templates are config strings with the
fields `{context}`, `{header}`, `{informal}`, `{statement}`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from fd_jax.data.extraction import extract_proof_task
from fd_jax.data.problems import Problem
from fd_jax.verification import ProofTask

# DeepSeek-Prover (V1.5) whole-proof completion: the model continues an open lean4 block after the statement.
# With an empty context this is that format exactly.
LEAN_COMPLETION_TEMPLATE = (
    "{context}Complete the following Lean 4 code:\n\n```lean4\n{header}{informal}{statement}"
)
# The user turn of the chat format; the model answers with a lean4 block.
LEAN_CHAT_TEMPLATE = (
    "{context}Complete the following Lean 4 code:\n\n```lean4\n{header}{informal}{statement}```\n\n"
    "Write the complete Lean 4 code, statement included, in one lean4 code block."
)


class PromptFormat(Protocol):
    """What the rollout needs from a format. A chat format also has `messages(problem, context="") ->
    ChatMessages` (the turns `render` renders), through which the teacher's context can be placed in a
    system turn or in extra turns (`fd_jax.data.reprompt.PLACEMENTS`)."""

    add_special_tokens: bool  # whether encoding the rendered text should add the tokenizer's BOS

    def render(self, problem: Problem, context: str = "") -> str: ...

    def extract(self, problem: Problem, completion: str) -> ProofTask: ...

    def demonstration(self, task: ProofTask) -> str: ...


def fill(template: str, **fields: str) -> str:
    """`template.format(**fields)` with an error naming the template field that has no value."""
    try:
        return template.format(**fields)
    except KeyError as e:
        raise ValueError(
            f"template field {{{e.args[0]}}} is not one of {sorted(fields)}; template: {template[:200]!r}"
        ) from None


def _lean_demonstration(task: ProofTask) -> str:
    return f"```lean4\n{task.code.rstrip()}\n```"


@dataclasses.dataclass
class LeanCompletionFormat:
    """Whole-proof completion (DeepSeek-Prover style); the proof is extracted from prompt + completion."""

    template: str = LEAN_COMPLETION_TEMPLATE
    include_informal: bool = True  # put the informal statement (a doc comment in miniF2F) before the theorem
    add_special_tokens: bool = True

    def render(self, problem: Problem, context: str = "") -> str:
        informal = problem.informal if self.include_informal else ""
        return fill(
            self.template,
            context=context,
            header=problem.header,
            informal=informal,
            statement=problem.statement,
        )

    def extract(self, problem: Problem, completion: str) -> ProofTask:
        # The open code block starts in the prompt, so the block is only whole with the prompt in front.
        text = self.render(problem) + completion
        return extract_proof_task(text, problem.statement, problem.header, problem.id)

    def demonstration(self, task: ProofTask) -> str:
        return _lean_demonstration(task)


@dataclasses.dataclass(frozen=True)
class ChatMessages:
    """A chat prompt before the template: an optional system turn, earlier (user, assistant) exchanges,
    then the user turn the model answers."""

    system: str | None
    turns: tuple[tuple[str, str], ...]
    user: str
    tools: tuple[dict[str, Any], ...] = ()  # tool schemas for the template (`apply_chat_template(tools=)`)

    def render(self, tokenizer: Any) -> str:
        return render_chat(tokenizer, self.user, system=self.system, turns=self.turns, tools=self.tools)

    def as_list(self) -> list[dict[str, str]]:
        """The messages as `apply_chat_template` takes them (system, the exchanges, the user turn)."""
        return chat_messages(self.user, system=self.system, turns=self.turns)


@dataclasses.dataclass
class LeanChatFormat:
    """A user turn through the tokenizer's chat template (`apply_chat_template`, jinja2)."""

    tokenizer: Any
    template: str = LEAN_CHAT_TEMPLATE
    system: str | None = None  # an optional system turn
    include_informal: bool = True
    add_special_tokens: bool = False  # the chat template writes its own BOS, if any
    tools: tuple[dict[str, Any], ...] = ()  # tool schemas rendered by the template (a native tool format)
    tool_format: Any = None  # the episode's `fd_jax.tasks.tool_formats` format (None: json_tag / no tools)
    default_placement: str = "user"  # context_placement=auto: not measured on Lean yet, so the original slot

    def messages(self, problem: Problem, context: str = "") -> ChatMessages:
        informal = problem.informal if self.include_informal else ""
        user = fill(
            self.template,
            context=context,
            header=problem.header,
            informal=informal,
            statement=problem.statement,
        )
        return ChatMessages(self.system, (), user, tuple(self.tools))

    def render(self, problem: Problem, context: str = "") -> str:
        return self.messages(problem, context).render(self.tokenizer)

    def extract(self, problem: Problem, completion: str) -> ProofTask:
        return extract_proof_task(completion, problem.statement, problem.header, problem.id)

    def demonstration(self, task: ProofTask) -> str:
        return _lean_demonstration(task)


def chat_messages(user: str, *, system: str | None = None,
                  turns: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """[system], (user, assistant) per exchange of `turns`, then `user`: the messages of a chat prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    for asked, answered in turns:
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    return messages + [{"role": "user", "content": user}]


def render_chat(
    tokenizer: Any, user: str, *, system: str | None = None, turns: Sequence[tuple[str, str]] = (),
    tools: Sequence[dict[str, Any]] = (),
) -> str:
    """One user turn rendered with a generation prompt, as text: after an optional system turn and the
    earlier (user, assistant) exchanges in `turns` (worked examples a small model imitates); `tools`: tool
    schemas the template puts where the model family expects them (none: the template is called without)."""
    messages = chat_messages(user, system=system, turns=turns)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat_template; use a completion format")
    extra = {"tools": list(tools)} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)


PROMPT_FORMATS: dict[str, Callable[..., PromptFormat]] = {
    "lean_completion": LeanCompletionFormat,
    "lean_chat": LeanChatFormat,
}


def get_prompt_format(name: str, **options: Any) -> PromptFormat:
    """`PROMPT_FORMATS[name](**options)`; `lean_chat` needs `tokenizer=`."""
    if name not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {name!r}; known: {sorted(PROMPT_FORMATS)}")
    return PROMPT_FORMATS[name](**options)
