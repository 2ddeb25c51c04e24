"""Train a Lean prover (or the arithmetic test bed) with FD, GRPO or FD→GRPO.

    python scripts/train_tpu.py --config configs/smoke_cpu.py --workdir runs/smoke
    python scripts/train_tpu.py --config configs/kimina_rl_1p7b_tpu.py --workdir runs/kimina \
        --config.total_steps=500 --config.rollout.num_generations=16

`--config` defaults to configs/smoke_cpu.py; any field can be overridden with `--config.FIELD=VALUE`.
Running again on a workdir that has checkpoints resumes after the latest one. SIGTERM / SIGINT save a
checkpoint at the end of the current step and exit 0. See docs/usage.md.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

DEFAULT_CONFIG = REPO_ROOT / "configs" / "smoke_cpu.py"


def _config_path(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return str(DEFAULT_CONFIG)


def _explain(argv: list[str]) -> str | None:
    """Why config_flags failed, in terms of the user's arguments: a missing file, or an unknown field."""
    path = _config_path(argv).split(":", 1)[0]
    if not pathlib.Path(path).is_file():
        return None
    spec = importlib.util.spec_from_file_location("fd_jax_user_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        field = arg[len("--config."):].split("=", 1)[0]
        node, parts = config, field.split(".")
        for depth, key in enumerate(parts):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if key not in keys:
                parent = ".".join(["config", *parts[:depth]])
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f"; did you mean {parent}.{close[0]}?" if close else f"; fields of {parent}: {sorted(keys)}"
                return f"--config.{field}: {parent} has no field {key!r}{hint}"
            node = node[key]
    return None


def _fail_clearly(action):
    """Runs `action` (config_flags loading the file and applying the overrides); on failure, exits with
    the reason in terms of the command line instead of config_flags' traceback."""
    try:
        return action()
    except Exception:
        reason = _explain(sys.argv[1:])
        if reason is None:
            raise
        sys.exit(f"config error: {reason}")


# config_flags applies the overrides to the default config at definition time, and again to a --config
# file while parsing the flags (`_parse` below).
_CONFIG = _fail_clearly(lambda: config_flags.DEFINE_config_file(
    "config", default=str(DEFAULT_CONFIG), help_string="an ml_collections config file (configs/*.py)",
    lock_config=True))
_WORKDIR = flags.DEFINE_string("workdir", None, "the run's directory (created; resumed when it has checkpoints)")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]} (fields are set with --config.FIELD=VALUE)")
    logging.getLogger().setLevel(logging.WARNING)  # orbax and jax log every save at INFO
    logging.getLogger("fd_jax").setLevel(logging.INFO)
    from fd_jax.config.errors import ConfigError
    from fd_jax.train.loop import train

    try:
        result = train(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    print(f"{result['status']} at step {result['step']}: {result['workdir']}")
    return 0


def _parse(argv: list[str]) -> list[str]:
    path = _config_path(argv[1:]).split(":", 1)[0]
    if not pathlib.Path(path).is_file():  # config_flags would only fail at the first field access
        sys.exit(f"config error: --config {path}: no such config file (see configs/*.py)")
    return _fail_clearly(lambda: flags.FLAGS(argv))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
