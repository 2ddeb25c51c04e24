"""Evaluation of an episodic task runs episodes (the training rollout's sampler) and scores the final
answers: scripted episodes with known outcomes give known pass@k."""

from __future__ import annotations

import json

import numpy as np
from flax import nnx

from fd_jax.config.schema import EpisodeConfig
from fd_jax.data.char_tokenizer import build_char_tokenizer
from fd_jax.eval.evaluation import evaluate, mean_pass_at_k
from fd_jax.models.config import ModelConfig
from fd_jax.models.transformer import Transformer
from fd_jax.rollout.rollout import EpisodeSetup
from fd_jax.tasks.arithmetic import ArithmeticFormat, ArithmeticVerifier, answer_of, make_problems
from fd_jax.tasks.arithmetic_tools import TOOLS_TEMPLATE
from fd_jax.tasks.tools import Calculator, submit_tool

TOK = build_char_tokenizer()
ENC = lambda s: TOK.encode(s, add_special_tokens=False)  # noqa: E731


def script(problem, sample):
    """Sample 0 calls the calculator and answers right; 1 answers wrong; 2 calls and never answers (the turn
    budget ends it: a failure, never checked)."""
    expression = problem.statement[len("Compute "):-1]
    call = ENC("<tool>" + json.dumps({"name": "calculator", "arguments": {"expression": expression}}) + "</tool>")
    value = answer_of(problem.statement)
    return [[call, ENC(f"Answer: {value}") + [TOK.eos_token_id]],
            [ENC(f"Answer: {value + 1}") + [TOK.eos_token_id]],
            [call, call]][sample]


def test_episodic_evaluation_scores_the_final_answers():
    cfg = ModelConfig(family="qwen3", vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    setup = EpisodeSetup(EpisodeConfig(max_turns=2, max_turn_tokens=96, max_obs_tokens=32, max_episode_tokens=300,
                                       tool_timeout_s=10.0), {"calculator": Calculator(), "submit": submit_tool},
                         script=script)
    problems = make_problems(3, seed=1, level="hard")
    with ArithmeticVerifier() as verifier:
        report = evaluate(problems, model=model, tokenizer=TOK, fmt=ArithmeticFormat(template=TOOLS_TEMPLATE),
                          verifier=verifier, n=3, ks=(1, 2, 3), max_new_tokens=1, seed=0, lemmas=False,
                          batch_problems=2, episodes=setup, keep_samples=True, progress=False)
    # one right sample of three per problem
    want = mean_pass_at_k([1, 1, 1], 3, (1, 2, 3))
    assert report["pass_at_k"] == {str(k): v for k, v in want.items()}
    assert report["statuses"] == {"invalid": 3, "rejected": 3, "valid": 3}
    samples = report["samples"]
    assert [s["status"] for s in samples[:3]] == ["valid", "invalid", "rejected"]
    assert "without an answer" in samples[2]["reason"] and samples[0]["code"] == str(answer_of(problems[0].statement))
    # the entropy counts the model's tokens only: the three samples' scripted turns, never tool output
    model_tokens = sum(sum(len(t) for t in script(p, i)) for p in problems for i in range(3))
    assert report["entropy_tokens"] == model_tokens and np.isfinite(report["entropy"])


def test_evaluate_script_runs_episodes_for_a_task_with_tools(tmp_path):
    """scripts/evaluate.py --task arithmetic_tools: the samples are episodes (the report names their
    budgets), and every verdict agrees with the checker on the final answer."""
    import importlib.util
    import pathlib

    from fd_jax.models import init_model, save_hf
    from fd_jax.tasks.arithmetic import check_answer

    root = pathlib.Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("evaluate_script", root / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tiny = ModelConfig(family="qwen3", vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)
    model_dir = save_hf(init_model(tiny, seed=0), tiny, tmp_path / "tiny", tokenizer=TOK)
    report = script.main(["--model", str(model_dir), "--task", "arithmetic_tools", "--num_problems", "2", "--n", "2",
                          "--k", "1,2", "--out", str(tmp_path / "eval"), "--no_entropy"])
    assert report["episodes"]["max_turns"] == EpisodeConfig().max_turns and report["episodes"]["tool_format"] == "auto"
    statements = {p.id: p.statement for p in make_problems(2, seed=script.build_parser().get_default("problem_seed"))}
    assert len(report["samples"]) == 4
    for s in report["samples"]:
        if s["status"] != "rejected":  # rejected: the episode ended without an answer, never checked
            assert check_answer(statements[s["problem_id"]], s["code"]).status == s["status"]
