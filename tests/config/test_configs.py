"""The config files and their checks: every shipped config validates, every knob is documented, a bad value
is refused at start with the field named, and the stage layout of each algorithm is what the docs say."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import pathlib

import pytest

from fd_jax.tasks import get_task

from fd_jax.config import defaults as config_defaults
from fd_jax.config.errors import ConfigError
from fd_jax.config.validation import config_from_json, validate
from fd_jax.train.stages import stages

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture
def local_files(tmp_path):
    """Stand-ins for what a user downloads: a model directory with config.json and a problem file."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    problems = tmp_path / "problems.jsonl"
    problems.write_text("")
    return model, problems


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.py")))
def test_every_shipped_config_validates(name, local_files):
    cfg = load(name)
    if cfg.model.source == "hf":
        cfg.model.path = str(local_files[0])
    if get_task(cfg.data.task).reads_problem_file:
        cfg.data.path = str(local_files[1])
    validate(cfg)
    for algorithm in ("fd", "grpo", "fd_then_grpo"):
        cfg.algorithm = algorithm
        validate(cfg)


def _assignments_without_comment(function) -> list[str]:
    lines, first = inspect.getsourcelines(function)
    tree = ast.parse(inspect.getsource(function))
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            line = lines[node.lineno - 1]
            if "#" not in line and not line.rstrip().endswith("ConfigDict()"):
                missing.append(f"line {first + node.lineno - 1}: {line.strip()}")
    return missing


def test_every_knob_has_a_default_and_a_comment():
    builders = [config_defaults.model_config, config_defaults.data_config, config_defaults.rollout_config,
                config_defaults.step_config, config_defaults.optim_config, config_defaults.lean_config,
                config_defaults.feedback_config, config_defaults.base_config]
    missing = [entry for builder in builders for entry in _assignments_without_comment(builder)]
    assert not missing, "fields without a one-line comment:\n" + "\n".join(missing)


def _smoke(**overrides):
    cfg = load("smoke_cpu")
    for path, value in overrides.items():
        *parents, key = path.split("__")
        node = cfg
        for parent in parents:
            node = node[parent]
        node[key] = value
    return cfg


@pytest.mark.parametrize("overrides, message", [
    ({"step__teacher": "emma"}, "config.step.teacher = 'emma': must be one of ['ema', 'live', 'base']"),
    ({"step__loss_type": "ppo"}, "config.step.loss_type = 'ppo': must be one of"),
    ({"rollout__scale_rewards": "max"}, "config.rollout.scale_rewards = 'max'"),
    ({"step__distill_mode": "sampled_token", "step__alpha": 0.5}, "config.step.alpha = 0.5: distill_mode=sampled_token"),
    ({"eval__n": 2}, "config.eval.ks = (1, 2, 4): every k must be in [1, eval.n = 2]"),
    ({"algorithm": "fd_then_grpo", "fd_steps": 100}, "config.fd_steps = 100: fd_then_grpo needs 1 <= fd_steps < total_steps"),
    ({"step__distill_weight": 2.0}, "config.step.distill_weight = 2.0: must be in [0, 1]"),
    ({"step__ema_tau": 0.0}, "config.step.ema_tau = 0.0: must be in (0, 1]"),  # the dataclass checks it
    ({"optim__schedule": "linear"}, "config.optim.schedule = 'linear'"),
    ({"model__source": "hf", "model__path": "/nonexistent"}, "config.model.path = '/nonexistent': model.source=hf needs"),
    ({"data__task": "lean", "data__prompt_format": "lean_chat"}, "config.data.path = '': data.task=lean needs a problem file"),
    ({"data__prompt_format": "lean_chat"}, "config.data.prompt_format = 'lean_chat': data.task=arithmetic needs"),
    ({"num_iterations": 0}, "config.num_iterations = 0: must be an integer >= 1"),
    ({"step__token_chunk": 0}, "config.step.token_chunk = 0: must be a positive block size"),
    ({"data__num_shots": -1}, "config.data.num_shots = -1: must be an integer >= 0"),
    ({"log__teacher_diagnostics_every_steps": 0}, "config.log.teacher_diagnostics_every_steps = 0: must be an integer >= 1"),
    ({"data__task": "lean", "data__path": __file__, "data__prompt_format": "lean_chat", "data__num_shots": 2},
     "config.data.num_shots = 2: worked examples exist for data.task=arithmetic only"),
    ({"data__prompt_template": "{question}"}, "config.data.prompt_template = '{question}': template field {question} is not one of"),
    ({"data__system_prompt": "Be brief."}, "config.data.system_prompt = 'Be brief.': data.prompt_format=arithmetic has no system turn"),
])  # fmt: skip
def test_bad_values_are_refused_with_the_field_named(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(_smoke(**overrides))
    assert message in str(error.value)


def test_stage_layout_of_each_algorithm():
    fd, = stages(_smoke(algorithm="fd"))
    assert (fd.name, fd.first, fd.last, fd.subdir) == ("fd", 1, 100, "")
    assert fd.step.distill_weight == 1.0 and fd.step.teacher == "ema" and fd.rollout.request_feedback

    grpo, = stages(_smoke(algorithm="grpo"))
    # No feedback, no teacher pass and no teacher copy in memory.
    assert grpo.step.distill_weight == 0.0 and grpo.step.teacher == "live" and not grpo.rollout.request_feedback

    first, second = stages(_smoke(algorithm="fd_then_grpo", fd_steps=30, grpo_learning_rate=1e-4,
                                  step__distill_weight=0.8))
    assert (first.name, first.first, first.last, first.subdir, first.init_from) == ("fd", 1, 30, "fd", None)
    assert (second.name, second.first, second.last, second.subdir, second.init_from) == ("grpo", 31, 100, "grpo", "fd")
    assert first.step.distill_weight == 0.8 and second.step.distill_weight == 0.0
    assert first.optim.learning_rate == 1e-3 and second.optim.learning_rate == 1e-4
    # The cosine/warm-up length defaults to each stage's own optimizer steps.
    assert first.optim.total_steps == 30 and second.optim.total_steps == 70


def test_written_config_reads_back_identically():
    cfg = load("kimina_rl_1p7b_tpu")
    assert config_from_json(cfg.to_json_best_effort()).to_dict() == cfg.to_dict()


def test_smollm2_config_asks_with_a_system_turn_and_worked_examples():
    from fd_jax.train.components import build_format
    from fd_jax.data import Problem
    from fd_jax.data.char_tokenizer import build_char_tokenizer

    cfg = load("smollm2_arith_cpu")
    fmt = build_format(cfg, build_char_tokenizer())
    text = fmt.render(Problem("p", "Compute 2 + 2."))
    assert text.startswith(f"<bos>system: {cfg.data.system_prompt}\n")
    assert text.count("assistant: Answer: ") == cfg.data.num_shots == 3  # each example answered in the asked form
    assert text.endswith("<eos>\nuser: Compute 2 + 2.\nassistant: ")  # the bare question after the examples
    assert build_format(load("smoke_cpu"), None).render(Problem("p", "Compute 2 + 2.")) == "Compute 2 + 2.\nAnswer: "
