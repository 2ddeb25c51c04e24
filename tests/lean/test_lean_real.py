"""The real Lean REPL on miniF2F statements with known proofs (marked `lean`; skipped without `lake`).

Uses the installation of scripts/setup_lean.sh: `lake` on PATH or in ~/.elan/bin, and the REPL and Mathlib
project under $FD_JAX_LEAN_DIR (default ~/.cache/fd_jax/lean).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest

from fd_jax.lean import LeanVerifier, ProofTask

pytestmark = pytest.mark.lean

LEAN_DIR = pathlib.Path(os.environ.get("FD_JAX_LEAN_DIR", pathlib.Path.home() / ".cache" / "fd_jax" / "lean"))
# Proofs a human wrote for miniF2F `valid` statements; each closes its goal on Lean 4.9 and later.
PROOFS = {
    "mathd_numbertheory_81": "  norm_num\n",
    "amc12a_2009_p2": "  norm_num\n",
    "mathd_algebra_182": "  ring\n",
    "mathd_numbertheory_458": "  omega\n",
}


@pytest.fixture(scope="module")
def verifier():
    lake = shutil.which("lake") or str(pathlib.Path.home() / ".elan" / "bin" / "lake")
    repl = LEAN_DIR / "repl" / ".lake" / "build" / "bin" / "repl"
    project = LEAN_DIR / "mathlib_project"
    if not os.access(lake, os.X_OK):
        pytest.skip("`lake` not found (run scripts/setup_lean.sh)")
    if not repl.exists() or not project.is_dir():
        pytest.skip(f"no REPL build or Mathlib project under {LEAN_DIR} (run scripts/setup_lean.sh)")
    command = [lake, "env", str(repl)]
    with LeanVerifier(command, cwd=str(project), workers=2, timeout_s=300, memory_limit_mb=None) as v:
        yield v


@pytest.fixture(scope="module")
def problems(shared_data) -> dict[str, dict]:
    rows = [json.loads(line) for line in (shared_data / "minif2f.jsonl").read_text().splitlines()]
    return {row["name"]: row for row in rows if row["name"] in PROOFS}


def test_known_proofs_are_valid(verifier, problems):
    tasks = [
        ProofTask(row["formal_statement"], row["formal_statement"] + proof, header=row["header"], id=name)
        for name, proof in sorted(PROOFS.items())
        for row in [problems[name]]
    ]
    verdicts = verifier.verify_batch(tasks)
    assert [(t.id, v.status) for t, v in zip(tasks, verdicts)] == [(t.id, "valid") for t in tasks], verdicts


def test_wrong_proof_is_invalid_with_mapped_position(verifier, problems):
    row = problems["mathd_numbertheory_81"]
    code = "import Mathlib\n" + row["formal_statement"] + "  exact no_such_lemma_fd_jax\n"
    verdict = verifier.verify_batch([ProofTask(row["formal_statement"], code, header=row["header"])])[0]
    assert verdict.status == "invalid"
    error = verdict.errors[0]
    assert error["data"] == "Unknown identifier `no_such_lemma_fd_jax`"  # normalised on every Lean version
    line = code.splitlines()[error["pos"]["line"] - 1]
    assert line[error["pos"]["column"] : error["endPos"]["column"]] == "no_such_lemma_fd_jax"
