"""Where a run's per-step metrics go: `metrics.jsonl` (appended and flushed every step), TensorBoard event
files, optionally Weights & Biases, a PNG of the main curves, and a progress bar or plain log lines.

Only the writer process (process 0) creates any of it. On resume, `truncate_jsonl` drops the lines of
steps after the restored checkpoint and TensorBoard is told to purge them, so the logs read exactly like
those of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
# (metric, panel title) of the plot; the stage boundary of fd_then_grpo is drawn as a vertical line.
PLOT_PANELS = (
    ("reward_mean", "reward"), ("entropy", "policy entropy (nats/token)"), ("kl_mean", "KL(student, teacher)"),
    ("teacher/logp_gain_correct", "teacher − student log p(correct sibling)"),
)


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; a torn last line (a crash mid-write) is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_jsonl(path: pathlib.Path, last_step: int) -> int:
    """Rewrites `path` without the records whose `step` is after `last_step` (atomically: a temporary
    file renamed over it). Returns how many records were dropped."""
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except json.JSONDecodeError:
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(lines) - len(kept)


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: they are written as null (and a NaN loss is visible as such in the log)."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def plot_curves(records: Iterable[Mapping[str, Any]], path: pathlib.Path) -> pathlib.Path:
    """A PNG with one panel per PLOT_PANELS metric against `step`, one line per stage, the stage boundary
    dashed. Draws on matplotlib's Agg canvas directly: no display needed, pyplot's state untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = list(records)
    stage_names = list(dict.fromkeys(r.get("stage", "") for r in records))
    boundaries = [r["step"] - 0.5 for prev, r in zip(records, records[1:]) if r.get("stage") != prev.get("stage")]
    fig = Figure(figsize=(5 * len(PLOT_PANELS), 3.5), dpi=100)
    FigureCanvasAgg(fig)
    for i, (key, title) in enumerate(PLOT_PANELS):
        ax = fig.add_subplot(1, len(PLOT_PANELS), i + 1)
        for stage in stage_names:
            points = [(r["step"], r[key]) for r in records if r.get("stage", "") == stage and r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), label=stage or None, linewidth=1.2)
        for b in boundaries:
            ax.axvline(b, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(stage_names) > 1:
            ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)  # a reader never sees a half-written PNG
    return path


def _import_summary_writer():
    """tensorboardX imports torch, when installed, only to accept torch tensors; fd_jax logs Python floats,
    so torch (seconds of start-up and hundreds of MB) is kept out unless something already imported it."""
    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block:
            del sys.modules["torch"]
    return SummaryWriter


class _TensorBoard:
    """One SummaryWriter per stage directory, created on first use; `purge_step` hides events of steps
    that a resumed run writes again."""

    def __init__(self, purge_step: int | None):
        self._cls = _import_summary_writer()
        self._purge_step = purge_step
        self._writers: dict[pathlib.Path, Any] = {}

    def write(self, logdir: pathlib.Path, step: int, scalars: Mapping[str, float]) -> None:
        if logdir not in self._writers:
            self._writers[logdir] = self._cls(str(logdir), purge_step=self._purge_step, flush_secs=30)
        writer = self._writers[logdir]
        for key, value in scalars.items():
            writer.add_scalar(key, value, step)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()


class RunLog:
    """The writer of a run's logs (a no-op on processes other than 0).

    workdir: where metrics.jsonl and curves.png go. resume_step: the restored checkpoint's step (lines
    after it are dropped; None for a fresh run). total_steps: for the progress bar's ETA. progress:
    "auto" (a bar when stderr is a terminal) | "true" | "false". wandb: {"project", "entity", "name"}
    (project "" = off).
    """

    def __init__(
        self,
        workdir: pathlib.Path,
        *,
        enabled: bool = True,
        resume_step: int | None = None,
        total_steps: int,
        progress: str = "auto",
        every_steps: int = 1,
        plot_every_steps: int = 10,
        tensorboard: bool = True,
        wandb: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.path = workdir / METRICS_FILE
        self.plot_path = workdir / PLOT_FILE
        self.every_steps = every_steps
        self.plot_every_steps = plot_every_steps
        self.records: list[dict[str, Any]] = []
        self._bar = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            dropped = truncate_jsonl(self.path, resume_step)
            if dropped:
                log.info("dropped %d metrics lines after step %d (they are recomputed)", dropped, resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run in a reused directory starts a fresh log
        self.records = read_jsonl(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            try:
                self._tb = _TensorBoard(purge_step=None if resume_step is None else resume_step + 1)
            except ImportError:
                log.warning("log.tensorboard: tensorboardX is not installed (pip install tensorboardX); "
                            "no TensorBoard events will be written")
        if wandb and wandb.get("project"):
            self._wandb = _start_wandb(wandb, config, resume=resume_step is not None, workdir=workdir)
        show_bar = progress == "true" or (progress == "auto" and sys.stderr.isatty())
        if show_bar:
            from tqdm.auto import tqdm

            done = 0 if resume_step is None else resume_step
            self._bar = tqdm(total=total_steps, initial=done, unit="step", dynamic_ncols=True, desc="train")

    def write(self, record: dict[str, Any], *, tensorboard_dir: pathlib.Path | None = None) -> None:
        """Appends one step's record (must have `step`) and updates every sink."""
        if not self.enabled:
            return
        record = {k: _finite(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a crash loses at most the step being computed
        self.records.append(record)
        step = record["step"]
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "step"}
        if self._tb is not None and tensorboard_dir is not None:
            self._tb.write(tensorboard_dir, step, scalars)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if step % self.plot_every_steps == 0:
            self.plot()
        if self._bar is not None:
            # The postfix first: update() draws the bar, and would show the previous step's values.
            self._bar.set_postfix(stage=record.get("stage"), loss=f"{record.get('loss') or 0:.4f}",
                                  reward=f"{record.get('reward_mean') or 0:.3f}", refresh=False)
            self._bar.update(1)
        elif step % self.every_steps == 0:
            log.info("step %d [%s] loss %.4f reward %.3f pass %.3f entropy %.3f kl %.4f | %.2f s, %.0f tok/s",
                     step, record.get("stage"), *(record.get(k) or 0.0 for k in (
                         "loss", "reward_mean", "pass_rate", "entropy", "kl_mean", "time/step_s", "tokens_per_s")))

    def plot(self) -> None:
        if self.enabled and self.records:
            try:
                plot_curves(self.records, self.plot_path)
            except Exception as e:  # a plotting problem must never stop training
                log.warning("could not draw %s: %s", self.plot_path, e)

    def message(self, text: str) -> None:
        """A line that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            log.info("%s", text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.plot()
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(options: Mapping[str, str], config: Mapping[str, Any] | None, *, resume: bool,
                 workdir: pathlib.Path):
    try:
        import wandb
    except ImportError:
        log.warning("log.wandb_project is set but wandb is not installed (pip install wandb); W&B is off")
        return None
    # The run id is stored in the workdir, so a resumed run appends to the same W&B run.
    id_file = workdir / "wandb_run_id"
    run_id = id_file.read_text().strip() if resume and id_file.exists() else f"fdjax-{int(time.time())}"
    id_file.write_text(run_id)
    return wandb.init(project=options["project"], entity=options.get("entity") or None,
                      name=options.get("name") or workdir.name, id=run_id, resume="allow", config=dict(config or {}))
