"""Lean 4 theorem proving in episodes with tools, the paper's agentic environment: the prover compiles
files (`lean_check`, through the same verifier and screening as submissions), searches and reads the
Mathlib sources (`mathlib_search`, `read_mathlib`, when a Mathlib tree is found) and submits (`submit`);
or it ends with the whole proof in a lean4 code block. Problems and verification are the `lean` task's.
"""

from __future__ import annotations

import os
from typing import Any

from ml_collections import config_dict

from fd_jax.data.prompts import PromptFormat
from fd_jax.tasks.base import attach_tool_format, fail
from fd_jax.tasks.lean import LeanTask

# Literal braces of the JSON calls are doubled: the template is filled with str.format.
AGENTIC_LEAN_TEMPLATE = (
    "{context}Prove the following theorem in Lean 4:\n\n```lean4\n{header}{informal}{statement}```\n\n"
    'You may call tools, one per turn, as <tool>{{"name": NAME, "arguments": {{...}}}}</tool>; the result comes '
    "back in <result>...</result>.\n"
    '- lean_check {{"code": FILE}}: compile a complete Lean file (statement included) and read Lean\'s messages\n'
    '- mathlib_search {{"pattern": REGEX}}: search the Mathlib sources (matches as file:line: text)\n'
    '- read_mathlib {{"path": FILE, "start_line": N, "end_line": M}}: read lines of a Mathlib file\n'
    '- submit {{"code": FILE}}: submit the complete proof; this ends the attempt\n'
    "Or end by writing the complete Lean 4 code, statement included, in one lean4 code block."
)
# With the model family's native tool format the chat template shows the tools' schemas.
NATIVE_AGENTIC_LEAN_TEMPLATE = (
    "{context}Prove the following theorem in Lean 4:\n\n```lean4\n{header}{informal}{statement}```\n\n"
    "You may call the tools, one per turn: lean_check compiles a complete Lean file (statement included), "
    "mathlib_search and read_mathlib read the Mathlib sources, submit submits the complete proof and ends the "
    "attempt. Or end by writing the complete Lean 4 code, statement included, in one lean4 code block."
)
MATHLIB_IN_PROJECT = ".lake/packages/mathlib"  # where Mathlib's sources sit in a Lake project (lean.cwd)


def mathlib_dir(cfg: config_dict.ConfigDict) -> str:
    """`episode.mathlib_dir`, else the Mathlib sources of the Lean project `lean.cwd` if present, else ''."""
    if cfg.episode.mathlib_dir:
        return os.path.expanduser(cfg.episode.mathlib_dir)
    if cfg.lean.cwd:
        candidate = os.path.join(os.path.expanduser(cfg.lean.cwd), MATHLIB_IN_PROJECT)
        if os.path.isdir(candidate):
            return candidate
    return ""


class LeanAgenticTask(LeanTask):
    """`lean` in episodes: tools lean_check, mathlib_search, read_mathlib and submit (config.episode)."""

    name = "lean_agentic"
    prompt_formats = ("lean_chat",)  # the tool instructions are a user turn
    episodic = True

    def check(self, cfg: config_dict.ConfigDict) -> None:
        super().check(cfg)
        if cfg.episode.mathlib_dir and not os.path.isdir(os.path.expanduser(cfg.episode.mathlib_dir)):
            raise fail("episode.mathlib_dir", cfg.episode.mathlib_dir, "not a directory (Mathlib's sources, e.g. "
                       f"<lean.cwd>/{MATHLIB_IN_PROJECT}; '' = look there, else no search tools)")

    def prompt_format(self, cfg: config_dict.ConfigDict, tokenizer: Any) -> PromptFormat:
        fmt = super().prompt_format(cfg, tokenizer)
        return attach_tool_format(self, cfg, tokenizer, fmt, json_template=AGENTIC_LEAN_TEMPLATE,
                                  native_template=NATIVE_AGENTIC_LEAN_TEMPLATE)

    def tool_names(self, cfg: config_dict.ConfigDict) -> list[str]:
        search = ["mathlib_search", "read_mathlib"] if mathlib_dir(cfg) else []
        return ["lean_check", *search, "submit"]

    def make_tools(self, cfg: config_dict.ConfigDict, verifier: Any) -> dict[str, Any]:
        from fd_jax.tasks.tools import default_tools

        tools = default_tools(mathlib_root=mathlib_dir(cfg) or None, verifier=verifier,
                              search_matches=cfg.episode.search_matches, read_lines=cfg.episode.read_lines,
                              timeout_s=cfg.episode.tool_timeout_s)
        tools.pop("calculator")  # a prover's tools are the paper's: Lean and Mathlib
        return tools
