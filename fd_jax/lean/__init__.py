"""Lean 4 verification: the REPL protocol, proof screening, error formatting and the verifier back-ends.

    with LeanVerifier(repl_command, cwd=mathlib_project, workers=7, timeout_s=60) as verifier:
        future = verifier.submit(tasks)      # Lean checks while the caller generates
        verdicts = future.result()           # list[Verdict], in the order of `tasks`

Back-ends share one interface (`verify_batch`, `submit`, `close`, context manager) and are looked up by
name with `get_verifier("local" | "kimina" | "leandojo", **options)`.
"""

from fd_jax.lean.backends import BACKENDS, get_verifier
from fd_jax.lean.formatting import format_errors
from fd_jax.lean.kimina import KiminaVerifier, kimina_verdict
from fd_jax.lean.leandojo import LeanDojoVerifier
from fd_jax.lean.pool import LeanVerifier
from fd_jax.lean.protocol import classify, normalize_message, parse_repl_output
from fd_jax.lean.screen import DEFAULT_HEADER, screen, theorem_name
from fd_jax.lean.types import CRASHED, INVALID, REJECTED, SORRY, STATUSES, TIMEOUT, VALID, ProofTask, Verdict

__all__ = [
    "BACKENDS", "CRASHED", "DEFAULT_HEADER", "INVALID", "KiminaVerifier", "LeanDojoVerifier", "LeanVerifier",
    "ProofTask", "REJECTED", "SORRY", "STATUSES", "TIMEOUT", "VALID", "Verdict", "classify", "format_errors",
    "get_verifier", "kimina_verdict", "normalize_message", "parse_repl_output", "screen", "theorem_name",
]  # fmt: skip
