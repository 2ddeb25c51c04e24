"""The run's log sinks (fd_jax.train.metrics_log.RunLog) as a user sees them: the progress bar's text."""

from __future__ import annotations

import re

from fd_jax.train.metrics_log import RunLog


def test_progress_bar_shows_the_step_it_just_finished(tmp_path, capsys):
    log = RunLog(tmp_path, total_steps=3, progress="true", tensorboard=False, plot_every_steps=100)
    log._bar.mininterval = 0  # draw on every update, as a slow real step does
    for step, loss, reward in [(1, 0.1111, 0.25), (2, 0.2222, 0.5), (3, 0.3333, 0.75)]:
        log.write({"step": step, "stage": "fd", "loss": loss, "reward_mean": reward})
        drawn = re.split(r"[\r\n]", capsys.readouterr().err)
        shown = [line for line in drawn if f"{step}/3" in line]
        assert shown, drawn
        assert f"loss={loss:.4f}" in shown[-1] and f"reward={reward:.3f}" in shown[-1], shown[-1]
    log.close()
