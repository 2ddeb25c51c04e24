"""Proof hygiene: default-deny screening of model output before Lean sees it.

A model under RL finds every hole that yields reward, so `screen(statement, code)` returns the reason to
reject the code (None when it passes). The code is split into tokens by `lexer.py` (Lean's own lexical
rules; comments and literals are not code) and then into top-level commands: a command starts at a token
that begins a line with no indentation; every indented line continues the command above it. Only the
commands below are accepted; anything else is rejected with its line and name.

Accepted grammar (`IDS` is one or more identifiers; `OPT` an option in `ALLOWED_OPTIONS` with a number or
`true`/`false` value; `ATTRS` attributes in `INERT_ATTRIBUTES`):

    file      := import* command*                      -- imports only at the top (the verifier drops them)
    command   := helper | set_option OPT VALUE | open [scoped] IDS | block | statement
    helper    := (set_option OPT VALUE in | open [scoped] IDS in)* [@[ATTRS]] [private|protected|noncomputable]*
                 (theorem | lemma | def | abbrev | structure | inductive | example) ...
    block     := (section [ID] | noncomputable section | namespace ID) command* end [ID]   -- closed before
                 the statement; inside a block `open` may name any namespace (it ends with the block)
    statement := (set_option OPT VALUE in)* STATEMENT proof

Top-level `open` outside blocks may only name namespaces the header opens (`open Real`, `open scoped
BigOperators`). After the statement only helpers may follow (nothing that opens a scope or reuses its
name). The statement is matched on tokens, not whitespace: whitespace may be added or removed where Lean
reads the same tokens (`(h : x = 1):`, `:=by`), never inside an identifier or between two symbols. A
statement that ends in `:= by` may also be proved by a term (`:= rfl`).

Inside every command body (helper bodies and the proof) tokens are banned by class:
* every command keyword (`theorem`, `def`, `instance`, `axiom`, `namespace`, `end`, `variable`,
  `variable?`, `include`, `omit`, `attribute`, `export`, `notation`, `macro`, `elab`, `syntax`,
  `initialize`, `local`, `scoped`, `private`, `protected`, `sudo`, `unseal`, ...): a body may not start
  a new command; `open IDS in` and `set_option OPT VALUE in` are the only forms of those two allowed;
* anything that admits a goal or trusts something other than the kernel: `sorry`, `admit`, `stop`,
  `sorryAx`, `native_decide` and the `ofReduceBool` family (unless `allow_native_decide`), `decide
  +native`, `implemented_by`, `extern`, `unsafe`, `run_tac`, `by_elab`, ...;
* every identifier ending in `?` (`exact?`, `apply?`, `rw?`, `hint?`: search tactics that can close goals
  with sorry on some versions);
* every `#` command (`#exit`, `#eval`, `#guard_msgs`, `#print`), attributes `@[...]` (other than before a
  helper), and all options outside `ALLOWED_OPTIONS` (`warn.sorry`, Mathlib's `suppressSorry`,
  `debug.skipKernelTC`, `autoImplicit`, ...);
* an `open ... in` / `set_option ... in` that ends a declaration (Lean would apply it to the next command),
  and a doc comment `/--` / `/-!` anywhere but before a command (for Lean it ends the declaration).
Helper declarations must not be named like the statement, and no helper's last name component may equal
an identifier of the statement (a new constant could overload a name the statement uses).

What a pass guarantees, together with a Lean answer with no error and no sorry and the axiom audit
(`protocol.audit_verdict`: `#print axioms _root_.NAME` names exactly NAME, with standard axioms only):
the code contains the given statement as a top-level declaration of its own, outside any namespace or
section, with no modifier other than `set_option ... in` (allowed options), elaborated after only helper
declarations, allowed options and the header's own `open`s, so it means what it means under the header;
its proof uses only the kernel, the standard axioms and the helpers, none of which could admit a goal
without the audit seeing `sorryAx`. Not guaranteed: soundness of Lean, Mathlib or the REPL themselves.

Adding a command or an option for your Lean version: see docs/usage.md ("Lean screen allow-list"); the
lists are `HELPER_KEYWORDS`, `INERT_ATTRIBUTES`, `ALLOWED_OPTIONS` / `ALLOWED_OPTION_PREFIXES` and
`BODY_BANNED` below: module-level sets and a dict, read at every call, so a user extends them in place
(`from fd_jax.lean.screen import ALLOWED_OPTIONS; ALLOWED_OPTIONS.add(...)`).
"""

from __future__ import annotations

import functools
import re

from fd_jax.lean.lexer import Token, line_of, tokenize

# The one Lean header of the package: the verifiers' default and the header given to problems without one
# (fd_jax.data.problems). It is miniF2F's (all 488 rows of ../shared/data/minif2f.jsonl) and the one the
# recorded Kimina Lean Workbook checks used (50 of the 51 inputs of kimina_match): `maxHeartbeats 0` lifts
# Lean's deterministic limit, as in every published miniF2F number; the verifiers' wall-clock `timeout_s`
# bounds each proof instead. A limit of 400000 would fail honest proofs those numbers count as solved.
DEFAULT_HEADER = (
    "import Mathlib\nimport Aesop\n\n"
    "set_option maxHeartbeats 0\n\n"
    "open BigOperators Real Nat Topology Rat\n\n"
)

# Declarations allowed as helpers (before or after the statement), and their allowed modifiers.
HELPER_KEYWORDS = {"theorem", "lemma", "def", "abbrev", "structure", "inductive", "example"}
HELPER_MODIFIERS = {"private", "protected", "noncomputable"}
# Attributes with no effect on what is proved (others can register elaborators, tactics, instances,
# simprocs or compiler overrides such as `csimp`, which hides sorryAx behind ofReduceBool). `local` is the
# attribute kind of `@[local simp]` (the name after it is checked too); `scoped` is not allowed.
INERT_ATTRIBUTES = set(
    {
        "simp", "simps", "reducible", "irreducible", "semireducible", "inline", "noinline", "specialize",
        "ext", "norm_cast", "push_cast", "mono", "gcongr", "nolint", "elab_as_elim", "refl", "symm", "trans",
        "congr", "field_simps", "to_additive", "continuity", "measurability", "fun_prop", "bound", "local",
    }
)  # fmt: skip
# Options that only tune resources or output. Everything else is refused (`warn.sorry`, `suppressSorry`,
# `debug.*`, `autoImplicit`, `trace.*`, ...).
ALLOWED_OPTIONS = set(
    {
        "maxHeartbeats", "maxRecDepth", "synthInstance.maxHeartbeats", "synthInstance.maxSize",
        "exponentiation.threshold", "diagnostics", "diagnostics.threshold",
    }
)  # fmt: skip
ALLOWED_OPTION_PREFIXES = ("linter.", "pp.")
# Identifiers that may never appear in a body (see the module docstring). Matched on the whole identifier
# and on its last component (`Lean.ofReduceBool`, `_root_.sorryAx`).
_SORRY = "admits a goal (the proof would use sorry)"
_CMD = "starts a command: a proof may not contain one"
_TRUST = "bypasses the kernel"
_NATIVE = "trusts the compiler (set allow_native_decide to permit it)"
BODY_BANNED: dict[str, str] = {
    **{word: _SORRY for word in ("sorry", "admit", "stop", "sorryAx", "sorry_if_sorry", "checkedSorry")},
    **{word: _TRUST for word in ("unsafe", "implemented_by", "extern", "opaque", "axiom", "axioms", "partial")},
    **{
        word: _CMD
        for word in (
            "theorem", "lemma", "def", "abbrev", "instance", "class", "structure", "inductive", "coinductive",
            "example", "mutual", "namespace", "section", "end", "variable", "variables", "universe",
            "include", "omit", "attribute", "export", "import", "local", "scoped", "private", "protected",
            "noncomputable", "nonrec", "deriving", "alias", "notation", "notation3", "infix", "infixl",
            "infixr", "prefix", "postfix", "macro", "macro_rules", "syntax", "declare_syntax_cat", "elab",
            "elab_rules", "binder_predicate", "unif_hint", "initialize", "builtin_initialize", "simproc",
            "dsimproc", "simproc_decl", "dsimproc_decl", "run_cmd", "run_elab", "run_meta", "run_tac",
            "by_elab", "sudo", "unseal", "seal", "irreducible_def", "proof_wanted", "add_decl_doc",
            "suppress_compilation", "unsuppress_compilation", "compile_inductive", "register_simp_attr",
            "initialize_simps_projections", "assert_not_exists", "library_note", "add_aesop_rules",
            "declare_aesop_rule_sets", "grind_pattern", "recall", "register_option", "declare_config_elab",
            "open_locale", "library_search",
        )
    },
}  # fmt: skip
# Families of command keywords (`builtin_simproc`, `register_label_attr`, `declare_aesop_rule_sets`, ...).
_COMMAND_PREFIXES = ("builtin_", "register_", "declare_", "initialize_", "run_")
_TERM_ELABORATORS = ("eval", "type_of", "by_elab", "elab", "decl_name", "run_elab")  # `eval% ...`
_NATIVE_NAMES = ("native_decide", "ofReduceBool", "ofReduceNat", "reduceBool", "reduceNat", "trustCompiler")


class _Reject(Exception):
    """Raised inside the screen with the reason (one line, starting with the line number)."""

    def __init__(self, code: str, token: Token | int | None, why: str):
        if token is None:
            super().__init__(why)
            return
        offset = token if isinstance(token, int) else token.start
        super().__init__(f"line {line_of(code, offset)}: {why}")


_IMPORT_LINE = re.compile(r"\s*import\s+(?:runtime\s+)?[^\s]+")


def leading_import_end(view: str) -> int:
    """Offset where the leading `import` lines of a code view end (0 if there are none)."""
    end = 0
    while match := _IMPORT_LINE.match(view, end):
        end = match.end()
    return end


def _glued(a: Token, b: Token) -> bool:
    """Whether the whitespace between tokens a and b matters to Lean (see `_same_tokens`)."""
    if a.kind == "symbol" and b.kind == "symbol":
        return True  # `<` `=` vs `<=`: the longest-match token may differ
    if a.text.endswith(".") or b.text.startswith("."):
        return True  # `h.1` vs `h .1`
    return a.kind == "ident" and b.kind == "symbol" and not a.text[-1].isascii()  # `ℝ≥0` is one token


def _same_tokens(given: tuple[Token, ...], code: tuple[Token, ...], at: int) -> bool:
    """True if `given` occurs in `code` from index `at`, token for token, glued where it matters."""
    if at + len(given) > len(code):
        return False
    for k, token in enumerate(given):
        other = code[at + k]
        if token.kind != other.kind or token.text != other.text:
            return False
        if k and _glued(given[k - 1], token) and token.spaced != other.spaced:
            return False
    return True


@functools.lru_cache(maxsize=4096)  # a statement is screened once per sampled proof
def _statement_tokens(statement: str) -> tuple[Token, ...]:
    return tokenize(statement)[0]


@functools.lru_cache(maxsize=4096)
def theorem_name(statement: str) -> str | None:
    """The declared name in `theorem NAME ...` / `lemma NAME ...` (without universe parameters), or None."""
    tokens = _statement_tokens(statement)
    if len(tokens) >= 2 and tokens[0].text in ("theorem", "lemma") and tokens[1].kind == "ident":
        return tokens[1].text.removeprefix("_root_.")
    return None


def statement_span(statement: str, code: str) -> tuple[int, int] | None:
    """(start, end) offsets of the statement's first occurrence as code in `code` (token for token), or None."""
    given, tokens = _statement_tokens(statement), tokenize(code)[0]
    for at in range(len(tokens)):
        if given and _same_tokens(given, tokens, at):
            return tokens[at].start, tokens[at + len(given) - 1].end
    return None


@functools.lru_cache(maxsize=64)
def _header_opens(header: str) -> frozenset[str]:
    """The namespaces the header's top-level `open` commands open."""
    tokens, opened = tokenize(header)[0], set()
    for k, token in enumerate(tokens):
        if token.text == "open" and token.line_start:
            j = k + 1
            while j < len(tokens) and tokens[j].kind == "ident" and not tokens[j].line_start:
                opened.add(tokens[j].text)
                j += 1
    return frozenset(opened - {"scoped", "in"})


def _commands(tokens: tuple[Token, ...], code: str) -> list[list[Token]]:
    """Tokens grouped into top-level commands: a command starts at a line's first token when the line has
    no indentation (nothing before it on the line in the original text)."""
    commands: list[list[Token]] = []
    for token in tokens:
        starts = token.line_start and code[code.rfind("\n", 0, token.start) + 1] not in (" ", "\t")
        if starts or not commands:
            commands.append([])
        commands[-1].append(token)
    # A modifier on a line of its own (`set_option ... in`, `open ... in`, `@[simp]`) belongs to the next command.
    # A line starting with `|`, `where`, `termination_by` or `decreasing_by` continues the declaration above
    # (match alternatives and clauses written at column 0); no command starts with them.
    merged: list[list[Token]] = []
    for command in commands:
        continues = command[0].text in ("|", "where", "termination_by", "decreasing_by")
        if merged and (_is_prefix(merged[-1]) or continues):
            merged[-1] = merged[-1] + command
        else:
            merged.append(command)
    return merged


def _is_prefix(command: list[Token]) -> bool:
    """True if `command` is only a modifier: `set_option ... in`, `open ... in` or one attribute list `@[...]`."""
    if command[0].text in ("set_option", "open") and command[-1].text == "in":
        return True
    if command[0].text != "@" or len(command) < 2 or command[1].text != "[":
        return False
    depth = 0
    for k, token in enumerate(command[1:], 1):
        depth += {"[": 1, "]": -1}.get(token.text, 0)
        if depth == 0:
            return k == len(command) - 1
    return False


class _Screen:
    def __init__(self, statement: str, code: str, header: str, allow_native_decide: bool):
        self.code = code
        self.given = _statement_tokens(statement)
        self.name = theorem_name(statement)
        self.header_opens = _header_opens(header)
        self.banned = dict(BODY_BANNED)
        if not allow_native_decide:
            self.banned.update({word: _NATIVE for word in _NATIVE_NAMES})
        self.native_ok = allow_native_decide
        # Identifier components the statement uses: a helper must not be named like one of them.
        self.statement_words = {part for t in self.given if t.kind == "ident" for part in t.text.split(".")}

    def reject(self, token: Token | int, why: str) -> _Reject:
        return _Reject(self.code, token, why)

    # --- pieces of commands ---

    def option(self, tokens: list[Token], k: int) -> int:
        """Check `set_option OPT VALUE` at tokens[k] (the `set_option`); return the index after VALUE."""
        if k + 2 >= len(tokens) or tokens[k + 1].kind != "ident":
            raise self.reject(tokens[k], "`set_option` needs an option name and a value")
        option, value = tokens[k + 1].text, tokens[k + 2]
        if option not in ALLOWED_OPTIONS and not option.startswith(ALLOWED_OPTION_PREFIXES):
            raise self.reject(tokens[k], f"`set_option {option}` is not in the allow-list of options")
        if value.kind != "number" and value.text not in ("true", "false"):
            raise self.reject(value, f"`set_option {option}` takes a number or true/false, got `{value.text}`")
        return k + 3

    def open_names(self, tokens: list[Token], k: int) -> tuple[list[str], int]:
        """The namespaces of `open [scoped] IDS` at tokens[k] (the `open`) and the index after them."""
        j = k + 1
        if j < len(tokens) and tokens[j].text == "scoped":
            j += 1
        names = []
        while j < len(tokens) and tokens[j].kind == "ident" and tokens[j].text not in ("in", "scoped"):
            names.append(tokens[j].text)
            j += 1
        if not names:
            raise self.reject(tokens[k], "`open` must name namespaces (`open X Y`, `open scoped X`)")
        return names, j

    def attributes(self, tokens: list[Token], k: int) -> int:
        """Check `@[ATTRS]` at tokens[k] (the `@`); return the index after `]`."""
        if k + 1 >= len(tokens) or tokens[k + 1].text != "[" or tokens[k + 1].spaced:
            raise self.reject(tokens[k], "`@` outside an attribute list `@[...]`")
        j, depth, entry_start = k + 2, 1, True
        while j < len(tokens) and depth:
            token = tokens[j]
            if entry_start and depth == 1 and token.kind != "ident":
                raise self.reject(token, f"an attribute must start with its name, not `{token.text}`")
            if token.text in ("[", "(", "{", "⟨"):
                depth += 1
            elif token.text in ("]", ")", "}", "⟩"):
                depth -= 1
            elif depth == 1 and token.text == ",":
                entry_start = True
                j += 1
                continue
            elif entry_start and depth == 1:
                if token.text not in INERT_ATTRIBUTES:
                    raise self.reject(token, f"attribute `{token.text}` is not in the allow-list of attributes")
                entry_start = token.text == "local"
            j += 1
        if depth:
            raise self.reject(tokens[k], "an attribute list that is not closed")
        return j

    def body(self, tokens: list[Token], k: int) -> None:
        """Ban by token class in tokens[k:] (a declaration's signature and body)."""
        j = k
        while j < len(tokens):
            token = tokens[j]
            text = token.text
            if token.kind == "ident":
                last = text.rsplit(".", 1)[-1]
                if text == "open":
                    _, after = self.open_names(tokens, j)
                    if after >= len(tokens) or tokens[after].text != "in":
                        raise self.reject(token, "`open` inside a declaration must be `open X in`")
                    self.not_last(tokens, after)
                    j = after + 1
                    continue
                if text == "set_option":
                    after = self.option(tokens, j)
                    if after >= len(tokens) or tokens[after].text != "in":
                        raise self.reject(token, "`set_option` inside a declaration must be `set_option ... in`")
                    self.not_last(tokens, after)
                    j = after + 1
                    continue
                for word in (text, last):
                    if word in self.banned:
                        raise self.reject(token, f"`{text}` {self.banned[word]}")
                if text.startswith(_COMMAND_PREFIXES):
                    raise self.reject(token, f"`{text}` {_CMD}")
                if text.endswith("?"):
                    raise self.reject(token, f"`{text}`: search tactics (`...?`) can close goals with sorry")
                if text == "native" and j and tokens[j - 1].text in ("+", "-") and not self.native_ok:
                    raise self.reject(token, f"`+native` {_NATIVE}")
                if text == "native" and j + 1 < len(tokens) and tokens[j + 1].text == ":=" and not self.native_ok:
                    raise self.reject(token, f"`native := ...` {_NATIVE}")
            elif token.kind == "symbol":
                glued = j + 1 < len(tokens) and tokens[j + 1].kind == "ident" and not tokens[j + 1].spaced
                if glued and text.endswith("#"):
                    raise self.reject(token, f"`#{tokens[j + 1].text}`: `#` commands are not allowed")
                if text.endswith("@") and j + 1 < len(tokens) and tokens[j + 1].text == "[":
                    if not tokens[j + 1].spaced:
                        raise self.reject(token, "attributes `@[...]` are not allowed inside a declaration")
                if text.startswith("%") and j and tokens[j - 1].text in _TERM_ELABORATORS and not token.spaced:
                    raise self.reject(token, f"`{tokens[j - 1].text}{text}`: term elaborators are not allowed")
            j += 1

    def not_last(self, tokens: list[Token], k: int) -> None:
        """An `in` (tokens[k]) that ends a declaration would make Lean apply `open ... in` / `set_option ...
        in` to the next command (the statement, say), while this screen read it as part of the body."""
        if k + 1 >= len(tokens):
            raise self.reject(tokens[k], "`... in` at the end of a declaration would modify the next command")

    def helper(self, command: list[Token], k: int, namespace: list[str], after_statement: bool) -> None:
        """A helper declaration whose keyword is command[k]."""
        keyword = command[k]
        if keyword.text != "example":
            if k + 1 >= len(command) or command[k + 1].kind != "ident":
                raise self.reject(keyword, f"`{keyword.text}` needs a name")
            declared = command[k + 1].text
            full = declared.removeprefix("_root_.") if declared.startswith("_root_.") else ".".join(
                [*namespace, declared]
            )
            if self.name is not None and full == self.name:
                why = "is declared again" if after_statement else (
                    "is declared, but not by the given statement (compared token for token) on its own")
                raise self.reject(command[k + 1], f"the theorem name `{self.name}` {why}")
            if declared.rsplit(".", 1)[-1] in self.statement_words:
                raise self.reject(command[k + 1], f"a helper named `{declared}` could overload a name the "
                                  "statement uses")  # fmt: skip
        self.body(command, k + 1)

    # --- the file ---

    def modifiers(self, command: list[Token]) -> tuple[int, bool]:
        """Skip `set_option ... in` / `open ... in` modifiers; (index of what follows, whether `open ... in`
        was among them)."""
        k, opened = 0, False
        while k < len(command):
            if command[k].text == "set_option":
                after = self.option(command, k)
            elif command[k].text == "open":
                _, after = self.open_names(command, k)
            else:
                return k, opened
            if after < len(command) and command[after].text == "in":
                opened = opened or command[k].text == "open"
                k = after + 1
            elif after == len(command):
                return k, opened  # a plain command, not a modifier
            else:
                raise self.reject(command[after], f"unexpected `{command[after].text}` after `{command[k].text}`")
        return k, opened

    def run(self, tokens: tuple[Token, ...], docs: tuple[tuple[int, int], ...] = ()) -> None:
        if not self.given:
            raise _Reject("", None, "the statement is empty")
        if self.name is None:
            raise _Reject("", None, "the statement must be `theorem NAME ...` or `lemma NAME ...`")
        commands = _commands(tokens, self.code)
        self.doc_comments(tokens, docs, commands)
        while commands and commands[0][0].text == "import":
            if len(commands[0]) != 2 or commands[0][1].kind != "ident":
                raise self.reject(commands[0][0], "`import` takes one module name")
            commands.pop(0)
        blocks: list[tuple[str, str]] = []  # (kind, name) of open sections / namespaces
        seen = False
        for command in commands:
            if not seen and self.is_statement(command):
                if blocks:
                    raise self.reject(command[0], f"the statement is inside `{blocks[-1][0]} {blocks[-1][1]}`; "
                                      "close it before the statement")  # fmt: skip
                seen = True
                continue
            self.command(command, blocks, after_statement=seen)
        if not seen:
            raise _Reject("", None, "the code does not contain the given statement as a top-level command "
                          "(matched token for token, outside comments and strings)")  # fmt: skip
        if blocks:
            raise self.reject(len(self.code), f"`{blocks[-1][0]} {blocks[-1][1]}` is never closed")

    def doc_comments(self, tokens: tuple[Token, ...], docs: tuple[tuple[int, int], ...], commands) -> None:
        """A doc comment (`/--`, `/-!`) is a token for Lean: inside a term or a proof it ends the command, and
        Lean reads what follows as a new one. So one may only stand before a command (or at the end)."""
        starts = {command[0].start for command in commands}
        for start, end in docs:
            following = next((t for t in tokens if t.start >= end), None)
            if following is not None and following.start not in starts:
                raise self.reject(start, "a doc comment (`/--`, `/-!`) inside a declaration would end it for Lean")

    def is_statement(self, command: list[Token]) -> bool:
        """True if `command` is the statement (after `set_option ... in` modifiers); checks its proof."""
        k = 0
        while k < len(command) and command[k].text == "set_option":
            k = self.option(command, k)
            if k >= len(command) or command[k].text != "in":
                return False
            k += 1
        given = self.given
        if given[-1].text == "by" and len(given) >= 2 and given[-2].text == ":=":
            given = given[:-1]  # a term proof (`:= rfl`) is as good as a tactic one
        if not _same_tokens(given, tuple(command), k):
            return False
        rest = k + len(given)
        if given[-1].text != ":=" and (rest >= len(command) or command[rest].text not in (":=", "|", "where")):
            raise self.reject(command[rest - 1], "the statement is extended beyond the given text")
        self.body(command, rest)
        return True

    def command(self, command: list[Token], blocks: list[tuple[str, str]], *, after_statement: bool) -> None:
        head = command[0]
        if head.text == "import":
            raise self.reject(head, "`import` is only allowed at the top of the file")
        k, opened = self.modifiers(command)
        if k < len(command) and command[k].text in ("set_option", "open") and not opened and k == 0:
            if after_statement:
                raise self.reject(head, f"`{head.text}` after the statement")
            if head.text == "set_option":
                if self.option(command, 0) != len(command):
                    raise self.reject(head, "`set_option` takes one option and one value")
                return
            names, after = self.open_names(command, 0)
            if after != len(command):
                raise self.reject(command[after], "only `open X Y` and `open scoped X` are allowed")
            if not blocks and (foreign := [n for n in names if n not in self.header_opens]):
                raise self.reject(head, f"`open {' '.join(foreign)}` before the statement (only namespaces the "
                                  "header opens may be opened outside a section; use `open ... in`)")  # fmt: skip
            return
        if k >= len(command):
            raise self.reject(head, "a modifier without a command")
        if k == 0 and head.text in ("section", "namespace", "end") or command[:2] and [
            t.text for t in command[:2]
        ] == ["noncomputable", "section"]:
            self.block(command, blocks, after_statement=after_statement)
            return
        if command[k].kind == "symbol" and command[k].text.endswith("#") and k + 1 < len(command):
            raise self.reject(command[k], f"`#{command[k + 1].text}`: `#` commands are not allowed")
        if command[k].kind == "symbol" and command[k].text == "@":
            k = self.attributes(command, k)
        while k < len(command) and command[k].text in HELPER_MODIFIERS:
            k += 1
        if k < len(command) and command[k].text in HELPER_KEYWORDS:
            self.helper(command, k, [name for kind, name in blocks if kind == "namespace"], after_statement)
            return
        what = command[k].text if k < len(command) else head.text
        raise self.reject(command[min(k, len(command) - 1)], f"the command `{what}` is not in the allow-list "
                          "(see docs/usage.md, \"Lean screen allow-list\")")  # fmt: skip

    def block(self, command: list[Token], blocks: list[tuple[str, str]], *, after_statement: bool) -> None:
        texts = [t.text for t in command]
        if texts[0] == "end":
            name = ".".join(texts[1:])
            if not blocks or blocks[-1][1] != name or len(texts) > 2:
                raise self.reject(command[0], f"`end {name}` does not close the innermost section / namespace")
            blocks.pop()
            return
        if after_statement:
            raise self.reject(command[0], f"`{' '.join(texts[:2])}` after the statement")
        if texts[0] == "noncomputable":
            texts = texts[1:]
        kind, names = texts[0], texts[1:]
        if len(names) > 1 or (kind == "namespace" and not names) or any(t.kind != "ident" for t in command[1:]):
            raise self.reject(command[0], f"`{kind}` takes at most one name")
        blocks.append((kind, names[0] if names else ""))


def screen(
    statement: str, code: str, *, allow_native_decide: bool = False, header: str = DEFAULT_HEADER
) -> str | None:
    """Why `code` must not be sent to Lean as a proof of `statement`, or None if it may be.

    statement: the theorem as given (e.g. miniF2F's `formal_statement`, `theorem NAME ... := by`).
    code: the model's complete Lean source, statement included, header excluded (leading `import` lines
      are tolerated; the verifier strips them).
    allow_native_decide: permit `native_decide` and friends (they trust the compiler, not the kernel).
    header: the header the verifier will run first; top-level `open`s must name namespaces it opens.
    Returns a one-line, human-readable reason starting with the line number where it applies, if any.
    See the module docstring for the accepted grammar and exactly what a pass guarantees.
    """
    if not isinstance(statement, str) or not isinstance(code, str) or not isinstance(header, str):
        return f"statement and code must be strings, got {type(statement).__name__} and {type(code).__name__}"
    tokens, problems, _, docs = tokenize(code)
    if problems:
        first = problems[0]
        return f"line {line_of(code, first.offset)}: {first.what} is not allowed in proofs"
    statement_problems = tokenize(statement)[1]
    if statement_problems:
        return f"the statement has {statement_problems[0].what}; it cannot be matched safely"
    try:
        _Screen(statement, code, header, allow_native_decide).run(tokens, docs)
    except _Reject as reject:
        return str(reject)
    return None
