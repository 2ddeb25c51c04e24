r"""Pre-flight check of a run's config: does the FD teacher know more than the student? One line, in minutes.

    python scripts/preflight.py --config configs/smollm2_arith_cpu.py --num_problems 16
    python scripts/preflight.py --config configs/smollm2_arith_cpu.py --config.rollout.context_placement=turns

Rolls out `--num_problems` training problems once with the config's first stage (its sampling, feedback and
teacher prompts), then scores a correct completion of each problem with and without the teacher's context
(`fd_jax.eval.preflight`). Prints the verdict line; `--json FILE` also writes the numbers. Exit status 0
either way (2 for a mistake in the command or the config).
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fd_jax import cli  # noqa: E402

PROG = pathlib.Path(__file__).name
_CONFIG = config_flags.DEFINE_config_file("config", default=str(REPO_ROOT / "configs" / "smoke_cpu.py"),
                                          help_string="an ml_collections config file (configs/*.py)",
                                          lock_config=True)
flags.DEFINE_integer("num_problems", 16, "training problems rolled out and scored (the first N)")
flags.DEFINE_integer("seed", 0, "sampling seed of the rollout")
flags.DEFINE_string("json", "", "also write the numbers to this JSON file")
flags.DEFINE_bool("debug", False, "show the Python traceback of a user's error too")
FLAGS = flags.FLAGS


def run(cfg) -> str:
    from fd_jax.config.validation import validate
    from fd_jax.eval.preflight import preflight
    from fd_jax.rollout.sampling import generate
    from fd_jax.train import components
    from fd_jax.train.stages import stages

    validate(cfg)
    if FLAGS.num_problems < 1:
        raise cli_error(f"--num_problems {FLAGS.num_problems}: must be >= 1")
    first = next((s for s in stages(cfg) if s.step.distill_weight > 0), None)
    if first is None:
        raise cli_error(f"config.algorithm = {cfg.algorithm!r}: no FD stage, so no teacher to check")
    policy = components.build_policy(cfg, mesh=None)
    problems = components.build_problems(cfg)[: FLAGS.num_problems]
    fmt = components.build_format(cfg, policy.tokenizer)
    feedback = components.build_feedback(cfg, pathlib.Path.cwd())
    pad_id = policy.tokenizer.pad_token_id if policy.tokenizer.pad_token_id is not None else 0
    with components.build_verifier(cfg) as verifier:
        report = preflight(problems, model=policy.model, tokenizer=policy.tokenizer, fmt=fmt, verifier=verifier,
                           feedback=feedback, config=first.rollout, step_cfg=first.step,
                           generate_fn=functools.partial(generate, pad_id=pad_id), seed=FLAGS.seed)
    if FLAGS.json:
        pathlib.Path(FLAGS.json).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return report.line()


def cli_error(message: str) -> Exception:
    from fd_jax.config.errors import ConfigError

    return ConfigError(message)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]} (fields are set with --config.FIELD=VALUE)")
    logging.getLogger().setLevel(logging.WARNING)
    print(cli.run_reporting_user_errors(lambda: run(_CONFIG.value), PROG, debug=FLAGS.debug))
    return 0


if __name__ == "__main__":
    app.run(main)
