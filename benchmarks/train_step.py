"""Benchmark: the fused FD train step against an unfused, TRL/OPSD-style baseline.

    python benchmarks/train_step.py [--quick] [--reps 5] [--remat] [--token-chunk N] [--vocab-tile N]
    python benchmarks/train_step.py --mfu --peak-tflops 989      # on a GPU: step MFU of a ~1B model, bf16

Both variants do one FD update (reverse KL, alpha = 1, support `full`, EMA teacher, token_mean with the
importance weight min(exp(logp - old_logp), is_clip)), f32, on the same model, batch and optimizer:

* fused: `fd_jax.rl.step.make_train_step` — one jitted call: teacher forward to hidden states, student
  forward + backward, the fused kernel (never builds [tokens, vocab] logits; `fused_token_loss`, the
  gradient inside the statistics pass, unless --kernel-passes two: `fused_token_stats`), AdamW, EMA.
  --also-two-pass times the two-pass variant as well, interleaved.
* baseline: two jitted calls, as TRL/OPSD-style trainers do it: (1) the teacher forward returning
  materialised teacher logits [B, C, V] at the completion positions; (2) the student forward with
  materialised logits, log_softmax over the vocabulary, the per-token reverse KL, the same loss, its
  gradient, the same AdamW update and the EMA. Both calls donate what the fused step donates (the state).

Shapes (CPU): a Qwen3-style model (d 256, 6 layers, 4 heads, 2 kv heads, intermediate 1024, vocab 32768,
untied, ~23M parameters; --narrow-vocab: d 384, 6 heads, vocab 16384, ~22M); 8 rows, student prompt 256 tokens, teacher prompt a 256-token reprompt,
completions of 384..512 tokens (one row at 512), so S = U = 256 + 512 = 768 and C = 512.

Reported: compile time apart (an ahead-of-time compile of each program, also the source of the memory
figures), then one warm-up step each (untimed), then the median wall and process-CPU seconds of the timed
steps, run A B A B in one process with every array passed as an argument; XLA's compiled
`memory_analysis()`. Memory of one call = argument + output - alias + temp bytes (donated state counted
once; `raw_sum` = argument + output + temp is also given). The baseline's two calls run one after the other
while the whole train state stays resident, so its peak is the max over the calls of (call bytes + state
bytes that call does not take as arguments); the sum of both calls is reported too. The first step's loss
and gradient norm of both must agree (asserted): the baseline computes the same thing.

On a GPU (or with --mfu; --quick shrinks it to the tiny model) a second section times the fused step of a
~1.1B Llama-shaped model (d 2048, 22 layers, 32 heads, 4 kv heads, vocab 32768) with bf16 compute and f32
parameters/optimizer state, 4 rows x (256-token prompt or reprompt + 768 completion tokens, no padding),
and reports model FLOPs utilisation against --peak-tflops (default 989, H100 SXM bf16 dense). Model FLOPs
(`model_flops`): 6 per layer weight per student token + 2 per teacher token, the LM head only where the
step applies it (completion positions: 6 student + 2 teacher per weight), attention over the causal half;
remat and the kernel's recomputation are not counted. Without --mfu-remat the attention activations of the
1B model at this shape need roughly 25-35 GB; raise the rows only with remat.

--remat (and --mfu-remat) build the model with per-layer remat; the fused step traces with it only once
fd_jax/rl/step.py passes its arrays to `jax.eval_shape` as arguments (the benchmark says so and exits
otherwise). On XLA:CPU per-layer remat of the unrolled layer loop hardly changes the compiled memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from flax import nnx
from flax.errors import TraceContextError

from fd_jax.models import ModelConfig, init_model
from fd_jax.rl.optim import OptimConfig, make_optimizer
from fd_jax.rl.batch import pack_train_batch
from fd_jax.rl.step import StepConfig, TrainState, init_train_state, make_train_step

# ~22M parameters with the vocabulary-to-width ratio of real LLMs (most weights in the embeddings) and the
# kernel shape of CALIBRATION.md (D 256, V 32768). `--narrow-vocab` gives the d 384 / V 16384 variant,
# where activations rather than logits dominate memory.
SMALL = dict(vocab_size=32768, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)
NARROW_VOCAB = dict(SMALL, vocab_size=16384, hidden_size=384, num_attention_heads=6)
TINY = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
ONE_B = dict(vocab_size=32768, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False)
# (rows, student prompt, reprompt, completion) tokens
CPU_SHAPE, QUICK_SHAPE, GPU_SHAPE = (8, 256, 256, 512), (2, 32, 32, 64), (4, 256, 256, 768)
TARGETS = {"speedup": 1.2, "memory_ratio": 0.5, "mfu": 0.40}
LOSS_RTOL, GRAD_NORM_RTOL = 1e-4, 1e-3


# ---------------------------------------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------------------------------------


def make_batch(vocab: int, rows: int, prompt: int, reprompt: int, completion: int, *, ragged: bool = True,
               seed: int = 0) -> dict:
    """A packed FD batch of random tokens: every row distilled, completions 3/4..1 of `completion` long
    (row 0 full; all full when not `ragged`), old log-probs near the uniform policy's -log V so that
    importance weights vary and some clip."""
    rng = np.random.default_rng(seed)
    tokens = lambda n: list(rng.integers(1, vocab, n))  # noqa: E731
    lengths = [completion] * rows
    if ragged:
        lengths[1:] = rng.integers(completion * 3 // 4, completion + 1, rows - 1)
    completions = [tokens(n) for n in lengths]
    batch = pack_train_batch(
        student_prompts=[tokens(prompt) for _ in range(rows)],
        teacher_prompts=[tokens(reprompt) for _ in range(rows)],
        completions=completions,
        old_logprobs=[list(-np.log(vocab) + rng.normal(0.0, 0.5, len(c))) for c in completions],
        rewards_B=np.zeros(rows), advantages_B=np.zeros(rows), distill_mask_B=np.ones(rows),
        pad_id=0, pad_multiple=32)
    return {k: jnp.asarray(v) for k, v in batch.step_inputs().items()}


def fresh_state(params, optimizer, cfg: StepConfig) -> TrainState:
    """A train state with its own buffers (each variant donates and advances its own)."""
    return init_train_state(jax.tree.map(jnp.copy, params), optimizer, cfg)


# ---------------------------------------------------------------------------------------------------------
# The unfused baseline.
# ---------------------------------------------------------------------------------------------------------


def _gather_BCD(hidden_BTD, index_BC):
    return jnp.take_along_axis(hidden_BTD, index_BC[:, :, None], axis=1)


def make_baseline(graphdef, optimizer, cfg: StepConfig):
    """(teacher_logits(teacher_params, batch) -> [B, C, V] f32, update(state, batch, t_logits_BCV) ->
    (state, metrics)), the two jitted calls of a materialised-logits FD step."""

    def teacher_logits(teacher_params, batch):
        teacher = nnx.merge(graphdef, teacher_params)
        h_BCD = _gather_BCD(teacher.hidden_states(batch["teacher_tokens_BU"], batch["teacher_positions_BU"]),
                            batch["teacher_index_BC"])
        return teacher.logits_from_hidden(h_BCD)

    def loss_fn(params, batch, t_logits_BCV):
        student = nnx.merge(graphdef, params)
        h_BCD = _gather_BCD(student.hidden_states(batch["student_tokens_BS"], batch["student_positions_BS"]),
                            batch["student_index_BC"])
        logp_BCV = jax.nn.log_softmax(student.logits_from_hidden(h_BCD), axis=-1)
        logq_BCV = jax.nn.log_softmax(t_logits_BCV, axis=-1)
        reverse_kl_BC = jnp.sum(jnp.exp(logp_BCV) * (logp_BCV - logq_BCV), axis=-1)
        logp_BC = jnp.take_along_axis(logp_BCV, batch["completion_tokens_BC"][:, :, None], axis=-1)[..., 0]
        weight_BC = jnp.minimum(jnp.exp(jax.lax.stop_gradient(logp_BC) - batch["old_logprobs_BC"]), cfg.is_clip)
        mask_BC = batch["completion_mask_BC"] * batch["distill_mask_B"][:, None]
        return jnp.sum(reverse_kl_BC * weight_BC * mask_BC) / jnp.maximum(jnp.sum(mask_BC), 1.0)

    def update(state: TrainState, batch, t_logits_BCV):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, t_logits_BCV)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        tau = cfg.ema_tau
        teacher = jax.tree.map(lambda phi, theta: ((1 - tau) * phi + tau * theta).astype(phi.dtype),
                               state.teacher, params)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        return TrainState(state.step + 1, params, teacher, state.ref, opt_state), metrics

    return jax.jit(teacher_logits), jax.jit(update, donate_argnums=0)


# ---------------------------------------------------------------------------------------------------------
# Measuring.
# ---------------------------------------------------------------------------------------------------------


def _compile(jitted, *args):
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def _compile_step(step, state, batch):
    try:
        return _compile(step, state, batch)
    except TraceContextError as err:  # flax: nnx.remat inside a jax.eval_shape closure over jit tracers
        raise SystemExit(
            "the fused step does not trace with a remat model (flax TraceContextError): fd_jax/rl/step.py "
            "must pass its arrays to jax.eval_shape as arguments, jax.eval_shape(loss_fn, state.params, "
            "state.teacher, state.ref, first, totals), instead of closing over them") from err


def _tree_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
           "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes}
    out["bytes"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["raw_sum"] = out["argument"] + out["output"] + out["temp"]
    return out


def _mib(n: float) -> float:
    return round(n / 2**20, 1)


def _timed(fn):
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - start, time.process_time() - start_cpu


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def cpu_section(model_kwargs: dict, shape: tuple, reps: int, step_cfg: StepConfig, remat: bool,
                two_pass: bool = False) -> dict:
    cfg = ModelConfig.from_hf(transformers.Qwen3Config(**model_kwargs))
    graphdef, params = nnx.split(init_model(cfg, seed=0, remat=remat))
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-4, weight_decay=0.01, max_grad_norm=1.0))
    rows, prompt, reprompt, completion = shape
    batch = make_batch(cfg.vocab_size, rows, prompt, reprompt, completion)

    fused_step = make_train_step(graphdef, optimizer, step_cfg)
    teacher_fn, update_fn = make_baseline(graphdef, optimizer, step_cfg)
    state_f = fresh_state(params, optimizer, step_cfg)
    state_b = fresh_state(params, optimizer, step_cfg)
    state_bytes, teacher_bytes = _tree_bytes(state_b), _tree_bytes(state_b.teacher)

    # XLA's programs, for memory_analysis (lowering consumes nothing). make_train_step returns a wrapper that
    # picks its jit by the state's shardings, so its program is taken from one jit of it with its donation.
    fused_c, fused_compile_s = _compile_step(jax.jit(fused_step, donate_argnums=0), state_f, batch)
    teacher_c, teacher_compile_s = _compile(teacher_fn, state_b.teacher, batch)
    update_c, update_compile_s = _compile(update_fn, state_b, batch, jax.eval_shape(teacher_fn, state_b.teacher, batch))

    def run_fused():
        nonlocal state_f
        state_f, metrics = fused_step(state_f, batch)
        return metrics

    def run_baseline():
        nonlocal state_b
        t_logits_BCV = teacher_fn(state_b.teacher, batch)
        state_b, metrics = update_fn(state_b, batch, t_logits_BCV)
        return metrics

    variants = {"fused": run_fused, "baseline": run_baseline}
    if two_pass:  # the same fused step with the kernel's two-pass (recomputing) gradient, interleaved too
        two_cfg = dataclasses.replace(step_cfg, kernel_passes="two")
        two_step, state_two = make_train_step(graphdef, optimizer, two_cfg), fresh_state(params, optimizer, two_cfg)
        two_c, _ = _compile_step(jax.jit(two_step, donate_argnums=0), state_two, batch)

        def run_two_pass():
            nonlocal state_two
            state_two, metrics = two_step(state_two, batch)
            return metrics

        variants["fused_two_pass"] = run_two_pass

    # Warm-up: the first step of each, from identical states; the first losses must agree.
    m_fused, m_base = run_fused(), run_baseline()  # the fused wrapper compiles its own jit here
    if two_pass:
        run_two_pass()
    loss_f, loss_b = float(m_fused["loss"]), float(m_base["loss"])
    gn_f, gn_b = float(m_fused["grad_norm"]), float(m_base["grad_norm"])
    assert _rel(loss_f, loss_b) <= LOSS_RTOL, f"first-step losses differ: fused {loss_f} vs baseline {loss_b}"
    assert _rel(gn_f, gn_b) <= GRAD_NORM_RTOL, f"first-step grad norms differ: fused {gn_f} vs baseline {gn_b}"

    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for _ in range(reps):  # A B A B: machine noise hits both alike
        for name, fn in variants.items():
            _, w, c = _timed(fn)
            wall[name].append(w)
            cpu[name].append(c)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}

    mem_fused = _memory(fused_c)
    mem_teacher, mem_update = _memory(teacher_c), _memory(update_c)
    # While the teacher call runs, the student params and the optimizer state stay resident too.
    base_peak = max(mem_teacher["bytes"] + state_bytes - teacher_bytes, mem_update["bytes"])
    base_sum = mem_teacher["bytes"] + mem_update["bytes"]
    fmt = lambda m: {k: _mib(v) for k, v in m.items()}  # noqa: E731
    return {
        "model": {"family": cfg.family, "params": cfg.num_params, "hidden": cfg.hidden_size,
                  "layers": cfg.num_layers, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
                  "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size, "remat": remat},
        "batch": {"rows": rows, "student_prompt": prompt, "reprompt": reprompt, "completion": completion,
                  "S": int(batch["student_tokens_BS"].shape[1]), "U": int(batch["teacher_tokens_BU"].shape[1]),
                  "C": int(batch["completion_tokens_BC"].shape[1]),
                  "completion_tokens": int(jnp.sum(batch["completion_mask_BC"]))},
        "step_config": {"teacher": step_cfg.teacher, "alpha": step_cfg.alpha, "mode": step_cfg.distill_mode,
                        "kernel_passes": step_cfg.kernel_passes, "loss_chunk": step_cfg.loss_chunk,
                        "token_chunk": step_cfg.token_chunk, "vocab_tile": step_cfg.vocab_tile},
        "first_step": {"fused_loss": loss_f, "baseline_loss": loss_b, "loss_rel_diff": _rel(loss_f, loss_b),
                       "fused_grad_norm": gn_f, "baseline_grad_norm": gn_b,
                       "grad_norm_rel_diff": _rel(gn_f, gn_b)},
        "compile_s": {"fused": round(fused_compile_s, 2),
                      "baseline": round(teacher_compile_s + update_compile_s, 2)},
        "reps": reps,
        "fused_s": round(med["fused"], 4), "baseline_s": round(med["baseline"], 4),
        "fused_cpu_s": round(med_cpu["fused"], 4), "baseline_cpu_s": round(med_cpu["baseline"], 4),
        "all_wall_s": {k: [round(x, 3) for x in v] for k, v in wall.items()},
        "memory_MiB": {"fused": fmt(mem_fused), "baseline_teacher_call": fmt(mem_teacher),
                       "baseline_update_call": fmt(mem_update), "state": _mib(state_bytes),
                       "baseline_peak": _mib(base_peak), "baseline_sum_of_calls": _mib(base_sum)},
        **({"fused_two_pass": {"s": round(med["fused_two_pass"], 4), "cpu_s": round(med_cpu["fused_two_pass"], 4),
                               "memory_MiB": fmt(_memory(two_c)),
                               "one_pass_speedup": round(med["fused_two_pass"] / med["fused"], 3)}}
           if two_pass else {}),
        "fused_bytes": mem_fused["bytes"], "baseline_bytes": base_peak,
        "speedup": round(med["baseline"] / med["fused"], 3),
        "cpu_time_speedup": round(med_cpu["baseline"] / med_cpu["fused"], 3),
        "memory_ratio": round(mem_fused["bytes"] / base_peak, 4),
        "memory_ratio_vs_sum_of_calls": round(mem_fused["bytes"] / base_sum, 4),
        "memory_ratio_raw_sums": round(mem_fused["raw_sum"] / max(
            mem_teacher["raw_sum"] + state_bytes - teacher_bytes, mem_update["raw_sum"]), 4),
    }


# ---------------------------------------------------------------------------------------------------------
# GPU: model FLOPs utilisation of the fused step.
# ---------------------------------------------------------------------------------------------------------


def model_flops(cfg: ModelConfig, batch: dict) -> float:
    """Model FLOPs of one FD step (not hardware FLOPs: remat and the kernel's recomputation are free).

    6 per layer weight per student token (forward + backward) and 2 per teacher token; the LM head only at
    completion positions (6 student, 2 teacher per D x V weight); attention QK^T and PV over the causal
    half of each row's padded T x T scores, x3 for the student, x1 for the teacher."""
    d, v, hd = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    layer_params = cfg.num_params - v * d * (1 if cfg.tie_word_embeddings else 2)
    rows, s = batch["student_tokens_BS"].shape
    u = batch["teacher_tokens_BU"].shape[1]
    c = batch["completion_tokens_BC"].shape[1]
    attention = lambda t: 2 * cfg.num_layers * rows * t * t * cfg.num_heads * hd  # noqa: E731  (causal half)
    return (6 * layer_params * rows * s + 2 * layer_params * rows * u + 8 * d * v * rows * c
            + 3 * attention(s) + attention(u))


def mfu_section(model_kwargs: dict, shape: tuple, reps: int, step_cfg: StepConfig, peak_tflops: float,
                remat: bool) -> dict:
    """The fused step of a Llama-shaped model, bf16 compute with f32 parameters and optimizer state."""
    cfg = ModelConfig.from_hf(transformers.LlamaConfig(**model_kwargs))
    model = init_model(cfg, seed=0, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=remat)
    graphdef, params = nnx.split(model)
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-5, weight_decay=0.01, max_grad_norm=1.0))
    batch = make_batch(cfg.vocab_size, *shape, ragged=False)  # no padding: every token is a model token
    state = fresh_state(params, optimizer, step_cfg)
    del model, params
    step = make_train_step(graphdef, optimizer, step_cfg)
    compiled, compile_s = _compile_step(jax.jit(step, donate_argnums=0), state, batch)
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    flops = model_flops(cfg, batch)
    return {"device": jax.devices()[0].device_kind, "params": cfg.num_params, "remat": remat,
            "rows": shape[0], "S": int(batch["student_tokens_BS"].shape[1]),
            "U": int(batch["teacher_tokens_BU"].shape[1]), "C": int(batch["completion_tokens_BC"].shape[1]),
            "compile_s": round(compile_s, 1), "step_s": round(seconds, 4), "model_tflops_per_step": flops / 1e12,
            "tflops_per_s": round(flops / seconds / 1e12, 2), "peak_tflops": peak_tflops,
            "mfu": round(flops / seconds / 1e12 / peak_tflops, 4), "loss": float(metrics["loss"]),
            "memory_MiB": {k: _mib(v) for k, v in _memory(compiled).items()}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and batch, 2 repetitions")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per variant (default 5; quick 2)")
    parser.add_argument("--remat", action="store_true", help="comparison: per-layer remat in both variants")
    parser.add_argument("--narrow-vocab", action="store_true", help="d 384 / vocab 16384 instead of d 256 / 32768")
    parser.add_argument("--token-chunk", type=int, default=None, help="fused kernel token chunk")
    parser.add_argument("--vocab-tile", type=int, default=None, help="fused kernel vocabulary tile")
    parser.add_argument("--kernel-passes", default="auto", choices=("auto", "one", "two"),
                        help="StepConfig.kernel_passes of the fused step")
    parser.add_argument("--also-two-pass", action="store_true",
                        help="also time the fused step with kernel_passes='two', interleaved")
    parser.add_argument("--mfu", action="store_true", help="run the MFU section on any backend")
    parser.add_argument("--mfu-remat", action="store_true", help="MFU section with per-layer remat")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    args = parser.parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)
    blocks = {k: v for k, v in (("token_chunk", args.token_chunk), ("vocab_tile", args.vocab_tile)) if v}
    step_cfg = StepConfig(distill_weight=1.0, teacher="ema", alpha=1.0, distill_mode="full",
                          kernel_passes=args.kernel_passes, **blocks)
    result = {"benchmark": "FD train step, fused vs unfused (materialised logits)",
              "backend": jax.default_backend(), "jax": jax.__version__, "targets": TARGETS,
              "loadavg_start": os.getloadavg()}
    if jax.default_backend() == "cpu" or not args.mfu:
        model, shape = (TINY, QUICK_SHAPE) if args.quick else (NARROW_VOCAB if args.narrow_vocab else SMALL, CPU_SHAPE)
        result["comparison"] = cpu_section(model, shape, reps, step_cfg, args.remat, args.also_two_pass)
        print(json.dumps(result["comparison"]), file=sys.stderr)
    if jax.default_backend() == "gpu" or args.mfu:
        model, shape = (TINY, QUICK_SHAPE) if args.quick else (ONE_B, GPU_SHAPE)
        result["mfu_1b_bf16"] = mfu_section(model, shape, reps, step_cfg, args.peak_tflops,
                                            remat=args.mfu_remat)
    result["loadavg_end"] = os.getloadavg()
    cpu = result.get("comparison")
    if cpu is not None:
        result["speedup"], result["memory_ratio"] = cpu["speedup"], cpu["memory_ratio"]
        result["meets_targets"] = bool(cpu["speedup"] >= TARGETS["speedup"]
                                       and cpu["memory_ratio"] <= TARGETS["memory_ratio"])
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
