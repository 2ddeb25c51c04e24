"""Lean 4's lexical rules, as far as the screen needs them: tokens, comments and literals.

The screen (`screen.py`) must see exactly the tokens Lean will read: wherever this lexer and Lean's split a
file differently, text could be a comment for one and code for the other. `tokenize` follows Lean 4's
`Lean.Parser.Basic` (`whitespace`, `finishCommentBlock`, `tokenFn`, `identFn`) and `Init.Meta`'s character
classes:

* Whitespace is ` `, `\\t`, `\\r`, `\\n`. `--` starts a line comment. `/-` starts a block comment; the
  character right after `/-` is consumed with it (that is how `/--` and `/-!` doc comments start), then
  `/-` nests and `-/` closes.
* At the start of a token: `"` starts a string literal; `'` starts a character literal unless the next
  character is also `'` (Mathlib's `''` token); a digit starts a number; `` ` `` a name literal or
  quotation; otherwise an identifier (`isIdFirst`, then `isIdRest`, dot-separated parts) or a token of the
  token table (longest match).
* Identifier characters: `isIdFirst` = ASCII letters, `_`, `isLetterLike` (Greek except λ Π Σ, Coptic,
  polytonic Greek, the letter-like block U+2100-214F such as ℝ ℕ, mathematical alphanumerics);
  `isIdRest` adds ASCII digits, `'`, `!`, `?` and `isSubScriptAlnum` (₀-₉, ₐ-ₜ, ᵢ-ᵪ). Not Python's
  `str.isalnum`: `ˢ` (of Mathlib's `×ˢ`) and `²` are not identifier characters for Lean.

The token table (which symbol runs are one token) depends on the imported Mathlib, so symbols are grouped
in maximal runs; that is exact wherever the run is followed by whitespace, an identifier, a digit or a
bracket. Where this lexer cannot be sure what Lean does, it reports a `LexProblem` and the screen rejects
the proof with that reason rather than guess:

* a `'` right after a symbol, a number or a closing bracket (a character literal, or the end of a token
  such as `×'`?), except after the tokens in `PRIME_TOKENS` where no character literal could follow;
* a character literal holding a line break, a tab, `"` or `'`, and `'` next to a string's quote;
* a comment marker (`--`, `/-`) inside a run of symbols (the longest-match token could swallow its `-`);
* string literals containing `\\`, `{` or `}` (escapes; interpolation holes are code), raw strings, name
  literals and quotations (`` ` ``), escaped identifiers `«...»`, unterminated comments and literals;
* characters that are identifier letters in some Lean versions only (Latin-1 and Latin Extended-A
  letters, U+2C7C), and Unicode whitespace other than the four above.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

# Tokens of core Lean and Mathlib that end in `'`: after them a `'` belongs to the token. `×'` (PProd, core),
# `∑'` / `∏'` (tsum / tprod), `⁻¹'` (preimage); `''` (image) is handled at the start of a token.
PRIME_TOKENS = ("×'", "∑'", "∏'", "⁻¹'")
WHITESPACE = " \t\r\n"
BRACKETS = "()[]{}⟨⟩⦃⦄,"
OPENING = "([{⟨⦃,"


def is_letter_like(ch: str) -> bool:
    """Lean's `isLetterLike` (the ranges every Lean 4 version agrees on)."""
    c = ord(ch)
    return (
        (0x3B1 <= c <= 0x3C9 and c != 0x3BB)  # lower Greek except λ
        or (0x391 <= c <= 0x3A9 and c not in (0x3A0, 0x3A3))  # upper Greek except Π, Σ
        or 0x3CA <= c <= 0x3FB  # Coptic
        or 0x1F00 <= c <= 0x1FFE  # polytonic Greek
        or 0x2100 <= c <= 0x214F  # letter-like block: ℝ ℕ ℤ ℚ ℂ ...
        or 0x1D49C <= c <= 0x1D59F  # script, double-struck, Fraktur
    )


def is_version_dependent(ch: str) -> bool:
    """Letters that newer Lean versions added to `isLetterLike` / `isSubScriptAlnum` (Latin-1, Latin
    Extended-A, U+2C7C): an identifier character for some versions, a symbol for others."""
    c = ord(ch)
    return (0xC0 <= c <= 0x17F and c not in (0xD7, 0xF7)) or c == 0x2C7C


def is_subscript_alnum(ch: str) -> bool:
    """Lean's `isSubScriptAlnum`: ₀-₉, ₐ-ₜ and ᵢ-ᵪ."""
    c = ord(ch)
    return 0x2080 <= c <= 0x2089 or 0x2090 <= c <= 0x209C or 0x1D62 <= c <= 0x1D6A


def is_id_first(ch: str) -> bool:
    """Lean's `isIdFirst` (`Char.isAlpha` is ASCII-only in Lean)."""
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z") or ch == "_" or is_letter_like(ch)


def is_id_rest(ch: str) -> bool:
    """Lean's `isIdRest`."""
    return is_id_first(ch) or ("0" <= ch <= "9") or ch in "'!?" or is_subscript_alnum(ch)


is_ident_char = is_id_rest  # the name the rest of the package uses


@dataclasses.dataclass(frozen=True)
class LexProblem:
    """Source text the lexer declines to interpret (see the module docstring)."""

    offset: int
    what: str


class Token(NamedTuple):
    """One Lean token. kind: "ident", "number", "symbol" (a run of symbol characters), "bracket" (one of
    BRACKETS), "string", "char". start/end: offsets in the text. spaced: whitespace or a comment precedes it.
    line_start: it is the first token on its line."""

    kind: str
    text: str
    start: int
    end: int
    spaced: bool
    line_start: bool


_COMMENT_MARK = re.compile(r"/-|-/")
_ESCAPE = re.compile(r"\\(?:[\\\"'nrt0]|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4})")


class _Scanner:
    def __init__(self, text: str):
        self.text, self.n = text, len(text)
        self.tokens: list[Token] = []
        self.problems: list[LexProblem] = []
        self.blank: list[tuple[int, int]] = []  # comments and literals, blanked in the code view
        self.docs: list[tuple[int, int]] = []  # doc comments `/-- -/` and module docs `/-! -/` (tokens for Lean)
        self.spaced, self.line_start = True, True

    def problem(self, offset: int, what: str) -> None:
        self.problems.append(LexProblem(offset, what))

    def emit(self, kind: str, start: int, end: int) -> None:
        self.tokens.append(Token(kind, self.text[start:end], start, end, self.spaced, self.line_start))
        self.spaced = self.line_start = False

    def comment_end(self, start: int) -> int:
        """Offset just past the block comment opened at `start` (Lean skips the character after `/-`, then
        reads pairs left to right: `/-` nests, `-/` closes)."""
        depth, i = 1, start + 3
        while mark := _COMMENT_MARK.search(self.text, i):
            depth += 1 if mark.group() == "/-" else -1
            i = mark.end()
            if depth == 0:
                return i
        self.problem(start, "an unterminated block comment")
        return self.n

    def string(self, start: int) -> int:
        i = start + 1
        while i < self.n and self.text[i] != '"':
            ch = self.text[i]
            if ch == "\\" or ch in "{}":
                self.problem(start, f"a string literal containing {ch!r}")
            i += 1
        if i >= self.n:
            self.problem(start, "an unterminated string literal")
            return self.n
        body = self.text[start + 1 : i]
        before = self.text[start - 1] if start else ""
        after = self.text[i + 1] if i + 1 < self.n else ""
        if body[:1] == "'" or body[-1:] == "'" or "'" in (before, after):
            self.problem(start, "a `'` next to a string's quote")
        self.blank.append((start, i + 1))
        return i + 1

    def char(self, start: int) -> int:
        text = self.text
        match = _ESCAPE.match(text, start + 1)
        end = match.end() if match else start + 2
        if start + 1 >= self.n or text[start + 1] == "\\" and not match:
            self.problem(start, "a malformed character literal")
            return min(self.n, start + 2)
        content = text[start + 1 : end]
        if end >= self.n or text[end] != "'":
            self.problem(start, "a character literal without its closing `'`")
            return end
        if content in ("\n", "\r", "\t", '"', "'"):
            self.problem(start, f"a character literal holding {content!r} (where lexers are known to disagree)")
        self.blank.append((start, end + 1))
        return end + 1

    def prime(self, i: int) -> int:
        """A `'` at the start of a token, at `i`."""
        text = self.text
        if text.startswith("''", i):  # Mathlib's image token `f '' s`
            if text.startswith("'''", i):
                self.problem(i, "`'''`")
            self.emit("symbol", i, i + 2)
            return i + 2
        previous = text[i - 1] if i else " "
        if previous in WHITESPACE or previous in OPENING or i == 0 or self.spaced:
            return self.char(i)
        self.problem(i, f"a `'` right after `{previous}` (a character literal, or the end of a token?)")
        return i + 1

    def run(self) -> None:
        text, i, n = self.text, 0, self.n
        tokens, problem = self.tokens, self.problem
        while i < n:
            for match in _TOKEN.finditer(text, i):  # restarted wherever a literal or comment is skipped by hand
                kind = match.lastgroup
                start, end = match.span()
                if kind == "ws":
                    self.spaced = True
                    if not self.line_start and "\n" in match.group():
                        self.line_start = True
                    continue
                if kind == "ident":
                    tokens.append(Token("ident", match.group(), start, end, self.spaced, self.line_start))
                    self.spaced = self.line_start = False
                    if text.startswith(".«", end):
                        problem(end, "escaped identifiers «...» are not allowed")
                    continue
                if kind == "bracket":
                    tokens.append(Token("bracket", match.group(), start, end, self.spaced, self.line_start))
                    self.spaced = self.line_start = False
                    if text.startswith("'", end) and match.group() in ")]}⟩⦄":
                        problem(end, f"a `'` right after `{match.group()}` (a character literal or a token's end?)")
                    continue
                if kind == "sym":
                    run = match.group()
                    if "-" in run and (run.find("--", 1) > 0 or run.find("/-", 1) > 0):
                        problem(start, f"a comment marker inside the symbols `{run}`")
                    # A `'` after a token that ends in `'` belongs to it, when no character literal could start.
                    no_char = text[end + 1 : end + 2] != "\\" and text[end + 2 : end + 3] != "'"
                    if text.startswith("'", end) and no_char:
                        if any((run + "'").endswith(token) for token in PRIME_TOKENS):
                            self.emit("symbol", start, end + 1)
                            i = end + 1
                            break
                    tokens.append(Token("symbol", run, start, end, self.spaced, self.line_start))
                    self.spaced = self.line_start = False
                    continue
                if kind == "num":
                    tokens.append(Token("number", match.group(), start, end, self.spaced, self.line_start))
                    self.spaced = self.line_start = False
                    if text.startswith("'", end):
                        problem(end, "a `'` right after a number")
                    continue
                if kind == "line":
                    self.blank.append((start, end))
                    self.spaced = True
                    continue
                if kind == "tick":
                    what = "name literals and syntax quotations (`)" if match.group() == "`" else "escaped identifiers"
                    problem(start, f"{what} are not allowed")
                    self.emit("symbol", start, end)
                    continue
                if kind == "other":  # Unicode whitespace other than Lean's, or anything else
                    ch = match.group()
                    if ch.isspace():
                        problem(start, f"the whitespace character U+{ord(ch):04X} (Lean reads spaces and line breaks)")
                    else:
                        problem(start, f"the character U+{ord(ch):04X}")
                    self.spaced = True
                    continue
                # Literals and block comments are skipped by hand; the scan restarts after them.
                if kind == "block":
                    i = self.comment_end(start)
                    self.blank.append((start, i))
                    if text.startswith(("/--", "/-!"), start):
                        self.docs.append((start, i))
                    self.spaced = True
                elif kind == "str":
                    i = self.string(start)
                    self.emit("string", start, i)
                elif kind == "char":
                    i = self.prime(start)
                    if not tokens or tokens[-1].start != start:
                        self.emit("char", start, i)
                else:  # raw string
                    problem(start, "a raw string literal")
                    self.emit("ident", start, start + 1)
                    i = start + 1
                break
            else:
                return


_FIRST = (
    "A-Za-z_\u03b1-\u03ba\u03bc-\u03c9\u0391-\u039f\u03a1\u03a2\u03a4-\u03a9\u03ca-\u03fb"
    "\u1f00-\u1ffe\u2100-\u214f\U0001d49c-\U0001d59f"
)  # isIdFirst: ASCII letters, `_`, isLetterLike (λ U+03BB, Π U+03A0, Σ U+03A3 excluded)
_REST = _FIRST + "0-9'!?\u2080-\u2089\u2090-\u209c\u1d62-\u1d6a"  # isIdRest adds digits, ' ! ? and subscripts
_TOKEN = re.compile(
    "(?P<ws>[ \t\r\n]+)"
    "|(?P<line>--[^\n]*)"
    "|(?P<block>/-)"
    '|(?P<str>")'
    "|(?P<char>')"
    "|(?P<num>0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+|[0-9][0-9_]*(?:\\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)"
    '|(?P<raw>r#*")'
    f"|(?P<ident>[{_FIRST}][{_REST}]*(?:\\.[{_FIRST}][{_REST}]*)*)"
    "|(?P<bracket>[()\\[\\]{}⟨⟩⦃⦄,])"
    "|(?P<tick>[`«»])"
    f"|(?P<sym>[^\\s()\\[\\]{{}}⟨⟩⦃⦄,\"'`«»0-9{_FIRST}]+)"
    "|(?P<other>.)",
    re.S,
)
_VERSION_DEPENDENT = re.compile("[\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u017f\u2c7c]")


def tokenize(text: str) -> tuple[tuple[Token, ...], tuple[LexProblem, ...], str, tuple[tuple[int, int], ...]]:
    """(tokens, problems, code view, doc comments) of Lean 4 source `text`; see the module docstring.

    The code view is `text` with comments and string / character literals replaced by spaces (same length,
    same line breaks, so offsets and line numbers carry over). Doc comments are (start, end) offsets of
    `/-- ... -/` and `/-! ... -/`: for Lean they are tokens, which end the term or tactic block before them.
    """
    scanner = _Scanner(text)
    scanner.run()
    pieces, last = [], 0
    for start, end in sorted(scanner.blank):
        if start < last:
            continue
        pieces += [text[last:start], re.sub(r"[^\n]", " ", text[start:end])]
        last = end
    pieces.append(text[last:])
    view = "".join(pieces)
    if letter := _VERSION_DEPENDENT.search(view):
        scanner.problem(letter.start(), f"the character {letter.group()!r} (a letter for some Lean versions only)")
    problems = sorted(scanner.problems, key=lambda p: p.offset)
    return tuple(scanner.tokens), tuple(problems), view, tuple(scanner.docs)


def lex(text: str) -> tuple[str, list[LexProblem]]:
    """(code view, problems) of Lean 4 source `text`; see `tokenize`."""
    _, problems, view, _ = tokenize(text)
    return view, list(problems)


def code_view(text: str) -> str:
    """`text` with comments and literals blanked (same length, same line breaks)."""
    return tokenize(text)[2]


def find_word(view: str, word: str, *, allow_qualified: bool = False) -> list[int]:
    """Offsets where `word` occurs in `view` as a whole token.

    The characters around an occurrence must not continue an identifier; with `allow_qualified` a
    namespace prefix is allowed (`Lean.ofReduceBool` matches `ofReduceBool`), without it a preceding `.`
    makes it a different name (`h.sorry` is not `sorry`).
    """
    hits, start = [], 0
    first_is_ident = is_ident_char(word[0])
    last_is_ident = is_ident_char(word[-1])
    while (i := view.find(word, start)) >= 0:
        start = i + 1
        before = view[i - 1] if i > 0 else " "
        after = view[i + len(word)] if i + len(word) < len(view) else " "
        if first_is_ident and (is_ident_char(before) or (before == "." and not allow_qualified)):
            continue
        if last_is_ident and is_ident_char(after):
            continue
        hits.append(i)
    return hits


def line_of(text: str, offset: int) -> int:
    """1-based line number of `offset` in `text`."""
    return text.count("\n", 0, offset) + 1
