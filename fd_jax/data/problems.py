"""Problem sets: miniF2F-style JSONL, Lean Workbook JSON / JSONL / Parquet, any JSONL with a field map.

Every loader returns `Problem` records. A row that lacks a required field, or a line that is not JSON,
raises `ProblemFormatError` naming the file, the line (or row) and the field, so a user can fix the file or
the field map.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

# Lean Workbook statements are written for Lean 4.8-era Mathlib and come without a header of their own; they
# get the verifiers' header, the one every miniF2F row carries (one definition, in fd_jax.lean.screen).
from fd_jax.lean.screen import DEFAULT_HEADER


class ProblemFormatError(ValueError):
    """A problem file that cannot be read: the message names the file, the line or row, and the field."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One theorem (or arithmetic question) to prove.

    id: a stable name (miniF2F `name`, Lean Workbook `id`), used in logs and the rollout JSONL.
    statement: the formal statement the model must prove, ending with `:= by\n` for Lean problems.
    header: the `import`/`open`/`set_option` lines it needs ("" when the verifier's default applies).
    informal: the natural-language statement, possibly empty.
    split: the split the source file assigns (`valid`, `test`, ...), "" when it has none.
    """

    id: str
    statement: str
    header: str = ""
    informal: str = ""
    split: str = ""


# Problem field -> source field. `id` and `statement` are required; the rest default to "".
MINIF2F_FIELDS = {
    "id": "name",
    "statement": "formal_statement",
    "header": "header",
    "informal": "informal_prefix",
    "split": "split",
}
LEAN_WORKBOOK_FIELDS = {
    "id": "id",
    "statement": "formal_statement",
    "informal": "natural_language_statement",
    "split": "split",
}
REQUIRED_FIELDS = ("id", "statement")

_TRAILING_SORRY = re.compile(r"(:=\s*by)\s*sorry\s*$")


def normalize_statement(statement: str) -> str:
    """The statement as the model should continue it: a trailing `:= by sorry` becomes `:= by\n`."""
    match = _TRAILING_SORRY.search(statement)
    if match:
        return statement[: match.start()] + match.group(1) + "\n"
    return statement


def problem_from_row(
    row: Mapping[str, Any],
    field_map: Mapping[str, str],
    *,
    where: str,
    default_header: str = "",
) -> Problem:
    """Build a `Problem` from one source row.

    field_map: Problem field -> source field name; fields absent from the map default to "".
    where: "file:line" (or "file row N") for error messages.
    Raises ProblemFormatError when the row is not an object or a required field is missing or not a string.
    """
    if not isinstance(row, Mapping):
        raise ProblemFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    unknown = set(field_map) - {f.name for f in dataclasses.fields(Problem)}
    if unknown:
        raise ProblemFormatError(
            f"field_map names unknown Problem fields {sorted(unknown)}; valid ones: "
            f"{[f.name for f in dataclasses.fields(Problem)]}"
        )
    values: dict[str, str] = {}
    for name, source in field_map.items():
        value = row.get(source)
        if value is None:
            if name in REQUIRED_FIELDS:
                raise ProblemFormatError(
                    f"{where}: missing field {source!r} (needed for Problem.{name}); the row has fields "
                    f"{sorted(row)}. Map another field with field_map={{{name!r}: 'FIELD'}}."
                )
            continue
        if name == "id" and isinstance(value, int):
            value = str(value)
        if not isinstance(value, str):
            raise ProblemFormatError(f"{where}: field {source!r} must be a string, got {type(value).__name__}")
        values[name] = value
    for name in REQUIRED_FIELDS:
        if name not in values:
            raise ProblemFormatError(f"{where}: field_map has no entry for the required field {name!r}")
    values["statement"] = normalize_statement(values["statement"])
    values.setdefault("header", default_header)
    return Problem(**values)


def _read_jsonl(path: pathlib.Path) -> Iterable[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                message = f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})"
                raise ProblemFormatError(message) from e


def _read_json_array(path: pathlib.Path) -> Iterable[tuple[str, Any]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ProblemFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(rows, list):
        raise ProblemFormatError(f"{path}: expected a JSON array of objects, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        yield f"{path} row {i}", row


def _read_parquet(path: pathlib.Path) -> Iterable[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq  # optional: only Parquet files need it
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from e
    for i, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path} row {i}", row


def _rows(path: pathlib.Path) -> Iterable[tuple[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"problem file {path} does not exist")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    if path.suffix == ".json":
        return _read_json_array(path)
    return _read_jsonl(path)


def load_jsonl(
    path: str | pathlib.Path,
    field_map: Mapping[str, str],
    *,
    split: str | None = None,
    default_header: str = "",
) -> list[Problem]:
    """Problems from a JSONL file (`.json`: a JSON array; `.parquet`: needs pyarrow) through `field_map`.

    field_map: Problem field -> source field, e.g. {"id": "name", "statement": "formal_statement"}.
    split: keep only rows whose mapped `split` equals it (None keeps all).
    Raises ProblemFormatError naming the file and line for bad JSON or missing fields, FileNotFoundError.
    """
    path = pathlib.Path(path)
    problems = [
        problem_from_row(row, field_map, where=where, default_header=default_header)
        for where, row in _rows(path)
    ]
    if split is not None:
        problems = [p for p in problems if p.split == split]
    return problems


def load_minif2f(path: str | pathlib.Path, *, split: str | None = None) -> list[Problem]:
    """miniF2F in DeepSeek-Prover's JSONL (fields name, split, informal_prefix, formal_statement, header)."""
    return load_jsonl(path, MINIF2F_FIELDS, split=split)


def load_lean_workbook(
    path: str | pathlib.Path, *, split: str | None = None, header: str = DEFAULT_HEADER
) -> list[Problem]:
    """Lean Workbook (JSON array, JSONL or Parquet); `:= by sorry` statements are opened to `:= by\n`."""
    return load_jsonl(path, LEAN_WORKBOOK_FIELDS, split=split, default_header=header)


LOADERS: dict[str, Callable[..., list[Problem]]] = {
    "minif2f": load_minif2f,
    "lean_workbook": load_lean_workbook,
    "jsonl": load_jsonl,
}


def load_problems(path: str | pathlib.Path, *, format: str = "minif2f", **options: Any) -> list[Problem]:
    """Dispatch to `LOADERS[format]` (minif2f | lean_workbook | jsonl, the last needs `field_map=`)."""
    if format not in LOADERS:
        raise ValueError(f"unknown problem format {format!r}; known: {sorted(LOADERS)}")
    return LOADERS[format](path, **options)
