"""The task registry: each task builds its problems, prompt format and verifier from the run config, and
refuses settings it cannot work with by naming the field."""

from __future__ import annotations

import json

import pytest

from fd_jax.config.defaults import base_config
from fd_jax.config.errors import ConfigError
from fd_jax.data.char_tokenizer import build_char_tokenizer
from fd_jax.tasks import TASKS, get_task, prompt_format_names
from fd_jax.verification import INVALID, VALID, ProofTask


def test_registry_knows_the_tasks_and_names_the_known_ones():
    assert set(TASKS) == {"arithmetic", "arithmetic_tools", "lean", "lean_agentic"}
    assert set(prompt_format_names()) == {"arithmetic", "arithmetic_chat", "lean_completion", "lean_chat"}
    with pytest.raises(ValueError, match=r"unknown task 'chess'; known: \['arithmetic', 'arithmetic_tools', 'lean', 'lean_agentic'\]"):
        get_task("chess")


def test_arithmetic_task_end_to_end_from_the_config():
    cfg = base_config()
    cfg.data.task, cfg.data.num_problems, cfg.eval.num_problems = "arithmetic", 3, 2
    task = get_task("arithmetic")
    task.check(cfg)
    problems, held_out = task.problems(cfg), task.problems(cfg, held_out=True)
    assert len(problems) == 3 and len(held_out) == 2
    fmt = task.prompt_format(cfg, build_char_tokenizer())
    p = problems[0]
    assert fmt.render(p).startswith(p.statement)
    a, b = (int(x) for x in p.statement[len("Compute "):-1].split(" + "))  # easy level: "Compute a + b."
    right, wrong = fmt.extract(p, f"{a + b}\n"), fmt.extract(p, f"{a + b + 1}\n")
    with task.verifier(cfg) as verifier:
        assert [v.status for v in verifier.verify_batch([right, wrong])] == [VALID, INVALID]
    assert task.source(cfg) == "arithmetic:easy" and not task.count_lemmas


def test_lean_task_reads_its_problem_file_and_limits(tmp_path):
    rows = [dict(name=f"t{i}", split="test" if i % 2 else "valid", informal_prefix="",
                 formal_statement=f"theorem t{i} : {i} = {i} := by\n", header="import Mathlib\n") for i in range(6)]
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = base_config()
    cfg.data.update(task="lean", path=str(path), prompt_format="lean_completion", split="test", num_problems=2,
                    eval_split="valid")
    cfg.eval.num_problems = 5
    task = get_task("lean")
    task.check(cfg)
    assert [p.id for p in task.problems(cfg)] == ["t1", "t3"]
    assert [p.id for p in task.problems(cfg, held_out=True)] == ["t0", "t2", "t4"]
    fmt = task.prompt_format(cfg, tokenizer=None)
    extracted = fmt.extract(task.problems(cfg)[0], "  rfl\n```")
    assert extracted == ProofTask("theorem t1 : 1 = 1 := by\n", "theorem t1 : 1 = 1 := by\n  rfl\n",
                                  "import Mathlib\n", "t1")
    assert task.count_lemmas and task.source(cfg) == str(path)
    cfg.data.split = "nope"
    with pytest.raises(ConfigError, match=r"config.data.split = 'nope': .* has no problems in that split"):
        task.problems(cfg)


@pytest.mark.parametrize("task,changes,message", [
    ("lean", {"path": ""}, "config.data.path = '': data.task=lean needs a problem file"),
    ("lean", {"prompt_format": "arithmetic"}, "config.data.prompt_format = 'arithmetic': data.task=lean needs "
                                              "lean_completion | lean_chat"),
    ("arithmetic", {"prompt_format": "lean_chat"}, "data.task=arithmetic needs arithmetic | arithmetic_chat"),
    ("arithmetic", {"num_problems": 0}, "config.data.num_problems = 0: data.task=arithmetic generates"),
])  # fmt: skip
def test_task_checks_name_the_field(tmp_path, task, changes, message):
    path = tmp_path / "p.jsonl"
    path.write_text("")
    cfg = base_config()
    cfg.data.update(task=task, path=str(path), prompt_format=get_task(task).prompt_formats[0], num_problems=4)
    cfg.data.update(**changes)
    with pytest.raises(ConfigError, match=message):
        get_task(task).check(cfg)


def test_only_the_tool_tasks_are_episodic_and_they_take_periodic_evaluation():
    assert [name for name, task in TASKS.items() if task.episodic] == ["arithmetic_tools", "lean_agentic"]
    task = get_task("arithmetic_tools")
    assert set(task.make_tools(base_config(), None)) == {"calculator", "submit"}
    cfg = base_config()
    cfg.data.task, cfg.eval.every_steps = "arithmetic_tools", 5
    task.check(cfg)  # evaluation runs episodes (tests/train/test_episode_trainer.py)
