"""Control strings: the text only the environment may write into a model's context (a tokenizer's special
and added markup tokens such as `<|im_end|>`, a tool format's call and result tags), and `neutralize`, which
breaks them in untrusted text (a model's attempt, a feedback LLM's critique, tool output) so that text
encodes as plain characters and cannot forge a chat turn, end a tool result, or open one.

Used by the tool loop (`fd_jax.tasks.tool_formats`, `fd_jax.tasks.tools`) and by the teacher's reprompt
(`fd_jax.data.reprompt`), whose feedback and attempt texts are rendered through the chat template and then
encoded with special-token parsing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

# Splits a control string so it is neither its token nor its text. A plain space, which every tokenizer
# encodes (a zero-width space is <unk> in a character or SentencePiece vocabulary without byte fallback).
_BREAK = " "
_MARKUP = re.compile(r"[<>\[\]|]")


def neutralize(text: str, controls: Sequence[str]) -> str:
    """`text` with every occurrence of a control string (a special token's text, a call or result tag)
    broken by a space after its first character (`<|im_end|>` -> `< |im_end|>`), so that text from a tool
    (or the model) encodes as plain characters and cannot be read as the environment's scaffolding: a
    tool result that echoes `<|im_end|>` or `</result>` cannot end the result or open a turn. Idempotent;
    text without a control string is returned unchanged."""
    controls = sorted({c for c in controls if len(c) > 1}, key=len, reverse=True)
    if not controls:
        return text
    pattern = "|".join(re.escape(c) for c in controls)
    return re.sub(pattern, lambda m: m[0][0] + _BREAK + m[0][1:], text)


def tokenizer_controls(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens and its added tokens that are markup (`<|im_start|>`, Qwen's
    `<tool_call>`, `[TOOL_RESULTS]`), not the whitespace runs or word pieces some vocabularies add, which
    are ordinary text. [] for None (a format without a tokenizer)."""
    if tokenizer is None:
        return []
    out = [str(t) for t in getattr(tokenizer, "all_special_tokens", ())]
    added = getattr(tokenizer, "get_added_vocab", None)
    out += [t for t in (added() if callable(added) else ()) if t.strip() == t and _MARKUP.search(t)]
    return sorted(set(out))
