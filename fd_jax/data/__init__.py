"""Problem sets, shuffling, prompt formats, proof extraction and the teacher's reprompt."""

from __future__ import annotations

from fd_jax.data.extraction import extract_lean_code, extract_proof_task, strip_think
from fd_jax.data.problems import (
    LOADERS,
    Problem,
    ProblemFormatError,
    load_jsonl,
    load_lean_workbook,
    load_minif2f,
    load_problems,
)
from fd_jax.data.prompts import (
    PROMPT_FORMATS,
    LeanChatFormat,
    LeanCompletionFormat,
    PromptFormat,
    get_prompt_format,
)
from fd_jax.data.reprompt import Reprompt, RepromptTemplates, build_reprompt
from fd_jax.data.shuffle import ShuffledIterator

__all__ = [
    "LOADERS",
    "PROMPT_FORMATS",
    "LeanChatFormat",
    "LeanCompletionFormat",
    "Problem",
    "ProblemFormatError",
    "PromptFormat",
    "Reprompt",
    "RepromptTemplates",
    "ShuffledIterator",
    "build_reprompt",
    "extract_lean_code",
    "extract_proof_task",
    "get_prompt_format",
    "load_jsonl",
    "load_lean_workbook",
    "load_minif2f",
    "load_problems",
    "strip_think",
]
