"""How the scripts end on a mistake: a user's error is one line on stderr and a non-zero exit; a bug keeps
its traceback. `--debug` shows the traceback of a user's error too.

A user's error is one of `user_errors()`: a config value that cannot work (`ConfigError`, which includes
`WorkdirError`), a malformed problem file (`ProblemFormatError`, naming file, line and column), or a
`UsageError` raised by a script for its own arguments.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

DEBUG_FLAG = "--debug"
EXIT_USER_ERROR = 2  # as argparse exits on a bad argument


class UsageError(ValueError):
    """A script argument that cannot work; the message names the argument, its value and the fix."""


def user_errors() -> tuple[type[BaseException], ...]:
    from fd_jax.config.errors import ConfigError
    from fd_jax.data.problems import ProblemFormatError

    return (ConfigError, ProblemFormatError, UsageError)


def wants_debug(argv: list[str] | None = None) -> bool:
    """Whether the command line asks for tracebacks (looked up directly: errors can come before parsing)."""
    argv = sys.argv[1:] if argv is None else argv
    return any(arg in (DEBUG_FLAG, f"{DEBUG_FLAG}=true", f"{DEBUG_FLAG}=True") for arg in argv)


def fail(prog: str, kind: str, message: str) -> NoReturn:
    """Prints `prog: kind: message` as one line (newlines in the message folded) and exits non-zero."""
    text = " ".join(str(message).split("\n")).strip()
    print(f"{prog}: {kind}: {text}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run_reporting_user_errors(action: Callable[[], Any], prog: str, *, debug: bool | None = None) -> Any:
    """`action()`; a user's error ends the process with one line (see `fail`), unless debugging."""
    try:
        return action()
    except user_errors() as e:
        if wants_debug() if debug is None else debug:
            raise
        fail(prog, _kind(e), str(e))


def _kind(error: BaseException) -> str:
    from fd_jax.config.errors import ConfigError
    from fd_jax.train.workdir import WorkdirError

    if isinstance(error, WorkdirError):
        return "workdir error"
    if isinstance(error, ConfigError):
        return "config error"
    return "error"
