"""How a model writes a tool call and reads its result: a registry of tool-call formats (`episode.tool_format`).

* `json_tag`: `<tool>{"name": NAME, "arguments": {...}}</tool>`, the result appended as
  `<result>...</result>` text. Works with any model (no chat template needed); the turn pauses at the
  closing tag. The fallback of models without a native format.
* `hermes`: the Qwen2.5 / Hermes convention, through the tokenizer's chat template: the tool schemas go in
  `apply_chat_template(tools=...)`, the model writes `<tool_call>{"name": .., "arguments": ..}</tool_call>`
  and ends its turn (the template's end-of-turn token, e.g. `<|im_end|>`), and the result is a
  `role: tool` message rendered by the template.
* `llama3_json`: the Llama-3.1 convention for custom tools, through the chat template: the whole turn is one
  JSON object `{"name": .., "parameters": ..}` ended by `<|eot_id|>` / `<|eom_id|>`, the result a
  `role: tool` message (rendered by Llama 3.1's template as an `ipython` turn).
* `auto` (`resolve`): the native format when the chat template supports tools (it renders the schemas
  given as `tools=` and a `tool` message, and names the format's call syntax), else `json_tag`.
  SmolLM2's and the character tokenizer's templates ignore `tools=`, so they stay on `json_tag`.

A call is untrusted model output and parsing fails closed: `parse(text)` returns (name, arguments) for
exactly one well-formed call, None for a turn without a call (an answer), and an `error: ...` text (shown to
the model as the tool result) for anything else: malformed JSON, a non-object, a missing/extra key, several
calls, an unclosed call, or a call inside a Markdown code block (quoted, not made).

The result tokens of a native format are exactly what the template renders after the model's turn
(`ChatTemplateFormat.observation`): the transcript rendered with the row's messages, the model's turn as
an assistant message whose content is a sentinel, and the tool message, with a generation prompt; the
text after the sentinel, less the end-of-turn token the model already wrote, is appended. Rendering with a
sentinel rather than the model's text keeps this exact when a template trims or rewrites the content. So
prompt + turns + results concatenate to one render of the final transcript whenever the model ends its
turns with the template's end-of-turn token (`tests/tasks/test_tool_formats.py`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any

from fd_jax.data.control import neutralize, tokenizer_controls  # noqa: F401  (neutralize: re-exported)

SENTINEL = "FDJAXTURN7f3a9c"  # stands for the model's turn when rendering what follows it
_FENCE = "```"


def control_strings(tool_format: Any, tokenizer: Any = None) -> list[str]:
    """The strings only the environment may write into a transcript: the tokenizer's special and added
    markup tokens (chat markers such as `<|im_end|>`, Qwen's `<tool_response>`; `tokenizer_controls`) and
    the format's call and result tags."""
    return sorted(set(getattr(tool_format, "markers", ())) | set(tokenizer_controls(tokenizer)))


def _fenced(text: str, index: int) -> bool:
    """Whether position `index` of `text` lies inside a Markdown code block (an odd number of fences before)."""
    return text.count(_FENCE, 0, index) % 2 == 1


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: `{"answer": "41", "answer": "42"}` is ambiguous (json
    keeps the last one silently), so it is refused rather than resolved by a rule the model can game."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = [k for k, _ in pairs]
        raise ValueError(f"duplicate key {next(k for k in seen if seen.count(k) > 1)!r}"[:100])
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _parse_object(raw: str, name_key: str, args_key: str, example: str) -> tuple[str, dict[str, Any]] | str:
    """One JSON object with a string `name_key` and an object `args_key` (and nothing else, no key twice at
    any depth), or an error."""
    try:
        call = _DECODER.decode(raw)
    except ValueError as e:
        return f"error: the call is not JSON ({e}); write {example}"
    if not isinstance(call, dict) or not isinstance(call.get(name_key), str):
        return f'error: a call is a JSON object with a string "{name_key}" and an object "{args_key}"; write {example}'
    extra = sorted(set(call) - {name_key, args_key})
    if extra:
        return f"error: unexpected keys {extra} in the call; write {example}"[:300]
    arguments = call.get(args_key, {})
    if not isinstance(arguments, dict):
        return f'error: "{args_key}" must be a JSON object; write {example}'
    return call[name_key], arguments


@dataclasses.dataclass(frozen=True)
class TaggedCall:
    """Calls written as `open JSON close`; at most one per turn."""

    open: str
    close: str
    name_key: str = "name"
    args_key: str = "arguments"

    @property
    def example(self) -> str:
        return f'{self.open}{{"{self.name_key}": ..., "{self.args_key}": {{...}}}}{self.close}'

    def parse(self, text: str) -> tuple[str, dict[str, Any]] | str | None:
        opens = [m.start() for m in re.finditer(re.escape(self.open), text)]
        if not opens:
            return None
        if len(opens) > 1:
            return f"error: one call per turn; this turn has {len(opens)}"
        start = opens[0]
        end = text.find(self.close, start)
        if end < 0:
            return f"error: the call is not closed; write {self.example}"
        if _fenced(text, start):
            return f"error: the call is inside a code block (quoted, not made); write {self.example} outside it"
        return _parse_object(text[start + len(self.open): end], self.name_key, self.args_key, self.example)


@dataclasses.dataclass(frozen=True)
class WholeTurnJson:
    """Llama 3.1's custom tool calls: the turn is one JSON object (after optional whitespace), nothing else.
    A turn that does not start with `{` is an answer; a `{"name"` quoted in a code block is an error."""

    name_key: str = "name"
    args_key: str = "parameters"

    @property
    def example(self) -> str:
        return f'{{"{self.name_key}": ..., "{self.args_key}": {{...}}}} as the whole turn'

    def parse(self, text: str) -> tuple[str, dict[str, Any]] | str | None:
        body = text.strip()
        if not body.startswith("{"):
            quoted = re.search(r'\{\s*"' + re.escape(self.name_key) + r'"', text)
            if quoted and _fenced(text, quoted.start()):
                return f"error: the call is inside a code block (quoted, not made); write {self.example}"
            return None
        try:
            _, end = _DECODER.raw_decode(body)
        except ValueError as e:
            return f"error: the call is not JSON ({e}); write {self.example}"
        if body[end:].strip():
            return f"error: one call per turn and nothing after it; write {self.example}"
        return _parse_object(body[:end], self.name_key, self.args_key, self.example)


JSON_TAG = TaggedCall("<tool>", "</tool>")
RESULT_TEMPLATE = "\n<result>\n{result}\n</result>\n"


@dataclasses.dataclass(frozen=True)
class JsonTagFormat:
    """`<tool>{json}</tool>`, results as `<result>` text; any tokenizer. The turn pauses at `</tool>`; a
    turn ended by a stop token (EOS) is an answer."""

    name: str = "json_tag"
    stop_strings: tuple[str, ...] = (JSON_TAG.close,)
    native: bool = False
    calls_end_turns: bool = False  # a call ends at its closing tag, not at the end-of-turn token
    markers: tuple[str, ...] = (JSON_TAG.open, JSON_TAG.close, "<result>", "</result>")
    call_tags: tuple[str, ...] = (JSON_TAG.open, JSON_TAG.close)  # the model's own to write

    def parse(self, text: str) -> tuple[str, dict[str, Any]] | str | None:
        return JSON_TAG.parse(text)

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        return [t for t in (tokenizer.eos_token_id,) if t is not None]

    def observation(self, messages: list[dict[str, Any]], result: str, name: str | None) -> str:
        return RESULT_TEMPLATE.format(result=result)


@dataclasses.dataclass(frozen=True)
class NativeSpec:
    """A family's native convention: how calls are written, which tokens end a turn, and `marker`, a
    string its chat templates contain (how `auto` recognises the family)."""

    name: str
    call: Any  # TaggedCall | WholeTurnJson
    end_tokens: tuple[str, ...]
    marker: str
    tool_role: str = "tool"
    result_tags: tuple[str, ...] = ()  # tags the template puts around a tool result (control strings)


@dataclasses.dataclass
class ChatTemplateFormat:
    """A native format bound to a tokenizer and the tool schemas (`tools=` of apply_chat_template)."""

    spec: NativeSpec
    tokenizer: Any
    schemas: list[dict[str, Any]]
    stop_strings: tuple[str, ...] = ()  # the turn ends at the template's end-of-turn token
    native: bool = True
    calls_end_turns: bool = True

    @property
    def name(self) -> str:
        return self.spec.name

    def parse(self, text: str) -> tuple[str, dict[str, Any]] | str | None:
        return self.spec.call.parse(text)

    @property
    def call_tags(self) -> tuple[str, ...]:
        call = self.spec.call
        return (call.open, call.close) if isinstance(call, TaggedCall) else ()

    @property
    def markers(self) -> tuple[str, ...]:
        return (*self.call_tags, *self.spec.result_tags, *self.end_strings())

    def stop_token_ids(self, tokenizer: Any = None) -> list[int]:
        tok = tokenizer or self.tokenizer
        ids = [tok.eos_token_id] + [tok.convert_tokens_to_ids(t) for t in self.spec.end_tokens]
        return sorted({i for i in ids if i is not None and i != tok.unk_token_id})

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tools=self.schemas or None, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def observation(self, messages: list[dict[str, Any]], result: str, name: str | None) -> str:
        """The text the template renders after the model's turn (the last message of `messages`, an
        assistant turn) up to the next generation prompt, with `result` as a tool message; the model's
        end-of-turn token (already in the transcript) is left out. ValueError when the template does not
        render the sentinel turn (a template that cannot continue after a tool result)."""
        turn = dict(messages[-1], content=SENTINEL)
        tool = {"role": self.spec.tool_role, "content": result, **({"name": name} if name else {})}
        text = self.render([*messages[:-1], turn, tool], add_generation_prompt=True)
        at = text.rfind(SENTINEL)
        if at < 0:
            raise ValueError(f"tool format {self.name}: the chat template does not render the assistant turn")
        after = text[at + len(SENTINEL):]
        for end in sorted(self.end_strings(), key=len, reverse=True):
            if after.startswith(end):
                return after[len(end):]
        return after

    def end_strings(self) -> list[str]:
        tok = self.tokenizer
        return [s for s in (*self.spec.end_tokens, tok.eos_token) if s]


NATIVE: dict[str, NativeSpec] = {
    "hermes": NativeSpec("hermes", TaggedCall("<tool_call>", "</tool_call>"), ("<|im_end|>",), "<tool_call>",
                         result_tags=("<tool_response>", "</tool_response>")),
    "llama3_json": NativeSpec("llama3_json", WholeTurnJson(), ("<|eot_id|>", "<|eom_id|>"), "ipython"),
}
TOOL_FORMATS = ("auto", "json_tag", *NATIVE)  # the values episode.tool_format may take


def supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders the schemas given as `tools=` and a tool message."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return False
    probe = {"type": "function", "function": {"name": "fdjax_probe_tool", "description": "probe",
                                              "parameters": {"type": "object", "properties": {}}}}
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                {"role": "tool", "content": "fdjax_probe_result"}]
    try:
        text = tokenizer.apply_chat_template(messages, tools=[probe], tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that raises on tools does not support them
        return False
    return "fdjax_probe_tool" in text and "fdjax_probe_result" in text


def detect(tokenizer: Any) -> str:
    """The native format `auto` picks for this tokenizer, or 'json_tag'."""
    if not supports_tools(tokenizer):
        return "json_tag"
    template = str(tokenizer.chat_template)
    return next((name for name, spec in NATIVE.items() if spec.marker in template), "json_tag")


def resolve(name: str, tokenizer: Any, schemas: Sequence[dict[str, Any]], *, chat: bool) -> Any:
    """The format named by `episode.tool_format` for this tokenizer. chat: whether prompts go through the
    chat template (a completion-style prompt format only takes `json_tag`). ValueError for a native format
    the set-up cannot use (the caller names the config field)."""
    if name == "auto":
        name = detect(tokenizer) if chat else "json_tag"
    if name == "json_tag":
        return JsonTagFormat()
    if name not in NATIVE:
        raise ValueError(f"unknown tool format {name!r}; known: {list(TOOL_FORMATS)}")
    if not chat:
        raise ValueError(f"{name} renders calls and results with the chat template; use a chat prompt format")
    if not supports_tools(tokenizer):
        raise ValueError(f"{name}: the tokenizer's chat template does not render tools= and tool messages")
    return ChatTemplateFormat(NATIVE[name], tokenizer, [dict(s) for s in schemas])


ToolFormat = Any  # JsonTagFormat | ChatTemplateFormat: name, stop_strings, native, calls_end_turns, markers,
# call_tags, parse,
# stop_token_ids(tokenizer), observation(messages, result, name)
