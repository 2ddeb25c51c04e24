"""Prefill throughput of fd_jax vs transformers (torch) on the same weights, and load_hf's peak host memory.

    python benchmarks/forward.py            # full: batch 8 x 512 on a ~22M Llama, memory on a ~135M one
    python benchmarks/forward.py --quick    # smaller, for a smoke check

Prints one JSON object. Timings interleave fd_jax and torch calls in one process and report medians.
On a GPU it also reports the forward MFU of a ~1B model in bf16 (--peak-tflops sets the peak).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SMALL = dict(vocab_size=16384, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
             num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False)
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
ONE_B = dict(vocab_size=32768, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM, so the peak measured next belongs to the load alone.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _save_random_hf(config_kwargs: dict, path: pathlib.Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**config_kwargs))
    model.save_pretrained(path)


def prefill(batch: int, seq: int, reps: int) -> dict:
    import jax
    import torch
    import transformers

    from fd_jax.models import load_hf

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        _save_random_hf(SMALL, pathlib.Path(tmp))
        model, cfg = load_hf(tmp)
        reference = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()

    @jax.jit
    def forward(m, t, p):
        return m(t, p)

    start = time.perf_counter()
    forward(model, tokens, positions).block_until_ready()
    compile_s = time.perf_counter() - start
    tokens_pt = torch.from_numpy(tokens.astype(np.int64))

    def run_torch():
        with torch.no_grad():
            return reference(tokens_pt).logits

    run_torch()  # warm-up
    ours, theirs = [], []
    for _ in range(reps):  # interleaved, so machine noise hits both alike
        t0 = time.perf_counter()
        out = forward(model, tokens, positions).block_until_ready()
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        expected = run_torch()
        theirs.append(time.perf_counter() - t0)
    max_diff = float(np.abs(np.asarray(out) - expected.numpy()).max())
    n = batch * seq
    return {
        "model": "llama", "params": cfg.num_params, "batch": batch, "seq": seq,
        "fd_jax_tokens_per_s": n / statistics.median(ours),
        "transformers_tokens_per_s": n / statistics.median(theirs),
        "ratio": statistics.median(theirs) / statistics.median(ours),
        "fd_jax_compile_s": compile_s, "max_abs_logit_diff": max_diff, "reps": reps,
    }


def _load_child(path: str, which: str) -> None:
    """Runs in a fresh process: prints the RSS growth caused by loading `path`."""
    import jax

    jax.block_until_ready(jax.numpy.ones(8) * 2)  # start the runtime before measuring
    if which == "transformers":
        import torch  # noqa: F401
        import transformers
    else:
        from fd_jax.models import load_hf
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    if which == "transformers":
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    else:
        model, _ = load_hf(path)
        jax.block_until_ready(jax.tree.leaves(jax.tree.map(lambda x: x, model)))
    peak = _status_bytes("VmHWM")
    print(json.dumps({"rss_before": before, "peak": peak}))


def load_memory(config_kwargs: dict) -> dict:
    from fd_jax.models import ModelConfig
    import transformers

    cfg = ModelConfig.from_hf(transformers.LlamaConfig(**config_kwargs))
    param_bytes = cfg.num_params * 4
    result = {"params": cfg.num_params, "param_bytes": param_bytes}
    with tempfile.TemporaryDirectory() as tmp:
        _save_random_hf(config_kwargs, pathlib.Path(tmp))
        for which in ("fd_jax", "transformers"):
            out = subprocess.run([sys.executable, __file__, "--_load-child", tmp, which],
                                 capture_output=True, text=True, check=True)
            child = json.loads(out.stdout.strip().splitlines()[-1])
            growth = child["peak"] - child["rss_before"]
            result[f"{which}_peak_growth_bytes"] = growth
            result[f"{which}_peak_over_param_bytes"] = growth / param_bytes
    return result


def gpu_mfu(peak_tflops: float, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from fd_jax.models import ModelConfig, init_model
    import transformers

    cfg = ModelConfig.from_hf(transformers.LlamaConfig(**ONE_B))
    model = init_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    batch, seq = 16, 2048
    tokens = jnp.zeros((batch, seq), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    forward = jax.jit(lambda m, t, p: m.hidden_states(t, p))
    forward(model, tokens, positions).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        forward(model, tokens, positions).block_until_ready()
        times.append(time.perf_counter() - t0)
    matmul_params = cfg.num_params - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    # 2 flops per weight per token, plus QK^T and PV over the causal half of the T x T scores.
    flops = 2 * matmul_params * batch * seq + 2 * cfg.num_layers * batch * seq * seq * cfg.num_heads * cfg.head_dim
    seconds = statistics.median(times)
    return {"params": cfg.num_params, "batch": batch, "seq": seq, "step_s": seconds,
            "tflops": flops / seconds / 1e12, "mfu": flops / seconds / 1e12 / peak_tflops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    parser.add_argument("--_load-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._load_child:
        _load_child(*args._load_child)
        return
    import jax

    result = {"backend": jax.default_backend()}
    if result["backend"] == "gpu":
        result["forward_mfu_1b_bf16"] = gpu_mfu(args.peak_tflops, args.reps)
    else:
        batch, seq = (2, 128) if args.quick else (8, 512)
        result["prefill"] = prefill(batch, seq, args.reps)
        result["load_hf_memory"] = load_memory(SMALL if args.quick else SMOLLM2_SHAPE)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
