"""From a model's text to the Lean source to verify: the last lean4 code block, cleaned.

Rules, in order: `<think>...</think>` sections are dropped; the last ```` ```lean4 ```` (or ```` ```lean ````)
block is taken, an unterminated one running to the end of the text (a truncated completion still gets
Lean's errors as feedback); failing that the last fenced block of any language; failing that the whole
text. Header lines (the problem's own, and any `import`) are removed, and the statement is put back in
front when the model wrote only the proof.
"""

from __future__ import annotations

import re

from fd_jax.verification import ProofTask

_FENCE_OPEN = re.compile(r"```([A-Za-z0-9_+-]*)[^\n]*\n")
_DECLARATION = re.compile(r"^\s*(?:theorem|lemma)\s+([^\s({\[:]+)", re.MULTILINE)


def strip_think(text: str) -> str:
    """Drop reasoning: closed `<think>...</think>` pairs, anything before a stray `</think>` (the prompt
    opened it), and everything from an unclosed `<think>` on (the model never finished thinking)."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block; the last one may be unterminated."""
    blocks = []
    pos = 0
    while True:
        opening = _FENCE_OPEN.search(text, pos)
        if opening is None:
            return blocks
        close = text.find("```", opening.end())
        end = len(text) if close < 0 else close
        blocks.append((opening.group(1).lower(), text[opening.end() : end]))
        if close < 0:
            return blocks
        pos = close + 3


def last_code_block(text: str) -> str | None:
    """Body of the last lean4/lean block, else of the last fenced block, else None."""
    blocks = _fenced_blocks(text)
    lean = [body for language, body in blocks if language in ("lean4", "lean")]
    if lean:
        return lean[-1]
    return blocks[-1][1] if blocks else None


def remove_header_lines(code: str, header: str | None) -> str:
    """Remove `import` lines and lines equal (modulo surrounding spaces) to a line of `header`."""
    header_lines = {line.strip() for line in (header or "").splitlines() if line.strip()}
    kept = [
        line
        for line in code.splitlines(keepends=True)
        if not (line.strip() in header_lines or line.lstrip().startswith("import "))
    ]
    return "".join(kept).lstrip("\n")


def _squash(text: str) -> str:
    return " ".join(text.split())


def contains_statement(code: str, statement: str) -> bool:
    """True when `code` states the theorem itself: the statement verbatim up to whitespace (without its
    trailing `:= by`), or a declaration of the same name (a changed statement is the verifier's to judge)."""
    core = re.sub(r":=\s*(by)?\s*$", "", statement.strip())
    if _squash(core) in _squash(code):
        return True
    name = _DECLARATION.search(statement)
    if name is None:
        return False
    return re.search(rf"(?:theorem|lemma)\s+{re.escape(name.group(1))}(?![^\s({{\[:])", code) is not None


def attach_statement(code: str, statement: str) -> str:
    """`statement` followed by `code` used as its proof body (indented by two spaces when flush left)."""
    body = code.strip("\n")
    if re.search(r":=\s*by\s*$", statement):
        body = re.sub(r"^\s*(:=\s*)?by\b[ \t]*\n?", "", body)
    lines = body.splitlines()
    if lines and min((len(l) - len(l.lstrip()) for l in lines if l.strip()), default=0) == 0:
        body = "\n".join("  " + l if l.strip() else l for l in lines)
    return statement.rstrip("\n") + "\n" + body + "\n"


def extract_lean_code(text: str, statement: str, header: str | None = None) -> str:
    """The Lean source to verify from model text (see the module docstring for the rules)."""
    text = strip_think(text)
    block = last_code_block(text)
    code = remove_header_lines(block if block is not None else text.strip(), header)
    if not contains_statement(code, statement):
        code = attach_statement(code, statement)
    return code


def extract_proof_task(text: str, statement: str, header: str | None = None, id: str = "") -> ProofTask:
    """`extract_lean_code` wrapped in the `ProofTask` that the verifiers take."""
    return ProofTask(statement=statement, code=extract_lean_code(text, statement, header), header=header, id=id)
