"""Under every context placement, the teacher rows score exactly the student's completion tokens: the
TrainBatch index maps point, position by position, at the same completion tokens in both contexts."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

from fd_jax.data.char_tokenizer import build_char_tokenizer
from fd_jax.feedback import get_provider
from fd_jax.rollout.rollout import RolloutConfig, run_rollout
from fd_jax.tasks.arithmetic import ArithmeticFormat, ArithmeticVerifier, answer_of, make_problems

QWEN_STYLE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZER = build_char_tokenizer()
TOKENIZER.chat_template = QWEN_STYLE
STATEMENT = re.compile(r"Compute [0-9 +*-]+\.")


def generate(model, prompts, *, n=1, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed):
    """Row i answers its problem right unless i % 3 == 2 (then off by i): two solved siblings per group."""
    prompts = [p for p in prompts for _ in range(n)]
    tokens = np.zeros((len(prompts), max_new_tokens), np.int32)
    lengths = []
    for i, prompt in enumerate(prompts):
        statement = STATEMENT.findall(TOKENIZER.decode(prompt, skip_special_tokens=True))[-1]
        value = answer_of(statement) + (0 if i % 3 != 2 else i)
        ids = TOKENIZER.encode(f"Answer: {value}", add_special_tokens=False) + list(stop_token_ids)
        tokens[i, : len(ids)] = ids
        lengths.append(len(ids))
    return SimpleNamespace(tokens=tokens, logprobs=-tokens / 100.0, lengths=np.array(lengths),
                           finish_reason=["stop"] * len(prompts))


@pytest.mark.parametrize("placement", ["user", "system", "turns"])
def test_teacher_and_student_rows_hold_the_same_completion(placement):
    fmt = ArithmeticFormat(tokenizer=TOKENIZER, system="Reply with 'Answer: N'.", template="{context}{statement}",
                           examples=[("Compute 4 + 5.", 9)])
    config = RolloutConfig(num_generations=3, max_new_tokens=16, pad_multiple=8, use_successful_as_teacher=True,
                           context_placement=placement)
    with ArithmeticVerifier() as verifier:
        result = run_rollout(make_problems(4, seed=3, level="medium"), model=None, tokenizer=TOKENIZER, fmt=fmt,
                             verifier=verifier, feedback=get_provider("checker"), config=config,
                             generate_fn=generate)
    batch = result.batch
    rows = np.arange(batch.completion_tokens_BC.shape[0])[:, None]
    mask = batch.completion_mask_BC.astype(bool)
    after_student = batch.student_tokens_BS[rows, batch.student_index_BC + 1]
    after_teacher = batch.teacher_tokens_BU[rows, batch.teacher_index_BC + 1]
    np.testing.assert_array_equal(after_student[mask], batch.completion_tokens_BC[mask])
    np.testing.assert_array_equal(after_teacher[mask], batch.completion_tokens_BC[mask])
    # Positions run 0..len-1 in both rows, so the completion sits right after each row's own prompt.
    assert (batch.teacher_positions_BU[rows, batch.teacher_index_BC + 1][mask] ==
            (batch.teacher_index_BC + 1)[mask]).all()
    # Every row is distilled (the wrong ones get feedback, the right ones a solved sibling), and every
    # teacher prompt differs from the student's but renders this placement.
    assert batch.distill_mask_B.all()
    for record in result.records:
        teacher = record["teacher_prompt"]
        assert teacher != record["prompt"]
        if placement == "system":
            assert teacher.split("<|im_start|>user")[0] != record["prompt"].split("<|im_start|>user")[0]
            assert teacher.endswith(record["prompt"][-60:])
        if placement == "turns" and record["feedback"] is not None:
            assert f"<|im_start|>assistant\n{record['completion']}<|im_end|>" in teacher
            assert "That is not right: wrong answer" in teacher
        if placement != "user":
            assert "\n> 1 |" not in teacher and "^" not in teacher  # the checker's plain sentences, no carets
