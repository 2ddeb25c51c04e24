"""The training loop: FD, GRPO and FD→GRPO, with resume, preemption, logging and periodic evaluation.

One step:  problems (ShuffledIterator) → rollout (sample, verify, feedback, batch) → `num_iterations`
updates of the jitted train step (the EMA teacher moves inside it) → a metrics line → checkpoint (every
N steps, at a stage's end, on SIGTERM) → evaluation (every N steps).

Workdir (`DIR`):
    config.json        the resolved config
    metrics.jsonl      one line per step (global `step`, `stage`, loss, reward_mean, entropy, kl_mean, ...)
    rollouts.jsonl     every rollout with its verdict and feedback
    curves.png         reward, entropy and KL over steps
    checkpoints/       orbax checkpoints (for fd_then_grpo: fd/checkpoints/ and grpo/checkpoints/)
    tensorboard/       event files (fd_then_grpo: fd/tensorboard/, grpo/tensorboard/)
    eval/step_N/       evaluation reports (report.json, pass_at_k.png)
    hf_final/          the final policy as a Hugging Face directory (fd_then_grpo also fd/hf_final/)

Resume: a workdir with checkpoints continues after the latest one, with the data order where it was and
the sampler seeded by (seed, step) as before, and the log lines of later steps are dropped, so an
interrupted run ends exactly like an uninterrupted one (with synchronous rollouts; an asynchronous run
regenerates the batch that was in flight with the restored, one step newer, policy).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import pathlib
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import config_dict

from fd_jax.train import compilations, components, multihost, step_metrics
from fd_jax import sharding as sharding_lib
from fd_jax.train import workdir as workdir_lib
from fd_jax.train.workdir import CHECKPOINTS, CONFIG_FILE, ROLLOUTS_FILE, restore_policy  # noqa: F401 (restore_policy: public here too)
from fd_jax.train.workdir import checkpoint_dir as _checkpoint_dir, latest_step as _latest_step
from fd_jax.train.checkpoint import Checkpointer
from fd_jax.config.errors import ConfigError
from fd_jax.config.validation import validate
from fd_jax.train.stages import Stage, stages
from fd_jax.data import ShuffledIterator
from fd_jax.eval import evaluation
from fd_jax.train.metrics_log import RunLog, truncate_jsonl
from fd_jax.models import save_hf
from fd_jax.rl.optim import learning_rate_schedule, make_optimizer
from fd_jax.rollout.rollout import RolloutResult, run_rollout
from fd_jax.rollout.sample import derive_seed
from fd_jax.tasks import get_task
from fd_jax.rl.diagnostics import make_diagnostics
from fd_jax.rl.step import TrainState, init_train_state, make_train_step

log = logging.getLogger(__name__)

TENSORBOARD = "tensorboard"
HF_FINAL = "hf_final"


class StopSignal:
    """SIGTERM / SIGINT (TPU preemption, Ctrl-C) ask the loop to stop after the current step; it then
    saves a checkpoint and returns normally. A second signal interrupts at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # Python only allows it there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self.__exit__()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping now, without a checkpoint")
        self.received = signum
        log.warning("%s received: stopping after this step, with a checkpoint", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def should_stop(self) -> bool:
        """Whether any host was signalled (all hosts must stop at the same step)."""
        mine = float(self.received is not None)
        return multihost.reduce_scalars({"stop": mine}, {"stop": "max"})["stop"] > 0


@dataclasses.dataclass
class _Run:
    """What every stage of a run shares."""

    cfg: config_dict.ConfigDict
    workdir: pathlib.Path
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    policy: components.Policy
    fmt: Any
    verifier: Any
    feedback: Any
    iterator: ShuffledIterator
    eval_problems: list
    log: RunLog
    stop: StopSignal
    generate_fn: Any
    param_shapes: Any  # the params' ShapeDtypeStructs: restore targets are built from them
    feedback_totals: dict[str, float] = dataclasses.field(default_factory=dict)
    episodes: Any = None  # a task with tools: its EpisodeSetup (None: single-turn rollouts)

    def stage_dir(self, stage: Stage) -> pathlib.Path:
        return self.workdir / stage.subdir if stage.subdir else self.workdir


def abstract_state(params: Any, optimizer, step_cfg, mesh: jax.sharding.Mesh | None) -> TrainState:
    """The TrainState's shapes, dtypes and shardings (ShapeDtypeStruct leaves): a restore target, and the
    layout a fresh state is placed with."""
    shapes = jax.eval_shape(lambda p: init_train_state(p, optimizer, step_cfg), params)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
    shardings = sharding_lib.state_shardings(shapes, mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def resume_point(plan: list[Stage], workdir: pathlib.Path) -> tuple[int, int | None]:
    """(index of the stage to run, the step of its checkpoint to resume from, or None to start it).

    Raises ConfigError when the checkpoints do not fit the stage layout (fd_steps or total_steps changed
    in a way that would rewrite history)."""
    latest = [_latest_step(_checkpoint_dir(workdir, s)) for s in plan]
    found = [i for i, step in enumerate(latest) if step is not None]
    if not found:
        return 0, None
    k = found[-1]
    for i in range(k):
        if latest[i] != plan[i].last:
            raise ConfigError(f"{workdir}: stage {plan[i].name!r} has checkpoints up to step {latest[i]} but ends at "
                              f"step {plan[i].last} with this config (config.fd_steps changed?), and a later stage "
                              f"already started; use a new workdir")
    if latest[k] > plan[k].last:
        raise ConfigError(f"{workdir}: checkpoints reach step {latest[k]} but this config ends stage "
                          f"{plan[k].name!r} at step {plan[k].last}; raise config.total_steps or use a new workdir")
    if latest[k] == plan[k].last and k + 1 < len(plan):
        return k + 1, None
    return k, latest[k]


def train(cfg: config_dict.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Runs (or resumes) the configured training in `workdir`.

    Returns {"status": "complete" | "stopped", "step": the last step done, "workdir": ...}; "stopped"
    means a signal arrived and a checkpoint of that step was written. Raises ConfigError for a bad config
    (before anything is built)."""
    validate(cfg)
    compilations.install()
    sharding_lib.maybe_initialize_distributed(cfg.multihost)
    if cfg.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(cfg.compilation_cache_dir).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # small programs add up too
    workdir = pathlib.Path(workdir).expanduser().absolute()
    plan = stages(cfg)
    # Nothing is written into the workdir before every check has passed: its compatibility with the
    # checkpoints there, the data, the verifier's set-up, the model.
    workdir_lib.check_resumable(cfg, workdir)
    first_stage, resume_step = resume_point(plan, workdir)
    fresh = first_stage == 0 and resume_step is None
    writer = multihost.is_writer()
    mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    _check_batch_layout(cfg, mesh)
    problems = components.build_problems(cfg)
    eval_problems = components.build_problems(cfg, held_out=True) if _evaluates(cfg) else []
    # Built (and so checked: a missing Lean is refused here) before the model loads; on a later failure
    # the pool's finalizer stops its workers.
    verifier = components.build_verifier(cfg)
    episodes = components.build_episodes(cfg, verifier)  # None unless the task has tools
    needs_feedback = any(s.rollout.request_feedback or s.name == "sft" for s in plan)  # sft: feedback in prompts
    feedback = components.build_feedback(cfg, workdir) if needs_feedback else None

    policy = components.build_policy(cfg, mesh=mesh, weights=fresh)
    graphdef, params = nnx.split(policy.model)
    param_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    del params
    pad_id = policy.tokenizer.pad_token_id if policy.tokenizer.pad_token_id is not None else 0
    from fd_jax.rollout.sampling import generate

    generate_fn = multihost.global_generate(functools.partial(generate, mesh=mesh, pad_id=pad_id))
    if writer:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / CONFIG_FILE).write_text(cfg.to_json_best_effort(indent=2) + "\n")
    resumed_at = None if fresh else (resume_step if resume_step is not None else plan[first_stage].first - 1)
    if writer and resumed_at is not None:
        truncate_jsonl(workdir / ROLLOUTS_FILE, resumed_at)
    elif writer:
        (workdir / ROLLOUTS_FILE).unlink(missing_ok=True)  # a fresh run in a reused directory
    run_log = RunLog(workdir, enabled=writer, resume_step=resumed_at, total_steps=cfg.total_steps,
                     progress=cfg.log.progress, every_steps=cfg.log.every_steps,
                     plot_every_steps=cfg.log.plot_every_steps, tensorboard=cfg.log.tensorboard,
                     wandb=dict(project=cfg.log.wandb_project, entity=cfg.log.wandb_entity, name=cfg.log.wandb_name),
                     config=cfg.to_dict())
    status, step = "complete", resumed_at or 0
    with verifier, StopSignal() as stop:
        run = _Run(cfg, workdir, mesh, graphdef, policy, components.build_format(cfg, policy.tokenizer), verifier,
                   feedback, ShuffledIterator(problems, seed=cfg.data.shuffle_seed), eval_problems, run_log, stop,
                   generate_fn, param_shapes, episodes=episodes)
        if fresh and cfg.preflight_problems:
            _preflight(run, plan, problems)
        try:
            for index in range(first_stage, len(plan)):
                stage = plan[index]
                state, meta = _stage_start(run, stage, plan[index - 1] if index else None,
                                           resume_step if index == first_stage else None)
                finished, step = _run_stage(run, stage, state, meta)
                if not finished:
                    status = "stopped"
                    break
        finally:
            run_log.close()
            if feedback is not None:
                feedback.close()
    log.info("%s at step %d; logs in %s; %d XLA programs built in this process (%.1f s)", status, step, workdir,
             *compilations.totals().values())
    return {"status": status, "step": step, "workdir": str(workdir)}


def _preflight(run: _Run, plan: list[Stage], problems: list) -> None:
    """`fd_jax.eval.preflight` with the initial policy and the first FD stage's rollout settings, before any
    update: the verdict line goes to the log and the numbers to DIR/preflight.json."""
    from fd_jax.eval.preflight import preflight

    stage = next((s for s in plan if s.step.distill_weight > 0), None)
    if stage is None or run.feedback is None:
        return
    report = preflight(multihost.host_shard(problems[: run.cfg.preflight_problems]), model=run.policy.model,
                       tokenizer=run.policy.tokenizer, fmt=run.fmt, verifier=run.verifier, feedback=run.feedback,
                       config=stage.rollout, step_cfg=stage.step, generate_fn=run.generate_fn,
                       seed=derive_seed(run.cfg.seed, 0))
    run.log.message(report.line())
    if multihost.is_writer():
        (run.workdir / "preflight.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")


def _evaluates(cfg) -> bool:
    return cfg.eval.every_steps > 0 or cfg.eval.at_end


def _check_batch_layout(cfg, mesh) -> None:
    """Rows must split over hosts, mesh batch shards and micro-batches; say which field to change."""
    hosts = jax.process_count()
    rows = cfg.data.problems_per_step * cfg.rollout.num_generations
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.problems_per_step % hosts:
        raise ConfigError(f"config.data.problems_per_step = {cfg.data.problems_per_step}: must be a multiple of "
                          f"the {hosts} hosts (each rolls out its share)")
    if rows % shards or rows % cfg.step.micro_batches:
        raise ConfigError(f"config.data.problems_per_step x rollout.num_generations = {rows} rows: must be a "
                          f"multiple of the mesh's data x fsdp = {shards} and of step.micro_batches = "
                          f"{cfg.step.micro_batches}")
    if _evaluates(cfg) and cfg.eval.num_problems % hosts:
        raise ConfigError(f"config.eval.num_problems = {cfg.eval.num_problems}: must be a multiple of the "
                          f"{hosts} hosts")


def _init_state(params, optimizer, step_cfg, target: TrainState) -> TrainState:
    """init_train_state as one jitted program whose outputs land in their final shardings: the teacher
    copy and the optimizer moments are never materialised unsharded (8B parameters would not fit)."""
    shardings = jax.tree.map(lambda t: t.sharding, target)
    return jax.jit(lambda p: init_train_state(p, optimizer, step_cfg), out_shardings=shardings)(params)


def _stage_start(run: _Run, stage: Stage, previous: Stage | None, resume_step: int | None) -> tuple[TrainState, dict]:
    """The stage's initial TrainState and checkpoint meta: restored (resume), handed over from the
    previous stage's final checkpoint (params only: a fresh optimizer, and the reference policy of
    beta > 0 is the handed-over one), or built from the configured model."""
    optimizer = make_optimizer(stage.optim)
    target = abstract_state(run.param_shapes, optimizer, stage.step, run.mesh)
    with Checkpointer(_checkpoint_dir(run.workdir, stage), async_save=False) as ckpt:
        if resume_step is not None:
            state, meta = ckpt.restore(target, resume_step)
            run.log.message(f"resumed stage {stage.name} from the checkpoint of step {resume_step}")
            return state, meta
        if stage.init_from is not None:
            prev_target = abstract_state(run.param_shapes, make_optimizer(previous.optim), previous.step, run.mesh)
            with Checkpointer(_checkpoint_dir(run.workdir, previous), async_save=False) as prev:
                prev_state, meta = prev.restore(prev_target, previous.last)
            state = _init_state(prev_state.params, optimizer, stage.step, target)
            del prev_state
            meta = dict(meta, step=stage.first - 1, stage=stage.name)
            # The hand-over is itself a checkpoint of this stage: a crash before its first save resumes here.
            ckpt.save(stage.first - 1, state, meta=meta)
            run.log.message(f"stage {stage.name} starts from the final checkpoint of stage {previous.name} "
                            f"(step {previous.last})")
            return state, meta
    state = _init_state(nnx.split(run.policy.model)[1], optimizer, stage.step, target)
    run.policy.model = None  # its arrays now belong to the state, whose buffers the step donates
    return state, {"step": 0, "data": None}


def _take_problems(run: _Run) -> tuple[list, dict]:
    """This host's share of the step's problems, and the iterator state after taking them (all hosts
    advance the same global iterator, so the order does not depend on the number of hosts)."""
    every_host = run.iterator.take(run.cfg.data.problems_per_step)
    return multihost.host_shard(every_host), run.iterator.state_dict()


def _rollout(run: _Run, stage: Stage, params, problems: list, step: int) -> RolloutResult:
    model = nnx.merge(run.graphdef, params)
    rollouts_dir = run.workdir if multihost.is_writer() else run.workdir / "hosts" / str(jax.process_index())
    return run_rollout(problems, model=model, tokenizer=run.policy.tokenizer, fmt=run.fmt, verifier=run.verifier,
                       feedback=run.feedback if stage.rollout.request_feedback else None, config=stage.rollout,
                       generate_fn=run.generate_fn, seed=derive_seed(run.cfg.seed, step), step=step, workdir=rollouts_dir,
                       episodes=run.episodes)


def _rollout_and_state(run: _Run, stage: Stage, params, problems: list, step: int, data_state: dict):
    return _rollout(run, stage, params, problems, step), data_state


def _run_stage(run: _Run, stage: Stage, state: TrainState, meta: dict) -> tuple[bool, int]:
    """Trains the stage's remaining steps. Returns (finished, last step done)."""
    if stage.name == "sft":
        return _run_sft_stage(run, stage, state, meta)
    cfg = run.cfg
    optimizer = make_optimizer(stage.optim)
    diagnose = None
    if cfg.log.teacher_diagnostics and stage.step.distill_weight > 0:
        diagnose = make_diagnostics(run.graphdef, stage.step, first_k=cfg.log.teacher_diagnostics_first_k)
    # The batch's teacher/* come from the step's own statistics; `diagnose` scores only the probe.
    step_fn = make_train_step(run.graphdef, optimizer, stage.step, learning_rate_schedule(stage.optim),
                              diagnostics_first_k=cfg.log.teacher_diagnostics_first_k if diagnose else None)
    if meta.get("data"):
        run.iterator.load_state_dict(meta["data"])
    done = int(meta["step"])
    trained = 0
    stage_dir = run.stage_dir(stage)
    pad_id = run.policy.tokenizer.pad_token_id or 0
    ckpt = Checkpointer(stage_dir / CHECKPOINTS, max_to_keep=cfg.checkpoint.max_to_keep,
                        async_save=cfg.checkpoint.async_save)
    pending: concurrent.futures.Future | None = None  # asynchronous mode: the next step's rollout
    with ckpt, concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollout") as background:
        for step in range(done + 1, stage.last + 1):
            start = time.perf_counter()
            if pending is None:
                problems, data_state = _take_problems(run)
                rollout = _rollout(run, stage, state.params, problems, step)
            else:
                (rollout, data_state), pending = pending.result(), None
            if cfg.rollout.asynchronous and step < stage.last:
                # The next batch is sampled from a copy of the current weights (the step donates these)
                # while this one trains: one step off-policy, which the importance weights correct.
                problems, next_data_state = _take_problems(run)
                snapshot = jax.tree.map(jnp.copy, state.params)
                pending = background.submit(_rollout_and_state, run, stage, snapshot, problems, step + 1,
                                            next_data_state)
            train_start = time.perf_counter()
            batch = multihost.global_batch(rollout.batch, run.mesh, pad_id=pad_id)
            due = diagnose is not None and step % cfg.log.teacher_diagnostics_every_steps == 0
            # Before the step moves θ and φ: the probe rides on the first iteration, sharing its prompt
            # prefixes (`make_train_step`), or is scored apart where the step does not share prompts.
            probe = rollout.probe if due and jax.process_count() == 1 else None
            rides = probe is not None and step_fn.takes_probe(batch)
            diagnosed = {} if rides else _diagnose(diagnose if due else None, state, rollout, run.mesh, pad_id)
            per_iteration = []
            for i in range(cfg.num_iterations):
                ride = dataclasses.asdict(probe) if rides and i == 0 else None
                state, metrics = step_fn(state, batch, ride)
                per_iteration.append(metrics)
            per_iteration = [{k: float(v) for k, v in m.items()} for m in jax.device_get(per_iteration)]
            # The batch's teacher/* of the first iteration (before any update), on the steps they are due.
            diagnosed.update({k: v for k, v in per_iteration[0].items() if k.startswith("teacher/") and due})
            per_iteration = [{k: v for k, v in m.items() if not k.startswith("teacher/")} for m in per_iteration]
            record = _record(run, stage, step, rollout, per_iteration, start, time.perf_counter() - train_start,
                             epoch=data_state["epoch"])
            record.update({k: float(v) for k, v in jax.device_get(diagnosed).items()})
            trained += 1
            if _end_step(run, stage, ckpt, step, state, data_state, record):
                if pending is not None:
                    pending.result()  # let the sampler thread finish; its batch is re-sampled on resume
                return False, step
    _finish_stage(run, stage, state, stage.last, trained=trained > 0)
    return True, stage.last


def _end_step(run: _Run, stage: Stage, ckpt: Checkpointer, step: int, state: TrainState, data_state: dict,
              record: dict) -> bool:
    """What every stage does after its update: evaluate when due (eval.at_end too, so that its eval/* scores
    reach metrics.jsonl and TensorBoard), write the record, checkpoint when due or on a signal. Returns
    whether a signal asked to stop (the checkpoint of `step` is then written)."""
    cfg = run.cfg
    if (cfg.eval.every_steps and step % cfg.eval.every_steps == 0) or (cfg.eval.at_end and step == stage.last):
        record.update(_evaluate(run, stage, state.params, step))
    run.log.write(record, tensorboard_dir=run.stage_dir(stage) / TENSORBOARD)
    stop = run.stop.should_stop()
    if stop or step == stage.last or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0):
        ckpt.save(step, state, meta=_meta(run, stage, step, data_state), force=True)
    if stop:
        run.log.message(f"stopped by a signal after step {step}; checkpoint saved in {ckpt.directory}")
    return stop


def _run_sft_stage(run: _Run, stage: Stage, state: TrainState, meta: dict) -> tuple[bool, int]:
    """`_run_stage` for algorithm=sft: each step's problems become (prompt, target) pairs (`fd_jax.train.sft`)
    and one supervised update; checkpoints, evaluation, signals and logs as in the RL stages."""
    from fd_jax.rl.sft import make_sft_step
    from fd_jax.train import sft as sft_lib

    cfg = run.cfg
    optimizer = make_optimizer(stage.optim)
    step_fn = make_sft_step(run.graphdef, optimizer, stage.step, learning_rate_schedule(stage.optim))
    if meta.get("data"):
        run.iterator.load_state_dict(meta["data"])
    pad_id = run.policy.tokenizer.pad_token_id or 0
    feedback_fn = lambda request: run.feedback.feedback([request])[0]  # noqa: E731
    stage_dir, trained = run.stage_dir(stage), 0
    ckpt = Checkpointer(stage_dir / CHECKPOINTS, max_to_keep=cfg.checkpoint.max_to_keep,
                        async_save=cfg.checkpoint.async_save)
    with ckpt:
        for step in range(int(meta["step"]) + 1, stage.last + 1):
            start = time.perf_counter()
            problems, data_state = _take_problems(run)
            examples = sft_lib.sft_examples(cfg, problems, fmt=run.fmt, rollout=stage.rollout,
                                            feedback_fn=feedback_fn, step=step)
            batch = sft_lib.sft_batch(examples, tokenizer=run.policy.tokenizer, fmt=run.fmt,
                                      pad_multiple=stage.rollout.pad_multiple)
            state, metrics = step_fn(state, multihost.global_batch(batch, run.mesh, pad_id=pad_id))
            record = {"step": step, "stage": stage.name, "stage_step": step - stage.first + 1,
                      "epoch": data_state["epoch"], **{k: float(v) for k, v in jax.device_get(metrics).items()},
                      "time/step_s": time.perf_counter() - start, "wall_time": time.time(), **compilations.totals()}
            trained += 1
            if _end_step(run, stage, ckpt, step, state, data_state, record):
                return False, step
    _finish_stage(run, stage, state, stage.last, trained=trained > 0)
    return True, stage.last


def _diagnose(diagnose, state: TrainState, rollout: RolloutResult, mesh, pad_id: int) -> dict:
    """The probe's teacher/* metrics (`fd_jax.rl.diagnostics`; the batch's come from the step), {} when off
    or without probe rows. With several hosts the probe is left out: hosts may differ in whether they have
    probe rows, and all must run one program."""
    if diagnose is None or rollout.probe is None or jax.process_count() > 1:
        return {}
    return dict(diagnose(state, None, multihost.global_batch(rollout.probe, mesh, pad_id=pad_id)))


def _meta(run: _Run, stage: Stage, step: int, data_state: dict) -> dict:
    return {"step": step, "stage": stage.name, "data": data_state, "seed": run.cfg.seed,
            "algorithm": run.cfg.algorithm, "time": time.time()}


def _record(run: _Run, stage: Stage, step: int, rollout: RolloutResult, per_iteration: list[dict],
            start: float, train_s: float, *, epoch: int) -> dict[str, Any]:
    sums, how = step_metrics.rollout_sums(rollout, stage.rollout.num_generations)
    sums.update(step_metrics.feedback_deltas(rollout.counts, run.feedback_totals))
    combined = multihost.reduce_scalars(sums, how)
    step_s = time.perf_counter() - start
    record = {"step": step, "stage": stage.name, "stage_step": step - stage.first + 1, "epoch": epoch,
              **step_metrics.combine_iterations(per_iteration), **step_metrics.finish_rollout(combined)}
    record.update({
        "time/train_s": train_s,
        "time/step_s": step_s,
        "tokens_per_s": combined["completion_tokens"] / max(step_s, 1e-9),  # generated tokens per wall second
        "train/tokens_per_s": combined["completion_tokens"] * run.cfg.num_iterations / max(train_s, 1e-9),
        "wall_time": time.time(),
        **compilations.totals(),  # programs built so far in this process: flat once every shape has been seen
    })
    return record


def _evaluate(run: _Run, stage: Stage, params, step: int) -> dict[str, float]:
    """pass@k (and entropy, diversity) of the current policy on the held-out problems; the report goes to
    DIR/eval/step_N/. Returns the `eval/*` scalars for the metrics line."""
    e = run.cfg.eval
    problems = multihost.host_shard(run.eval_problems)
    report = evaluation.evaluate(
        problems, model=nnx.merge(run.graphdef, params), tokenizer=run.policy.tokenizer, fmt=run.fmt,
        verifier=run.verifier, n=e.n, ks=tuple(e.ks), max_new_tokens=e.max_new_tokens, temperature=e.temperature,
        seed=e.seed, entropy=jax.process_count() == 1,  # the entropy pass is per host, not a global program
        lemmas=get_task(run.cfg.data.task).count_lemmas, generate_fn=run.generate_fn, progress=False,
        episodes=run.episodes)  # an episodic task's evaluation runs episodes, as its rollouts do
    sums = {f"pass@{k}": v * len(problems) for k, v in report["pass_at_k"].items()}
    sums.update(problems=len(problems), solved=report["solved"])
    combined = multihost.reduce_scalars(sums, {})
    out = {f"eval/pass@{k}": combined[f"pass@{k}"] / combined["problems"] for k in report["pass_at_k"]}
    out["eval/solved"] = combined["solved"]
    if report.get("entropy") is not None:
        out["eval/entropy"] = report["entropy"]
    out["eval/distinct_valid_per_problem"] = report["diversity"]["distinct_valid_per_problem"]
    if multihost.is_writer():
        evaluation.write_report(report, run.workdir / "eval" / f"step_{step}", name=f"{stage.name} step {step}")
    return out


def _finish_stage(run: _Run, stage: Stage, state: TrainState, step: int, *, trained: bool) -> None:
    """At a stage's end: the Hugging Face export of the policy (eval.at_end ran with the last step)."""
    final = stage.name == stages(run.cfg)[-1].name
    export_dir = run.workdir / HF_FINAL if final else run.stage_dir(stage) / HF_FINAL
    if trained and run.cfg.eval.at_end and run.log.records and run.log.records[-1].get("step") == step:
        scalars = {k: v for k, v in run.log.records[-1].items() if k.startswith("eval/")}
        if scalars:
            run.log.message(f"evaluation at the end of stage {stage.name} (step {step}): " + json.dumps(scalars))
    if run.cfg.export_hf and (trained or not (export_dir / "config.json").exists()):
        save_hf(nnx.merge(run.graphdef, state.params), run.policy.config, export_dir,
                tokenizer=run.policy.tokenizer)
        run.log.message(f"exported the {stage.name} policy to {export_dir}")
