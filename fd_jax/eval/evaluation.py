"""Evaluation: unbiased pass@k, policy entropy on the samples, and the diversity of the valid proofs.

    report = evaluate(problems, model=model, tokenizer=tokenizer, fmt=fmt, verifier=verifier,
                      n=32, ks=(1, 8, 32), max_new_tokens=2048, temperature=1.0)
    write_report(report, out_dir)                      # report.json + pass_at_k.png
    plot_pass_at_k({"FD": fd, "GRPO": grpo}, "cmp.png")  # several runs on one plot

pass@k is the unbiased estimator of Chen et al. (2021) from n ≥ k samples per problem with c correct,
1 − C(n−c, k)/C(n, k), averaged over problems. The entropy is that of the policy itself (temperature 1, no
top-p/top-k) at every position where a sample drew a token, teacher-forced on the samples and computed
with the chunked kernel of `fd_jax.kernels.token_kl`, so no [tokens, vocab] logits are materialised. The
diversity measures are those of `fd_jax.eval.diversity`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import logging
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from fd_jax.eval import diversity
from fd_jax.data.problems import Problem
from fd_jax.data.prompts import PromptFormat
from fd_jax.kernels.token_kl import token_logprobs_and_entropy
from fd_jax.verification import VALID, ProofTask, Verdict, Verifier
from fd_jax.rollout.sample import sample_chunks
from fd_jax.rollout.sampling import bucket

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
PLOT_FILE = "pass_at_k.png"
SAMPLES_FILE = "samples.jsonl"


# -- pass@k -----------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n (c of them
    correct) is correct: 1 − C(n−c, k)/C(n, k), the unbiased pass@k estimator.

    Computed as 1 − Π_{i=n−c+1..n} (1 − k/i), which never forms a binomial coefficient. Exact 0.0 when
    c = 0 and exact 1.0 when n − c < k. Raises ValueError when k > n, k < 1 or c is outside [0, n].
    """
    n, c, k = int(n), int(c), int(k)
    if k > n:
        raise ValueError(f"pass_at_k: k={k} is larger than n={n}, the samples per problem; sample n >= k")
    if k < 1:
        raise ValueError(f"pass_at_k: k must be >= 1, got k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c={c} correct samples is outside [0, n={n}]")
    if c == 0:
        return 0.0
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(correct: Sequence[int], n: int, ks: Sequence[int]) -> dict[int, float]:
    """k -> pass@k averaged over problems, from each problem's count of correct samples out of n."""
    return {int(k): float(np.mean([pass_at_k(n, c, k) for c in correct])) for k in ks}


# -- policy entropy ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_stats(graphdef, state, tokens_BT, positions_BT, targets_BT, mask_BT):
    model = nnx.merge(graphdef, state)
    hidden_BTD = model.hidden_states(tokens_BT, positions_BT)
    b, t, d = hidden_BTD.shape
    logprob_N, entropy_N = token_logprobs_and_entropy(
        hidden_BTD.reshape(b * t, d), model.unembedding, targets_BT.reshape(b * t), mask_BT.reshape(b * t)
    )
    return logprob_N.reshape(b, t), entropy_N.reshape(b, t)


def completion_logprobs_and_entropy(
    model: Any,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    batch_rows: int = 16,
    min_bucket: int = 16,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Teacher-forced statistics of the model's next-token distribution (temperature 1) along completions.

    Row b is `prompts[b] + completions[b]`; for each completion token t the model reads everything before
    it. Returns (logprobs, entropies): per row, f32 arrays of len(completions[b]) with log π(y_t | ...) and
    H(π(· | ...)) in nats. Rows run `batch_rows` at a time, padded to a power-of-two length >= min_bucket
    (and the last batch to `batch_rows` rows), so the forward pass compiles once per length bucket.
    """
    where = "completion_logprobs_and_entropy"
    if len(prompts) != len(completions):
        raise ValueError(f"{where}: {len(prompts)} prompts but {len(completions)} completions")
    if empty := [b for b, prompt in enumerate(prompts) if not len(prompt)]:
        raise ValueError(f"{where}: prompts {empty[:5]} are empty; the first completion token needs a context")
    graphdef, state = nnx.split(model)
    logprobs, entropies = [], []
    for first in range(0, len(prompts), batch_rows):
        rows = range(first, min(first + batch_rows, len(prompts)))
        length = bucket(max(len(prompts[b]) + len(completions[b]) for b in rows), min_bucket)
        tokens_BT = np.zeros((batch_rows, length), np.int32)
        positions_BT = np.full((batch_rows, length), -1, np.int32)  # -1: padding, never attended to
        targets_BT = np.zeros((batch_rows, length), np.int32)
        mask_BT = np.zeros((batch_rows, length), np.float32)
        for i, b in enumerate(rows):
            seq = list(prompts[b]) + list(completions[b])
            tokens_BT[i, : len(seq)] = seq
            positions_BT[i, : len(seq)] = np.arange(len(seq))
            targets_BT[i, : len(seq) - 1] = seq[1:]
            # The distribution that drew completion token t sits one position earlier.
            mask_BT[i, len(prompts[b]) - 1 : len(seq) - 1] = 1.0
        logprob_BT, entropy_BT = jax.device_get(
            _token_stats(graphdef, state, tokens_BT, positions_BT, targets_BT, mask_BT)
        )
        for i, b in enumerate(rows):
            span = slice(len(prompts[b]) - 1, len(prompts[b]) - 1 + len(completions[b]))
            logprobs.append(np.asarray(logprob_BT[i, span], np.float32))
            entropies.append(np.asarray(entropy_BT[i, span], np.float32))
    return logprobs, entropies


# -- evaluate ---------------------------------------------------------------------------------------------


def _check_ks(ks: Sequence[int], n: int) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"evaluate: ks must be a non-empty list of k >= 1, got {ks}")
    if ks[-1] > n:
        raise ValueError(f"evaluate: k={ks[-1]} is larger than n={n} samples per problem; raise n or drop that k")
    return ks


def _progress_bar(total: int, enabled: bool | None):
    from tqdm.auto import tqdm

    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(total=total, desc="evaluate", unit="problem", disable=disable, dynamic_ncols=True)


def evaluate(
    problems: Sequence[Problem],
    *,
    model: Any,
    tokenizer: Any,
    fmt: PromptFormat,
    verifier: Verifier,
    n: int,
    ks: Sequence[int] = (1,),
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop_strings: Sequence[str] = (),
    batch_problems: int = 0,
    entropy: bool = True,
    entropy_batch_rows: int = 8,
    lemmas: bool = True,
    generate_fn: Callable[..., Any] | None = None,
    keep_samples: bool = False,
    progress: bool | None = None,
    episodes: Any = None,
) -> dict[str, Any]:
    """Samples n completions per problem, verifies them, and reports pass@k, entropy and diversity.

    The sampling and checking are `fd_jax.rollout.sample.sample_chunks`, as in training: fmt renders prompts
    and extracts `ProofTask`s; the verifier's `submit` checks a batch while the next one generates.
    generate_fn: `fd_jax.sampling.generate` by default (any function with its signature and `n=`).
    batch_problems: problems per generate call (0 = all at once); each call gets its own seed derived from
    `seed`, so a run is reproducible for a fixed batch_problems. stop_strings: passed to the sampler (with
    the tokenizer to decode). entropy: compute the teacher-forced policy entropy (needs an fd_jax model)
    over `entropy_batch_rows` completions per forward pass (the memory knob: attention holds
    [rows, heads, T, T] scores). lemmas: count Mathlib lemmas in valid proofs (off for the arithmetic test
    bed, whose "proofs" are numbers). keep_samples: add `samples`, one record per completion, to the
    report. progress: a tqdm bar (None = only on a terminal; log lines otherwise).
    episodes: an episodic task's `fd_jax.rollout.rollout.EpisodeSetup`: each sample is an episode with
    tools, sampled as the training rollout samples them (`fd_jax.rollout.rollout.sample_episodes`, budgets of
    the setup instead of max_new_tokens, batch_problems problems at a time); pass@k is over the final
    submissions' verdicts, an episode that ends without an answer counts as a failure, and the entropy is
    over the model's own tokens (never tool output).

    Returns a JSON-serialisable dict: `pass_at_k` {str(k): mean over problems}, `entropy` (nats per token,
    None when off), `diversity`, per-problem records in `problems`, `statuses`, `timings` and the settings.
    Raises ValueError for an empty problem list, n < 1 or a k outside [1, n] before any sampling.
    """
    if not problems:
        raise ValueError("evaluate: no problems to evaluate")
    if n < 1:
        raise ValueError(f"evaluate: n (samples per problem) must be >= 1, got {n}")
    ks = _check_ks(ks, n)
    if generate_fn is None:
        from fd_jax.rollout.sampling import generate as generate_fn
    start = time.perf_counter()
    encode = lambda text: tokenizer.encode(text, add_special_tokens=fmt.add_special_tokens)  # noqa: E731
    prompts = [encode(fmt.render(p)) for p in problems]
    if episodes is not None:
        chunks = _episode_chunks(problems, prompts, model=model, tokenizer=tokenizer, fmt=fmt, verifier=verifier,
                                 setup=episodes, n=n, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                 chunk_problems=batch_problems)
    else:
        chunks = sample_chunks(problems, prompts, model=model, tokenizer=tokenizer, fmt=fmt, verifier=verifier,
                               generate_fn=generate_fn, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, seed=seed, chunk_problems=batch_problems,
                               stop_strings=stop_strings)

    completions: list[list[int]] = []
    texts: list[str] = []
    finish: list[str] = []
    tasks: list[ProofTask] = []
    token_entropy: list[np.ndarray] = []
    pending: list[Any] = []  # per chunk: the future of its verdicts
    generate_s = entropy_s = 0.0
    with _progress_bar(len(problems), progress) as bar:
        for chunk in chunks:
            generate_s += chunk.generate_s
            completions += chunk.completions
            tasks += chunk.tasks
            texts += chunk.texts
            finish += chunk.finish
            pending.append(chunk.verdicts)
            if entropy:
                t0 = time.perf_counter()
                rows = [prompts[p] for p in chunk.problems for _ in range(n)]
                rows_entropy = completion_logprobs_and_entropy(model, rows, chunk.completions,
                                                               batch_rows=entropy_batch_rows)[1]
                masks = getattr(chunk, "masks", None)  # episodes: the model's own tokens only
                token_entropy += rows_entropy if masks is None else [
                    np.asarray(e)[np.asarray(m[: len(e)], bool)] for e, m in zip(rows_entropy, masks)]
                entropy_s += time.perf_counter() - t0
            bar.update(len(chunk.problems))
            if bar.disable:
                log.info("evaluate: %d/%d problems sampled (%.1f s)", chunk.problems.stop, len(problems),
                         time.perf_counter() - start)
        t0 = time.perf_counter()
        verdicts: list[Verdict] = [v for future in pending for v in future.result()]
        verify_wait_s = time.perf_counter() - t0

    report = summarize(problems, n=n, ks=ks, tasks=tasks, verdicts=verdicts, completions=completions,
                       finish_reasons=finish, token_entropy=token_entropy if entropy else None, lemmas=lemmas)
    report["sampling"] = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                              seed=seed, batch_problems=batch_problems, stop_strings=list(stop_strings))
    if episodes is not None:
        report["episodes"] = dataclasses.asdict(episodes.config)  # the budgets and tool format of the episodes
    report["timings"] = dict(generate_s=generate_s, entropy_s=entropy_s, verify_wait_s=verify_wait_s,
                             total_s=time.perf_counter() - start)
    if keep_samples:
        report["samples"] = [
            dict(problem_id=problems[b // n].id, sample=b % n, completion=texts[b], code=tasks[b].code,
                 status=verdicts[b].status, reason=verdicts[b].reason, finish_reason=finish[b],
                 num_tokens=len(completions[b]))
            for b in range(len(tasks))
        ]
    return report


@dataclasses.dataclass
class _EpisodeChunk:
    """What `evaluate` reads of a chunk (the fields of `fd_jax.rollout.sample.SampledChunk` it uses), for
    episodes: the verdicts are already known (a done future)."""

    problems: range
    completions: list[list[int]]
    masks: list[list[int]]
    tasks: list[ProofTask]
    texts: list[str]
    finish: list[str]
    verdicts: concurrent.futures.Future
    generate_s: float


def _episode_chunks(problems, prompts, *, model, tokenizer, fmt, verifier, setup, n, temperature, top_p, top_k, seed,
                    chunk_problems):
    """Episodes of `chunk_problems` problems at a time (0 = all), each chunk with its own seed."""
    from fd_jax.rollout.rollout import sample_episodes

    size = chunk_problems or len(problems)
    for c, start in enumerate(range(0, len(problems), size)):
        span = range(start, min(start + size, len(problems)))
        t0 = time.perf_counter()
        s = sample_episodes(problems[span.start:span.stop], prompts[span.start:span.stop], model=model,
                            tokenizer=tokenizer, fmt=fmt, verifier=verifier, setup=setup, n=n, temperature=temperature,
                            top_p=top_p, top_k=top_k, seed=seed + 1000003 * c)
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(s.verdicts)
        yield _EpisodeChunk(span, s.completions, s.masks, s.tasks, s.texts, s.finish, done,
                            time.perf_counter() - t0)


def summarize(
    problems: Sequence[Problem],
    *,
    n: int,
    ks: Sequence[int],
    tasks: Sequence[ProofTask],
    verdicts: Sequence[Verdict],
    completions: Sequence[Sequence[int]],
    finish_reasons: Sequence[str],
    token_entropy: Sequence[np.ndarray] | None = None,
    lemmas: bool = True,
) -> dict[str, Any]:
    """The report of `evaluate` from its per-sample results, rows b = p * n + i (problem-major).

    token_entropy: per row, the per-token entropies (nats); the report's `entropy` is their mean over all
    completion tokens of all rows (each token weighs the same), None when not given.
    """
    correct, per_problem, lemma_problems = [], [], collections.Counter()
    for p, problem in enumerate(problems):
        rows = range(p * n, (p + 1) * n)
        valid = [b for b in rows if verdicts[b].status == VALID]
        record = dict(
            id=problem.id,
            correct=len(valid),
            distinct_valid=diversity.distinct(diversity.normalize_proof(tasks[b].code) for b in valid),
            distinct_samples=diversity.distinct(diversity.normalize_proof(tasks[b].code) for b in rows),
        )
        if lemmas:
            used = set().union(*(diversity.lemmas_used(tasks[b].code, problem.statement) for b in valid))
            record["lemmas"] = sorted(used)
            lemma_problems.update(used)
        correct.append(len(valid))
        per_problem.append(record)

    solved = [r for r in per_problem if r["correct"]]
    mean = lambda xs: float(np.mean(xs)) if len(xs) else 0.0  # noqa: E731
    div: dict[str, Any] = {
        "distinct_valid_per_problem": mean([r["distinct_valid"] for r in per_problem]),
        "distinct_valid_per_solved_problem": mean([r["distinct_valid"] for r in solved]),
        "distinct_samples_per_problem": mean([r["distinct_samples"] for r in per_problem]),
    }
    if lemmas:
        div["distinct_lemmas"] = len(lemma_problems)
        div["lemmas_per_solved_problem"] = mean([len(r["lemmas"]) for r in solved])
        div["top_lemmas"] = [[name, count] for name, count in lemma_problems.most_common(20)]

    entropy_tokens = int(sum(len(e) for e in token_entropy)) if token_entropy is not None else 0
    statuses = collections.Counter(v.status for v in verdicts)
    return {
        "num_problems": len(problems),
        "n": n,
        "ks": list(ks),
        "pass_at_k": {str(k): v for k, v in mean_pass_at_k(correct, n, ks).items()},
        "solved": len(solved),
        "entropy": float(sum(float(np.sum(e, dtype=np.float64)) for e in token_entropy) / entropy_tokens)
        if entropy_tokens else None,
        "entropy_tokens": entropy_tokens,
        "completion_tokens_mean": mean([len(c) for c in completions]),
        "truncated_fraction": mean([f == "length" for f in finish_reasons]),
        "statuses": dict(sorted(statuses.items())),
        "diversity": div,
        "problems": per_problem,
    }


# -- output -----------------------------------------------------------------------------------------------


def plot_pass_at_k(reports: Mapping[str, Mapping[str, Any]], path: str | pathlib.Path) -> pathlib.Path:
    """A PNG of pass@k against k (log2 axis), one line per report, labelled by its key in `reports`.

    reports: name -> a report of `evaluate` (or anything with `pass_at_k` {str(k): value}). Uses
    matplotlib's Agg canvas directly, so it neither needs a display nor changes pyplot's backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not reports:
        raise ValueError("plot_pass_at_k: no reports to plot")
    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    all_ks, top = set(), 0.0
    for name, report in reports.items():
        curve = sorted((int(k), float(v)) for k, v in report["pass_at_k"].items())
        ks, values = zip(*curve)
        all_ks.update(ks)
        top = max(top, *values)
        label = name if report.get("entropy") is None else f"{name} (entropy {report['entropy']:.2f} nats)"
        ax.plot(ks, values, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
    ax.set_ylim(0.0, min(1.0, max(0.05, 1.15 * top)))  # zoomed on the data: runs differ by a few points
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("pass@k")
    sizes = {(r.get("num_problems"), r.get("n")) for r in reports.values()}
    if len(sizes) == 1 and None not in next(iter(sizes)):
        problems, n = next(iter(sizes))
        ax.set_title(f"pass@k on {problems} problems, n = {n} samples each")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_report(report: Mapping[str, Any], out_dir: str | pathlib.Path, *, name: str = "model") -> dict[str, str]:
    """Writes `report.json`, `pass_at_k.png` (labelled `name`) and, when the report keeps them,
    `samples.jsonl` (one line per completion, left out of report.json) into out_dir. Returns their paths."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(report)
    paths = {}
    samples = report.pop("samples", None)
    if samples is not None:
        paths["samples"] = out / SAMPLES_FILE
        with paths["samples"].open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    paths["report"] = out / REPORT_FILE
    paths["report"].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["plot"] = plot_pass_at_k({name: report}, out / PLOT_FILE)
    return {k: str(v) for k, v in paths.items()}
