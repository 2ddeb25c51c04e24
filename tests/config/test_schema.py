"""The settings dataclasses are the one source of the step, optim and rollout knobs: the run config is
derived from them, and their checks name the field."""

from __future__ import annotations

import dataclasses

import pytest

from fd_jax.config import defaults, schema
from fd_jax.config.errors import ConfigError
from fd_jax.config.schema import OptimConfig, RolloutConfig, StepConfig

SECTIONS = {"step": StepConfig, "optim": OptimConfig, "rollout": RolloutConfig}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_run_config_section_is_the_dataclass(section):
    cls, cfg = SECTIONS[section], defaults.base_config()[section]
    in_config = [f for f in dataclasses.fields(cls) if f.metadata["run_default"] is not schema.NOT_IN_CONFIG]
    assert set(cfg.keys()) == {f.name for f in in_config}
    for f in in_config:
        run_default = f.metadata["run_default"]
        expected = f.default if run_default is schema._SAME else run_default
        assert cfg[f.name] == expected, f.name
    assert all(doc.strip() for doc in schema.docs(cls).values()), "every knob has a one-line comment"


def test_run_defaults_that_differ_are_resolved_by_the_stage():
    cfg = defaults.base_config()
    assert cfg.step.distill_weight is None and StepConfig().distill_weight == 1.0
    assert cfg.optim.total_steps == 0 and OptimConfig().total_steps == 1000
    assert "request_feedback" not in cfg.rollout and RolloutConfig().request_feedback
    with pytest.raises(TypeError):  # a placeholder keeps the field's type on override
        cfg.step.distill_weight = "half"


@pytest.mark.parametrize("cls,values,message", [
    (StepConfig, {"loss_agg": "sum"}, "step.loss_agg = 'sum': must be one of ['constant', 'seq_mean', 'token_mean']"),
    (StepConfig, {"loss_type": "ppo"}, "step.loss_type = 'ppo': must be one of ['bnpo', 'dapo', 'dr_grpo', 'grpo']"),
    (StepConfig, {"micro_batches": 0}, "step.micro_batches = 0: must be an integer >= 1"),
    (StepConfig, {"token_chunk": 0}, "step.token_chunk = 0: must be a positive block size"),
    (StepConfig, {"kernel_passes": "one", "importance_sampling_level": "sequence"}, "step.kernel_passes = 'one'"),
    (OptimConfig, {"schedule": "linear"}, "optim.schedule = 'linear': must be one of ['constant', 'cosine']"),
    (RolloutConfig, {"top_p": 0.0}, "rollout.top_p = 0.0: must be in (0, 1]"),
    (RolloutConfig, {"num_generations": 2.5}, "rollout.num_generations = 2.5: must be an integer >= 1"),
])  # fmt: skip
def test_bad_settings_name_the_field(cls, values, message):
    with pytest.raises(ConfigError) as error:
        cls(**values)
    assert str(error.value).startswith(message)


def test_loss_registries_are_the_names_the_schema_allows():
    from fd_jax.rl import losses

    assert losses.LOSS_TYPES == schema.LOSS_TYPES and losses.LOSS_AGGS == schema.LOSS_AGGS


def test_rollout_templates_come_from_its_fields():
    r = RolloutConfig(reprompt_template="{feedback}!", feedback_template="F:{feedback}")
    assert (r.templates.reprompt, r.templates.feedback) == ("{feedback}!", "F:{feedback}")


def test_checking_a_config_imports_no_jax():
    import subprocess
    import sys

    code = ("import sys, fd_jax.config.validation, fd_jax.config.defaults, fd_jax.tasks; "
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
