"""Just enough of Lean 4's lexical rules to tell code from comments and literals.

The screen (`screen.py`) must look only at what Lean will elaborate: a banned word inside a comment is
harmless, and a theorem statement inside a comment or a string proves nothing. `code_view` returns a
copy of the source with the same length and the same line breaks (offsets and line numbers carry over)
in which comments, string literals and character literals are replaced by spaces.

The rules follow Lean 4's `Lean.Parser.Basic` (`whitespace`, `finishCommentBlock`, `tokenFn`):

* `--` starts a line comment.
* `/-` starts a block comment; the character right after `/-` is consumed with it (that is how `/--`
  and `/-!` doc comments start), then `/-` nests and `-/` closes.
* `"` starts a string literal. A `'` starts a character literal unless it continues an identifier
  (`h'`); after a number (`2'a'`) or a closing bracket it does start one.
* A comment left open runs to the end of the text (Lean reports an error there).

Where Lean's rules are intricate the lexer does not try to follow them; `LexProblem`s report such text so
that the screen can reject it: string literals containing `\\`, `{` or `}` (escapes; interpolation holes,
which are code), raw strings `r"..."`/`r#"..."#`, and unterminated literals. Competition proofs need
none of them.
"""

from __future__ import annotations

import dataclasses
import re

# Lean's `isIdRest`, approximately: letters (Unicode letters such as ℝ, α included), digits, `_`, `'`, `!`,
# `?` and subscripts. Used for word boundaries: `sorry_lemma` and `h.sorry` are not the keyword `sorry`.
_SUBSCRIPTS = set("₀₁₂₃₄₅₆₇₈₉ₐₑₒₓₔₕₖₗₘₙₚₛₜᵢᵣᵤᵥⱼᵦᵧᵨᵩᵪ")

_CHAR_LITERAL = re.compile(r"'(?:\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|.)|[^\\'\n])'")


def is_ident_char(ch: str) -> bool:
    """True if `ch` can continue a Lean identifier."""
    return ch.isalnum() or ch in "_'!?" or ch in _SUBSCRIPTS


@dataclasses.dataclass(frozen=True)
class LexProblem:
    """Source text the lexer declines to interpret (see the module docstring)."""

    offset: int
    what: str


def _in_identifier(text: str, i: int) -> bool:
    """True if the character at `i` continues an identifier (not a number) that starts before it."""
    j = i
    while j > 0 and is_ident_char(text[j - 1]):
        j -= 1
    return j < i and not text[j].isdigit()


_NEXT = re.compile(r'--|/-|r#*"|"|\'')  # where a comment or a literal may start
_COMMENT_MARK = re.compile(r"/-|-/")
_STRING_STOP = re.compile(r'["\\{}]')
_NOT_NEWLINE = re.compile(r"[^\n]")


def _block_comment_end(text: str, start: int) -> int:
    """Index just past the comment opened by the `/-` at `start` (Lean skips the character after `/-`)."""
    depth, i = 1, start + 3
    while mark := _COMMENT_MARK.search(text, i):
        depth += 1 if mark.group() == "/-" else -1
        if depth == 0:
            return mark.end()
        i = mark.end()
    return len(text)


def lex(text: str) -> tuple[str, list[LexProblem]]:
    """(code view, problems) of Lean 4 source `text`; see the module docstring."""
    pieces, problems, last, i, n = [], [], 0, 0, len(text)
    while found := _NEXT.search(text, i):
        start, token = found.start(), found.group()
        if token == "--":
            end = text.find("\n", start)
            end = n if end < 0 else end
        elif token == "/-":
            end = _block_comment_end(text, start)
        elif token[0] == "r":
            if not _in_identifier(text, start):
                problems.append(LexProblem(start, "a raw string literal"))
            i = start + 1
            continue
        elif token == '"':
            stop = _STRING_STOP.search(text, start + 1)
            if stop is None:
                problems.append(LexProblem(start, "an unterminated string literal"))
            elif stop.group() != '"':
                problems.append(LexProblem(start, f"a string literal containing {stop.group()!r}"))
            end = n if stop is None else stop.end()
        elif not _in_identifier(text, start) and (literal := _CHAR_LITERAL.match(text, start)):
            end = literal.end()
        else:  # a `'` inside an identifier such as `h'`
            i = start + 1
            continue
        pieces += [text[last:start], _NOT_NEWLINE.sub(" ", text[start:end])]
        last = i = end
    pieces.append(text[last:])
    return "".join(pieces), problems


def code_view(text: str) -> str:
    """`text` with comments and literals blanked (same length, same line breaks)."""
    return lex(text)[0]


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
