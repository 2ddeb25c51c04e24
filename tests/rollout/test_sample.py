"""sample_chunks, the one sample-and-verify path of training and evaluation: rows are problem-major
whatever the chunking, each chunk has its own seed, and its tasks are submitted to the verifier at once."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from fd_jax.data.char_tokenizer import build_char_tokenizer
from fd_jax.rollout.sample import derive_seed, sample_chunks
from fd_jax.tasks.arithmetic import ArithmeticFormat, ArithmeticVerifier, answer_of, make_problems

TOKENIZER = build_char_tokenizer()


def seed_echo_generate(seeds):
    """Sample i of prompt p answers the right sum plus i (so sample 0 is valid) and records the seed."""

    def generate(model, prompts, *, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed):
        seeds.append(seed)
        rows = []
        for prompt in prompts:
            statement = TOKENIZER.decode(prompt, skip_special_tokens=True).split("\n")[-2]
            rows += [TOKENIZER.encode(str(answer_of(statement) + i), add_special_tokens=False) + list(stop_token_ids)
                     for i in range(n)]
        tokens = np.zeros((len(rows), max_new_tokens), np.int32)
        for b, ids in enumerate(rows):
            tokens[b, : len(ids)] = ids
        return SimpleNamespace(tokens=tokens, logprobs=-tokens / 100.0, lengths=np.array([len(r) for r in rows]),
                               finish_reason=["stop"] * len(rows))

    return generate


def _run(chunk_problems):
    problems = make_problems(5, seed=3)
    fmt = ArithmeticFormat()
    prompts = [TOKENIZER.encode(fmt.render(p)) for p in problems]
    seeds: list[int] = []
    with ArithmeticVerifier() as verifier:
        chunks = list(sample_chunks(problems, prompts, model=None, tokenizer=TOKENIZER, fmt=fmt, verifier=verifier,
                                    generate_fn=seed_echo_generate(seeds), n=3, max_new_tokens=8, seed=11,
                                    chunk_problems=chunk_problems))
        verdicts = {b: v.status for c in chunks for b, v in zip(c.rows, c.verdicts.result())}
    codes = {b: task.code for c in chunks for b, task in zip(c.rows, c.tasks)}
    return chunks, seeds, verdicts, codes


def test_chunking_keeps_the_row_layout_and_seeds_each_chunk():
    whole, whole_seeds, whole_verdicts, whole_codes = _run(0)
    split, split_seeds, split_verdicts, split_codes = _run(2)
    assert len(whole) == 1 and [list(c.problems) for c in split] == [[0, 1], [2, 3], [4]]
    assert [c.rows for c in split] == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 14]]
    assert whole_codes == split_codes and sorted(whole_codes) == list(range(15))
    assert whole_verdicts == split_verdicts == {b: "valid" if b % 3 == 0 else "invalid" for b in range(15)}
    assert whole_seeds == [derive_seed(11, 0)]
    assert split_seeds == [derive_seed(11, c) for c in range(3)] and len(set(split_seeds)) == 3


def test_derive_seed_depends_on_its_keys_only():
    assert derive_seed(0, 5) == derive_seed(0, 5)
    assert len({derive_seed(0, 5), derive_seed(1, 5), derive_seed(0, 6), derive_seed(0, 5, 1)}) == 4
    assert 0 <= derive_seed(2**40, 7) < 2**63
