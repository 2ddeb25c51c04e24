"""How different the valid proofs of a problem are: proofs compared after normalisation, and the Mathlib
lemmas they use.

`normalize_proof` drops comments (and string literals, which competition proofs do not use) with the Lean
lexer of `fd_jax.lean.lexer` and collapses whitespace, so proofs that differ only in layout or comments
count once.

`lemmas_used` is a lexical heuristic; it never asks Lean. A name counts as a lemma when it

1. looks like a theorem under Mathlib's naming convention: theorems are snake_case (`mul_pos`,
   `Nat.succ_le_iff`, `Finset.sum_range_succ`: the last component starts with a lowercase letter and
   contains `_`), while definitions are lowerCamelCase (`Real.sqrt`) and types UpperCamelCase
   (`Nat.Prime`); single-word names in the logic namespaces, whose members are proofs (`Or.inl`,
   `Eq.symm`, `And.intro`, `Iff.mp`, ...), count too;
2. is not a tactic or a keyword (`norm_num`, `field_simp`, `set_option`, ...);
3. is not a local name: hypotheses and variables bound in the code (`(h₀ : 0 < x)`, `have h_main :`,
   `intro x hx`, `obtain ⟨k, hk⟩ :=`, `rcases h with ...`, `fun x =>`, `∀ x,`, `case succ n ih =>`), the
   code's own declarations (`lemma aux_bound`), or a projection on a local (`h_main.le`, `hx.trans`);
   a projection on a lemma counts as the lemma (`sub_ne_zero.mpr` uses `sub_ne_zero`);
4. does not occur in the theorem statement (the theorem's own name, the definitions it is stated with).

Known misses: lowerCamelCase theorems of core Lean (`congrArg`, `funext`), lemmas used only through
`simp`'s default set or found by automation (`linarith`, `aesop`), and names `open`ed under a short alias.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from fd_jax.lean.lexer import code_view

# A (possibly dotted) identifier, not preceded by a character that would make it part of a longer token:
# `(mul_pos ha hb).le` yields `mul_pos`, not `le`; `?_` and numerals such as `2.5` yield nothing.
_IDENT = re.compile(r"(?<![\w'!?.@])@?([^\W\d][\w'!?]*(?:\.[^\W\d][\w'!?]*)*)")

# Namespaces whose single-word members are (nearly all) proofs, so `Or.inl` is a lemma although it has no
# `_`. The exception: the definition `Exists.choose` counts too.
_PROOF_NAMESPACES = frozenset({"And", "Or", "Iff", "Eq", "Ne", "HEq", "Exists", "False", "True", "Not"})

# Tactics, keywords and options that are spelled like lemma names.
_NOT_LEMMAS = frozenset(
    """
    norm_num norm_num1 simp_all simp_arith simp_rw simp_intro field_simp push_cast push_neg norm_cast
    exact_mod_cast apply_mod_cast rw_mod_cast assumption_mod_cast ring_nf ring1 ring1_nf by_contra by_contra!
    by_cases interval_cases fin_cases mod_cases split_ifs apply_fun apply_rules solve_by_elim nth_rewrite
    nth_rw conv_lhs conv_rhs all_goals any_goals on_goal pick_goal rotate_left rotate_right native_decide
    rename_i infer_instance cancel_denoms compute_degree fun_prop filter_upwards convert_to linear_combination
    subst_vars unfold_let show_term tfae_have tfae_finish rw_search exists_intro refine_lift set_option
    termination_by decreasing_by decreasing_tactic simp_wf norm_num_ext positivity_ext field_simps
    """.split()
)

# Binder keywords and where their binding region ends. The region's identifiers are local names.
_STOPS_DECLARE = (":", "\n", ";")  # have h : ..., have h := ..., obtain ⟨x, hx⟩ := ...
_STOPS_LINE = ("\n", ";", " using ")  # intro x hx, rintro ⟨x, hx⟩, choose f hf using h
_STOPS_ARROW = ("=>", "↦", "\n")  # fun x hx =>, case succ n ih =>
_STOPS_QUANT = (",", ":", "\n", " in ", "∈")  # ∀ x y : ℝ, ...  ∑ i in range n, ...
_STOPS_WITH = ("\n", ";", "=>", ":=")  # rcases h with ⟨x, hx⟩ | h', induction n with n ih
_BINDER_STOPS = {
    **dict.fromkeys(("have", "let", "set", "suffices", "obtain", "by_cases", "generalize"), _STOPS_DECLARE),
    **dict.fromkeys(("intro", "intros", "rintro", "by_contra", "by_contra!", "choose", "rename_i"), _STOPS_LINE),
    **dict.fromkeys(("fun", "λ", "case", "next", "|"), _STOPS_ARROW),
    **dict.fromkeys(("∀", "∃", "∃!", "∑", "∏", "⋃", "⋂"), _STOPS_QUANT),
    "with": _STOPS_WITH,
}
_BINDER_KEYWORD = re.compile(
    r"(?<![\w'!?.])(have|let|set|suffices|obtain|by_cases|generalize|intros|intro|rintro|by_contra!|by_contra"
    r"|choose|rename_i|fun|case|next|with)(?![\w'!?])"
    r"|(λ|∀|∃!|∃|∑|∏|⋃|⋂)"
    r"|^[ \t]*(\|)",  # a match arm or an induction case at the start of a line (not `|x|`)
    re.MULTILINE,
)
# A declaration and its name, then binder groups `(a b : T)`, `{x : T}`, `⦃x y : T⦄`, `[inst : T]`. Only
# groups right after a head are binders: elsewhere `(mul_pos ha hb : 0 < a * b)` is a type ascription.
_HEAD = re.compile(
    r"(?<![\w'!?.])(?:theorem|lemma|def|abbrev|instance|example|have|let|suffices)(?![\w'!?])"
    r"(?:\s+[^\W\d][\w'!?.]*)?"
)
_OPENING, _CLOSING = "({⦃[⟨", ")}⦄]⟩"
_DECLARATION = re.compile(r"(?<![\w'!?.])(?:theorem|lemma|def|abbrev|instance|example)\s+([^\W\d][\w'!?.]*)")


def normalize_proof(code: str) -> str:
    """`code` without comments and string literals, with every run of whitespace made one space."""
    return " ".join(code_view(code).split())


def _names(text: str) -> list[str]:
    return [m.group(1) for m in _IDENT.finditer(text)]


def _binder_groups(view: str, pos: int) -> list[str]:
    """Names bound by the binder groups that start at `pos` (after a declaration head)."""
    names = []
    while True:
        while pos < len(view) and view[pos].isspace():
            pos += 1
        if pos >= len(view) or view[pos] not in "({⦃[":
            return names
        depth, end = 0, pos
        for end in range(pos, len(view)):
            depth += (view[end] in _OPENING) - (view[end] in _CLOSING)
            if depth == 0:
                break
        group = view[pos + 1 : end]
        if ":" in group:
            names += _names(group.split(":", 1)[0])
        elif view[pos] != "[":  # `{x}` binds x; `[Fintype α]` is an anonymous instance
            names += _names(group)
        pos = end + 1


def local_names(view: str) -> set[str]:
    """Names bound in Lean code (comments already blanked): binders, introduced hypotheses, declarations."""
    bound = set()
    for match in _BINDER_KEYWORD.finditer(view):
        keyword = next(g for g in match.groups() if g is not None)
        ends = [i for stop in _BINDER_STOPS[keyword] if (i := view.find(stop, match.end())) >= 0]
        bound.update(_names(view[match.end() : min(ends, default=len(view))]))
    for match in _HEAD.finditer(view):
        bound.update(_binder_groups(view, match.end()))
    bound.update(_DECLARATION.findall(view))
    return bound


def _looks_like_lemma(name: str) -> bool:
    parts = name.split(".")
    last = parts[-1]
    if len(parts) > 1 and not parts[0][0].isupper():
        return False  # a projection on a local (`hx.le`), not a namespace
    if name in _NOT_LEMMAS or not last[0].islower():
        return False
    return "_" in last or (len(parts) > 1 and parts[-2] in _PROOF_NAMESPACES)


def lemmas_used(code: str, statement: str = "") -> set[str]:
    """The Mathlib lemmas a Lean proof refers to, by the heuristic of the module docstring.

    code: the submitted Lean source (statement included); statement: the theorem as given, whose names are
    excluded. Returns fully written names as they appear (`Nat.add_comm`, `mul_pos`); an `open`ed
    namespace is not resolved, so `add_comm` and `Nat.add_comm` are different names.
    """
    view = code_view(code)
    excluded = local_names(view) | set(_names(code_view(statement)))
    found = set()
    for name in _names(view):
        parts = name.split(".")
        if name in excluded or parts[0] in excluded:
            continue
        # The longest prefix that is a lemma: `sub_ne_zero.mpr` and `Real.sqrt_pos.mpr` use the lemmas
        # `sub_ne_zero` and `Real.sqrt_pos` through a projection.
        lemma = next((p for i in range(len(parts), 0, -1) if _looks_like_lemma(p := ".".join(parts[:i]))), None)
        if lemma is not None:
            found.add(lemma)
    return found


def distinct(items: Iterable[str]) -> int:
    """How many different strings `items` holds."""
    return len(set(items))
