"""Lean 4 theorem proving: problems from a file (miniF2F, Lean Workbook, JSONL/Parquet), the Lean prompt
formats of `fd_jax.data.prompts`, and a Lean back-end of `fd_jax.lean` as the verifier."""

from __future__ import annotations

import os
import pathlib
import shlex
from typing import Any

from ml_collections import config_dict

from fd_jax.data.problems import Problem, load_problems
from fd_jax.data.prompts import PromptFormat, get_prompt_format
from fd_jax.tasks.base import Task, fail, format_options
from fd_jax.verification import Verifier


class LeanTask(Task):
    name = "lean"
    prompt_formats = ("lean_completion", "lean_chat")
    count_lemmas = True
    reads_problem_file = True

    def check(self, cfg: config_dict.ConfigDict) -> None:
        d = cfg.data
        if not d.path or not pathlib.Path(d.path).expanduser().is_file():
            raise fail("data.path", d.path, "data.task=lean needs a problem file (e.g. miniF2F JSONL)")
        super().check(cfg)
        if d.num_shots:
            raise fail("data.num_shots", d.num_shots, "worked examples exist for data.task=arithmetic only; set 0")

    def problems(self, cfg: config_dict.ConfigDict, *, held_out: bool = False) -> list[Problem]:
        d = cfg.data
        path = pathlib.Path(d.eval_path or d.path if held_out else d.path).expanduser()
        split = d.eval_split if held_out else d.split
        loader = (d.eval_format or d.format) if held_out else d.format
        problems = load_problems(path, format=loader, split=split or None)
        if not problems:
            field = "data.eval_split" if held_out else "data.split"
            raise fail(field, split, f"{path} has no problems in that split ('' keeps all)")
        limit = cfg.eval.num_problems if held_out else d.num_problems
        return problems[:limit] if limit else problems

    def prompt_format(self, cfg: config_dict.ConfigDict, tokenizer: Any) -> PromptFormat:
        return get_prompt_format(cfg.data.prompt_format, **format_options(cfg, tokenizer))

    def verifier(self, cfg: config_dict.ConfigDict) -> Verifier:
        """This host's Lean verifier: a REPL pool (`local`) or a Kimina client."""
        from fd_jax.lean import DEFAULT_HEADER, get_verifier

        lean = cfg.lean
        common = dict(header=lean.header or DEFAULT_HEADER, timeout_s=lean.timeout_s,
                      allow_native_decide=lean.allow_native_decide, audit_axioms=lean.audit_axioms)
        if lean.backend == "kimina":
            return get_verifier("kimina", base_url=lean.kimina_url, max_concurrency=lean.workers or 8, **common)
        if lean.backend != "local":
            raise fail("lean.backend", lean.backend, "a training run builds 'local' or 'kimina' (LeanDojo needs a "
                       "traced repository; use fd_jax.lean.LeanDojoVerifier directly)")
        command = [os.path.expanduser(part) for part in shlex.split(lean.repl_command)]
        try:
            return get_verifier("local", repl_command=command, workers=lean.workers or None,
                                memory_limit_mb=lean.memory_limit_mb or None, max_uses=lean.max_uses,
                                cwd=os.path.expanduser(lean.cwd) if lean.cwd else None, **common)
        except FileNotFoundError as e:  # no Lean here, or no Mathlib project: a set-up step, not a bug
            raise fail("lean.repl_command", lean.repl_command, f"(lean.cwd = {lean.cwd!r}) {e}") from None

    def source(self, cfg: config_dict.ConfigDict) -> str:
        return cfg.data.path
