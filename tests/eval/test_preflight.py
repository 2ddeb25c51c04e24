"""The pre-flight check on a tiny model: its log-probs against one unpadded forward pass per sequence, the
rows it scores (every failed rollout with feedback, on the reference answer) and its one-line verdict."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import transformers

from fd_jax.config.schema import RolloutConfig
from fd_jax.data.char_tokenizer import build_char_tokenizer
from fd_jax.eval.preflight import PreflightReport, preflight, score_rows
from fd_jax.feedback import get_provider
from fd_jax.models import ModelConfig, init_model
from fd_jax.tasks.arithmetic import ArithmeticFormat, ArithmeticVerifier, answer_of, make_problems

TOKENIZER = build_char_tokenizer()
CFG = ModelConfig.from_hf(transformers.Qwen3Config(
    vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8))


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=0)


def direct_logp(model, prompt, completion):
    tokens = np.array([list(prompt) + list(completion)], np.int32)
    logits = np.asarray(model(tokens, np.arange(tokens.shape[1])[None]), np.float64)[0]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return sum(logp[len(prompt) - 1 + c, t] for c, t in enumerate(completion))


def wrong_by_one(model, prompts, *, n=1, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed):
    """Every sample answers its problem's result + 1 (so every row fails and gets feedback)."""
    prompts = [p for p in prompts for _ in range(n)]
    tokens = np.zeros((len(prompts), max_new_tokens), np.int32)
    lengths = []
    for i, prompt in enumerate(prompts):
        statement = TOKENIZER.decode(prompt, skip_special_tokens=True).split("\n")[-2]
        ids = TOKENIZER.encode(str(answer_of(statement) + 1), add_special_tokens=False) + list(stop_token_ids)
        tokens[i, : len(ids)] = ids
        lengths.append(len(ids))
    return SimpleNamespace(tokens=tokens, logprobs=np.zeros(tokens.shape, np.float32), lengths=np.array(lengths),
                           finish_reason=["stop"] * len(prompts))


def test_scores_equal_an_unpadded_forward_pass(model):
    students = [[1, 40, 41], [1, 42], [1, 43, 44, 45]]
    teachers = [[1, 50, 51, 40, 41], [1, 52, 42], [1, 43, 44, 45]]
    completions = [[10, 11, 2], [12, 2], [13, 14, 15, 2]]
    t, s = score_rows(model, students, teachers, completions, pad_multiple=8)
    for r in range(3):
        np.testing.assert_allclose(t[r], direct_logp(model, teachers[r], completions[r]), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(s[r], direct_logp(model, students[r], completions[r]), rtol=1e-5, atol=1e-4)
    assert abs(t[2] - s[2]) < 1e-5  # same prompt, same weights: no gain


def test_preflight_scores_the_reference_answer_after_each_teacher_prompt(model):
    problems = make_problems(3, seed=2)
    fmt = ArithmeticFormat()
    config = RolloutConfig(num_generations=2, max_new_tokens=6, pad_multiple=16)
    with ArithmeticVerifier() as verifier:
        report = preflight(problems, model=model, tokenizer=TOKENIZER, fmt=fmt, verifier=verifier,
                           feedback=get_provider("checker"), config=config, generate_fn=wrong_by_one)
    assert report.rows == 6 and list(report.problem_R) == [0, 0, 1, 1, 2, 2]
    # Row 0 by hand: the teacher prompt holds the checker's sentence about the wrong answer.
    answer = answer_of(problems[0].statement)
    feedback = get_provider("checker").feedback([_request(problems[0], str(answer + 1))])[0]
    assert feedback.startswith(f"wrong answer {answer + 1}:")
    from fd_jax.data.reprompt import RepromptTemplates, teacher_context

    teacher_text = fmt.render(problems[0], teacher_context(feedback, None, RepromptTemplates()))
    target = TOKENIZER.encode(str(answer), add_special_tokens=False) + [TOKENIZER.eos_token_id]
    gain = (direct_logp(model, TOKENIZER.encode(teacher_text), target)
            - direct_logp(model, TOKENIZER.encode(fmt.render(problems[0])), target))
    np.testing.assert_allclose(report.gains_R[0], gain, rtol=1e-4, atol=1e-4)
    assert report.line().startswith("preflight: the teacher ")
    assert report.line().endswith(f"{report.rows} rows, placement=user")  # every sample wrong: no solved sibling
    assert not report.sibling_R.any()


def _request(problem, code):
    from fd_jax.feedback import FeedbackRequest
    from fd_jax.tasks.arithmetic import check_answer

    return FeedbackRequest(problem.statement, code, check_answer(problem.statement, code).messages)


def test_the_verdict_needs_a_positive_mean_and_most_problems():
    def report(gains, problems):
        gains = np.array(gains, np.float64)
        return PreflightReport(gains, np.array(problems), gains - 5.0, np.full(len(gains), -5.0), "turns")

    assert report([1.0, 0.5, -0.2], [0, 1, 2]).teacher_knows_more()
    assert "KNOWS MORE than the student" in report([1.0, 0.5, -0.2], [0, 1, 2]).line()
    assert "teacher better on 2/3 problems (67%)" in report([1.0, 0.5, -0.2], [0, 1, 2]).line()
    assert not report([3.0, -0.1, -0.2], [0, 1, 2]).teacher_knows_more()  # one problem carries the mean
    assert not report([-1.0, -0.5], [0, 0]).teacher_knows_more()
    assert "does NOT know more" in report([-1.0, -0.5], [0, 0]).line()
    assert "nothing to say" in report([], []).line()


def test_the_gain_on_rows_with_a_solved_sibling_is_their_own_mean():
    """The number comparable with teacher/logp_gain_correct: the mean over rows with a correct sibling only."""
    gains = np.array([1.0, -0.5, 2.0, -1.0])
    report = PreflightReport(gains, np.array([0, 0, 1, 1]), gains - 5.0, np.full(4, -5.0), "turns",
                             np.array([False, True, False, True]))
    assert report.sibling_gain == (-0.75, 2)
    assert "; on the 2 rows with a solved sibling -0.750" in report.line()
    assert report.as_dict()["preflight/logp_gain_sibling_rows"] == -0.75
    assert np.isnan(PreflightReport(gains, np.zeros(4), gains, gains, "user").sibling_gain[0])
