"""The arithmetic test bed with a `calculator` tool: the whole multi-turn path (episodes, tools, masked
losses) on any CPU, without Lean. Problems, checker and answer extraction are the arithmetic task's; the
prompt says how to call the calculator, and an episode ends with an answer ("Answer: N" and the stop
token) or a `submit` call.
"""

from __future__ import annotations

from typing import Any

from ml_collections import config_dict

from fd_jax.tasks.arithmetic import ArithmeticFormat, ArithmeticTask
from fd_jax.tasks.base import attach_tool_format

# Literal braces of the JSON call are doubled: the template is filled with str.format.
TOOLS_TEMPLATE = (
    "{context}{statement}\n"
    'To use the calculator write <tool>{{"name": "calculator", "arguments": {{"expression": "12 * 7"}}}}</tool> '
    "and read its result. End with 'Answer: ' and the integer.\n"
)
# With the model family's native tool format the chat template shows the calculator's schema.
NATIVE_TOOLS_TEMPLATE = ("{context}{statement}\nUse the calculator tool where it helps. "
                         "End with 'Answer: ' and the integer.\n")


class ArithmeticToolsTask(ArithmeticTask):
    """`arithmetic` with episodes: tools `calculator` and `submit`, budgets in `config.episode`."""

    name = "arithmetic_tools"
    episodic = True

    def prompt_format(self, cfg: config_dict.ConfigDict, tokenizer: Any) -> ArithmeticFormat:
        fmt = super().prompt_format(cfg, tokenizer)
        return attach_tool_format(self, cfg, tokenizer, fmt, json_template=TOOLS_TEMPLATE,
                                  native_template=NATIVE_TOOLS_TEMPLATE)

    def tool_names(self, cfg: config_dict.ConfigDict) -> list[str]:
        return ["calculator", "submit"]

    def make_tools(self, cfg: config_dict.ConfigDict, verifier: Any) -> dict[str, Any]:
        from fd_jax.tasks.tools import Calculator, submit_tool

        return {"calculator": Calculator(), "submit": submit_tool}
