"""Where the teacher's context goes (`rollout.context_placement`): the exact chat each placement renders
through a Llama-3-style and a Qwen-style (ChatML) chat template, built locally on the character tokenizer."""

from __future__ import annotations

import pytest

from fd_jax.data.char_tokenizer import build_char_tokenizer
from fd_jax.data.problems import Problem
from fd_jax.data.prompts import LeanChatFormat
from fd_jax.data.reprompt import RepromptTemplates, render_teacher_prompt, teacher_context
from fd_jax.tasks.arithmetic import ArithmeticFormat

# Hand-written in the shape of the two families' templates (header markers per turn, no system default).
LLAMA_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
QWEN_STYLE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def llama(turns):
    body = "".join(f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>" for role, text in turns)
    return "<bos>" + body + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def qwen(turns):
    return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns) + "<|im_start|>assistant\n"


STYLES = {"llama": (LLAMA_STYLE, llama), "qwen": (QWEN_STYLE, qwen)}
PROBLEM = Problem("p", "Compute 3 + 9.")
SYSTEM = "Reply with 'Answer: N'."
FEEDBACK = "wrong answer 13: the answer is too large"
T = RepromptTemplates()


def arith(template):
    tok = build_char_tokenizer()
    tok.chat_template = template
    return ArithmeticFormat(tokenizer=tok, system=SYSTEM, template="{context}{statement}",
                            examples=[("Compute 4 + 5.", 9)])


@pytest.mark.parametrize("style", sorted(STYLES))
def test_user_placement_is_the_original_context_slot(style):
    template, expect = STYLES[style]
    fmt = arith(template)
    ctx = teacher_context(FEEDBACK, None, T)
    text = render_teacher_prompt(fmt, PROBLEM, feedback=FEEDBACK, solution=None, placement="user", attempt="13")
    assert text == fmt.render(PROBLEM, ctx)  # unchanged from before placements existed
    assert text == expect([("system", SYSTEM), ("user", "Compute 4 + 5."), ("assistant", "Answer: 9"),
                           ("user", ctx + "Compute 3 + 9.")])
    assert ctx == ("Feedback on an earlier, incorrect attempt at this problem:\n\n" + FEEDBACK +
                   "\n\nTaking this into account, solve the problem below.\n\n")


@pytest.mark.parametrize("style", sorted(STYLES))
def test_system_placement_appends_the_context_to_the_system_turn(style):
    template, expect = STYLES[style]
    fmt = arith(template)
    text = render_teacher_prompt(fmt, PROBLEM, feedback=FEEDBACK, solution="Compute 3 + 9.\nAnswer: 12",
                                 placement="system")
    context = teacher_context(FEEDBACK, "Compute 3 + 9.\nAnswer: 12", T).strip()
    assert text == expect([("system", SYSTEM + "\n\n" + context), ("user", "Compute 4 + 5."),
                           ("assistant", "Answer: 9"), ("user", "Compute 3 + 9.")])
    # The question turn is the student's, character for character.
    assert text.endswith(fmt.render(PROBLEM)[-40:])


@pytest.mark.parametrize("style", sorted(STYLES))
def test_turns_placement_adds_a_worked_example_and_a_retry_exchange(style):
    template, expect = STYLES[style]
    fmt = arith(template)
    text = render_teacher_prompt(fmt, PROBLEM, feedback=FEEDBACK, solution="Compute 3 + 9.\nAnswer: 12",
                                 placement="turns", attempt="Answer: 13", solved_reply="Answer: 12")
    assert text == expect([("system", SYSTEM), ("user", "Compute 4 + 5."), ("assistant", "Answer: 9"),
                           ("user", "Compute 3 + 9."), ("assistant", "Answer: 12"),
                           ("user", "Compute 3 + 9."), ("assistant", "Answer: 13"),
                           ("user", f"That is not right: {FEEDBACK}\n\nCompute 3 + 9.")])
    # Feedback alone: only the retry exchange; a solved sibling alone: only the worked example.
    only_feedback = render_teacher_prompt(fmt, PROBLEM, feedback=FEEDBACK, solution=None, placement="turns",
                                          attempt="Answer: 13")
    assert only_feedback == expect([("system", SYSTEM), ("user", "Compute 4 + 5."), ("assistant", "Answer: 9"),
                                    ("user", "Compute 3 + 9."), ("assistant", "Answer: 13"),
                                    ("user", f"That is not right: {FEEDBACK}\n\nCompute 3 + 9.")])
    only_solution = render_teacher_prompt(fmt, PROBLEM, feedback=None, solution="Compute 3 + 9.\nAnswer: 12",
                                          placement="turns", solved_reply="Answer: 12")
    assert only_solution == expect([("system", SYSTEM), ("user", "Compute 4 + 5."), ("assistant", "Answer: 9"),
                                    ("user", "Compute 3 + 9."), ("assistant", "Answer: 12"),
                                    ("user", "Compute 3 + 9.")])


@pytest.mark.parametrize("placement", ["auto", "user", "system", "turns"])
def test_no_context_renders_the_student_prompt(placement):
    fmt = arith(QWEN_STYLE)
    assert render_teacher_prompt(fmt, PROBLEM, feedback=None, solution=None, placement=placement) == fmt.render(PROBLEM)


def test_lean_chat_format_takes_every_placement():
    tok = build_char_tokenizer()
    tok.chat_template = QWEN_STYLE
    fmt = LeanChatFormat(tok, template="{context}Prove:\n{statement}")
    problem = Problem("t", "theorem t : 1 = 1 := by\n")
    text = render_teacher_prompt(fmt, problem, feedback="error: x", solution=None, placement="system")
    system = teacher_context("error: x", None, T).strip()
    assert text == qwen([("system", system), ("user", "Prove:\ntheorem t : 1 = 1 := by\n")])
    text = render_teacher_prompt(fmt, problem, feedback="error: x", solution=None, placement="turns", attempt="rfl")
    assert text == qwen([("user", "Prove:\ntheorem t : 1 = 1 := by\n"), ("assistant", "rfl"),
                         ("user", "That is not right: error: x\n\nProve:\ntheorem t : 1 = 1 := by\n")])


def test_completion_format_refuses_chat_placements():
    with pytest.raises(ValueError, match="chat"):
        render_teacher_prompt(ArithmeticFormat(), PROBLEM, feedback=FEEDBACK, solution=None, placement="system")
    with pytest.raises(ValueError, match="unknown context placement"):
        render_teacher_prompt(arith(QWEN_STYLE), PROBLEM, feedback=FEEDBACK, solution=None, placement="middle")


def test_config_refuses_a_chat_placement_with_a_completion_format():
    from fd_jax.config.defaults import base_config
    from fd_jax.config.errors import ConfigError
    from fd_jax.config.validation import validate

    cfg = base_config()
    cfg.model.source, cfg.model.tokenizer = "init", "char"
    cfg.rollout.context_placement = "turns"
    with pytest.raises(ConfigError, match=r"config.rollout.context_placement = 'turns': data.prompt_format=arithmetic"):
        validate(cfg)
    cfg.data.prompt_format = "arithmetic_chat"
    validate(cfg)
    cfg.rollout.context_placement = "middle"
    with pytest.raises(ConfigError, match=r"rollout.context_placement = 'middle': must be one of"):
        validate(cfg)


def test_auto_placement_is_the_formats_measured_default():
    """`auto` (the config default) renders exactly what the format's `default_placement` renders: turns for
    the arithmetic chat format, user for its completion style and for the Lean chat format."""
    fmt = arith(QWEN_STYLE)
    assert fmt.default_placement == "turns" and ArithmeticFormat().default_placement == "user"
    for feedback, solution in ((FEEDBACK, None), (None, "Compute 5 + 7.\nAnswer: 12")):
        kw = dict(feedback=feedback, solution=solution, attempt="Answer: 13", solved_reply="Answer: 12")
        assert (render_teacher_prompt(fmt, PROBLEM, placement="auto", **kw)
                == render_teacher_prompt(fmt, PROBLEM, placement="turns", **kw)
                != render_teacher_prompt(fmt, PROBLEM, placement="user", **kw))
        assert (render_teacher_prompt(ArithmeticFormat(), PROBLEM, placement="auto", **kw)
                == render_teacher_prompt(ArithmeticFormat(), PROBLEM, placement="user", **kw))
    tok = build_char_tokenizer()
    tok.chat_template = QWEN_STYLE
    lean, problem = LeanChatFormat(tok, template="{context}Prove:\n{statement}"), Problem("t", "theorem t : 1 = 1 := by\n")
    assert (render_teacher_prompt(lean, problem, feedback="error: x", solution=None, placement="auto")
            == render_teacher_prompt(lean, problem, feedback="error: x", solution=None, placement="user"))
    from fd_jax.config.defaults import base_config

    assert base_config().rollout.context_placement == "auto"
