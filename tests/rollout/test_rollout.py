"""The rollout pipeline with a scripted generator (the batching is what is under test here): alignment of
teacher and student completions, masks, reprompts, demonstrations, overlap, screening and the JSONL log."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from fd_jax.data.char_tokenizer import build_char_tokenizer
from fd_jax.data.problems import Problem
from fd_jax.data.reprompt import TRUNCATION_MARKER
from fd_jax.feedback import get_provider
from fd_jax.rollout.rollout import RolloutConfig, run_rollout
from fd_jax.tasks.arithmetic import ArithmeticFormat, ArithmeticVerifier, answer_of, make_problems
from fd_jax.rl.batch import bucket_length, pack_train_batch
from fd_jax.verification import REJECTED, Verdict

TOKENIZER = build_char_tokenizer()
FMT = ArithmeticFormat()


def scripted_generate(answer_for, *, delay_s=0.0, calls=None):
    """A stand-in for `fd_jax.rollout.sampling.generate`: row i answers `answer_for(statement, i)` followed by <eos>,
    or is cut at max_new_tokens (finish_reason "length"). Log-probs are -(token id)/100, so they can be
    traced back to their token."""

    def generate(model, prompts, *, n=1, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed):
        if calls is not None:
            calls.append(time.monotonic())
        time.sleep(delay_s)
        prompts = [prompt for prompt in prompts for _ in range(n)]  # rows prompt-major, as the sampler's
        tokens_BT = np.zeros((len(prompts), max_new_tokens), np.int32)
        logprobs_BT = np.zeros((len(prompts), max_new_tokens), np.float32)
        lengths, finish = [], []
        for i, prompt in enumerate(prompts):
            statement = TOKENIZER.decode(prompt, skip_special_tokens=True).split("\n")[-2]
            ids = TOKENIZER.encode(answer_for(statement, i), add_special_tokens=False) + list(stop_token_ids)
            n = min(len(ids), max_new_tokens)
            tokens_BT[i, :n] = ids[:n]
            logprobs_BT[i, :n] = -np.array(ids[:n]) / 100
            lengths.append(n)
            finish.append("stop" if n == len(ids) else "length")
        return SimpleNamespace(tokens=tokens_BT, logprobs=logprobs_BT, lengths=np.array(lengths),
                               finish_reason=finish)

    return generate


def right_for_even_rows(statement, i):
    """Even samples answer correctly, odd ones are off by 10; sample 3 rambles past the token budget."""
    if i % 4 == 3:
        return "1" * 40
    return str(answer_of(statement) + (0 if i % 2 == 0 else 10))


def rollout(problems, generate, config, verifier=None, **kw):
    verifier = verifier or ArithmeticVerifier()
    with verifier:
        return run_rollout(problems, model=None, tokenizer=TOKENIZER, fmt=FMT, verifier=verifier,
                           feedback=kw.pop("feedback", get_provider("lean_errors")), config=config,
                           generate_fn=generate, **kw)


def test_teacher_and_student_score_the_same_completion_tokens(tmp_path):
    problems = make_problems(3, seed=1, level="hard")
    config = RolloutConfig(num_generations=4, max_new_tokens=12, pad_multiple=16)
    result = rollout(problems, scripted_generate(right_for_even_rows), config, workdir=tmp_path, step=7)
    batch = result.batch
    B, C = batch.completion_tokens_BC.shape
    assert B == 12 and C == 16
    for name in ("student_tokens_BS", "teacher_tokens_BU"):
        assert getattr(batch, name).shape[1] % 16 == 0

    rows = np.arange(B)[:, None]
    mask = batch.completion_mask_BC.astype(bool)
    # The token after each predicting position is the completion token, in both contexts, position by position.
    student_next = batch.student_tokens_BS[rows, np.where(mask, batch.student_index_BC + 1, 0)]
    teacher_next = batch.teacher_tokens_BU[rows, np.where(mask, batch.teacher_index_BC + 1, 0)]
    assert np.array_equal(student_next[mask], batch.completion_tokens_BC[mask])
    assert np.array_equal(teacher_next[mask], batch.completion_tokens_BC[mask])
    # The predicting positions are real tokens and the predicted ones lie past the prompt.
    assert (np.take_along_axis(batch.student_positions_BS, batch.student_index_BC, 1)[mask] >= 0).all()
    assert (np.take_along_axis(batch.teacher_positions_BU, batch.teacher_index_BC, 1)[mask] >= 0).all()

    for b in range(B):
        p, g = divmod(b, 4)
        prompt = TOKENIZER.encode(FMT.render(problems[p]))
        expected = TOKENIZER.encode(right_for_even_rows(problems[p].statement, b), add_special_tokens=False)
        expected = (expected + [TOKENIZER.eos_token_id])[:12]
        n = len(expected)
        # The mask covers exactly the generated tokens (the stop token included), nothing of the prompt.
        assert batch.completion_mask_BC[b].tolist() == [1.0] * n + [0.0] * (C - n)
        assert batch.completion_tokens_BC[b, :n].tolist() == expected
        assert (batch.completion_tokens_BC[b, n:] == TOKENIZER.pad_token_id).all()
        assert batch.student_tokens_BS[b, : len(prompt)].tolist() == prompt
        assert batch.student_index_BC[b, 0] == len(prompt) - 1
        assert batch.student_positions_BS[b].tolist() == list(range(len(prompt) + n)) + [-1] * (
            batch.student_tokens_BS.shape[1] - len(prompt) - n)
        np.testing.assert_allclose(batch.old_logprobs_BC[b, :n], -np.array(expected) / 100, rtol=1e-6)
        assert (batch.old_logprobs_BC[b, n:] == 0).all()
        assert result.truncated_B[b] == (g == 3)

    rewards_PG = np.array([[1, 0, 1, 0]] * 3, np.float32)
    assert batch.rewards_B.tolist() == rewards_PG.reshape(-1).tolist()
    # Mean 0.5 in every group and the unbiased std (as TRL's torch.std) sqrt(1/3).
    np.testing.assert_allclose(batch.advantages_B, np.tile([1, -1, 1, -1], 3) * 0.5 / (np.sqrt(1 / 3) + 1e-4),
                               rtol=1e-5)
    # Failed rows are distilled with Lean-style feedback in their reprompt; solved rows are not.
    assert batch.distill_mask_B.tolist() == [0.0, 1.0, 0.0, 1.0] * 3
    for b in range(B):
        n_teacher = int((batch.teacher_positions_BU[b] >= 0).sum())
        teacher_text = TOKENIZER.decode(batch.teacher_tokens_BU[b, :n_teacher])
        if b % 2 == 0:
            assert np.array_equal(batch.teacher_tokens_BU[b, :n_teacher],
                                  batch.student_tokens_BS[b, :n_teacher])
        else:
            assert "Feedback on an earlier, incorrect attempt" in teacher_text
            assert "wrong answer" in teacher_text and result.records[b]["feedback"] in teacher_text

    lines = (tmp_path / "rollouts.jsonl").read_text().splitlines()
    assert len(lines) == 12
    first, second = json.loads(lines[0]), json.loads(lines[1])
    assert first["step"] == 7 and first["status"] == "valid" and first["reward"] == 1.0
    assert first["feedback"] is None
    assert second["status"] == "invalid" and "wrong digit" in second["messages"][0]["data"]
    assert second["feedback"] and second["distilled"] and second["prompt"] == FMT.render(problems[0])
    assert result.counts["valid"] == 6 and result.counts["invalid"] == 6 and result.counts["distilled"] == 6
    assert set(result.timings) >= {"generate_s", "verify_s", "feedback_s", "batch_s", "total_s"}


def test_solved_sibling_demonstrations():
    problems = [Problem("a", "Compute 2 + 3."), Problem("b", "Compute 4 + 4.")]
    # Problem a: only sample 0 solves it; problem b: samples 0 and 1 do.
    def answer(statement, i):
        solved = {0, 4, 5}
        return str(answer_of(statement) + (0 if i in solved else 1))

    config = RolloutConfig(num_generations=4, max_new_tokens=8, pad_multiple=8, use_successful_as_teacher=True,
                           reprompt_template="{solution}{feedback}", feedback_template="[F]",
                           solution_template="[S:{solution}]")
    result = rollout(problems, scripted_generate(answer), config)
    contexts = [r["teacher_prompt"] for r in result.records]
    assert contexts[0] is None  # its own success is not shown to it, and it has no sibling success
    assert contexts[1] == FMT.render(problems[0], "[S:Compute 2 + 3.\nAnswer: 5][F]")
    assert contexts[4] == FMT.render(problems[1], "[S:Compute 4 + 4.\nAnswer: 8]")  # shown the sibling
    assert contexts[5] == FMT.render(problems[1], "[S:Compute 4 + 4.\nAnswer: 8]")
    assert result.batch.distill_mask_B.tolist() == [0, 1, 1, 1, 1, 1, 1, 1]

    config.dont_reprompt_on_self_success = False
    result = rollout(problems, scripted_generate(answer), config)
    assert result.records[0]["teacher_prompt"] == FMT.render(problems[0], "[S:Compute 2 + 3.\nAnswer: 5]")


def test_max_reprompt_len_cuts_feedback_never_the_completion():
    problems = make_problems(2, seed=3, level="hard")
    long_feedback = get_provider("lean_errors", template="x")
    long_feedback.lean_errors_text = lambda request: "Check the carries. " * 40
    config = RolloutConfig(num_generations=2, max_new_tokens=10, pad_multiple=8, max_reprompt_len=240)
    wrong = scripted_generate(lambda s, i: str(answer_of(s) + 1))
    result = rollout(problems, wrong, config, feedback=long_feedback)
    batch = result.batch
    for b in range(4):
        prompt_len = int(batch.teacher_index_BC[b, 0]) + 1
        assert prompt_len <= 240
        n = int(batch.completion_mask_BC[b].sum())
        teacher_completion = batch.teacher_tokens_BU[b, prompt_len : prompt_len + n]
        assert np.array_equal(teacher_completion, batch.completion_tokens_BC[b, :n])
        assert TRUNCATION_MARKER in TOKENIZER.decode(batch.teacher_tokens_BU[b, :prompt_len])
    assert result.counts["reprompts_truncated"] == 4 and batch.distill_mask_B.tolist() == [1, 1, 1, 1]


def test_verification_overlaps_generation():
    problems = make_problems(4, seed=0)
    calls = []
    config = RolloutConfig(num_generations=2, max_new_tokens=4, pad_multiple=8, chunk_problems=1)
    # Per chunk: 0.2 s generating, 0.2 s verifying (2 rows x 0.1 s). In series: 1.6 s; overlapped: ~1.0 s.
    # Batch building is not part of the overlap (the first one in a process also starts JAX): left out.
    result = rollout(problems, scripted_generate(right_for_even_rows, delay_s=0.2, calls=calls), config,
                     verifier=ArithmeticVerifier(delay_s=0.1))
    assert len(calls) == 4
    assert result.timings["verify_s"] >= 0.75 and result.timings["generate_s"] >= 0.75
    assert result.timings["total_s"] - result.timings["batch_s"] < 1.35
    assert result.timings["wait_s"] < 0.4  # only the last chunk's checks are left after generation


def test_rejected_proofs_get_the_reason_as_feedback():
    class ScreeningVerifier(ArithmeticVerifier):
        """Rejects before checking, as the Lean verifiers screen proofs they will not run."""

        def verify(self, task):
            return Verdict(REJECTED, reason="answers must not be 3") if task.code == "3" else super().verify(task)

    problems = [Problem("a", "Compute 1 + 1.")]
    config = RolloutConfig(num_generations=2, max_new_tokens=6, pad_multiple=8)
    result = rollout(problems, scripted_generate(lambda s, i: ["2", "3"][i]), config, verifier=ScreeningVerifier())
    assert [r["status"] for r in result.records] == ["valid", "rejected"]
    assert "answers must not be 3" in result.records[1]["feedback"]


def test_pack_train_batch_by_hand():
    batch = pack_train_batch(
        student_prompts=[[5, 6, 7], [8]],
        teacher_prompts=[[3, 5, 6, 7], [8]],
        completions=[[9, 10], [11, 12, 13]],
        old_logprobs=[[-0.5, -0.25], [-1.0, -2.0, -3.0]],
        rewards_B=np.array([1.0, 0.0]),
        advantages_B=np.array([1.0, -1.0]),
        distill_mask_B=np.array([1.0, 0.0]),
        pad_id=0,
        pad_multiple=4,
    )
    assert batch.student_tokens_BS.tolist() == [[5, 6, 7, 9, 10, 0, 0, 0], [8, 11, 12, 13]+[0] * 4]
    assert batch.student_positions_BS.tolist() == [[0, 1, 2, 3, 4, -1, -1, -1], [0, 1, 2, 3, -1, -1, -1, -1]]
    assert batch.teacher_tokens_BU.tolist() == [[3, 5, 6, 7, 9, 10, 0, 0], [8, 11, 12, 13, 0, 0, 0, 0]]
    assert batch.completion_tokens_BC.tolist() == [[9, 10, 0, 0], [11, 12, 13, 0]]
    assert batch.completion_mask_BC.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    assert batch.student_index_BC.tolist() == [[2, 3, 4, 5], [0, 1, 2, 3]]
    assert batch.teacher_index_BC.tolist() == [[3, 4, 5, 6], [0, 1, 2, 3]]
    assert batch.old_logprobs_BC.tolist() == [[-0.5, -0.25, 0, 0], [-1, -2, -3, 0]]
    assert batch.student_tokens_BS.dtype == np.int32 and batch.completion_mask_BC.dtype == np.float32
    with pytest.raises(ValueError, match="row 1 has 3 completion tokens but 2 log-probs"):
        pack_train_batch(student_prompts=[[1], [1]], teacher_prompts=[[1], [1]], completions=[[2], [2, 3, 4]],
                         old_logprobs=[[0.0], [0.0, 0.0]], rewards_B=np.zeros(2), advantages_B=np.zeros(2),
                         distill_mask_B=np.zeros(2), pad_id=0)


def test_padded_lengths_come_from_a_small_known_set():
    """The smoke run's reprompts grew from 295 to 334 tokens at step 61, past a multiple of 64: a new
    shape, a recompilation of the train step and a 10-18 s stall. Lengths now fall in buckets of
    pad_multiple x {1, 2, 3, 4, 6, 8, ...}: few shapes, known in advance, little padding."""
    m = 64
    lengths = {bucket_length(n, m) for n in range(1, 8193)}
    assert lengths == {m * u for u in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)}
    assert all(n <= bucket_length(n, m) <= max(1.5 * n, m) for n in range(2 * m + 1, 8193))  # beyond 2 m: <= 1.5x
    assert all(n <= bucket_length(n, m) < max(2 * n, m + 1) for n in range(1, 2 * m + 1))
    teacher = [[1] * 295, [1] * 334]  # the two reprompt lengths of the smoke run, around step 61
    shapes = {pack_train_batch(student_prompts=[[1] * 23], teacher_prompts=[t], completions=[[2] * 8],
                               old_logprobs=[[0.0] * 8], rewards_B=np.zeros(1), advantages_B=np.zeros(1),
                               distill_mask_B=np.ones(1), pad_id=0, pad_multiple=m).teacher_tokens_BU.shape
              for t in teacher}
    assert shapes == {(1, 384)}


def test_end_to_end_with_a_tiny_model_and_the_real_sampler(tmp_path):
    """The real sampler on a tiny random model: the sampler's log-probs must be the model's own
    log-softmax read through the batch's index maps, which checks the maps against an independent forward."""
    import jax

    from fd_jax.models import ModelConfig, init_model
    from fd_jax.rollout.sampling import generate

    cfg = ModelConfig(family="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    model = init_model(cfg, seed=0)
    problems = make_problems(4, seed=5, level="easy")
    config = RolloutConfig(num_generations=3, max_new_tokens=6, pad_multiple=16, chunk_problems=2,
                           use_successful_as_teacher=True)
    with ArithmeticVerifier() as verifier:
        result = run_rollout(problems, model=model, tokenizer=TOKENIZER, fmt=FMT, verifier=verifier,
                             feedback=get_provider("lean_errors"), config=config, generate_fn=generate, seed=3,
                             workdir=tmp_path)
    batch = result.batch
    assert batch.completion_tokens_BC.shape == (12, 16)
    mask = batch.completion_mask_BC.astype(bool)
    eos = TOKENIZER.eos_token_id
    for b in range(12):
        n = int(mask[b].sum())
        generated = batch.completion_tokens_BC[b, :n].tolist()
        assert eos not in generated[:-1]  # the mask ends at the first stop token...
        assert n == 6 if result.truncated_B[b] else generated[-1] == eos  # ...or at max_new_tokens

    forward = jax.jit(lambda tokens, positions: jax.nn.log_softmax(model(tokens, positions), axis=-1))
    rows = np.arange(12)[:, None]
    logp = {}
    for name, tokens, positions, index in [
        ("student", batch.student_tokens_BS, batch.student_positions_BS, batch.student_index_BC),
        ("teacher", batch.teacher_tokens_BU, batch.teacher_positions_BU, batch.teacher_index_BC),
    ]:
        predicted = tokens[rows, np.where(mask, index + 1, 0)]
        assert np.array_equal(predicted[mask], batch.completion_tokens_BC[mask])
        logp[name] = np.asarray(forward(tokens, positions))[rows, index, batch.completion_tokens_BC]
    np.testing.assert_allclose(logp["student"][mask], batch.old_logprobs_BC[mask], atol=2e-5)
    plain = ~batch.distill_mask_B.astype(bool)
    teacher, student = logp["teacher"][plain], logp["student"][plain]
    np.testing.assert_allclose(teacher[mask[plain]], student[mask[plain]], atol=2e-5)

    solved = np.array([r["status"] == "valid" for r in result.records]).reshape(4, 3)
    sibling_solved = (solved.sum(1, keepdims=True) - solved) > 0
    assert batch.distill_mask_B.tolist() == (~solved | sibling_solved).reshape(-1).astype(float).tolist()
    assert len((tmp_path / "rollouts.jsonl").read_text().splitlines()) == 12
    assert result.timings["generate_s"] > 0 and result.counts["rollouts"] == 12
