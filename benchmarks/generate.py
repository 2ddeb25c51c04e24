"""Generation speed: fd_jax's sampler against transformers' `generate`, and decode bandwidth on a GPU.

CPU section (the default off-accelerator): the same random weights on both sides (a transformers model is
built, saved and read back with `load_hf`), batch 8, 32-token prompts, greedy, exactly N new tokens on
both sides (no eos). Runs are interleaved A B A B in one process and medians reported; fd_jax's compile
time is reported apart (its first call minus its median). Tokens/s count generated tokens, prefill
included, on both sides. fd_jax runs twice per round: as shipped (decode attends to a prefix of the cache
that grows in blocks of 64 slots) and with `attend_block=0` (every step attends to the whole cache, the
sampler before issue 19), `--no-whole-cache` skips the latter.

GPU section (when jax.default_backend() == "gpu", or `--section gpu`): decode tokens/s of a ~1B
Llama-shaped random model in bf16 at batch 64, and the fraction of HBM bandwidth reached. The decode step
time is isolated as (t(N) - t(N/2 + 1)) / (N/2 - 1) with both runs on the same compiled program
(max_new_tokens is a traced value), so prefill and host time cancel.

    python benchmarks/generate.py [--quick] [--reps 3] [--out result.json]
    python benchmarks/generate.py --section gpu [--hbm-gbps 3350]

Prints one JSON object. Timings on a shared CPU are noisy: check the machine is idle (torch at 2 threads
slows ~20x when another process is busy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from fd_jax.models import ModelConfig, init_model, load_hf
from fd_jax.rollout.sampling import generate

# Target ratios (fd_jax / transformers tokens/s) from the issue, per model at batch 8.
TARGETS = {"tiny": 2.5, "smollm2_135m_shape": 2.0}

CPU_MODELS = {
    "tiny": dict(
        cls="Qwen2Config", vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    ),
    "smollm2_135m_shape": dict(
        cls="LlamaConfig", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
        rms_norm_eps=1e-5, max_position_embeddings=8192,
    ),
}

# Llama-3.2-1B's shape: 1.24 B parameters (tied), 16 layers, GQA 32/8 heads.
GPU_MODEL = ModelConfig(
    family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
    num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
    max_position_embeddings=8192,
)
GPU_SMOKE_MODEL = ModelConfig(  # the same code path at a size a CPU runs in seconds
    family="llama", vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=32, tie_word_embeddings=True,
)


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_cpu_model(name: str, new_tokens: list[int], *, batch: int, prompt_len: int, reps: int, threads: int,
                    whole_cache: bool = True):
    import torch
    import transformers

    torch.set_num_threads(threads)
    spec = dict(CPU_MODELS[name])
    hf_config = getattr(transformers, spec.pop("cls"))(**spec)
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        model, _ = load_hf(tmp, dtype=jnp.float32)

    rng = np.random.default_rng(0)
    prompts_BT = rng.integers(3, hf_config.vocab_size, size=(batch, prompt_len))
    prompts = prompts_BT.tolist()
    input_ids = torch.tensor(prompts_BT)

    results = []
    for n_new in new_tokens:
        def run_fd():
            return generate(model, prompts, max_new_tokens=n_new, temperature=0.0)

        def run_fd_whole():
            return generate(model, prompts, max_new_tokens=n_new, temperature=0.0, attend_block=0)

        def run_hf():
            with torch.no_grad():
                return hf_model.generate(
                    input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n_new,
                    min_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0,
                )

        first_fd_s, fd_out = _timed(run_fd)
        _, hf_out = _timed(run_hf)  # warm-up
        if whole_cache:
            _, whole_out = _timed(run_fd_whole)
            assert (whole_out.tokens == fd_out.tokens).all(), "the whole-cache sampler chose other tokens"
        fd_times, hf_times, whole_times = [], [], []
        for _ in range(reps):
            fd_times.append(_timed(run_fd)[0])
            hf_times.append(_timed(run_hf)[0])
            if whole_cache:
                whole_times.append(_timed(run_fd_whole)[0])
        hf_tokens = hf_out[:, prompt_len:].numpy()
        assert hf_tokens.shape == (batch, n_new), hf_tokens.shape
        assert (fd_out.lengths == n_new).all()
        fd_med, hf_med = statistics.median(fd_times), statistics.median(hf_times)
        generated = batch * n_new
        results.append(dict(
            model=name, batch=batch, prompt_len=prompt_len, new_tokens=n_new, reps=reps,
            fd_jax_tok_s=round(generated / fd_med, 1),
            transformers_tok_s=round(generated / hf_med, 1),
            ratio=round(hf_med / fd_med, 2),
            target_ratio=TARGETS.get(name),
            fd_jax_compile_s=round(first_fd_s - fd_med, 2),
            fd_jax_s=[round(t, 4) for t in fd_times],
            transformers_s=[round(t, 4) for t in hf_times],
            # random weights give near-ties, so f32 rounding may flip a few greedy tokens; not a speed figure
            greedy_token_agreement=round(float((fd_out.tokens == hf_tokens).mean()), 3),
        ))
        if whole_cache:
            whole_med = statistics.median(whole_times)
            results[-1].update(
                fd_jax_whole_cache_tok_s=round(generated / whole_med, 1),
                ratio_whole_cache=round(hf_med / whole_med, 2),
                fd_jax_whole_cache_s=[round(t, 4) for t in whole_times],
            )
        print(json.dumps(results[-1]), file=sys.stderr)
    return results


def bench_gpu(*, batch: int, prompt_len: int, new_tokens: int, reps: int, hbm_gbps: float, smoke: bool):
    cfg = GPU_SMOKE_MODEL if smoke else GPU_MODEL
    dtype = jnp.float32 if smoke else jnp.bfloat16
    model = init_model(cfg, seed=0, dtype=dtype, param_dtype=dtype)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, cfg.vocab_size, size=(batch, prompt_len)).tolist()
    short = new_tokens // 2 + 1  # same bucket as new_tokens: the same compiled program

    def run(n_new):
        return generate(model, prompts, max_new_tokens=n_new, temperature=0.0)

    first_s, _ = _timed(lambda: run(new_tokens))
    long_times, short_times = [], []
    for _ in range(reps):
        long_times.append(_timed(lambda: run(new_tokens))[0])
        short_times.append(_timed(lambda: run(short))[0])
    t_long, t_short = statistics.median(long_times), statistics.median(short_times)
    step_s = (t_long - t_short) / (new_tokens - short)

    itemsize = jnp.dtype(dtype).itemsize
    weight_bytes = cfg.num_params * itemsize
    cache_len = max(16, 1 << (prompt_len - 1).bit_length()) + max(16, 1 << (new_tokens - 1).bit_length())
    per_slot = cfg.num_layers * 2 * batch * cfg.num_kv_heads * cfg.head_dim * itemsize
    live_len = prompt_len + (short + new_tokens) / 2  # mean attended length over the timed steps
    read_bytes = weight_bytes + per_slot * cache_len  # attention reads every slot of the static cache
    live_bytes = weight_bytes + per_slot * live_len
    peak = hbm_gbps * 1e9
    return dict(
        model="smoke" if smoke else "llama_1b_shape", params=cfg.num_params, dtype=str(jnp.dtype(dtype)),
        device=str(jax.devices()[0].device_kind), batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
        decode_step_ms=round(step_s * 1e3, 3),
        decode_tok_s=round(batch / step_s, 1),
        end_to_end_tok_s=round(batch * new_tokens / t_long, 1),
        compile_s=round(first_s - t_long, 2),
        bytes_per_step_gb=round(read_bytes / 1e9, 3),
        hbm_fraction=round(read_bytes / step_s / peak, 3),
        live_bytes_per_step_gb=round(live_bytes / 1e9, 3),
        hbm_fraction_live=round(live_bytes / step_s / peak, 3),
        hbm_gbps_peak=hbm_gbps, target_hbm_fraction=0.5,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=("auto", "cpu", "gpu"), default="auto",
                        help="auto: gpu when jax.default_backend() == 'gpu', else cpu")
    parser.add_argument("--quick", action="store_true", help="64 new tokens only, 2 repetitions")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions per side (medians)")
    parser.add_argument("--models", default=",".join(CPU_MODELS), help=f"comma list of {sorted(CPU_MODELS)}")
    parser.add_argument("--new-tokens", default="64,256", help="comma list (cpu section)")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (cpu) / 64 (gpu)")
    parser.add_argument("--prompt-len", type=int, default=None, help="default 32 (cpu) / 128 (gpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for transformers")
    parser.add_argument("--gpu-new-tokens", type=int, default=256)
    parser.add_argument("--hbm-gbps", type=float, default=3350.0, help="peak HBM bandwidth (H100 SXM: 3350)")
    parser.add_argument("--gpu-smoke", action="store_true", help="gpu section with a tiny model (checks the code)")
    parser.add_argument("--no-whole-cache", action="store_true",
                        help="do not also time fd_jax with attend_block=0 (attention over the whole cache)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    section = args.section
    if section == "auto":
        section = "gpu" if jax.default_backend() == "gpu" else "cpu"
    reps = 2 if args.quick and args.reps == 3 else args.reps
    report = dict(
        benchmark="generate", section=section, backend=jax.default_backend(), jax=jax.__version__,
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_avg_1min_start=os.getloadavg()[0]),
        results=[],
    )
    if section == "cpu":
        import torch
        import transformers

        report.update(torch=torch.__version__, transformers=transformers.__version__)
        new_tokens = [64] if args.quick else [int(x) for x in args.new_tokens.split(",")]
        for name in args.models.split(","):
            report["results"] += bench_cpu_model(
                name, new_tokens, batch=args.batch or 8, prompt_len=args.prompt_len or 32, reps=reps,
                threads=args.threads, whole_cache=not args.no_whole_cache,
            )
    else:
        report["results"].append(bench_gpu(
            batch=args.batch or 64, prompt_len=args.prompt_len or 128, new_tokens=args.gpu_new_tokens, reps=reps,
            hbm_gbps=args.hbm_gbps, smoke=args.gpu_smoke,
        ))
    # > ~0.5 on 2 cores: another process competed, and torch's thread team suffers far more than XLA's
    report["machine"]["load_avg_1min_end"] = os.getloadavg()[0]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
