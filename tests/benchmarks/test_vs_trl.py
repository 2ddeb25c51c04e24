"""benchmarks/vs_trl.py: fd_jax's FD step and TRL's SDPOTrainer compute the same divergence on the same ids.

Needs the `bench` extra (TRL); skipped without it. Runs the --quick model (a tiny random Llama with the
character tokenizer), so no download and no GGUF.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("trl", reason="needs the bench extra: pip install -e '.[bench]'")
pytest.importorskip("torch")

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "vs_trl.py"


def _module():
    spec = importlib.util.spec_from_file_location("vs_trl", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["vs_trl"] = module
    spec.loader.exec_module(module)
    return module


def test_first_step_divergence_agrees_with_trl(tmp_path):
    vs_trl = _module()
    args = vs_trl.parse_args(["--quick", "--cache-dir", str(tmp_path)])
    directory = vs_trl.model_dir(args)
    result = vs_trl.agreement(args, directory)
    # The reprompt changes the teacher's distribution: a divergence well above float rounding, so that
    # agreement is not two zeros. Both sides compute it in f32 over the same 116-token vocabulary.
    assert result["fdjax_kl_mean"] > 0.05
    assert result["abs_diff"] <= 1e-3 * max(1.0, result["trl_kl_mean"]), result
    assert result["agree"]
