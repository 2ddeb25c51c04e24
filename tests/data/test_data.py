"""Problem loaders (real miniF2F and malformed files), shuffling, prompt formats, extraction, reprompts and
the character tokenizer."""

from __future__ import annotations

import json

import pytest

from fd_jax.data import (
    LeanChatFormat,
    LeanCompletionFormat,
    Problem,
    ProblemFormatError,
    RepromptTemplates,
    ShuffledIterator,
    build_reprompt,
    extract_lean_code,
    load_jsonl,
    load_lean_workbook,
    load_minif2f,
)
from fd_jax.data.char_tokenizer import ALPHABET, build_char_tokenizer
from fd_jax.data.problems import DEFAULT_HEADER
from fd_jax.data.reprompt import TRUNCATION_MARKER

HEADER = DEFAULT_HEADER  # the Lean Workbook default, also a realistic header for the other tests
STATEMENT = "theorem add_comm' (a b : ℕ) : a + b = b + a := by\n"


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


# -- loaders -------------------------------------------------------------------------------------------------


def test_minif2f_loads_488_problems_split_244_244(shared_data):
    path = shared_data / "minif2f.jsonl"
    problems = load_minif2f(path)
    assert len(problems) == 488
    assert len(load_minif2f(path, split="valid")) == 244 and len(load_minif2f(path, split="test")) == 244
    assert len({p.id for p in problems}) == 488
    assert all(p.statement.rstrip().endswith(":= by") for p in problems)
    assert all(p.header.startswith("import Mathlib") for p in problems)
    raw = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert problems[0] == Problem(
        id=raw["name"],
        statement=raw["formal_statement"],
        header=raw["header"],
        informal=raw["informal_prefix"],
        split=raw["split"],
    )


def test_malformed_rows_name_the_file_line_and_field(tmp_path):
    good = {"name": "p1", "split": "test", "formal_statement": STATEMENT, "header": HEADER,
            "informal_prefix": ""}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"name": "p2", "header": HEADER}) + "\n")
    with pytest.raises(ProblemFormatError, match=rf"{path}:3: missing field 'formal_statement'"):
        load_minif2f(path)
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ProblemFormatError, match=rf"{path}:2: not valid JSON"):
        load_minif2f(path)
    path.write_text(json.dumps({**good, "formal_statement": 42}) + "\n")
    with pytest.raises(ProblemFormatError, match=rf"{path}:1: field 'formal_statement' must be a string, got"):
        load_minif2f(path)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_minif2f(tmp_path / "nowhere.jsonl")


def test_any_jsonl_through_a_field_map(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"uid": 7, "lean": STATEMENT, "nl": "Addition commutes.", "part": "train"},
            {"uid": 8, "lean": "theorem x : True := by sorry", "part": "eval"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = load_jsonl(path, {"id": "uid", "statement": "lean", "informal": "nl", "split": "part"},
                          default_header=HEADER)
    assert problems == [
        Problem("7", STATEMENT, HEADER, "Addition commutes.", "train"),
        Problem("8", "theorem x : True := by\n", HEADER, "", "eval"),  # `:= by sorry` is opened up
    ]
    with pytest.raises(ProblemFormatError, match="unknown Problem fields \\['proof'\\]"):
        load_jsonl(path, {"id": "uid", "statement": "lean", "proof": "x"})


def test_lean_workbook_json_array(tmp_path):
    rows = [
        {"id": "lean_workbook_1",
         "formal_statement": "theorem lean_workbook_1 (x : ℝ) : x ^ 2 ≥ 0 := by sorry",
         "natural_language_statement": "Squares are nonnegative.",
         "split": "lean_workbook",
         "status": "proved"},
        {"id": "lean_workbook_2", "natural_language_statement": "no formal statement"},
    ]
    path = tmp_path / "workbook.json"
    path.write_text(json.dumps(rows[:1]))
    [p] = load_lean_workbook(path)
    assert p.statement == "theorem lean_workbook_1 (x : ℝ) : x ^ 2 ≥ 0 := by\n" and p.header == HEADER
    assert p.informal == "Squares are nonnegative."
    path.write_text(json.dumps(rows))
    with pytest.raises(ProblemFormatError, match=rf"{path} row 1: missing field 'formal_statement'"):
        load_lean_workbook(path)


def test_lean_workbook_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (optional)")
    import pyarrow.parquet as pq

    table = pa.table({"id": ["w1"], "formal_statement": ["theorem w1 : 1 = 1 := by sorry"], "split": ["x"]})
    pq.write_table(table, tmp_path / "w.parquet")
    assert load_lean_workbook(tmp_path / "w.parquet")[0].statement == "theorem w1 : 1 = 1 := by\n"


# -- shuffling -----------------------------------------------------------------------------------------------


def test_shuffling_is_a_permutation_per_epoch_and_resumes_exactly():
    items = list(range(10))
    it = ShuffledIterator(items, seed=3)
    epoch0, epoch1 = it.take(10), it.take(10)
    assert sorted(epoch0) == items and sorted(epoch1) == items and epoch0 != epoch1
    assert ShuffledIterator(items, seed=3).take(20) == epoch0 + epoch1  # same seed, same order
    assert ShuffledIterator(items, seed=4).take(10) != epoch0

    run = ShuffledIterator(items, seed=3)
    run.take(13)  # into the second epoch
    state = json.loads(json.dumps(run.state_dict()))  # as a checkpoint would store it
    expected = run.take(12)
    resumed = ShuffledIterator(items, seed=3)
    resumed.load_state_dict(state)
    assert resumed.take(12) == expected
    with pytest.raises(ValueError, match="num_items=10 seed=3, this one has num_items=9"):
        ShuffledIterator(items[:9], seed=3).load_state_dict(state)


# -- prompts and extraction ----------------------------------------------------------------------------------


def test_deepseek_completion_prompt_is_exact(shared_data):
    problem = load_minif2f(shared_data / "minif2f.jsonl")[1]
    text = LeanCompletionFormat().render(problem)
    opening = "Complete the following Lean 4 code:\n\n```lean4\n"
    assert text == opening + problem.header + problem.informal + problem.statement


def test_chat_prompt_goes_through_the_chat_template(tokenizer):
    problem = Problem("p", STATEMENT, HEADER)
    fmt = LeanChatFormat(tokenizer, template="Prove:\n{statement}", system="You prove theorems.")
    text = fmt.render(problem)
    assert text == f"<bos>system: You prove theorems.\nuser: Prove:\n{STATEMENT}\nassistant: "


def test_extraction_takes_the_last_lean4_block_outside_think():
    text = (
        "<think>maybe\n```lean4\ntheorem add_comm' (a b : ℕ) : a + b = b + a := by\n  sorry\n```\n</think>"
        "Plan first.\n```lean4\ntheorem add_comm' (a b : ℕ) : a + b = b + a := by\n  simp\n```\n"
        "A helper in Python:\n```python\nprint(1)\n```\nFinal:\n"
        f"```lean4\n{HEADER}theorem add_comm' (a b : ℕ) : a + b = b + a := by\n  omega\n```\nDone."
    )
    assert extract_lean_code(text, STATEMENT, HEADER) == STATEMENT + "  omega\n"


def test_extraction_reattaches_a_missing_statement():
    assert extract_lean_code("```lean4\nomega\n```", STATEMENT, HEADER) == STATEMENT + "  omega\n"
    # A proof that already starts with `by`, indented: kept as is under the statement.
    assert extract_lean_code("```lean\nby\n  simp\n  ring\n```", STATEMENT) == STATEMENT + "  simp\n  ring\n"
    # No code block at all: the text is the proof.
    assert extract_lean_code("<think>hmm</think>  exact Nat.add_comm a b", STATEMENT) == (
        STATEMENT + "  exact Nat.add_comm a b\n"
    )
    # A restated theorem of the same name (even with a changed statement) is left for the verifier to judge.
    changed = "```lean4\ntheorem add_comm' (a b : ℤ) : a + b = b + a := by\n  omega\n```"
    assert extract_lean_code(changed, STATEMENT).startswith("theorem add_comm' (a b : ℤ)")


def test_completion_style_extraction_uses_the_open_block_of_the_prompt():
    problem = Problem("p", STATEMENT, HEADER, "/-- Addition commutes. -/\n")
    task = LeanCompletionFormat().extract(problem, "  omega\n```\nSome chatter.")
    assert task.code == "/-- Addition commutes. -/\n" + STATEMENT + "  omega\n"
    assert (task.statement, task.header, task.id) == (STATEMENT, HEADER, "p")
    truncated = LeanCompletionFormat(include_informal=False).extract(problem, "  nlinarith [sq_nonneg (a - b),")
    assert truncated.code == STATEMENT + "  nlinarith [sq_nonneg (a - b),"


# -- reprompts -----------------------------------------------------------------------------------------------


def test_reprompt_places_feedback_and_demonstration(tokenizer):
    fmt = LeanCompletionFormat(include_informal=False)
    problem = Problem("p", STATEMENT, "")
    templates = RepromptTemplates(reprompt="{solution}{feedback}", feedback="F[{feedback}]",
                                  solution="S[{solution}]")
    r = build_reprompt(fmt, problem, feedback="use omega", solution="DEMO", encode=tokenizer.encode,
                       templates=templates)
    assert r.text == fmt.render(problem, "S[DEMO]F[use omega]") and not r.truncated
    assert r.tokens == tokenizer.encode(r.text)


def test_max_reprompt_len_truncates_only_the_feedback(tokenizer):
    fmt = LeanCompletionFormat(include_informal=False)
    problem = Problem("p", STATEMENT, "")
    feedback = "".join(f"hint {k}; " for k in range(200))
    full = build_reprompt(fmt, problem, feedback=feedback, solution=None, encode=tokenizer.encode)
    cap = len(full.tokens) - 500
    cut = build_reprompt(fmt, problem, feedback=feedback, solution=None, encode=tokenizer.encode, max_len=cap)
    assert cut.truncated and len(cut.tokens) <= cap
    # The cut keeps the longest feedback prefix that fits: one more character would not.
    kept = cut.text[cut.text.index("hint 0") : cut.text.index(TRUNCATION_MARKER)]
    assert feedback.startswith(kept)
    longer = build_reprompt(fmt, problem, feedback=feedback[: len(kept) + 1] + TRUNCATION_MARKER, solution=None,
                            encode=tokenizer.encode)
    assert len(longer.tokens) > cap
    assert cut.text.endswith("```lean4\n" + STATEMENT)  # the problem itself is never cut
    too_small = len(tokenizer.encode(fmt.render(problem)))
    nothing_fits = build_reprompt(fmt, problem, feedback=feedback, solution=None, encode=tokenizer.encode,
                                  max_len=too_small)
    assert nothing_fits is None


# -- the character tokenizer ---------------------------------------------------------------------------------


def test_char_tokenizer_round_trips_and_reloads(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    assert len(tokenizer) < 128
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    ids = tokenizer.encode(ALPHABET, add_special_tokens=False)
    assert len(ids) == len(ALPHABET) and len(set(ids)) == len(ALPHABET)  # one token per character
    assert tokenizer.decode(ids) == ALPHABET
    assert tokenizer.encode("7+8")[0] == tokenizer.bos_token_id
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Compute 4831 * 27 - 903.\nAnswer: 129534"
    assert reloaded.encode(text) == tokenizer.encode(text)
    chat = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]
    assert reloaded.apply_chat_template(chat, tokenize=False) == "<bos>user: 1+1\nassistant: 2<eos>\n"
