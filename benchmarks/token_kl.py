"""Benchmark: value-and-grad of the fused divergence kernels against `reference_divergence` (materialised
logits).

    python benchmarks/token_kl.py [--quick] [--reps 5] [--mode full] [--alpha 1.0] [--shapes S,L]
        [--dtypes float32,bfloat16[,mixed]] [--one-pass-chunk C] [--one-pass-tile T] [--mask-fraction 0.1]
        [--also-one-pass-blocks 128x2048,384x2048]

The loss is mean_n D_n over N tokens (10% masked at random, `--mask-fraction`), differentiated w.r.t. the
student hidden states and W. The fused kernels compute only the token chunks that hold counted tokens
(`token_kl_xla.compaction`), so masked tokens cost nothing once they fill whole chunks, while the reference
pays for all N. At the default 10% that is 15 of one pass's 16 chunks of 128 and all 4 of the two-pass
kernel's chunks of 512; `--mask-fraction 0` times the kernels on fully counted batches.

* `reference`: `reference_divergence`, [N, V] logits in memory (four [N, D] x [D, V] matmuls);
* `fused`: `fused_divergence`, the per-token kernel whose backward recomputes every logit tile (six);
* `one_pass`: `token_loss.fused_token_loss` with the per-token loss D_n / N: the gradient is formed while
  the statistics are (four; the train step's default whenever its loss is a sum of per-token terms);
  `one_pass_CxT` (`--also-one-pass-blocks`): the same with other block sizes, in the same interleaved run
  (a default's before and after in one process);
* `matmul_floor` (timed, not a divergence): the four matmuls that any value-and-grad must do (student and
  teacher logits, d_h, dW) for the counted tokens only, unchunked, in the same input dtypes with f32
  accumulation, and nothing else but g = s - t. No kernel of the same FLOPs can beat this machine's matmul
  rate by much, so its ratio to the reference tells whether a time target is reachable here at all.

Per shape (N tokens, D, V) and input dtypes (f32; bf16; `mixed`: bf16 hidden states with an f32 W, as the
TPU configs train): XLA's compiled temporary memory (`memory_analysis().temp_size_in_bytes`) and the
median wall time, the three run in turn (A B C A B C) in one process, every array passed as an argument
(captured arrays would be constants that XLA folds); each variant's value and gradients are checked
against the reference's. Prints one JSON object with the ratios to the reference and to the floor, and the
targets of issue 19: per variant `floor_ratio` (its median wall time / the floor's; `cpu_floor_ratio` the
same in process CPU seconds) <= 1.15 in f32 and bf16, and `memory_ratio` (temporary memory / the
reference's) <= 5% in f32 (bf16: reported, no target; `mixed`: no targets). `meets_targets` reads the
wall-time ratio. A ratio to the floor timed interleaved in the same process is far steadier on a loaded
machine than a time or a ratio across processes, but load still moves it by several percent.
Process CPU seconds are reported beside wall seconds: on a shared or oversubscribed machine wall time also
counts time spent descheduled, and the reference's time varies most (its GB-sized temporaries are
page-faulted in on every call), so read the CPU ratio too and compare several runs.

On a GPU or TPU a second section times the fused engines (XLA scans, Pallas: Triton kernels on GPU, Mosaic
on TPU, one pass) at a larger bf16 shape, checks their value and gradients against the XLA engine's, and
reports achieved FLOP/s as a fraction of the chip's bf16 peak. FLOPs counted: 12 N D
V for the two-pass engines (student and teacher logits forward, both again in the backward, d_h and dW),
8 N D V for one pass; the JSD and the Pallas backward do more work than counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fd_jax.kernels import token_kl, token_kl_xla, token_loss

SHAPES = {"S": (2048, 256, 32768), "L": (2048, 576, 49152)}  # L: SmolLM2-135M's D and V
ACCEL_SHAPE = (8192, 2048, 151936)  # a Qwen-sized vocabulary
# Issue 19's targets, relative to the matmul floor (time) and to the reference (temporary memory).
TARGET_FLOOR = {"float32": 1.15, "bfloat16": 1.15, "mixed": None}
TARGET_MEMORY = {"float32": 0.05, "bfloat16": None, "mixed": None}
# Input dtypes (hidden states, W). `mixed` is how the TPU configs train (bf16 compute, f32 parameters): the
# issue sets no target for it; with an f32 W the one-pass dW accumulator is the gradient itself.
DTYPES = {"float32": (jnp.float32, jnp.float32), "bfloat16": (jnp.bfloat16, jnp.bfloat16),
          "mixed": (jnp.bfloat16, jnp.float32)}
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v5 lite": 197e12,
                   "TPU v5": 459e12, "TPU v4": 275e12, "TPU v6 lite": 918e12}


def _inputs(num: int, dim: int, vocab: int, dtype, w_dtype=None, seed: int = 0, mask_fraction: float = 0.1):
    rng = np.random.default_rng(seed)
    hs = rng.normal(size=(num, dim)).astype(np.float32) / np.sqrt(dim) * 4
    ht = hs + rng.normal(size=(num, dim)).astype(np.float32) / np.sqrt(dim)
    w = rng.normal(size=(dim, vocab)).astype(np.float32)
    mask = (rng.random(num) >= mask_fraction).astype(np.float32)
    return (jnp.asarray(hs, dtype), jnp.asarray(ht, dtype), jnp.asarray(w, w_dtype or dtype), jnp.asarray(mask))


def _value_and_grad(divergence_fn, **kwargs):
    def run(hs, ht, w, mask):
        def loss(hs, w):
            return jnp.sum(divergence_fn(hs, ht, w, mask, **kwargs)) / hs.shape[0]
        return jax.value_and_grad(loss, argnums=(0, 1))(hs, w)
    return jax.jit(run)


def _one_pass_value_and_grad(chunk=None, tile=None, **kwargs):
    """The same loss, mean_n D_n over the N rows, through `fused_token_loss` (gradient in the same pass)."""
    def run(hs, ht, w, mask):
        ids = jnp.zeros(mask.shape, jnp.int32)
        def loss(hs, w):
            mean_div = lambda stats, aux: stats.divergence / hs.shape[0]  # noqa: E731
            return token_loss.fused_token_loss(hs, ht, w, mask, ids, mean_div, token_chunk=chunk,
                                              vocab_tile=tile, **kwargs)[0]
        return jax.value_and_grad(loss, argnums=(0, 1))(hs, w)
    return jax.jit(run)


def _matmul_floor(counted: int):
    """The four [n, D] x [D, V] matmuls of a value-and-grad for the n counted tokens (see the docstring)."""
    def run(hs, ht, w, mask):
        del mask  # the counted tokens are taken as the first n: only the matmul shapes matter here
        hs, ht = hs[:counted], ht[:counted]
        dot = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)  # noqa: E731
        g = dot(hs, w) - dot(ht, w)
        return dot(g, w.T), dot(hs.T, g)
    return jax.jit(run)


def _temp_bytes(fn, args) -> int:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def _interleaved_medians(fns: dict, args, reps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall seconds and median process CPU seconds (all threads) per function. CPU time is the
    steadier figure on a shared machine, where wall time also counts time spent descheduled."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args))
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    median = statistics.median
    return {k: median(v) for k, v in wall.items()}, {k: median(v) for k, v in cpu.items()}


def cpu_section(shapes, dtypes, reps: int, mode: str, alpha: float, one_pass_blocks: tuple,
                mask_fraction: float = 0.1, also_blocks: tuple = ()) -> list[dict]:
    rows = []
    for shape_name in shapes:
        num, dim, vocab = SHAPES[shape_name]
        for dtype_name in dtypes:
            args = _inputs(num, dim, vocab, *DTYPES[dtype_name], mask_fraction=mask_fraction)
            kw = dict(alpha=alpha, mode=mode, top_k=64 if mode == "topk" else None)
            fns = {"reference": _value_and_grad(token_kl.reference_divergence, **kw),
                   "fused": _value_and_grad(token_kl.fused_divergence, backend="xla", **kw),
                   "one_pass": _one_pass_value_and_grad(*one_pass_blocks, **kw),
                   **{f"one_pass_{c}x{t}": _one_pass_value_and_grad(c, t, **kw) for c, t in also_blocks}}
            mem = {name: _temp_bytes(fn, args) for name, fn in fns.items()}
            counted = int(np.sum(np.asarray(args[3]) > 0))
            secs, cpu = _interleaved_medians({**fns, "matmul_floor": _matmul_floor(counted)}, args, reps)
            want = fns["reference"](*args)
            variants = [name for name in fns if name != "reference"]
            for name in variants:  # the same value and gradients as the reference
                _check_close(want, fns[name](*args), name)
            row = {"shape": shape_name, "N": num, "D": dim, "V": vocab, "dtype": dtype_name,
                   "counted_tokens": counted,
                   "reference_temp_MiB": round(mem["reference"] / 2**20, 1),
                   "reference_s": round(secs["reference"], 4), "reference_cpu_s": round(cpu["reference"], 4)}
            for name in variants:
                mem_ratio = mem[name] / mem["reference"]
                floor_ratio = secs[name] / secs["matmul_floor"]
                target_floor, target_memory = TARGET_FLOOR[dtype_name], TARGET_MEMORY[dtype_name]
                row[name] = {
                    "temp_MiB": round(mem[name] / 2**20, 1), "memory_ratio": round(mem_ratio, 4),
                    "s": round(secs[name], 4), "cpu_s": round(cpu[name], 4),
                    "floor_ratio": round(floor_ratio, 3),
                    "cpu_floor_ratio": round(cpu[name] / cpu["matmul_floor"], 3),
                    "time_ratio": round(secs[name] / secs["reference"], 3),
                    "cpu_time_ratio": round(cpu[name] / cpu["reference"], 3),
                    "meets_targets": None if target_floor is None else
                    bool(floor_ratio <= target_floor and (target_memory is None or mem_ratio <= target_memory)),
                }
            row["matmul_floor"] = {"s": round(secs["matmul_floor"], 4),
                                   "time_ratio": round(secs["matmul_floor"] / secs["reference"], 3),
                                   "cpu_time_ratio": round(cpu["matmul_floor"] / cpu["reference"], 3)}
            rows.append(row)
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def _check_close(ref, out, name):
    """Raise if a variant's value or gradients stray from the reference's (bf16 inputs: loose)."""
    (ref_value, ref_grads), (value, grads) = ref, out
    for what, a, b in (("value", ref_value, value), ("d_h", ref_grads[0], grads[0]), ("dW", ref_grads[1], grads[1])):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        err = float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30))
        if err > (2e-2 if ref_grads[0].dtype == jnp.bfloat16 else 1e-3):
            raise AssertionError(f"{name}: {what} differs from the reference by {err:.2e} (relative to max)")


def _peak_flops() -> tuple[str, float | None]:
    kind = jax.devices()[0].device_kind
    matches = [name for name in BF16_PEAK_FLOPS if name.lower() in kind.lower()]
    return kind, BF16_PEAK_FLOPS[max(matches, key=len)] if matches else None


def accelerator_section(reps: int, mode: str, alpha: float, mask_fraction: float = 0.1) -> dict:
    """Fused engines on the accelerator: wall time, FLOP/s and fraction of the bf16 peak (FLOPs of every
    token, masked or not)."""
    num, dim, vocab = ACCEL_SHAPE
    args = _inputs(num, dim, vocab, jnp.bfloat16, mask_fraction=mask_fraction)
    kind, peak = _peak_flops()
    flops = 12.0 * num * dim * vocab
    kw = dict(alpha=alpha, mode=mode, top_k=64 if mode == "topk" else None)
    fns, skipped = {}, {}
    for backend in ("xla", "pallas"):
        fn = _value_and_grad(token_kl.fused_divergence, backend=backend, **kw)
        try:
            lowered = fn.lower(*args)
        except ValueError as err:  # the engine does not run on this platform or mode
            skipped[backend] = str(err)
            continue
        try:
            lowered.compile()
        except Exception as err:  # noqa: BLE001 - a kernel the compiler rejects is reported, not fatal
            if backend == "xla":
                raise
            skipped[backend] = f"compilation failed: {type(err).__name__}: {err}"[:2000]
            continue
        fns[backend] = fn
    fns["one_pass"] = _one_pass_value_and_grad(**kw)
    if "xla" in fns:  # compiled kernels (Triton / Mosaic) must agree with the XLA engine before being timed
        want = fns["xla"](*args)
        for name in [name for name in fns if name != "xla"]:
            try:
                _check_close(want, fns[name](*args), name)
            except AssertionError as err:
                skipped[name] = f"wrong results: {err}"
                del fns[name]
    secs, _ = _interleaved_medians(fns, args, reps)
    out = {"device": kind, "bf16_peak_flops": peak, "N": num, "D": dim, "V": vocab, "skipped": skipped}
    for backend, sec in secs.items():
        done = flops * (8 / 12 if backend == "one_pass" else 1)
        out[backend] = {"s": round(sec, 4), "flops_per_s": done / sec,
                        "fraction_of_bf16_peak": None if peak is None else round(done / sec / peak, 3)}
    if "xla" in secs and "pallas" in secs:
        out["pallas_speedup_over_xla"] = round(secs["xla"] / secs["pallas"], 3)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shape S only, 2 repetitions")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per function (default 5)")
    parser.add_argument("--mode", default="full", choices=("full", "topk", "sampled_token"))
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--one-pass-chunk", type=int, default=None,
                        help="token chunk of fused_token_loss (default token_loss.default_loss_blocks(W dtype))")
    parser.add_argument("--one-pass-tile", type=int, default=None,
                        help="vocabulary tile of fused_token_loss (default token_loss.default_loss_blocks(W dtype))")
    parser.add_argument("--also-one-pass-blocks", default="",
                        help="comma-separated CxT block sizes of extra one-pass variants timed in the same "
                             "interleaved run (e.g. 128x2048,384x2048), reported as one_pass_CxT")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated input dtypes: float32, bfloat16, mixed (bf16 hidden states, f32 W)")
    parser.add_argument("--shapes", default=None, help="comma-separated shape names (S, L)")
    parser.add_argument("--mask-fraction", type=float, default=0.1,
                        help="fraction of the N tokens masked at random (default 0.1)")
    args = parser.parse_args(argv)
    try:
        also_blocks = tuple(tuple(int(x) for x in spec.split("x")) for spec in args.also_one_pass_blocks.split(",")
                            if spec)
    except ValueError:
        also_blocks = ((),)
    if any(len(b) != 2 or min(b) < 1 for b in also_blocks):
        parser.error(f"--also-one-pass-blocks: {args.also_one_pass_blocks!r} is not a list of CxT positive sizes")
    unknown = sorted(set(args.dtypes.split(",")) - set(DTYPES))
    if unknown:
        parser.error(f"--dtypes: unknown {unknown}; choose from {sorted(DTYPES)}")
    reps = args.reps or (2 if args.quick else 5)
    shapes = args.shapes.split(",") if args.shapes else ("S",) if args.quick else ("S", "L")
    result = {
        "benchmark": "token_kl value_and_grad, fused vs reference",
        "backend": jax.default_backend(), "jax": jax.__version__, "reps": reps, "mode": args.mode,
        "alpha": args.alpha, "mask_fraction": args.mask_fraction, "xla_blocks": list(token_kl_xla.DEFAULT_BLOCKS),
        "targets": {"floor_ratio": TARGET_FLOOR, "memory_ratio": TARGET_MEMORY},
        "load_avg_1min_start": os.getloadavg()[0],
        "one_pass_blocks": {name: [args.one_pass_chunk or blocks[0], args.one_pass_tile or blocks[1]]
                            for name in args.dtypes.split(",")
                            for blocks in [token_loss.default_loss_blocks(DTYPES[name][1])]},
        "cases": cpu_section(shapes, args.dtypes.split(","), reps, args.mode, args.alpha,
                             (args.one_pass_chunk, args.one_pass_tile), args.mask_fraction, also_blocks),
    }
    result["load_avg_1min_end"] = os.getloadavg()[0]
    if jax.default_backend() in ("gpu", "tpu"):
        result["accelerator"] = accelerator_section(reps, args.mode, args.alpha, args.mask_fraction)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
