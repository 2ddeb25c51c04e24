"""Lean pool overhead and scaling, with the stand-in REPL of tests/lean/fake_repl.py (no Lean needed).

1. Overhead: a stand-in that answers at once, 2 workers; proofs/s and ms per proof of the pool itself
   (screening, JSON, pipes, queue, the axiom audit's second round trip, the stand-in's own parsing).
   Target: <= 2 ms per proof. The proofs are the 51 real Lean Workbook proofs of
   ../shared/data/kimina_match (about 1.2 kB each) when that folder exists, else a short one; the time
   `screen` alone takes on them is reported too, and how many of them it rejects (false positives: a Kimina
   server accepted all but one, which timed out).
2. Scaling: a stand-in that burns a fixed CPU time per proof; throughput with 1 and 2 workers against the
   ideal (workers / burn time), as an efficiency.

    python benchmarks/lean_pool.py [--proofs 400] [--burn-ms 50] [--reps 3] [--out result.json]

Prints one JSON object (medians over --reps). Kimina Lean Server's published throughput is included for
scale; it is for real Mathlib proofs, where Lean's own time dominates, so it is not comparable with the
pool's overhead. Timings on a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from fd_jax.lean import DEFAULT_HEADER, LeanVerifier, ProofTask, screen  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "lean" / "fake_repl.py"
KIMINA_INPUTS = REPO.parent / "shared" / "data" / "kimina_match" / "input"
STATEMENT = "theorem mathd_algebra_10 (x : ℝ) (h₀ : x = 2) :\n  x ^ 2 + 1 = 5 := by\n"
CODE = STATEMENT + "  subst h₀\n  norm_num\n"
KIMINA = {"proofs_per_s_8_cpus": 0.83, "proofs_per_s_60_cpus": 4.33,
          "source": "Kimina Lean Server technical report (real Mathlib proofs)"}  # fmt: skip


def _real_proofs() -> list[ProofTask]:
    """The kimina_match proofs (header removed) if available, else the short synthetic one."""
    tasks = []
    for path in sorted(KIMINA_INPUTS.glob("*.lean")) if KIMINA_INPUTS.is_dir() else []:
        source = path.read_text()
        if source.startswith(DEFAULT_HEADER):
            code = source[len(DEFAULT_HEADER) :]
            tasks.append(ProofTask(re.search(r"theorem\s.*?:=\s*by", code, re.S).group(0), code))
    return tasks or [ProofTask(STATEMENT, CODE)]


def _screen_false_positives(tasks: list[ProofTask]) -> dict[str, object]:
    """How many of the real proofs (all accepted by a real Kimina server) the screen rejects, and why."""
    rejected = {task.statement.split()[1]: reason for task in tasks if (reason := screen(task.statement, task.code))}
    return {"real_proofs": len(tasks), "rejected": len(rejected), "rate": round(len(rejected) / len(tasks), 4),
            "reasons": rejected}  # fmt: skip


def _screen_ms(tasks: list[ProofTask], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for task in tasks:
            screen(task.statement, task.code)
        times.append((time.perf_counter() - start) / len(tasks))
    return round(1000 * statistics.median(times), 3)


def _throughput(
    workers: int, proofs: int, reps: int, burn_ms: float, audit: bool, pool: list[ProofTask]
) -> dict[str, float]:
    """Median proofs/s of `reps` batches of `proofs` proofs (cycling through `pool`) on warm workers."""
    command = [sys.executable, str(FAKE), "--burn-ms", str(burn_ms)]
    batch = [pool[i % len(pool)] for i in range(proofs)]
    rates = []
    with LeanVerifier(command, workers=workers, timeout_s=60, max_uses=10**9, audit_axioms=audit) as verifier:
        if not verifier.wait_ready(60):
            raise RuntimeError("the stand-in REPL did not start")
        verifier.verify_batch(batch[: 2 * workers])  # warm-up
        for _ in range(reps):
            start = time.perf_counter()
            verdicts = verifier.verify_batch(batch)
            rates.append(proofs / (time.perf_counter() - start))
            if {v.status for v in verdicts} != {"valid"}:
                raise RuntimeError(f"unexpected verdicts: {sorted({v.status for v in verdicts})}")
    rate = statistics.median(rates)
    # ms_per_proof: wall time per proof of the whole pool; worker_ms_per_proof: what one proof costs a worker.
    return {"proofs_per_s": round(rate, 1), "ms_per_proof": round(1000 / rate, 3),
            "worker_ms_per_proof": round(1000 * workers / rate, 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--proofs", type=int, default=400, help="proofs per timed batch (overhead section)")
    parser.add_argument("--burn-ms", type=float, default=50.0, help="CPU time per proof (scaling section)")
    parser.add_argument("--reps", type=int, default=3)
    if not FAKE.is_file():  # every verdict would be `crashed`, which reads as a pool fault
        sys.exit(f"lean_pool.py: the stand-in REPL {FAKE} is missing (run from a checkout with tests/)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    proofs = _real_proofs()
    overhead = _throughput(2, args.proofs, args.reps, 0.0, audit=True, pool=proofs)
    overhead_no_audit = _throughput(2, args.proofs, args.reps, 0.0, audit=False, pool=proofs)
    scaling = {}
    scaled_proofs = max(8, int(4000 / args.burn_ms))  # about 4 s of CPU per batch
    for workers in (1, 2):
        result = _throughput(workers, scaled_proofs, args.reps, args.burn_ms, audit=True, pool=proofs)
        ideal = workers * 1000 / args.burn_ms
        scaling[f"{workers}_workers"] = {**result, "ideal_proofs_per_s": round(ideal, 1),
                                         "efficiency": round(result["proofs_per_s"] / ideal, 3)}  # fmt: skip
    report = {
        "benchmark": "lean_pool",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "overhead_2_workers": {**overhead, "target_ms_per_proof": 2.0,
                               "meets_target": overhead["worker_ms_per_proof"] <= 2.0,
                               "note": "2 REPL round trips per proof (the proof, then the axiom audit)"},
        "overhead_2_workers_no_audit": overhead_no_audit,
        "screen_ms_per_proof": _screen_ms(proofs, args.reps),
        "screen_false_positives": _screen_false_positives(proofs),
        "proofs": f"{len(proofs)} kimina_match proofs" if len(proofs) > 1 else "one synthetic proof",
        "scaling": {"burn_ms_per_proof": args.burn_ms, **scaling},
        "kimina_published": KIMINA,
        "settings": {"proofs": args.proofs, "scaling_proofs": scaled_proofs, "reps": args.reps,
                     "statistic": "median"},
    }  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
