"""Issue 16: attacks on the screen per class (lexer, command deny-lists), and the honest proofs Lean
accepts that the screen must pass (the five cases of the issue, the recorded real proofs, miniF2F).

Classes 3 (axiom audit) and 4 (malformed answers) are tested in test_lean_protocol.py, test_lean_kimina.py,
test_lean_pool.py and test_lean_strict.py.
"""

from __future__ import annotations

import json
import re

import pytest

from fd_jax.lean import DEFAULT_HEADER, screen, theorem_name
from fd_jax.lean.lexer import is_id_first, is_id_rest, tokenize

STATEMENT = "theorem mathd_algebra_10 (x : ℝ) (h₀ : x = 2) :\n  x ^ 2 + 1 = 5 := by\n"
HONEST = STATEMENT + "  subst h₀\n  norm_num\n"

# Class 1: the lexer must split the file as Lean does, and refuse where it cannot be sure.
LEXER_ATTACKS = {
    # Mathlib's `×ˢ` ends in U+02E2, which Python calls alphanumeric and Lean does not: after it a `'`
    # starts a character literal for Lean; a lexer that continued an identifier would read a comment.
    "prime after ×ˢ": ("example : Set (ℕ × ℕ) := {1} ×ˢ'-'\n" + HONEST, "right after"),
    "superscript two then prime": ("def x₂ := 2\nexample := x₂²'/'\n" + HONEST, "right after"),
    "raw line break in a character literal": ("def c : Char := '\n'\n" + HONEST, "character literal"),
    "quote in a character literal": ("def c : Char := '\"'\n" + HONEST, "character literal"),
    "prime next to a string's quote": ("def s := \"'\" \n" + HONEST, "string"),
    "triple prime": ("example := f '" + "''\n" + HONEST, "`'''`"),
    "prime after a closing bracket": ("example := (1)'a'\n" + HONEST, "right after"),
    "Latin-1 letter (version-dependent)": ("def café := 1\n" + HONEST, "some Lean versions"),
    "no-break space": (HONEST.replace("theorem ", "theorem\u00a0"), "U+00A0"),
    "comment marker glued to a symbol": ("def s := {x : ℕ //-x < 0 }\n-/\n" + HONEST, "comment marker"),
    "unterminated block comment (would swallow the audit)": (HONEST + "/- the rest\n", "unterminated"),
    "escaped identifier": ("def «mathd_algebra_10» := 0\n" + HONEST, "escaped"),
    "name literal": ("def n := `sorry\n" + HONEST, "name literals"),
}

# Class 2: command-level default deny, and bans by token class inside bodies. Commands, options and
# tactics looked up in Lean core and Mathlib: `stop` (core: `repeat sorry`), `warn.sorry` (core option
# that drops the "declaration uses sorry" warning), `suppressSorry` (Mathlib.Util.SuppressSorry),
# `sudo set_option` (Mathlib), `@[csimp]` (hides sorryAx behind ofReduceBool), `variable?` (Mathlib),
# `include` / `omit` (core), `unseal`, `proof_wanted` (Mathlib).
COMMAND_ATTACKS = {
    "protected statement": ("protected " + HONEST, "not by the given statement"),
    "private statement": ("private " + HONEST, "not by the given statement"),
    "attribute on the statement": ("@[simp] " + HONEST, "not by the given statement"),
    "noncomputable statement": ("noncomputable " + HONEST, "not by the given statement"),
    "open in on the statement": ("open Real in " + HONEST, "not by the given statement"),
    "variable? with a suffix": ("variable? (h : False)\n" + HONEST, "variable?"),
    "include": ("include h\n" + HONEST, "include"),
    "omit": ("omit [Fact True]\n" + HONEST, "omit"),
    "stop admits the rest": (STATEMENT + "  stop\n  norm_num\n", "stop"),
    "warn.sorry off": ("set_option warn.sorry false in\n" + STATEMENT + "  norm_num\n", "warn.sorry"),
    "suppressSorry": ("set_option suppressSorry true\n" + HONEST, "suppressSorry"),
    "option inside the proof": (STATEMENT + "  set_option warn.sorry false in\n  norm_num\n", "warn.sorry"),
    "sudo set_option": ("sudo set_option debug.skipKernelTC true\n" + HONEST, "sudo"),
    "csimp attribute": ("@[csimp] theorem h : 1 = 1 := rfl\n" + HONEST, "csimp"),
    "unseal": ("unseal Nat.add in\n" + HONEST, "unseal"),
    "proof_wanted": ("proof_wanted cheat : False\n" + HONEST, "proof_wanted"),
    "unknown command": ("some_future_command foo\n" + HONEST, "allow-list"),
    "search tactic with another name": (STATEMENT + "  hint?\n", "hint?"),
    "sorry_if_sorry": (STATEMENT + "  sorry_if_sorry\n", "sorry_if_sorry"),
    "indented #exit after the proof": (HONEST + "  #exit\n", "#exit"),
    "command on the proof's last line": (STATEMENT + "  norm_num theorem x : False := sorry\n", "theorem"),
    "namespace left open": ("namespace Hack\n" + HONEST, "inside `namespace Hack`"),
    "namespace after the statement": (
        HONEST + "namespace Hack\ntheorem mathd_algebra_10 : True := trivial\nend Hack\n", "after the statement"
    ),
    "open after the statement": (HONEST + "open Finset\n", "after the statement"),
    "section never closed": ("noncomputable section\n" + HONEST, "inside `section"),
    "instance after the statement": (HONEST + "instance : Inhabited ℕ := ⟨3⟩\n", "instance"),
    "helper overloading a statement name": ("def x : ℝ := 2\n" + HONEST, "overload"),
    "root redeclaration after": (HONEST + "theorem _root_.mathd_algebra_10 : True := trivial\n", "declared again"),
    "native config": (STATEMENT + "  decide (config := { native := true })\n", "native"),
    "attribute inside a proof": (STATEMENT + "  @[simp] have := 1\n  norm_num\n", "attributes"),
    "open not in the header, scoped": ("open scoped Classical\n" + HONEST, "open Classical"),
    "partial def": ("partial def f (n : ℕ) : ℕ := f n\n" + HONEST, "partial"),
    # Indented under a term-mode helper, `open ... in` ends the helper for Lean and modifies the statement.
    "open in dangling at the end of a helper": (
        "lemma aux : True := trivial\n  open scoped Classical in\n" + HONEST, "modify the next command"
    ),
    "set_option in dangling at the end": ("lemma aux : True := trivial\n  set_option maxHeartbeats 0 in\n" + HONEST,
                                          "modify the next command"),
    # For Lean `/-!` is a token: it ends the proof, and what follows is read as new commands.
    "module doc inside a proof": (STATEMENT + "  norm_num /-! -/ open scoped Classical in\n  example : True := trivial\n",
                                  "doc comment"),
    "doc comment inside a helper": ("lemma aux : True := trivial /-- d -/ open Real in\n" + HONEST, "doc comment"),
    "statement split by a column-0 line": (HONEST.replace("\n  x ^ 2", "\nx ^ 2"), "not by the given statement"),
}


@pytest.mark.parametrize("name", sorted(LEXER_ATTACKS))
def test_lexer_attacks_are_rejected(name):
    code, word = LEXER_ATTACKS[name]
    reason = screen(STATEMENT, code)
    assert reason is not None and word in reason, reason


@pytest.mark.parametrize("name", sorted(COMMAND_ATTACKS))
def test_command_attacks_are_rejected(name):
    code, word = COMMAND_ATTACKS[name]
    reason = screen(STATEMENT, code)
    assert reason is not None and word in reason, reason


def test_identifier_characters_follow_lean():
    """Lean's isIdFirst / isIdRest (Init/Meta), not Python's str.isalnum."""
    for ch in "aZ_αℝℕ𝓝ϵ":
        assert is_id_first(ch), ch
    for ch in "λΠΣ0²ˢ∑×'":  # λ Π Σ are excluded from isLetterLike; ² and ˢ are not letters for Lean
        assert not is_id_first(ch), ch
    for ch in "0₀₉ₐᵢ'!?":
        assert is_id_rest(ch), ch
    for ch in "²ˢ⁻¹.":
        assert not is_id_rest(ch), ch


def test_tokens_that_end_in_a_prime():
    texts = [t.text for t in tokenize("f ⁻¹' {7} ∑' i, g i ×' h '' s h' ×ˢ t")[0]]
    assert texts == ["f", "⁻¹'", "{", "7", "}", "∑'", "i", ",", "g", "i", "×'", "h", "''", "s", "h'", "×ˢ", "t"]
    # After `×'` a character literal `'b'` could also be read: refused rather than guessed.
    assert tokenize("a ×''b'")[1]


def test_audit_name_is_the_declared_name():
    assert theorem_name("theorem _root_.foo : True := by") == "foo"
    assert theorem_name("theorem Foo.bar.{u} (α : Sort u) : True := by") == "Foo.bar"
    reason = screen("example : True := by", "example : True := by trivial\n")
    assert reason is not None and "theorem NAME" in reason  # no name: nothing to audit


T = "theorem t : 2 + 2 = 4 := by\n"
B = "theorem mathd_numbertheory_1 (x : ℕ) (h : x = 1) : x + 1 = 2 := by\n"
HONEST_CASES = {  # name -> (statement, code); Lean accepts each with the default header
    "whitespace removed between tokens": (B, B.replace(") :", "):").replace(":= by", ":=by") + "  subst h\n  rfl\n"),
    "whitespace added between tokens": (B, B.replace("(x : ℕ)", "( x : ℕ )") + "  omega\n"),
    "term proof for a `:= by` statement": (T, "theorem t : 2 + 2 = 4 := rfl\n"),
    "open Real from the header": (B, "open Real\n\n" + B + "  omega\n"),
    "open scoped BigOperators": (B, "open scoped BigOperators\n" + B + "  omega\n"),
    "open in on a helper": (B, "open Finset in\nlemma aux : (range 3).card = 3 := by simp\n\n" + B + "  omega\n"),
    "open in inside a helper's proof": (B, "lemma aux : (3 : ℕ) = 3 := by\n  open Finset in\n  rfl\n" + B + "  omega\n"),
    "namespace closed before the statement": (
        B, "namespace Helpers\ntheorem aux (y : ℕ) : y + 0 = y := by simp\nend Helpers\n\n" + B + "  omega\n"
    ),
    "section with an open": (B, "section\nopen Finset\nlemma aux : True := trivial\nend\n" + B + "  omega\n"),
    "helper with attribute on its own line": (B, "@[simp]\nlemma aux : (1 : ℕ) + 1 = 2 := rfl\n" + B + "  omega\n"),
    "set_option in on its own line": (B, "set_option maxHeartbeats 400000 in\n" + B + "  omega\n"),
    "match alternatives at column 0": (B, "def g : ℕ → ℕ\n| 0 => 1\n| n + 1 => n\n\n" + B + "  omega\n"),
    "preimage and image tokens": (
        "theorem t (f : ℕ → ℕ) : f ⁻¹' {0} = f ⁻¹' {0} ∧ f '' ∅ = ∅ := by\n",
        "theorem t (f : ℕ → ℕ) : f ⁻¹' {0} = f ⁻¹' {0} ∧ f '' ∅ = ∅ := by\n  simp\n",
    ),
    "comments and doc comments everywhere": (
        B, "/-- a doc -/\nlemma aux : True := trivial -- note\n/-! module doc -/\n" + B + "  -- sorry here is a word\n  omega\n"
    ),
    "helper with attribute ending in a bracket": (B, "@[simp] lemma aux : (1 : ℕ) + 1 = 2 := by simp [add_comm]\n"
                                                   + B + "  omega\n"),
    "refine with holes and factorial": (B, B + "  refine ?_\n  have : 3 ! = 6 := rfl\n  omega\n"),
}


@pytest.mark.parametrize("name", sorted(HONEST_CASES))
def test_honest_cases_pass(name):
    statement, code = HONEST_CASES[name]
    assert screen(statement, code) is None, screen(statement, code)


def test_real_proofs_pass(shared_data):
    """Every recorded real proof in kimina_match (Lean Workbook, checked by a Kimina server) passes."""
    paths = sorted((shared_data / "kimina_match" / "input").glob("*.lean"))
    assert len(paths) == 51
    for path in paths:
        source = path.read_text()
        code = source.removeprefix(DEFAULT_HEADER)
        statement = re.search(r"theorem\s.*?:=\s*by", code, re.S).group(0)
        assert screen(statement, code) is None, (path.name, screen(statement, code))
        assert screen(statement, source) is None  # with the header's imports left in


def test_minif2f_statements_pass_with_honest_variants(shared_data):
    """All 488 miniF2F statements, with their own header, in forms an honest model writes."""
    rows = [json.loads(line) for line in (shared_data / "minif2f.jsonl").read_text().splitlines()]
    assert len(rows) == 488
    for row in rows:
        s, header = row["formal_statement"], row["header"]
        for code in (
            s + "  norm_num\n",
            "open Real\n" + s + "  nlinarith\n",
            "lemma helper_fd : True := trivial\n\n" + s + "  exact by norm_num\n",
            "set_option maxHeartbeats 400000 in\n" + s + "  omega\n",
        ):
            assert screen(s, code, header=header) is None, (row["name"], screen(s, code, header=header))
        assert screen(s, s + "  sorry\n", header=header) is not None


def test_allow_list_can_be_extended():
    """docs/usage.md, "Lean screen allow-list": a user adds an option and a helper command in place."""
    from fd_jax.lean.screen import ALLOWED_OPTIONS, HELPER_KEYWORDS

    code = "set_option tactic.skipAssignedInstances false\nirreducible_def c : ℕ := 3\n" + HONEST
    assert "tactic.skipAssignedInstances" in screen(STATEMENT, code)
    ALLOWED_OPTIONS.add("tactic.skipAssignedInstances")
    HELPER_KEYWORDS.add("irreducible_def")
    try:
        assert screen(STATEMENT, code) is None
    finally:
        ALLOWED_OPTIONS.discard("tactic.skipAssignedInstances")
        HELPER_KEYWORDS.discard("irreducible_def")
    assert screen(STATEMENT, code) is not None


def test_scanner_classes_agree_with_the_character_functions():
    """The tokenizer's regular expression and is_id_first / is_id_rest encode the same Lean rules."""
    import re as _re

    from fd_jax.lean import lexer

    first, rest = _re.compile(f"[{lexer._FIRST}]"), _re.compile(f"[{lexer._REST}]")
    for code_point in range(0x20000):
        ch = chr(code_point)
        assert bool(first.fullmatch(ch)) == is_id_first(ch), hex(code_point)
        assert bool(rest.fullmatch(ch)) == is_id_rest(ch), hex(code_point)
