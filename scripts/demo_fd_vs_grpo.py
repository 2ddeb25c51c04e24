"""FD vs GRPO vs FD→GRPO vs a no-update control on the same number of samples, over several seeds.

    python scripts/demo_fd_vs_grpo.py --out runs/demo      # SmolLM2-135M-Instruct, arithmetic, CPU
    python scripts/demo_fd_vs_grpo.py --out runs/demo_tiny --config configs/tiny_arith_sft_cpu.py --sft ...

With `--sft`, the config's supervised stage (algorithm=sft, its own steps and learning rate, `--sft_set`
overrides) first trains OUT/sft with the same held-out problems excluded, and every run starts from
OUT/sft/hf_final (skipped when that export exists).

Trains each algorithm with scripts/train_tpu.py (configs/smollm2_arith_cpu.py by default) into
OUT/ALGO/seed_S for every seed S (sampler seed, data order, evaluation seed), with identical sizes (steps,
problems per step, generations per problem, completion budget, learning rate), so every run draws the same
number of samples. `control` is a run whose learning rate is 0: the starting policy sampled the same way, the floor
every method must beat. Training problems never include a held-out question (`data.exclude_eval_problems`).
The untrained model is evaluated on the same held-out problems with the same sampling settings as the runs'
final evaluations (OUT/base, "step 0"; the config's evaluation seed); then it writes

    OUT/demo.png       reward, policy entropy and KL(student, teacher) per step (mean over seeds), and
                       pass@k against k with 95% bootstrap intervals (over seeds and held-out problems)
    OUT/pass_at_k.png  pass@k of the base model and of each final policy, seeds pooled
    OUT/summary.json   the settings and, per run and seed, the curves' summaries and the final evaluation,
                       per run the seed-pooled pass@k with its interval, and per run against the control
                       and FD→GRPO against GRPO the paired difference of pass@k with its interval
    OUT/table.md       per run and seed, and their mean: reward, entropy, pass@k (intervals on the means)

Running it again resumes an interrupted run and redraws the figures from what the runs left.
`--set FIELD=VALUE` overrides any config field in every run (e.g. `--set optim.learning_rate=2e-5`).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import pathlib
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

ALGORITHMS = ("fd", "grpo", "fd_then_grpo", "control")
LABELS = {"fd": "FD", "grpo": "GRPO", "fd_then_grpo": "FD→GRPO", "control": "no-update control", "base": "base model"}
# How each run is made from the shared config: the algorithm, plus its own overrides.
RUNS = {"fd": {"algorithm": "fd"}, "grpo": {"algorithm": "grpo"}, "fd_then_grpo": {"algorithm": "fd_then_grpo"},
        "control": {"algorithm": "grpo", "optim.learning_rate": "0.0"}}
# The claims' comparisons (a - b): each method against the control, FD against GRPO, FD→GRPO against GRPO.
COMPARISONS = (("fd", "control"), ("grpo", "control"), ("fd_then_grpo", "control"), ("fd", "grpo"),
               ("fd_then_grpo", "grpo"))
BOOTSTRAP = 2000  # resamples of the pass@k intervals
SMOOTH = 5  # steps in the moving average drawn over the (noisy) per-step curves


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="directory of the runs, the figures and summary.json")
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "smollm2_arith_cpu.py"))
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help="comma-separated subset of fd,grpo,fd_then_grpo,control")
    p.add_argument("--seeds", default="0,1,2",
                   help="comma-separated seeds: sampler seed, data order and evaluation seed of each run")
    p.add_argument("--steps", type=int, default=24, help="training steps of every run")
    p.add_argument("--fd_steps", type=int, default=12, help="fd_then_grpo: steps of the FD stage")
    p.add_argument("--problems_per_step", type=int, default=4)
    p.add_argument("--num_generations", type=int, default=8, help="samples per problem (the GRPO group)")
    p.add_argument("--max_new_tokens", type=int, default=16, help="completion budget (training and evaluation)")
    p.add_argument("--eval_problems", type=int, default=16, help="held-out problems of the final evaluation")
    p.add_argument("--eval_n", type=int, default=16, help="samples per held-out problem")
    p.add_argument("--ks", default="1,2,4,8,16", help="k values of pass@k (each <= eval_n)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other config override, applied to every run (repeatable)")
    p.add_argument("--no_base", action="store_true", help="skip the evaluation of the untrained model")
    p.add_argument("--sft", action="store_true",
                   help="first train OUT/sft with the config's supervised stage; every run starts from its export")
    p.add_argument("--sft_set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override of the supervised stage only (repeatable)")
    p.add_argument("--plot_only", action="store_true", help="only redraw demo.png and summary.json")
    return p


def overrides(args: argparse.Namespace) -> dict[str, str]:
    """Config field -> value as train_tpu.py reads it on its command line; the same for every run."""
    ks = tuple(int(k) for k in args.ks.split(",") if k.strip())
    fields = {
        "total_steps": args.steps, "fd_steps": args.fd_steps,
        "data.problems_per_step": args.problems_per_step, "rollout.num_generations": args.num_generations,
        "rollout.max_new_tokens": args.max_new_tokens, "eval.max_new_tokens": args.max_new_tokens,
        "eval.num_problems": args.eval_problems, "eval.n": args.eval_n, "eval.ks": ks,
        "eval.at_end": True, "eval.every_steps": 0,  # one evaluation per stage end: FD→GRPO also after its FD stage
        "checkpoint.max_to_keep": 1, "export_hf": False,  # the demo needs neither old checkpoints nor exports
        "data.exclude_eval_problems": True,  # held-out questions are never trained on
        # The runs compile the same sampler and steps: the second and third take them from this cache.
        "compilation_cache_dir": str(pathlib.Path(args.out).expanduser().resolve() / "xla_cache"),
    }  # fmt: skip
    out = {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in fields.items()}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE, e.g. optim.learning_rate=2e-5")
        out[key.removeprefix("config.")] = value
    return out


def resolved_config(config_path: str, fields: Mapping[str, str]):
    """The config file with `fields` applied (values parsed as Python literals where they are ones)."""
    spec = importlib.util.spec_from_file_location("demo_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    for path, text in fields.items():
        *parents, key = path.split(".")
        node = cfg
        for parent in parents:
            node = node[parent]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = {"true": True, "false": False}.get(text, text)
        node[key] = value
    return cfg


def run(command: Sequence[str], log_path: pathlib.Path) -> int:
    """Prints `command`, then runs it with its output appended to log_path; returns its exit status."""
    print(shlex.join(command), flush=True)
    with log_path.open("a", encoding="utf-8") as log:
        return subprocess.run(list(command), stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT).returncode


def run_sft(args: argparse.Namespace, out: pathlib.Path, fields: Mapping[str, str]) -> int:
    """The config's supervised stage into OUT/sft: its own steps, learning rate and batch, the runs' held-out
    problems excluded (so the runs' evaluation stays on questions never trained on), then `--sft_set`."""
    shared = ("eval.num_problems", "eval.n", "eval.ks", "eval.max_new_tokens", "data.exclude_eval_problems",
              "compilation_cache_dir")
    sft_fields = {"algorithm": "sft", **{k: fields[k] for k in shared}}
    for item in args.sft_set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--sft_set {item!r}: expected FIELD=VALUE, e.g. total_steps=300")
        sft_fields[key.removeprefix("config.")] = value
    command = [sys.executable, str(REPO_ROOT / "scripts" / "train_tpu.py"), "--config", args.config,
               "--workdir", str(out / "sft"), *(f"--config.{k}={v}" for k, v in sft_fields.items())]
    return run(command, out / "sft.log")


def evaluate_base(cfg, out: pathlib.Path) -> int:
    """The untrained model through scripts/evaluate.py with the runs' evaluation settings: the same problems,
    prompt, sampling and seed (one generate call, as the trainer makes), so it is every run's step 0."""
    from fd_jax.train.components import model_dir

    directory = model_dir(cfg)
    if directory is None or cfg.data.task != "arithmetic":
        print("base: only a pretrained model on the arithmetic test bed is evaluated here; skipped", flush=True)
        return 0
    d, e = cfg.data, cfg.eval
    command = [
        sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), "--model", str(directory),
        "--task", "arithmetic", "--level", d.level, "--prompt_format", d.prompt_format,
        "--template", d.prompt_template, "--system", d.system_prompt, "--num_shots", str(d.num_shots),
        "--num_problems", str(e.num_problems), "--problem_seed", str(d.eval_problem_seed),
        "--n", str(e.n), "--k", ",".join(str(k) for k in e.ks), "--max_new_tokens", str(e.max_new_tokens),
        "--temperature", str(e.temperature), "--seed", str(e.seed), "--batch_problems", "0",
        "--name", LABELS["base"], "--out", str(out / "base"),
    ]  # fmt: skip
    return run(command, out / "base.log")


# -- reading the runs ---------------------------------------------------------------------------------------


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None


def _report(workdir: pathlib.Path, step: int) -> dict[str, Any] | None:
    path = workdir / "eval" / f"step_{step}" / "report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _eval_summary(report: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    keys = ("pass_at_k", "entropy", "solved", "num_problems", "n", "statuses", "completion_tokens_mean")
    return {k: report.get(k) for k in keys} | {"distinct_valid_per_problem":
                                                report["diversity"]["distinct_valid_per_problem"]}


def summarize_run(workdir: pathlib.Path, cfg, algorithm: str) -> dict[str, Any]:
    """Curves and evaluations of one run from its metrics.jsonl and eval reports."""
    from fd_jax.train.metrics_log import METRICS_FILE, read_jsonl

    records = read_jsonl(workdir / METRICS_FILE)
    per_step = cfg.data.problems_per_step * cfg.rollout.num_generations
    quarter = max(1, len(records) // 4)
    column = lambda key, rows=records: [r.get(key) for r in rows]  # noqa: E731
    fd_rows = [r for r in records if r.get("stage") == "fd"]
    summary = {
        "steps_done": len(records),
        "samples": len(records) * per_step,
        "reward_mean": column("reward_mean"),
        "entropy": column("entropy"),
        "kl_mean": column("kl_mean"),
        "reward_first_quarter": _mean(column("reward_mean")[:quarter]),
        "reward_last_quarter": _mean(column("reward_mean")[-quarter:]),
        "reward_all_steps": _mean(column("reward_mean")),
        "entropy_first_3": _mean(column("entropy")[:3]),
        "entropy_last_3": _mean(column("entropy")[-3:]),
        "kl_mean_fd_steps": _mean(column("kl_mean", fd_rows)),
        "kl_first_3_fd_steps": _mean(column("kl_mean", fd_rows)[:3]),
        "kl_last_3_fd_steps": _mean(column("kl_mean", fd_rows)[-3:]),
        "wall_s": sum(r.get("time/step_s") or 0.0 for r in records),
        "final_eval": _eval_summary(_report(workdir, cfg.total_steps)),
    }
    if algorithm == "fd_then_grpo":
        summary["fd_stage_eval"] = _eval_summary(_report(workdir, cfg.fd_steps))
    return summary


def pooled_pass_at_k(reports: Sequence[Mapping[str, Any]], ks: Sequence[int], *, seed: int = 0
                     ) -> dict[str, dict[str, float]]:
    """k -> {mean, lo, hi}: pass@k averaged over seeds and held-out problems, with a 95% percentile
    bootstrap interval that resamples seeds, then problems within each seed (both vary between repeats)."""
    import numpy as np

    if not reports:
        return {}
    table = np.array([_pass_table(r, ks) for r in reports])  # [S, P, K]
    lo, hi = np.percentile(_bootstrap_means(table, seed), [2.5, 97.5], axis=0)
    mean = table.mean(axis=(0, 1))
    return {str(k): {"mean": float(mean[j]), "lo": float(lo[j]), "hi": float(hi[j])} for j, k in enumerate(ks)}


def _pass_table(report: Mapping[str, Any], ks: Sequence[int]):
    """[P, K] pass@k of each held-out problem of one evaluation report (unbiased estimator, its n)."""
    import numpy as np

    from fd_jax.eval.evaluation import pass_at_k

    n = int(report["n"])
    return np.array([[pass_at_k(n, int(p["correct"]), k) for k in ks] for p in report["problems"]])


def paired_difference(reports_a: Sequence[Mapping[str, Any]], reports_b: Sequence[Mapping[str, Any]],
                      ks: Sequence[int], *, seed: int = 0) -> dict[str, dict[str, float]]:
    """k -> {mean, lo, hi, p_le_0}: pass@k of a minus pass@k of b, the runs paired by seed and the problems by
    index (the same held-out problems in both), with a 95% percentile bootstrap interval that resamples the
    same seeds and problems in both; p_le_0 is the share of resamples where the difference is <= 0 (a
    one-sided bootstrap p-value for "a beats b"). Pairing removes the problems' own difficulty from the
    spread, so it is tighter than comparing the two pooled intervals."""
    import numpy as np

    pairs = list(zip(reports_a, reports_b))
    if not pairs:
        return {}
    diff = np.array([_pass_table(a, ks) - _pass_table(b, ks) for a, b in pairs])  # [S, P, K]
    draws = _bootstrap_means(diff, seed)
    lo, hi = np.percentile(draws, [2.5, 97.5], axis=0)
    mean = diff.mean(axis=(0, 1))
    return {str(k): {"mean": float(mean[j]), "lo": float(lo[j]), "hi": float(hi[j]),
                     "p_le_0": float((draws[:, j] <= 0).mean())} for j, k in enumerate(ks)}


def _bootstrap_means(table_SPK, seed: int):
    """[BOOTSTRAP, K] means of `table_SPK` over resampled seeds, then problems within each drawn seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    S, P = table_SPK.shape[:2]
    draws = np.empty((BOOTSTRAP, table_SPK.shape[2]))
    for i in range(BOOTSTRAP):
        seeds = rng.integers(0, S, S)
        problems = rng.integers(0, P, (S, P))
        draws[i] = table_SPK[seeds[:, None], problems].mean(axis=(0, 1))
    return draws


def mean_curves(per_seed: Sequence[list[dict]]) -> list[dict]:
    """Per step, the mean over seeds of every numeric metric (steps missing in a seed are left out)."""
    steps: dict[int, list[dict]] = {}
    for records in per_seed:
        for r in records:
            steps.setdefault(r["step"], []).append(r)
    out = []
    for step in sorted(steps):
        rows = steps[step]
        merged = {"step": step, "stage": rows[0].get("stage")}
        for key in {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k != "step"}:
            merged[key] = _mean([r.get(key) for r in rows])
        out.append(merged)
    return out


# -- the figure -----------------------------------------------------------------------------------------------


def _smooth(steps: list[int], values: list[float | None]) -> tuple[list[int], list[float]]:
    """Trailing moving average over SMOOTH steps, skipping missing values."""
    points = [(s, v) for s, v in zip(steps, values) if v is not None]
    out = []
    for i in range(len(points)):
        window = [v for _, v in points[max(0, i - SMOOTH + 1): i + 1]]
        out.append(sum(window) / len(window))
    return [s for s, _ in points], out


def plot_demo(curves: Mapping[str, list[dict]], reports: Mapping[str, Mapping], fd_steps: int | None,
              title: str, path: pathlib.Path) -> pathlib.Path:
    """Four panels: reward, entropy and KL against step (thin: per step; bold: moving average), and pass@k
    against k (log2 axis) for the reports. Agg canvas: no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(20, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    colors = {"fd": "tab:blue", "grpo": "tab:red", "fd_then_grpo": "tab:purple", "control": "tab:gray",
              "base": "black"}
    panels = (("reward_mean", "reward (mean over the step's samples)"), ("entropy", "policy entropy (nats/token)"),
              ("kl_mean", "KL(student, teacher), FD steps"))
    for i, (key, name) in enumerate(panels):
        ax = fig.add_subplot(1, 4, i + 1)
        for algorithm, records in curves.items():
            if key == "kl_mean":  # GRPO steps have no teacher; their KL entry is not a divergence to one
                records = [r for r in records if r.get("stage") == "fd"]
            steps, values = [r["step"] for r in records], [r.get(key) for r in records]
            if not any(v is not None for v in values):
                continue
            color = colors.get(algorithm)
            # FD→GRPO's FD stage is the FD run itself (same seeds): dashed, so that the FD line shows under it.
            style = "--" if algorithm == "fd_then_grpo" else "-"
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(*_smooth(steps, values), style, color=color, linewidth=2, label=LABELS.get(algorithm, algorithm))
        if fd_steps and "fd_then_grpo" in curves:
            ax.axvline(fd_steps + 0.5, color=colors["fd_then_grpo"], linestyle=":", linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 4, 4)
    all_ks = set()
    for label, report in reports.items():
        curve = sorted((int(k), float(v)) for k, v in report["pass_at_k"].items())
        all_ks.update(k for k, _ in curve)
        algorithm = label.split(":")[0]
        style = "--" if algorithm == "base" else ":" if label.endswith(":fd_stage") else "-"
        entropy = f", H {report['entropy']:.2f}" if report.get("entropy") is not None else ""
        name = LABELS.get(algorithm, algorithm) + (" (after its FD stage)" if label.endswith(":fd_stage") else "")
        ax.plot(*zip(*curve), style, marker="o", color=colors.get(algorithm), label=f"{name}{entropy}")
        if report.get("interval"):  # 95% bootstrap interval over seeds and problems
            ks_ = [k for k, _ in curve]
            lo = [report["interval"][str(k)]["lo"] for k in ks_]
            hi = [report["interval"][str(k)]["hi"] for k in ks_]
            ax.fill_between(ks_, lo, hi, color=colors.get(algorithm), alpha=0.15)
    if all_ks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
    ax.set_ylim(0, 1.05)
    ax.set_title("pass@k on held-out problems (H: eval entropy)", fontsize=10)
    ax.set_xlabel("k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 0.14))  # above the low curves, below the high ones
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_table(summary: Mapping[str, Any], ks: Sequence[int]) -> str:
    """Per run and seed, then the mean over seeds (pass@k with its 95% interval), then the paired
    differences: the demo's table as Markdown."""
    head = ["run", "seed", "reward first → last quarter", "entropy first 3 → last 3 steps", "eval entropy",
            *(f"pass@{k}" for k in ks)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for algorithm, per_seed in summary["runs"].items():
        for seed, r in per_seed.items():
            final = r.get("final_eval") or {}
            pk = final.get("pass_at_k") or {}
            lines.append("| " + " | ".join([
                LABELS.get(algorithm, algorithm), seed,
                f"{_fmt(r['reward_first_quarter'])} → {_fmt(r['reward_last_quarter'])}",
                f"{_fmt(r['entropy_first_3'])} → {_fmt(r['entropy_last_3'])}", _fmt(final.get("entropy")),
                *(_fmt(pk.get(str(k))) for k in ks)]) + " |")
        pooled = summary["pooled"][algorithm]
        first = _mean([r["reward_first_quarter"] for r in per_seed.values()])
        entropy_first = _mean([r["entropy_first_3"] for r in per_seed.values()])
        cells = [f"**{_fmt(v['mean'])}** [{_fmt(v['lo'], 2)}, {_fmt(v['hi'], 2)}]"
                 for v in (pooled["pass_at_k"].get(str(k)) for k in ks) if v is not None]
        lines.append("| " + " | ".join([
            f"**{LABELS.get(algorithm, algorithm)}**", "mean",
            f"{_fmt(first)} → {_fmt(pooled['reward_last_quarter'])}",
            f"{_fmt(entropy_first)} → {_fmt(pooled['entropy_last_3'])}", _fmt(pooled["eval_entropy"]),
            *cells]) + " |")
    lines += ["", "Paired differences of pass@k (same seeds, same held-out problems), 95% bootstrap interval, "
              "and the share of resamples where the difference is <= 0:", "",
              "| a − b | " + " | ".join(f"pass@{k}" for k in ks) + " |", "|" + " --- |" * (len(ks) + 1)]
    for name, diff in summary.get("paired_differences", {}).items():
        a, _, b = name.partition(" - ")
        cells = [f"{v['mean']:+.3f} [{v['lo']:+.2f}, {v['hi']:+.2f}] p={v['p_le_0']:.2f}"
                 for v in (diff.get(str(k)) for k in ks) if v is not None]
        lines.append(f"| {LABELS.get(a, a)} − {LABELS.get(b, b)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seed_fields(seed: int) -> dict[str, str]:
    """What a seed sets in every run: the sampler, the data order and the final evaluation's sampling. The
    arms of one seed share all three (paired comparisons); another seed redraws them all, so the spread
    over seeds includes the evaluation's own sampling noise (the no-update control's too)."""
    return {"seed": str(seed), "data.shuffle_seed": str(seed), "eval.seed": str(seed)}


def run_dir(out: pathlib.Path, algorithm: str, seed: int) -> pathlib.Path:
    return out / algorithm / f"seed_{seed}"


def write_outputs(out: pathlib.Path, cfg, config_file: str, algorithms: Sequence[str], seeds: Sequence[int],
                  fields: Mapping[str, str], exit_codes: Mapping[str, int]) -> dict[str, Any]:
    from fd_jax.eval.evaluation import plot_pass_at_k
    from fd_jax.train.metrics_log import METRICS_FILE, read_jsonl

    ks = tuple(int(k) for k in cfg.eval.ks)
    runs = {a: {str(s): summarize_run(run_dir(out, a, s), cfg, a) for s in seeds} for a in algorithms}
    base_path = out / "base" / "report.json"
    base = json.loads(base_path.read_text()) if base_path.is_file() else None
    per_step = cfg.data.problems_per_step * cfg.rollout.num_generations
    finals = {a: [r for s in seeds if (r := _report(run_dir(out, a, s), cfg.total_steps)) is not None]
              for a in algorithms}
    pooled = {}
    for a in algorithms:
        per_seed = runs[a].values()
        pooled[a] = {
            "seeds_done": len(finals[a]),
            "pass_at_k": pooled_pass_at_k(finals[a], ks),
            "reward_last_quarter_per_seed": [r["reward_last_quarter"] for r in per_seed],
            "reward_last_quarter": _mean([r["reward_last_quarter"] for r in per_seed]),
            "entropy_last_3": _mean([r["entropy_last_3"] for r in per_seed]),
            "eval_entropy": _mean([r.get("entropy") for r in finals[a]]),
        }
    comparisons = {}
    for a, b in COMPARISONS:
        if a in algorithms and b in algorithms:
            paired = [(x, y) for s in seeds if (x := _report(run_dir(out, a, s), cfg.total_steps)) is not None
                      and (y := _report(run_dir(out, b, s), cfg.total_steps)) is not None]
            comparisons[f"{a} - {b}"] = paired_difference([x for x, _ in paired], [y for _, y in paired], ks)
    summary = {
        "config_file": config_file,
        "overrides": dict(fields),
        "seeds": list(seeds),
        "samples_per_step": per_step,
        "samples_per_run": per_step * cfg.total_steps,
        "base_eval": _eval_summary(base),
        "pooled": pooled,
        "paired_differences": comparisons,
        "runs": runs,
        "exit_codes": dict(exit_codes),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "table.md").write_text(markdown_table(summary, ks), encoding="utf-8")

    curves = {a: mean_curves([read_jsonl(run_dir(out, a, s) / METRICS_FILE) for s in seeds
                              if (run_dir(out, a, s) / METRICS_FILE).is_file()]) for a in algorithms}
    reports = {"base": base} if base else {}
    for a in algorithms:
        if finals[a]:
            reports[a] = {"pass_at_k": {k: v["mean"] for k, v in pooled[a]["pass_at_k"].items()},
                          "interval": pooled[a]["pass_at_k"], "entropy": pooled[a]["eval_entropy"]}
    title = (f"{cfg.total_steps} steps x {cfg.data.problems_per_step} problems x {cfg.rollout.num_generations} "
             f"samples = {per_step * cfg.total_steps} samples per run, {len(seeds)} seeds; arithmetic level "
             f"{cfg.data.level}; pass@k on {cfg.eval.num_problems} held-out problems (never trained on), "
             f"n = {cfg.eval.n}")
    plot_demo(curves, reports, cfg.fd_steps if "fd_then_grpo" in algorithms else None, title, out / "demo.png")
    if reports:
        plot_pass_at_k({LABELS.get(k, k): r for k, r in reports.items()}, out / "pass_at_k.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    algorithms = [a for a in args.algorithms.split(",") if a]
    if unknown := sorted(set(algorithms) - set(ALGORITHMS)):
        raise SystemExit(f"--algorithms: unknown {unknown}; choose from {list(ALGORITHMS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    out = pathlib.Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    fields = overrides(args)
    exit_codes: dict[str, int] = {}
    if args.sft:
        export = out / "sft" / "hf_final"
        if not args.plot_only and not (export / "config.json").is_file():
            exit_codes["sft"] = run_sft(args, out, fields)
            if exit_codes["sft"] != 0:
                raise SystemExit(f"the supervised stage failed (exit {exit_codes['sft']}); see {out / 'sft.log'}")
        fields.update({"model.source": "hf", "model.path": str(export), "model.tokenizer": ""})
    cfg = resolved_config(args.config, fields)
    cfg.algorithm = "fd_then_grpo"  # the stage layout every run shares (fd_steps < total_steps is checked here)
    from fd_jax.config.validation import validate

    validate(cfg)
    if args.plot_only and (out / "summary.json").is_file():  # keep what the runs returned
        exit_codes = json.loads((out / "summary.json").read_text()).get("exit_codes", {}) | exit_codes
    if not args.plot_only:
        start = time.perf_counter()
        if not args.no_base and not (out / "base" / "report.json").is_file():
            exit_codes["base"] = evaluate_base(cfg, out)
        for seed in seeds:
            for algorithm in algorithms:
                name, workdir = f"{algorithm}/seed_{seed}", run_dir(out, algorithm, seed)
                workdir.parent.mkdir(parents=True, exist_ok=True)
                run_fields = {**fields, **seed_fields(seed), **RUNS[algorithm]}
                command = [sys.executable, str(REPO_ROOT / "scripts" / "train_tpu.py"), "--config", args.config,
                           "--workdir", str(workdir), *(f"--config.{k}={v}" for k, v in run_fields.items())]
                t0 = time.perf_counter()
                exit_codes[name] = run(command, workdir.parent / f"seed_{seed}.log")
                print(f"{name}: exit {exit_codes[name]} after {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"all runs done in {time.perf_counter() - start:.0f} s", flush=True)
    summary = write_outputs(out, cfg, args.config, algorithms, seeds, fields, exit_codes)
    for algorithm, pooled in summary["pooled"].items():
        ci = {k: f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]" for k, v in pooled["pass_at_k"].items()}
        print(f"{LABELS[algorithm]}: reward over the last quarter {pooled['reward_last_quarter_per_seed']}, "
              f"final pass@k {ci} ({pooled['seeds_done']} seeds)", flush=True)
    print(f"wrote {out / 'demo.png'}, {out / 'pass_at_k.png'}, {out / 'summary.json'}", flush=True)
    return max(exit_codes.values(), default=0)


if __name__ == "__main__":
    sys.exit(main())
