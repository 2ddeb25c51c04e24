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
import functools
import re

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


@dataclasses.dataclass(frozen=True)
class Token:
    """One Lean token. kind: "ident", "number", "symbol" (a run of symbol characters), "bracket" (one of
    BRACKETS), "string", "char". start/end: offsets in the text. spaced: whitespace or a comment precedes it.
    line_start: it is the first token on its line. column: its column (code points)."""

    kind: str
    text: str
    start: int
    end: int
    spaced: bool
    line_start: bool
    column: int


def _is_symbol_char(ch: str) -> bool:
    """Characters that are neither whitespace, a bracket, a quote, a digit nor an identifier's first character
    (`!`, `?` and subscripts continue identifiers, but on their own they are symbols: `?_`, `n !`)."""
    return not (
        ch in WHITESPACE or ch in BRACKETS or ch in "\"'`«»" or is_id_first(ch) or "0" <= ch <= "9" or ch.isspace()
    )


_NUMBER = re.compile(r"0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+|[0-9][0-9_]*(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_ESCAPE = re.compile(r"\\(?:[\\\"'nrt0]|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4})")


class _Scanner:
    def __init__(self, text: str):
        self.text, self.n = text, len(text)
        self.tokens: list[Token] = []
        self.problems: list[LexProblem] = []
        self.blank: list[tuple[int, int]] = []  # comments and literals, blanked in the code view
        self.spaced, self.line_start = True, True

    def problem(self, offset: int, what: str) -> None:
        self.problems.append(LexProblem(offset, what))

    def emit(self, kind: str, start: int, end: int) -> None:
        column = start - (self.text.rfind("\n", 0, start) + 1)
        self.tokens.append(Token(kind, self.text[start:end], start, end, self.spaced, self.line_start, column))
        self.spaced = self.line_start = False

    def comment_end(self, start: int) -> int:
        """Offset just past the block comment opened at `start` (Lean skips the character after `/-`)."""
        depth, i = 1, start + 3
        while i < self.n - 1:
            pair = self.text[i : i + 2]
            if pair == "/-":
                depth, i = depth + 1, i + 2
            elif pair == "-/":
                depth, i = depth - 1, i + 2
                if depth == 0:
                    return i
            else:
                i += 1
        self.problem(start, "an unterminated block comment")
        return self.n

    def skip_space(self, i: int) -> int:
        text = self.text
        while i < self.n:
            ch = text[i]
            if ch in WHITESPACE:
                self.spaced = True
                self.line_start = self.line_start or ch == "\n"
                i += 1
            elif text.startswith("--", i):
                end = text.find("\n", i)
                end = self.n if end < 0 else end
                self.blank.append((i, end))
                self.spaced, i = True, end
            elif text.startswith("/-", i):
                end = self.comment_end(i)
                self.blank.append((i, end))
                self.spaced, i = True, end
            elif ch.isspace():
                self.problem(i, f"the whitespace character U+{ord(ch):04X} (Lean reads only spaces and line breaks)")
                self.spaced, i = True, i + 1
            else:
                break
        return i

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

    def symbols(self, start: int) -> int:
        text, i = self.text, start
        while i < self.n and _is_symbol_char(text[i]):
            if i > start and text.startswith(("--", "/-"), i):
                self.problem(i, f"a comment marker inside the symbols `{text[start:i + 2]}`")
            if is_version_dependent(text[i]):
                self.problem(i, f"the character {text[i]!r} (a letter for some Lean versions only)")
            i += 1
        # A `'` after a token that ends in `'` belongs to it, when no character literal could start there.
        if i < self.n and text[i] == "'":
            run = text[start : i + 1]
            no_char = text[i + 1 : i + 2] != "\\" and text[i + 2 : i + 3] != "'"
            if no_char and any(run.endswith(token) for token in PRIME_TOKENS):
                i += 1
        self.emit("symbol", start, i)
        return i

    def ident(self, start: int) -> int:
        text, i = self.text, start + 1
        while True:
            while i < self.n and is_id_rest(text[i]):
                i += 1
            if i + 1 < self.n and text[i] == "." and (is_id_first(text[i + 1]) or text[i + 1] == "«"):
                i += 1
                if text[i] == "«":
                    self.problem(i, "escaped identifiers «...» are not allowed")
                    break
                continue
            break
        if i < self.n and is_version_dependent(text[i]):
            self.problem(i, f"the character {text[i]!r} (a letter for some Lean versions only)")
        self.emit("ident", start, i)
        return i

    def run(self) -> None:
        text, i = self.text, 0
        while True:
            i = self.skip_space(i)
            if i >= self.n:
                return
            ch = text[i]
            if ch == '"':
                start, i = i, self.string(i)
                self.emit("string", start, i)
            elif ch == "'":
                start, i = i, self.prime(i)
                if not self.tokens or self.tokens[-1].start != start:
                    self.emit("char", start, i)
            elif "0" <= ch <= "9":
                match = _NUMBER.match(text, i)
                self.emit("number", i, match.end())
                if match.end() < self.n and text[match.end()] == "'":
                    self.problem(match.end(), "a `'` right after a number")
                i = match.end()
            elif ch == "r" and re.match(r'r#*"', text[i : i + 20]):
                self.problem(i, "a raw string literal")
                i = self.ident(i)
            elif ch == "`":
                self.problem(i, "name literals and syntax quotations (`) are not allowed")
                self.emit("symbol", i, i + 1)
                i += 1
            elif ch in "«»":
                self.problem(i, "escaped identifiers «...» are not allowed")
                self.emit("symbol", i, i + 1)
                i += 1
            elif is_id_first(ch):
                i = self.ident(i)
            elif ch in BRACKETS:
                self.emit("bracket", i, i + 1)
                if ch in ")]}⟩⦄" and text[i + 1 : i + 2] == "'":
                    self.problem(i + 1, f"a `'` right after `{ch}` (a character literal, or the end of a token?)")
                i += 1
            else:
                if is_version_dependent(ch):
                    self.problem(i, f"the character {ch!r} (a letter for some Lean versions only)")
                i = self.symbols(i)


@functools.lru_cache(maxsize=256)
def tokenize(text: str) -> tuple[tuple[Token, ...], tuple[LexProblem, ...], str]:
    """(tokens, problems, code view) of Lean 4 source `text`; see the module docstring.

    The code view is `text` with comments and string / character literals replaced by spaces (same length,
    same line breaks, so offsets and line numbers carry over).
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
    problems = sorted(scanner.problems, key=lambda p: p.offset)
    return tuple(scanner.tokens), tuple(problems), "".join(pieces)


def lex(text: str) -> tuple[str, list[LexProblem]]:
    """(code view, problems) of Lean 4 source `text`; see `tokenize`."""
    _, problems, view = tokenize(text)
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
