r"""Evaluate a model: pass@k, policy entropy and proof diversity, written as a JSON report and a PNG plot.

    # miniF2F test with a local Lean pool (paths printed by scripts/setup_lean.sh)
    python scripts/evaluate.py --model DIR --task lean --problems minif2f.jsonl --n 32 --k 1,8,32 \
        --out runs/eval --repl_command "lake env /opt/repl/.lake/build/bin/repl" --lean_cwd /opt/mathlib4
    # the arithmetic test bed, on any CPU
    python scripts/evaluate.py --model DIR --task arithmetic --n 8 --k 1,2,4,8 --out runs/eval
    # overlay earlier reports on this run's plot
    python scripts/evaluate.py ... --name FD --compare GRPO=runs/grpo/report.json,FD-GRPO=runs/fdg/report.json

`--out` receives report.json, pass_at_k.png and samples.jsonl (every completion with its verdict).
Defaults follow the task: --max_new_tokens is 2048 for lean and 16 for arithmetic; with --checkpoint the
task and the budget are the run's own (its config.json). A mistake in the arguments is reported in one
line (exit status 2); --debug shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import re
import sys
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from a checkout, without installing

from fd_jax import cli  # noqa: E402
from fd_jax.cli import UsageError  # noqa: E402

LOG = logging.getLogger("evaluate")
PROG = pathlib.Path(__file__).name


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a help line only where the line does not say its default already and
    there is a value to show."""

    def _get_help_string(self, action):
        empty = action.default is None or action.default is False or action.default in ("", {}, argparse.SUPPRESS)
        if "default" in (action.help or "") or empty:
            return action.help
        return super()._get_help_string(action)


def _int_list(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,8,32, got {text!r}") from None


def _named_paths(text: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected NAME=PATH[,NAME=PATH...], got {text!r}")
    return {name: path for name, path in pairs}


def build_parser() -> argparse.ArgumentParser:
    from fd_jax.tasks import TASKS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=_HelpFormatter)
    source = parser.add_argument_group("model (one of)")
    source.add_argument("--model", help="a Hugging Face model directory (config.json, safetensors, tokenizer)")
    source.add_argument("--checkpoint", help="a trainer workdir: evaluates its latest (or --step) checkpoint")
    source.add_argument("--step", type=int, default=None, help="checkpoint step with --checkpoint (default: latest)")
    source.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")

    data = parser.add_argument_group("problems")
    data.add_argument("--task", default=None, choices=sorted(TASKS),
                      help="required with --model; with --checkpoint the run's task is the default")
    data.add_argument("--problems", default=None, help="problem file, required for task lean (e.g. miniF2F JSONL)")
    data.add_argument("--problem_format", default="minif2f", help="loader: minif2f | lean_workbook")
    data.add_argument("--split", default="test", help="split to keep ('' keeps every row)")
    data.add_argument("--num_problems", type=int, default=0, help="first N problems only (0 = all); "
                      "for task arithmetic, how many to generate (default 32)")
    data.add_argument("--level", default="easy", help="arithmetic difficulty (easy | medium | hard)")
    data.add_argument("--problem_seed", type=int, default=1234, help="seed of the generated arithmetic problems")
    data.add_argument("--prompt_format", default=None,
                      help="lean_completion | lean_chat | arithmetic | arithmetic_chat (default by task)")
    data.add_argument("--template", default="",
                      help="the question's template, fields {context} {statement} ('' = the format's; config data.prompt_template)")
    data.add_argument("--system", default="", help="a system turn (chat formats; '' = the chat template's own)")
    data.add_argument("--num_shots", type=int, default=0,
                      help="arithmetic: solved examples of --level shown before each question (config data.num_shots)")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--n", type=int, default=32, help="samples per problem")
    sampling.add_argument("--k", type=_int_list, default=[1, 8, 32], help="k values of pass@k (each <= n)")
    sampling.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    sampling.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    sampling.add_argument("--top_k", type=int, default=0, help="top-k sampling (0 = off)")
    sampling.add_argument("--max_new_tokens", type=int, default=None,
                          help="completion budget (default: 2048 for lean, 16 for arithmetic; a checkpoint's "
                               "own eval.max_new_tokens)")
    sampling.add_argument("--stop", default="", help="comma-separated stop strings (besides the EOS token)")
    sampling.add_argument("--seed", type=int, default=0, help="sampler seed")
    sampling.add_argument("--batch_problems", type=int, default=8, help="problems per generate call (0 = all)")
    sampling.add_argument("--no_entropy", action="store_true", help="skip the teacher-forced entropy pass")
    sampling.add_argument("--entropy_batch_rows", type=int, default=8,
                          help="completions per entropy forward pass (lower it if that pass runs out of memory)")

    lean = parser.add_argument_group("Lean verifier (task lean)")
    lean.add_argument("--lean_backend", default="local", choices=["local", "kimina"], help="the verifier")
    lean.add_argument("--repl_command", default="lake env repl", help="command that starts one Lean REPL")
    lean.add_argument("--lean_cwd", default=None, help="the Mathlib project the REPL runs in")
    lean.add_argument("--workers", type=int, default=None, help="REPL processes (default: cores - 1)")
    lean.add_argument("--timeout_s", type=float, default=60.0, help="wall-clock limit per proof")
    lean.add_argument("--memory_limit_mb", type=int, default=16384, help="address-space limit per REPL (0: none)")
    lean.add_argument("--kimina_url", default="http://localhost:8000", help="Kimina Lean Server (backend kimina)")

    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="directory for report.json, pass_at_k.png, samples.jsonl")
    output.add_argument("--name", default=None, help="this run's label in the plot (default: the model's name)")
    output.add_argument("--compare", type=_named_paths, default={},
                        help="other runs to overlay: NAME=path/to/report.json,...")
    output.add_argument("--progress", default=None, action=argparse.BooleanOptionalAction,
                        help="progress bar (default: only on a terminal)")
    output.add_argument(cli.DEBUG_FLAG, action="store_true", help="show the Python traceback of a user's error")
    return parser


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the task-dependent defaults (--task, --max_new_tokens) and checks the sources exist, before
    anything is loaded. Raises UsageError / WorkdirError naming the argument."""
    from fd_jax.tasks import get_task

    if bool(args.model) == bool(args.checkpoint):
        raise UsageError("give exactly one of --model DIR or --checkpoint WORKDIR")
    run = None
    if args.checkpoint:
        from fd_jax.train.workdir import read_config

        run = read_config(args.checkpoint)
    elif not (pathlib.Path(args.model) / "config.json").is_file():
        raise UsageError(f"--model {args.model}: not a Hugging Face model directory (no config.json there)")
    if args.task is None:
        if run is None:
            raise UsageError("--task is required with --model: lean or arithmetic")
        args.task = run.data.task
    same_task = run is not None and run.data.task == args.task
    # a task with tools: the run's episode budgets and tool format (the defaults of config.episode otherwise)
    args.run_episode = dict(run.episode) if same_task and "episode" in run else None
    if args.max_new_tokens is None:
        args.max_new_tokens = run.eval.max_new_tokens if same_task else get_task(args.task).default_max_new_tokens
    if get_task(args.task).reads_problem_file and not args.problems:
        raise UsageError(f"--problems FILE is required with --task {args.task} (e.g. a miniF2F JSONL)")
    return args


def load_policy(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, tokenizer, name) from --model, or from --checkpoint through the trainer."""
    import jax.numpy as jnp

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    if args.checkpoint:
        from fd_jax.train.workdir import restore_policy  # the policy of a workdir's orbax checkpoint

        model, tokenizer = restore_policy(args.checkpoint, step=args.step, dtype=dtype)
        return model, tokenizer, pathlib.Path(args.checkpoint).name
    import transformers

    from fd_jax.models import load_hf

    model, _ = load_hf(args.model, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    return model, tokenizer, pathlib.Path(args.model).resolve().name


# The run-config field each flag sets, so that a task's error names the flag the user typed.
FLAG_OF = {
    "data.task": "--task", "data.path": "--problems", "data.format": "--problem_format", "data.split": "--split",
    "data.num_problems": "--num_problems", "data.level": "--level", "data.problem_seed": "--problem_seed",
    "data.prompt_format": "--prompt_format", "data.prompt_template": "--template", "data.system_prompt": "--system",
    "data.num_shots": "--num_shots", "lean.backend": "--lean_backend", "lean.repl_command": "--repl_command",
    "lean.cwd": "--lean_cwd", "lean.workers": "--workers", "lean.timeout_s": "--timeout_s",
    "lean.memory_limit_mb": "--memory_limit_mb", "lean.kimina_url": "--kimina_url",
}  # fmt: skip


def task_config(args: argparse.Namespace):
    """The run config (`fd_jax.config.defaults.base_config`) with the task's fields set from the flags."""
    from fd_jax.config.defaults import base_config
    from fd_jax.tasks import get_task

    task = get_task(args.task)
    cfg = base_config()
    values = {
        "data.task": args.task, "data.path": args.problems, "data.format": args.problem_format,
        "data.split": args.split, "data.num_problems": args.num_problems or task.default_num_problems,
        "data.level": args.level, "data.problem_seed": args.problem_seed,
        "data.prompt_format": args.prompt_format or task.prompt_formats[0], "data.prompt_template": args.template,
        "data.system_prompt": args.system, "data.num_shots": args.num_shots, "lean.backend": args.lean_backend,
        "lean.repl_command": args.repl_command, "lean.cwd": args.lean_cwd or "", "lean.workers": args.workers or 0,
        "lean.timeout_s": args.timeout_s, "lean.memory_limit_mb": args.memory_limit_mb,
        "lean.kimina_url": args.kimina_url,
    }  # fmt: skip
    assert set(values) == set(FLAG_OF), "every flag of a task field is mapped once"
    for path, value in values.items():
        section, field = path.split(".")
        cfg[section][field] = value
    for field, value in (getattr(args, "run_episode", None) or {}).items():
        if field in cfg.episode:
            cfg.episode[field] = value
    return cfg


def _as_flag(error: Exception) -> UsageError:
    """A task's ConfigError (`config.data.path = ...: why`) as the flag's error (`--problems = ...: why`)."""
    text = re.sub(r"config\.([\w.]+)", lambda m: FLAG_OF.get(m.group(1), m.group(0)), str(error))
    return UsageError(text)


def load_task(args: argparse.Namespace, tokenizer: Any):
    """(problems, prompt format, verifier, count lemmas?, episodes) for --task; episodes: a task with tools'
    `EpisodeSetup` (the default budgets of config.episode), None otherwise."""
    from fd_jax.config.errors import ConfigError
    from fd_jax.tasks import get_task

    cfg = task_config(args)
    if args.system and not cfg.data.prompt_format.endswith("_chat"):
        raise UsageError(f"--system: --prompt_format {cfg.data.prompt_format} has no system turn; use a _chat format")
    task = get_task(args.task)
    try:
        task.check(cfg)
        problems = task.problems(cfg)
        fmt = task.prompt_format(cfg, tokenizer)
    except ConfigError as e:
        raise _as_flag(e) from None
    verifier = task.verifier(cfg)
    from fd_jax.train.components import build_episodes

    return problems, fmt, verifier, task.count_lemmas, build_episodes(cfg, verifier)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    return cli.run_reporting_user_errors(lambda: _main(args), PROG, debug=args.debug)


def _main(args: argparse.Namespace) -> dict[str, Any]:
    resolve_defaults(args)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    for name in ("fd_jax", LOG.name):  # our progress lines, without every library's INFO chatter
        logging.getLogger(name).setLevel(logging.INFO)
    if args.n < max(args.k):
        raise UsageError(f"--k {max(args.k)} is larger than --n {args.n}: pass@k needs n >= k samples")
    compare = {}
    for label, path in args.compare.items():
        if not pathlib.Path(path).is_file():
            raise UsageError(f"--compare {label}={path}: no such report file")
        compare[label] = json.loads(pathlib.Path(path).read_text())

    from fd_jax.eval import evaluation
    from fd_jax.tasks import get_task

    model, tokenizer, model_name = load_policy(args)
    problems, fmt, verifier, lemmas, episodes = load_task(args, tokenizer)
    with verifier:
        report = evaluation.evaluate(
            problems, model=model, tokenizer=tokenizer, fmt=fmt, verifier=verifier, n=args.n, ks=args.k,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, stop_strings=[s for s in args.stop.split(",") if s],
            batch_problems=args.batch_problems, entropy=not args.no_entropy,
            entropy_batch_rows=args.entropy_batch_rows, lemmas=lemmas, keep_samples=True,
            progress=args.progress, episodes=episodes,  # a task with tools: episodes, as in training
        )  # fmt: skip
    report["model"] = args.model or args.checkpoint
    report["task"] = args.task
    report["problems_source"] = get_task(args.task).source(task_config(args))
    name = args.name or model_name
    paths = evaluation.write_report(report, args.out, name=name)
    if compare:
        report_only = json.loads(pathlib.Path(paths["report"]).read_text())
        evaluation.plot_pass_at_k({name: report_only, **compare}, paths["plot"])
    summary = ", ".join(f"pass@{k} {v:.3f}" for k, v in report["pass_at_k"].items())
    entropy = "n/a" if report["entropy"] is None else f"{report['entropy']:.3f} nats"
    LOG.info("%s on %d problems: %s; entropy %s; wrote %s", name, len(problems), summary, entropy,
                 ", ".join(paths.values()))
    return report


if __name__ == "__main__":
    main()
