"""fd_jax.cli: a user's error ends a script with one line and exit status 2; a bug keeps its traceback."""

from __future__ import annotations

import pytest

from fd_jax.cli import UsageError, run_reporting_user_errors
from fd_jax.config.errors import ConfigError
from fd_jax.data.problems import ProblemFormatError


@pytest.mark.parametrize("error, line", [
    (ConfigError("config.total_steps = 0: must be an integer >= 1"),
     "prog: config error: config.total_steps = 0: must be an integer >= 1"),
    (ProblemFormatError("p.jsonl:2: not valid JSON (Expecting ',' delimiter at column 32)"),
     "prog: error: p.jsonl:2: not valid JSON (Expecting ',' delimiter at column 32)"),
    (UsageError("--k 8 is larger than --n 4:\npass@k needs n >= k"), "prog: error: --k 8 is larger than --n 4: pass@k needs n >= k"),
])
def test_user_errors_are_one_line_and_exit_2(error, line, capsys):
    def action():
        raise error

    with pytest.raises(SystemExit) as exit_:
        run_reporting_user_errors(action, "prog", debug=False)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == line + "\n"
    with pytest.raises(type(error)):  # --debug: the exception itself, with its traceback
        run_reporting_user_errors(action, "prog", debug=True)


def test_bugs_keep_their_traceback():
    def action():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_reporting_user_errors(action, "prog", debug=False)
    assert run_reporting_user_errors(lambda: 7, "prog", debug=False) == 7
