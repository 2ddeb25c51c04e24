"""Turning one step's rollout and train-step outputs into the scalars of its `metrics.jsonl` line.

Rollout figures are first reduced to per-host sums (and maxima for times), so that a multi-host run
combines them exactly; `finish` turns the sums into means and rates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fd_jax.verification import STATUSES, VALID
from fd_jax.rollout.rollout import RolloutResult

TIMINGS = ("generate_s", "verify_s", "feedback_s", "wait_s", "batch_s", "total_s")
# Counters of multi-turn episodes (present on every host when the task has tools), logged as episode/KEY.
EPISODE_COUNTS = ("turns", "tool_calls", "tool_errors", "prefill_tokens", "decode_steps")
EPISODE_TIMINGS = ("tool_s", "episode_host_s")


def rollout_sums(result: RolloutResult, num_generations: int) -> tuple[dict[str, float], dict[str, str]]:
    """(this host's sums, how to combine each over hosts: "sum" or "max"). Keys are the same on every
    host for a given stage."""
    rewards_B = np.asarray(result.batch.rewards_B, np.float64)
    valid_PG = np.array([r["status"] == VALID for r in result.records]).reshape(-1, num_generations)
    sums = {
        "rollouts": float(len(rewards_B)),
        "reward_sum": float(rewards_B.sum()),
        "valid": float(valid_PG.sum()),
        "problems": float(valid_PG.shape[0]),
        "solved": float(valid_PG.any(axis=1).sum()),
        "distilled": float(result.counts.get("distilled", 0)),
        "truncated": float(result.counts.get("truncated", 0)),
        "reprompts_truncated": float(result.counts.get("reprompts_truncated", 0)),
        "completion_tokens": float(np.sum(result.batch.completion_mask_BC)),
    }
    for status in STATUSES:
        sums[f"status/{status}"] = float(result.counts.get(status, 0))
    sums.update({f"episode/{key}": float(result.counts[key]) for key in EPISODE_COUNTS if key in result.counts})
    how = {key: "sum" for key in sums}
    for key in TIMINGS + tuple(k for k in EPISODE_TIMINGS if k in result.timings):
        sums[f"time/{key}"] = float(result.timings.get(key, 0.0))
        how[f"time/{key}"] = "max"  # the slowest host sets the pace
    return sums, how


def feedback_deltas(counts: Mapping[str, float], previous: dict[str, float]) -> dict[str, float]:
    """The provider's counters for this step alone (the rollout reports running totals since the provider
    was built; per-step deltas read the same after a resume). Updates `previous` in place."""
    totals = {k[len("feedback_"):]: float(v) for k, v in counts.items() if k.startswith("feedback_")}
    deltas = {f"feedback/{k}": v - previous.get(k, 0.0) for k, v in totals.items()}
    previous.update(totals)
    return deltas


def finish_rollout(sums: Mapping[str, float]) -> dict[str, float]:
    """Means and rates from the combined sums."""
    rollouts = max(sums["rollouts"], 1.0)
    out = {
        "reward_mean": sums["reward_sum"] / rollouts,
        "pass_rate": sums["valid"] / rollouts,  # fraction of rollouts that verified
        "solved_rate": sums["solved"] / max(sums["problems"], 1.0),  # problems with >= 1 valid rollout
        "rollout/distilled_frac": sums["distilled"] / rollouts,
        "rollout/truncated_frac": sums["truncated"] / rollouts,
        "rollout/completion_len_mean": sums["completion_tokens"] / rollouts,
        "rollout/reprompts_truncated": sums["reprompts_truncated"],
        "rollout/completion_tokens": sums["completion_tokens"],
    }
    for key, value in sums.items():
        if key.startswith("status/"):
            out[f"rollout/{key}"] = value
        elif key.startswith("time/"):
            out["time/rollout_s" if key == "time/total_s" else key] = value
        elif key.startswith("feedback/"):
            out[key] = value
        elif key.startswith("episode/"):  # per rollout: turns, tool calls, ... per episode
            out[f"{key}_mean"] = value / rollouts
    return out


def combine_iterations(per_iteration: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One value per metric over the `num_iterations` updates of a rollout batch: the mean, except maxima
    (`*_max`) which take the max. With one iteration, that iteration's metrics."""
    keys = per_iteration[0].keys()
    out = {}
    for key in keys:
        values = [float(m[key]) for m in per_iteration]
        out[key] = max(values) if key.endswith("_max") else float(np.mean(values))
    if len(per_iteration) > 1:  # how far the last reuse drifted from the sampler's policy
        last = per_iteration[-1]
        for key in ("fd/is_weight_mean", "grpo/ratio_mean", "grpo/clip_ratio/region_mean"):
            if key in last:
                out[f"last_iteration/{key}"] = float(last[key])
    return out
