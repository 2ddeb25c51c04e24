"""Screening: attacks a reward-hungry model could try, and honest proofs that must still pass."""

from __future__ import annotations

import pytest

from fd_jax.lean import DEFAULT_HEADER, screen, theorem_name
from fd_jax.lean.lexer import code_view, lex

STATEMENT = "theorem mathd_algebra_10 (x : ℝ) (h₀ : x = 2) :\n  x ^ 2 + 1 = 5 := by\n"
PROOF = "  subst h₀\n  norm_num\n"
HONEST = STATEMENT + PROOF
SUM_STATEMENT = "theorem mathd_numbertheory_466 : (∑ k in Finset.range 11, k) % 9 = 1 := by\n"


def passes(code: str, statement: str = STATEMENT, **kw) -> bool:
    return screen(statement, code, **kw) is None


ACCEPTED = {
    "plain": HONEST,
    "whitespace differs": "theorem mathd_algebra_10  (x : ℝ)\n    (h₀ : x = 2) : x ^ 2 + 1 = 5 := by\n"
    + PROOF,
    "header repeated": "import Mathlib\nimport Aesop\n\nset_option maxHeartbeats 400000\n\n"
    "open BigOperators Real Nat Topology Rat\n\n" + HONEST,
    "words in comments and strings": "-- sorry, #eval, axiom, native_decide\n"
    "/- sorry /- nested admit -/ #exit -/\n"
    '/-- doc: sorry -/\n' + STATEMENT + '  -- sorry\n  have : "sorry #exit".length = 10 := by rfl\n' + PROOF,
    "sorry inside identifiers": "theorem sorry_lemma : True := trivial\nlemma h_admit_free : 1 = 1 := rfl\n"
    + STATEMENT + "  have := sorry_lemma\n  have := h_admit_free\n" + PROOF,
    "helper lemma with simp attribute": "@[simp] lemma two_sq : (2 : ℝ) ^ 2 = 4 := by norm_num\n\n" + HONEST,
    "set_option in": "set_option maxHeartbeats 400000 in\n" + HONEST,
    "helper def before": "def double (n : ℕ) : ℕ := 2 * n\n\n" + HONEST,
    "primes and characters": STATEMENT + "  have h' : x = 2 := h₀\n  have c : 'a' ≠ 'b' := by decide\n"
    + PROOF,
    "open in a tactic": STATEMENT + "  open Real in\n  subst h₀\n  norm_num\n",
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_honest_proofs_pass(name):
    assert screen(STATEMENT, ACCEPTED[name]) is None


def test_sum_statement_with_in_passes():
    assert passes(SUM_STATEMENT + "  decide\n", SUM_STATEMENT)
    assert passes(SUM_STATEMENT + "  simp [Finset.sum_range_succ]\n", SUM_STATEMENT)


HIDDEN = "theorem mathd_algebra_10 (x : ℝ) (h₀ : x = 2) : True := trivial\n"  # proves something else
# name -> (code, a word the reason must contain)
REJECTED = {
    "statement missing": ("theorem other : True := trivial", "does not contain"),
    "statement in a line comment": ("-- " + STATEMENT.replace("\n", " ") + "\n" + HIDDEN, "not by the given statement"),
    "statement in a block comment": ("/-\n" + HONEST + "-/\n" + HIDDEN, "not by the given statement"),
    "statement in a nested comment": ("/- /- -/\n" + HONEST + "-/\n" + HIDDEN, "not by the given statement"),
    "statement in a doc comment opened by /--/": ("/--/\n" + HONEST + "-/\n" + HIDDEN, "not by the given statement"),
    "statement in a string": ('def s := "' + HONEST + '"\n' + HIDDEN, "not by the given statement"),
    "statement altered": (HONEST.replace("(h₀ : x = 2)", "(h₀ : x = 2) (h₁ : False)"), "not by the given statement"),
    "statement renamed": (HONEST.replace("mathd_algebra_10", "mathd_algebra_10'"), "does not contain"),
    "sorry": (STATEMENT + "  sorry\n", "sorry"),
    "admit": (STATEMENT + "  admit\n", "admit"),
    "sorryAx": (STATEMENT + "  exact _root_.sorryAx _ false\n", "sorryAx"),
    "axiom": ("axiom cheat : False\n" + STATEMENT + "  exact cheat.elim\n", "axiom"),
    "opaque": ("opaque cheat : ℕ\n" + HONEST, "opaque"),
    "unsafe": ("unsafe def f : ℕ := 0\n" + HONEST, "unsafe"),
    "implemented_by": ("@[implemented_by id] def f (n : ℕ) : ℕ := n\n" + HONEST, "implemented_by"),
    "extern": ('@[extern "c_f"] def f (n : ℕ) : ℕ := n\n' + HONEST, "extern"),
    "#eval": ("#eval IO.println 1\n" + HONEST, "#eval"),
    "#exit before the statement": ("#exit\n" + HONEST, "#exit"),
    "#guard_msgs hides errors": ("/-- error: x -/\n#guard_msgs in\n" + HONEST, "#guard_msgs"),
    "run_cmd": ("run_cmd pure ()\n" + HONEST, "run_cmd"),
    "run_tac": (STATEMENT + "  run_tac pure ()\n", "run_tac"),
    "run_elab": ("run_elab pure ()\n" + HONEST, "run_elab"),
    "by_elab": (STATEMENT + "  exact by_elab pure ()\n", "by_elab"),
    "macro": ('macro "win" : tactic => `(tactic| norm_num)\n' + HONEST, "quotation"),
    "macro_rules": ("macro_rules | `(tactic| trivial) => `(tactic| norm_num)\n" + HONEST, "quotation"),
    "syntax": ('syntax "win" : tactic\n' + HONEST, "syntax"),
    "elab": ('elab "win" : tactic => pure ()\n' + HONEST, "elab"),
    "local notation": ('local notation "ℝ" => ℕ\n' + HONEST, "local"),
    "infix redefinition": ('infixl:65 " + " => HSub.hSub\n' + HONEST, "infixl"),
    "simproc": ("simproc foo (_) := fun _ => pure .continue\n" + HONEST, "simproc"),
    "skip kernel": ("set_option debug.skipKernelTC true\n" + HONEST, "debug.skipKernelTC"),
    "skip kernel in": ("set_option debug.skipKernelTC true in\n" + HONEST, "debug.skipKernelTC"),
    "autoImplicit": ("set_option autoImplicit true in\n" + HONEST, "autoImplicit"),
    "open in before the statement": ("open Real in\n" + HONEST, "not by the given statement"),
    "statement inside a quotation": ("open Lean in\ndef q : MacroM Syntax := `(command| " + HONEST + ")\n"
                                     + HIDDEN.replace("mathd_algebra_10", "other"), "quotation"),
    "open not in the header": ("open Finset\n" + HONEST, "open Finset"),
    "namespace": ("namespace Hack\n" + HONEST + "end Hack\n", "namespace"),
    "variable": ("variable (h : False)\n" + HONEST, "variable"),
    "instance before": ("instance : LT ℝ := ⟨fun _ _ => True⟩\n" + HONEST, "instance"),
    "local instance attribute": ("attribute [local instance] Classical.propDecidable\n" + HONEST, "attribute"),
    "instance attribute on a def": ("@[instance] def bad : LT ℝ := ⟨fun _ _ => True⟩\n" + HONEST, "instance"),
    "tactic attribute": ("@[tactic Lean.Parser.Tactic.omega] def f : ℕ := 0\n" + HONEST, "tactic"),
    "apply?": (STATEMENT + "  apply?\n", "apply?"),
    "exact?": (STATEMENT + "  subst h₀\n  exact?\n", "exact?"),
    "native_decide": (STATEMENT + "  native_decide\n", "native_decide"),
    "decide +native": (STATEMENT + "  decide +native\n", "+native"),
    "ofReduceBool": (STATEMENT + "  exact Lean.ofReduceBool _ _ rfl\n", "ofReduceBool"),
    "import later": (HONEST + "import Mathlib.Tactic\n", "import"),
    "redeclared after": (HONEST + "theorem mathd_algebra_10 : True := trivial\n", "declared again"),
    "redeclared before as def": ("def mathd_algebra_10 := 0\n" + HONEST, "is declared"),
    "escaped identifier": ("def «x» := 0\n" + HONEST, "escaped"),
    "raw string": ('def s := r#"a" theorem "#\n' + HONEST, "raw string"),
    "interpolated string": ('def s := s!"{1}"\n' + HONEST, "string literal"),
    # Lean reads `'"'` after a number as a character literal; a lexer that did not would take the rest
    # of the line for a string and miss the `#exit`.
    "character literal after a number": (
        'def f (n : ℕ) (c : Char) := n\nexample := f 2\'"\' #exit\n' + HONEST, "after a number"
    ),
}


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_attacks_are_rejected(name):
    code, word = REJECTED[name]
    reason = screen(STATEMENT, code)
    assert reason is not None and word in reason, reason


def test_statement_may_not_be_extended():
    statement = "theorem t (x : ℕ) : x + 0 = x"  # no `:=`: the code must continue with one
    assert passes(statement + " := by simp", statement)
    reason = screen(statement, statement + " ∨ False := by simp", header="")
    assert reason is not None and "extended" in reason


def test_native_decide_allowed_on_request():
    code = STATEMENT + "  native_decide\n"
    assert not passes(code)
    assert passes(code, allow_native_decide=True)
    assert passes(STATEMENT + "  decide +native\n", allow_native_decide=True)


def test_header_decides_which_opens_may_precede():
    code = "open Finset\n" + HONEST
    assert not passes(code)
    assert passes(code, header=DEFAULT_HEADER + "open Finset\n")


def test_only_set_option_may_modify_the_statement():
    header = DEFAULT_HEADER + "open Real\n"
    assert passes("open Real\nset_option maxHeartbeats 0 in\n" + HONEST, header=header)
    reason = screen(STATEMENT, "open Real\nin\nset_option maxHeartbeats 0 in\n" + HONEST, header=header)
    assert reason is not None and "`in`" in reason


def test_reasons_name_the_line():
    assert screen(STATEMENT, "\n\n" + STATEMENT + "  sorry\n").startswith("line 5:")


def test_theorem_name():
    assert theorem_name(STATEMENT) == "mathd_algebra_10"
    assert theorem_name("lemma foo.{u} (α : Sort u) : True := by") == "foo"
    assert theorem_name("theorem bar: True := by") == "bar"
    assert theorem_name("example : True := by") is None


def test_lexer_blanks_exactly_comments_and_literals():
    text = "a -- b\nc /- d /- e -/ f -/ g \"h\" 'i' j' k"
    view = code_view(text)
    assert len(view) == len(text)
    assert view.split() == ["a", "c", "g", "j'", "k"]
    assert lex('"unterminated')[1][0].what == "an unterminated string literal"
    # `/-` consumes the character after it: `/--/` opens a doc comment, it does not close it.
    assert code_view("/--/ x -/ y").split() == ["y"]
