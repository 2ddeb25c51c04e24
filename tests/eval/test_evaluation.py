"""Evaluation against independent oracles: pass@k by enumerating every k-subset and by exact rational
arithmetic, the entropy by numpy on the model's full logits, lemma and proof counts on hand-written Lean,
and scripts/evaluate.py end to end on the arithmetic test bed with a tiny random model."""

from __future__ import annotations

import fractions
import importlib.util
import itertools
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fd_jax.data.char_tokenizer import build_char_tokenizer
from fd_jax.data.problems import Problem
from fd_jax.eval.diversity import lemmas_used, normalize_proof
from fd_jax.eval.evaluation import completion_logprobs_and_entropy, pass_at_k, plot_pass_at_k, summarize
from fd_jax.verification import INVALID, VALID, ProofTask, Verdict
from fd_jax.models import ModelConfig, init_model, save_hf
from fd_jax.rollout.sampling import generate
from fd_jax.tasks.arithmetic import ArithmeticFormat, check_answer, make_problems

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKENIZER = build_char_tokenizer()
TINY = ModelConfig(family="llama", vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8)


# -- pass@k -----------------------------------------------------------------------------------------------


def test_pass_at_k_equals_enumeration_of_every_subset():
    for n in range(1, 9):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_closed_forms_edges_and_large_n():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)  # pass@1 = c / n
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45, abs=1e-15)  # 1 - C(7,2)/C(10,2)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0 and pass_at_k(5, 1, 5) == 1.0
    # Where C(n, k) has hundreds of digits: against exact rationals.
    for n, c, k in [(1000, 1, 500), (1000, 500, 100), (3000, 7, 1024), (256, 250, 3)]:
        exact = 1 - fractions.Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15), (n, c, k)
    with pytest.raises(ValueError, match=r"k=9 .*n=8"):
        pass_at_k(8, 2, 9)
    with pytest.raises(ValueError, match="c=9"):
        pass_at_k(8, 9, 1)


# -- entropy ----------------------------------------------------------------------------------------------


def test_teacher_forced_entropy_and_logprobs_match_numpy_and_the_sampler():
    model = init_model(TINY, seed=3)
    fmt = ArithmeticFormat()
    prompts = [TOKENIZER.encode(fmt.render(p)) for p in make_problems(2, seed=0, level="easy")]
    # The shapes of the end-to-end test below, so that the sampler compiles once for both.
    out = generate(model, prompts, n=4, max_new_tokens=6, temperature=1.0, seed=5, stop_token_ids=(2,))
    completions = out.token_lists()
    rows = [prompts[p] for p in out.prompt_index]
    # batch_rows=3: three batches, the last one padded with empty rows
    logprobs, entropies = completion_logprobs_and_entropy(model, rows, completions, batch_rows=3)
    length = max(len(r) + len(c) for r, c in zip(rows, completions))
    tokens = np.zeros((len(rows), length), np.int32)
    positions = np.full((len(rows), length), -1, np.int32)
    for b, seq in enumerate(r + c for r, c in zip(rows, completions)):
        tokens[b, : len(seq)], positions[b, : len(seq)] = seq, np.arange(len(seq))
    logits_BTV = np.asarray(model(tokens, positions), np.float64)
    for b, (prompt, completion) in enumerate(zip(rows, completions)):
        logits = logits_BTV[b, len(prompt) - 1 : len(prompt) + len(completion) - 1]  # the positions that drew them
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        np.testing.assert_allclose(entropies[b], -(np.exp(logp) * logp).sum(-1), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logprobs[b], logp[np.arange(len(completion)), completion], atol=1e-5)
        # The sampler recorded log π(y_t) while decoding with its KV cache: the same numbers.
        np.testing.assert_allclose(logprobs[b], out.logprobs[b, : len(completion)], atol=1e-4)


# -- diversity --------------------------------------------------------------------------------------------

STATEMENT = "theorem mathd_algebra_10 (a b : ℝ) (h₀ : 0 < a) (h₁ : 0 < b) : 0 < a * b + Real.sqrt a := by\n"
PROOF_A = STATEMENT + """  -- mul_comm is mentioned only in this comment
  have h_main : 0 < a * b := (mul_pos h₀ h₁ : 0 < a * b)
  have h_sqrt : 0 ≤ Real.sqrt a := Real.sqrt_nonneg a
  nlinarith [sq_nonneg (a - b), h_main.le, (add_pos h₀ h₁).le]
"""
PROOF_A_RESPACED = STATEMENT + """  have h_main : 0 < a * b :=   (mul_pos h₀ h₁ : 0 < a * b) /- a block
  comment -/
  have h_sqrt : 0 ≤ Real.sqrt a := Real.sqrt_nonneg a

  nlinarith [sq_nonneg (a - b),  h_main.le,  (add_pos h₀ h₁).le]
"""
PROOF_B = """lemma aux_pos (x : ℝ) (hx_pos : 0 < x) : 0 < x * 1 := by simpa using hx_pos
""" + STATEMENT + """  obtain ⟨k, hk_pos⟩ : ∃ k : ℝ, 0 < k := ⟨1, one_pos⟩
  rcases lt_or_le a b with h_lt | h_ge
  · have key := @mul_pos a b h₀ h₁
    exact add_pos_of_pos_of_nonneg key (Real.sqrt_nonneg a)
  · have := aux_pos a h₀
    have h_sq (x : ℝ) (hx_pos : 0 < x) : 0 < x ^ 2 := pow_pos hx_pos 2
    have h_d : 0 ≤ b - a := sub_nonneg.mpr h_ge
    refine add_pos_of_pos_of_nonneg (mul_pos h₀ h₁) ?_
    exact Or.elim (Or.inl h_ge) (fun hy_0 => Real.sqrt_nonneg _) (fun hz_1 => Real.sqrt_nonneg _)
"""


def test_lemmas_used_on_hand_written_proofs():
    # Not lemmas: locals (h_main, hk_pos, hx_pos, hy_0 ...), projections on locals (h_main.le), the definition
    # Real.sqrt and the theorem's own name, the aux lemma, tactics (nlinarith, simpa), comments. A type
    # ascription `(mul_pos h₀ h₁ : ...)` is not a binder.
    assert lemmas_used(PROOF_A, STATEMENT) == {"mul_pos", "Real.sqrt_nonneg", "sq_nonneg", "add_pos"}
    assert lemmas_used(PROOF_B, STATEMENT) == {
        "one_pos", "lt_or_le", "mul_pos", "add_pos_of_pos_of_nonneg", "Real.sqrt_nonneg", "Or.elim", "Or.inl",
        "sub_nonneg", "pow_pos",  # sub_nonneg through `.mpr`
    }


def test_summary_counts_distinct_proofs_lemmas_and_pass_at_k():
    problems = [Problem("p0", STATEMENT), Problem("p1", STATEMENT)]
    n = 4
    codes = [PROOF_A, PROOF_A_RESPACED, PROOF_B, PROOF_B + "  bad", "x", "y", "x", "y"]
    statuses = [VALID, VALID, VALID, INVALID, INVALID, INVALID, INVALID, INVALID]
    assert normalize_proof(PROOF_A) == normalize_proof(PROOF_A_RESPACED) != normalize_proof(PROOF_B)
    report = summarize(
        problems, n=n, ks=[1, 2, 4], tasks=[ProofTask(STATEMENT, c) for c in codes],
        verdicts=[Verdict(s) for s in statuses], completions=[[1] * (b + 1) for b in range(8)],
        finish_reasons=["stop"] * 7 + ["length"], token_entropy=[np.full(b + 1, 0.5 * b) for b in range(8)],
    )  # fmt: skip
    p0, p1 = report["problems"]
    assert (p0["correct"], p0["distinct_valid"], p0["distinct_samples"]) == (3, 2, 3)
    assert (p1["correct"], p1["distinct_valid"], p1["distinct_samples"]) == (0, 0, 2)
    assert p0["lemmas"] == sorted(lemmas_used(PROOF_A, STATEMENT) | lemmas_used(PROOF_B, STATEMENT))
    assert report["diversity"]["distinct_lemmas"] == 11  # 4 in A, 9 in B, 2 of them shared
    assert report["pass_at_k"] == {"1": (3 / 4 + 0) / 2, "2": (1 + 0) / 2, "4": (1 + 0) / 2}
    # token-weighted: sum_b (b+1) * 0.5 b / sum_b (b+1)
    assert report["entropy"] == pytest.approx(sum((b + 1) * 0.5 * b for b in range(8)) / 36)
    assert report["truncated_fraction"] == 1 / 8 and report["statuses"] == {"invalid": 5, "valid": 3}
    json.dumps(report)


def test_plot_overlays_runs(tmp_path):
    runs = {name: {"pass_at_k": {"1": a, "4": b, "16": c}, "num_problems": 5, "n": 16, "entropy": e}
            for name, a, b, c, e in (("FD", .2, .4, .6, 1.1), ("GRPO", .3, .35, .4, .3))}
    path = plot_pass_at_k(runs, tmp_path / "cmp.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the script -------------------------------------------------------------------------------------------


def _load_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO_ROOT / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_script_end_to_end_on_arithmetic(tmp_path, capsys):
    model_dir = save_hf(init_model(TINY, seed=0), TINY, tmp_path / "tiny", tokenizer=TOKENIZER)
    script = _load_script()
    with pytest.raises(SystemExit) as exit_:
        script.main(["--model", str(model_dir), "--task", "arithmetic", "--n", "4", "--k", "1,8",
                     "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "evaluate.py: error: --k 8 is larger than --n 4: pass@k needs n >= k samples\n"
    out = tmp_path / "eval"
    report = script.main(["--model", str(model_dir), "--task", "arithmetic", "--num_problems", "4", "--n", "4",
                          "--k", "1,2,4", "--max_new_tokens", "6", "--batch_problems", "2", "--out", str(out)])
    saved = json.loads((out / "report.json").read_text())
    assert (out / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(saved["pass_at_k"]) == {"1", "2", "4"} and saved["num_problems"] == 4 and saved["n"] == 4
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and "samples" not in saved
    # Every verdict agrees with the checker, and pass@k follows from the per-problem counts.
    problems = {p["id"]: p for p in saved["problems"]}
    statements = {q.id: q.statement for q in make_problems(4, seed=script.build_parser().get_default("problem_seed"))}
    for s in samples:
        assert check_answer(statements[s["problem_id"]], s["code"]).status == s["status"]
    for k in (1, 2, 4):
        expected = np.mean([pass_at_k(4, p["correct"], k) for p in problems.values()])
        assert saved["pass_at_k"][str(k)] == pytest.approx(expected)
    assert sum(p["correct"] for p in problems.values()) == sum(s["status"] == VALID for s in samples)
    # A random model's next-token distribution is almost uniform: entropy just below log V.
    assert saved["entropy_tokens"] == sum(s["num_tokens"] for s in samples)
    assert math.log(TINY.vocab_size) - 0.05 < saved["entropy"] <= math.log(TINY.vocab_size) + 1e-5
    assert report["pass_at_k"] == saved["pass_at_k"] and "distinct_lemmas" not in saved["diversity"]


@pytest.mark.parametrize("args, message", [
    (["--model", "{tmp}/nowhere", "--task", "arithmetic"],
     "--model {tmp}/nowhere: not a Hugging Face model directory (no config.json there)"),
    (["--checkpoint", "{tmp}/nowhere"], "{tmp}/nowhere: no such directory"),
    (["--checkpoint", "{tmp}"], "{tmp}: not a training workdir (it has no config.json)"),
    (["--model", "{tmp}/tiny"], "--task is required with --model"),
    (["--model", "{tmp}/tiny", "--task", "lean"], "--problems FILE is required with --task lean"),
], ids=["missing-model", "missing-workdir", "not-a-workdir", "no-task", "lean-without-problems"])
def test_evaluate_script_refuses_in_one_line_before_loading_anything(args, message, tmp_path):
    """As a user runs it: exit status 2, one line naming the argument, no traceback, nothing written."""
    save_hf(init_model(TINY, seed=0), TINY, tmp_path / "tiny", tokenizer=TOKENIZER)
    argv = [a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), *argv], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and message.format(tmp=tmp_path) in done.stderr
    assert not (tmp_path / "out").exists()
    if args[0] == "--checkpoint":  # --debug keeps the traceback (once is enough: each run imports JAX)
        debug = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), *argv, "--debug"],
                               capture_output=True, text=True, timeout=120)
        assert debug.returncode != 0 and "Traceback" in debug.stderr and "WorkdirError" in debug.stderr


def test_evaluate_defaults_follow_the_task(tmp_path):
    script = _load_script()
    parse = lambda *a: script.resolve_defaults(script.build_parser().parse_args([*a, "--out", "x"]))  # noqa: E731
    (tmp_path / "config.json").write_text("{}")  # resolve_defaults only checks that it is there
    assert parse("--model", str(tmp_path), "--task", "arithmetic").max_new_tokens == 16  # a number and <eos>
    lean = parse("--model", str(tmp_path), "--task", "lean", "--problems", "p.jsonl")
    assert lean.max_new_tokens == 2048 and lean.problems == "p.jsonl"
    assert parse("--model", str(tmp_path), "--task", "arithmetic", "--max_new_tokens", "5").max_new_tokens == 5
    assert script.build_parser().get_default("problems") is None  # no path into a checkout's neighbours
    help_text = script.build_parser().format_help()
    for option in help_text.split("\n  --")[1:]:
        assert option.count("default") <= 1, option
