"""Proof hygiene: reject model output that could earn reward without proving the given statement.

A model under RL finds every hole that yields reward, so the screen runs before Lean sees the code and
`screen(statement, code)` returns the reason to reject it (None when it passes). Everything is decided on
the code view of `lexer.py`: comments and literals are blanked first, so a banned word inside a comment
does not reject a proof, and a statement inside a comment or a string does not count.

What a pass guarantees, together with a Lean answer with no error and no sorry (and, in the local pool,
the axiom audit of `protocol.audit_command`):

1. The given statement occurs verbatim as Lean code, not in a comment or a string, at a token boundary,
   and it is not extended: when it does not end with `:=` the code continues with `:=`. "Verbatim" is
   modulo whitespace: a run of whitespace may be replaced by another (line breaks, indentation), but no
   whitespace may be added or removed between tokens (`(a b : ℕ)` is not `(ab : ℕ)`). So Lean elaborated
   it as a declaration of its own, with the given name and type.
2. Nothing before it can change what it means. Before the statement the code may contain only helper
   declarations (`theorem`, `lemma`, `def`, `abbrev`, `structure`, `inductive`, without instance
   attributes), `set_option` lines (safe options only), `open` lines that are also in the header, and
   sections. Rejected there: `instance`, `class`, `namespace` (a namespace changes name resolution in the
   statement), `variable` (adds hypotheses), `include`, `omit`, `attribute`, `export`, and any `... in`
   modifier on the statement other than `set_option ... in`.
3. The theorem's name is declared once: no other declaration reuses it.
4. None of these appear anywhere: `sorry`, `admit`, `sorryAx`; `axiom`, `opaque`, `unsafe`,
   `implemented_by`, `extern`; `#eval`, `#exit`, `#guard_msgs` and other commands that run code or hide
   messages; `run_cmd`, `run_tac`, `run_elab`, `run_meta`, `by_elab`; user syntax (`notation`, `infix`,
   `macro`, `macro_rules`, `syntax`, `elab`, `elab_rules`, `simproc`, `unif_hint`, `initialize`, ...);
   syntax quotations `` `(...) `` (a statement inside one is never elaborated); `import` after the
   leading import lines; attributes outside a short list of inert ones; options that skip checks or
   change elaboration (`debug.*`, `autoImplicit`, `hygiene`, ...); search tactics that admit goals on
   some Lean versions (`apply?`, `exact?`, `rw?`, `library_search`); `native_decide`, `decide +native`
   and the `Lean.ofReduceBool` family unless `allow_native_decide`; escaped identifiers `«...»`, raw
   strings and string literals containing escapes or braces (where this lexer and Lean's could disagree).

Not guaranteed: soundness of Lean, Mathlib or the REPL themselves. Words are matched as whole tokens, so
identifiers such as `sorry_lemma`, `h.sorry` or `my_axiom_free` are fine.
"""

from __future__ import annotations

import functools
import re

from fd_jax.lean.lexer import find_word, is_ident_char, lex, line_of

# The miniF2F / DeepSeek-Prover header (see ../shared/data/minif2f.jsonl); the verifiers' default.
DEFAULT_HEADER = (
    "import Mathlib\nimport Aesop\n\n"
    "set_option maxHeartbeats 0\n\n"
    "open BigOperators Real Nat Topology Rat\n\n"
)

_SORRY = "proofs must not use sorry/admit"
_META = "code that runs or defines metaprograms is not allowed"
_SYNTAX = "new syntax could change what the statement means"
_TRUST = "bypasses the kernel"
_NATIVE = "native_decide trusts the compiler (set allow_native_decide to permit it)"

# word -> why it is rejected. Matched as whole tokens outside comments and literals.
_BANNED_WORDS: dict[str, str] = {
    "sorry": _SORRY,
    "admit": _SORRY,
    "axiom": "new axioms are not allowed",
    "opaque": "opaque declarations are not allowed",
    "unsafe": _TRUST,
    "implemented_by": _TRUST,
    "extern": _TRUST,
    "#eval": _META,
    "#eval!": _META,
    "#exit": "`#exit` stops Lean before the proof is checked",
    "#guard_msgs": "`#guard_msgs` hides Lean's messages",
    "#test": _META,
    "#sample": _META,
    "#html": _META,
    "#widget": _META,
    "run_cmd": _META,
    "run_elab": _META,
    "run_meta": _META,
    "run_tac": _META,
    "by_elab": _META,
    "eval%": _META,
    "`(": "syntax quotations are not allowed (the statement inside one is never elaborated)",
    "elab": _META,
    "elab_rules": _META,
    "macro": _SYNTAX,
    "macro_rules": _SYNTAX,
    "syntax": _SYNTAX,
    "declare_syntax_cat": _SYNTAX,
    "notation": _SYNTAX,
    "notation3": _SYNTAX,
    "infix": _SYNTAX,
    "infixl": _SYNTAX,
    "infixr": _SYNTAX,
    "prefix": _SYNTAX,
    "postfix": _SYNTAX,
    "binder_predicate": _SYNTAX,
    "unif_hint": "unification hints could change what the statement means",
    "initialize": _META,
    "builtin_initialize": _META,
    "simproc": _META,
    "dsimproc": _META,
    "simproc_decl": _META,
    "dsimproc_decl": _META,
    "apply?": "search tactics can close goals with sorry on some Lean versions",
    "exact?": "search tactics can close goals with sorry on some Lean versions",
    "rw?": "search tactics can close goals with sorry on some Lean versions",
    "library_search": "search tactics can close goals with sorry on some Lean versions",
}
# Names that may carry a namespace prefix (`Lean.ofReduceBool`).
_BANNED_NAMES: dict[str, str] = {"sorryAx": _SORRY}
_NATIVE_NAMES = ("native_decide", "ofReduceBool", "ofReduceNat", "reduceBool", "reduceNat", "trustCompiler")
_NATIVE_CONFIG = re.compile(r"\+native\b|\bnative\s*:=\s*true\b")

# Options that switch off checks or change how the statement elaborates.
_BANNED_OPTION_PREFIXES = ("debug.", "bootstrap.", "internal.", "compiler.", "interpreter.")
_BANNED_OPTIONS = frozenset(
    {"autoImplicit", "relaxedAutoImplicit", "hygiene", "allowUnsafeReducibility", "quotPrecheck"}
)
# Attributes with no effect on what is proved (others can register elaborators, tactics, simprocs or
# compiler overrides). `instance` is allowed only after the statement.
_ALLOWED_ATTRIBUTES = frozenset(
    {
        "simp", "simps", "reducible", "irreducible", "semireducible", "inline", "noinline", "specialize",
        "ext", "norm_cast", "push_cast", "mono", "gcongr", "nolint", "nontriviality", "elab_as_elim",
        "match_pattern", "refl", "symm", "trans", "congr", "field_simps", "to_additive", "continuity",
        "measurability", "fun_prop", "bound", "instance",
    }
)  # fmt: skip
# Commands that must not come before the statement (see the module docstring, point 2).
_PREAMBLE_BANNED = (
    "instance", "class", "namespace", "variable", "variables", "include", "omit", "attribute", "export",
)  # fmt: skip
_DECLARATION_KEYWORDS = (
    "theorem", "lemma", "def", "abbrev", "instance", "axiom", "opaque", "structure", "class", "inductive",
    "alias",
)  # fmt: skip

_IMPORT_LINE = re.compile(r"\s*import\s+(?:runtime\s+)?[^\s]+")
_SET_OPTION = re.compile(r"\bset_option\s+([^\s]+)")
_ATTRIBUTE_OPEN = re.compile(r"@\[|\battribute\s*\[")
_IN_SUFFIX = re.compile(r"(?<![\w.])in\s*$")
_SET_OPTION_IN_SUFFIX = re.compile(r"(?:\bset_option\s+\S+\s+\S+\s+in\s*)+$")
_THEOREM_NAME = re.compile(r"^\s*(?:theorem|lemma)\s+([^\s:({\[⦃]+)")


def leading_import_end(view: str) -> int:
    """Offset where the leading `import` lines of a code view end (0 if there are none)."""
    end = 0
    while match := _IMPORT_LINE.match(view, end):
        end = match.end()
    return end


@functools.lru_cache(maxsize=4096)  # a statement is screened once per sampled proof
def theorem_name(statement: str) -> str | None:
    """The declared name in `theorem NAME ...` / `lemma NAME ...` (without universe parameters), or None."""
    match = _THEOREM_NAME.match(lex(statement)[0])
    return match.group(1).removesuffix(".") if match else None  # `foo.{u}` stops at `{`


@functools.lru_cache(maxsize=4096)
def _statement_pattern(statement: str) -> re.Pattern[str] | None:
    """The statement's tokens (comments dropped) separated by any whitespace."""
    tokens = lex(statement)[0].split()
    if not tokens:
        return None
    return re.compile(r"\s+".join(re.escape(token) for token in tokens))


def _find_statement(view: str, pattern: re.Pattern[str]) -> re.Match[str] | None:
    for match in pattern.finditer(view):
        start, end = match.start(), match.end()
        if start > 0 and (is_ident_char(view[start - 1]) or view[start - 1] == "."):
            continue
        if end < len(view) and is_ident_char(view[end - 1]) and is_ident_char(view[end]):
            continue
        return match
    return None


def statement_span(statement: str, code: str) -> tuple[int, int] | None:
    """(start, end) offsets of the statement's first occurrence as code in `code`, or None."""
    pattern = _statement_pattern(statement)
    match = _find_statement(lex(code)[0], pattern) if pattern else None
    return match.span() if match else None


def _attribute_names(view: str, start: int) -> tuple[list[str], int]:
    """Names in the attribute list whose `[` is just before `start`, and the offset after its `]`."""
    depth, i = 1, start
    while i < len(view) and depth:
        depth += {"[": 1, "]": -1}.get(view[i], 0)
        i += 1
    names = []
    for entry in re.split(r",", view[start : i - 1]):
        words = entry.replace("-", " ").split()
        while words and words[0] in ("local", "scoped"):
            words = words[1:]
        if words:
            names.append(words[0])
    return names, i


def _words_reason(view: str, words: dict[str, str], *, allow_qualified: bool = False) -> str | None:
    """The reason for the first banned word (by position) in `view`, if any."""
    firsts = []
    for word in words:
        if found := find_word(view, word, allow_qualified=allow_qualified):
            firsts.append((found[0], word))
    if not firsts:
        return None
    offset, word = min(firsts)
    return f"line {line_of(view, offset)}: `{word}`: {words[word]}"


def _options_reason(view: str) -> str | None:
    for match in _SET_OPTION.finditer(view):
        option = match.group(1)
        if option in _BANNED_OPTIONS or option.startswith(_BANNED_OPTION_PREFIXES):
            return f"line {line_of(view, match.start())}: `set_option {option}` is not allowed"
    return None


def _attributes_reason(view: str, preamble_end: int) -> str | None:
    for match in _ATTRIBUTE_OPEN.finditer(view):
        names, _ = _attribute_names(view, match.end())
        line = line_of(view, match.start())
        for name in names:
            if name not in _ALLOWED_ATTRIBUTES:
                return f"line {line}: attribute `{name}` is not allowed"
            if name == "instance" and match.start() < preamble_end:
                return f"line {line}: instances before the statement could change what it means"
    return None


@functools.lru_cache(maxsize=64)
def _normalized_lines(text: str) -> frozenset[str]:
    return frozenset(" ".join(line.split()) for line in lex(text)[0].splitlines())


def _preamble_reason(preamble: str, header: str) -> str | None:
    """Why the code before the statement could change what the statement means (module docstring, point 2)."""
    for word in _PREAMBLE_BANNED:
        if hits := find_word(preamble, word):
            return f"line {line_of(preamble, hits[0])}: `{word}` before the statement may change its meaning"
    header_lines = _normalized_lines(header)
    for hit in find_word(preamble, "open"):
        line_end = preamble.find("\n", hit)
        command = " ".join(preamble[hit : len(preamble) if line_end < 0 else line_end].split())
        if command not in header_lines:
            return (f"line {line_of(preamble, hit)}: `{command}` before the statement "
                    "(only the header's own `open` lines may be repeated)")  # fmt: skip
    if _IN_SUFFIX.search(_SET_OPTION_IN_SUFFIX.sub("", preamble)):
        return "the statement must not be preceded by an `... in` modifier (only `set_option ... in`)"
    return None


def _redeclaration_reason(view: str, name: str, span: tuple[int, int]) -> str | None:
    """Why `name` is declared somewhere outside `span` (the statement), if it is."""
    for hit in find_word(view, name, allow_qualified=True):
        if span[0] <= hit < span[1] or view[hit + len(name) : hit + len(name) + 1] == ".":
            continue
        before = view[:hit].removesuffix("_root_.")
        previous = before.rsplit(maxsplit=1)[-1:]  # the token before the name
        if before[-1:].isspace() and previous and previous[0] in _DECLARATION_KEYWORDS:
            return f"line {line_of(view, hit)}: the theorem name `{name}` is declared again"
    return None


def screen(
    statement: str, code: str, *, allow_native_decide: bool = False, header: str = DEFAULT_HEADER
) -> str | None:
    """Why `code` must not be sent to Lean as a proof of `statement`, or None if it may be.

    statement: the theorem as given (e.g. miniF2F's `formal_statement`, `theorem NAME ... := by`).
    code: the model's complete Lean source, statement included, header excluded (leading `import` lines
      are tolerated; the verifier strips them).
    allow_native_decide: permit `native_decide` and friends (they trust the compiler, not the kernel).
    header: the header the verifier will run first; `open` lines before the statement must be among its own.
    Returns a one-line, human-readable reason starting with the line number where it applies, if any.
    See the module docstring for exactly what a pass guarantees.
    """
    if not isinstance(statement, str) or not isinstance(code, str):
        return f"statement and code must be strings, got {type(statement).__name__} and {type(code).__name__}"
    view, problems = lex(code)
    if problems:
        first = problems[0]
        return f"line {line_of(code, first.offset)}: {first.what} is not allowed in proofs"
    if "«" in view:
        return f"line {line_of(view, view.index('«'))}: escaped identifiers «...» are not allowed"
    pattern = _statement_pattern(statement)
    if pattern is None:
        return "the statement is empty"
    match = _find_statement(view, pattern)
    if match is None:
        return "the code does not contain the given statement verbatim (modulo whitespace) as Lean code"
    open_ended = not re.search(r":=\s*(by)?$", statement.strip())
    if open_ended and not re.match(r"\s*(:=|\||where\b)", view[match.end() :]):
        return f"line {line_of(view, match.end())}: the statement is extended beyond the given text"
    imports_end = leading_import_end(view)
    after_imports = re.sub(r"[^\n]", " ", view[:imports_end]) + view[imports_end:]
    qualified = dict(_BANNED_NAMES)
    if not allow_native_decide:
        qualified.update({name: _NATIVE for name in _NATIVE_NAMES})
    for reason in (
        _words_reason(after_imports, {"import": "`import` is only allowed at the top of the file"}),
        _words_reason(view, _BANNED_WORDS),
        _words_reason(view, qualified, allow_qualified=True),
        _options_reason(view),
        _attributes_reason(view, match.start()),
        _preamble_reason(view[: match.start()], header),
    ):
        if reason:
            return reason
    if not allow_native_decide and (native := _NATIVE_CONFIG.search(view)):
        return f"line {line_of(view, native.start())}: `{native.group(0)}`: {_NATIVE}"
    name = theorem_name(statement)
    if name and (reason := _redeclaration_reason(view, name, match.span())):
        return reason
    return None
