"""Multi-turn episodes on CPU: time per turn split into generation, tool execution and host work, and the
KV-cache reuse of `fd_jax.rollout.episodes` against recomputing the history at every turn.

    python benchmarks/agentic.py                 # B=8 rows, prompt 512, 4 turns of 32 model + ~64 tool tokens
    python benchmarks/agentic.py --quick         # smaller, for a smoke check

Both modes produce the same number of tokens per row and turn on a random Llama-shaped model with the
character tokenizer: every turn is `turn_tokens` model tokens, then a tool result of `obs_chars`
characters (a real `ToolBox` call).

* reuse: `run_episodes` with scripted turns (each turn is forced to end in a `</tool>` call after
  `turn_tokens` tokens): one prefill of the prompt, then per turn one decode loop and one append of the
  new tokens only.
* recompute: per turn, `fd_jax.rollout.sampling.generate` over the whole history (prompt + every earlier
  turn and result) for `turn_tokens` greedy tokens (no stop token, so exactly that many), the way a
  sampler without a persistent cache would run an agent.

Each mode runs once to compile and is then timed over --repeats runs (the median is reported). Prints one
JSON object: prefill tokens of each mode and their ratio, wall time of each and the speed-up, and the
reuse mode's per-turn split (generate_s, tool_s, append_s, host_s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="episodes in the batch")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--turn-tokens", type=int, default=32, help="model tokens per turn")
    parser.add_argument("--obs-chars", type=int, default=48, help="characters of each tool result")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.prompt, args.hidden, args.layers, args.repeats = 2, 128, 64, 2, 1

    import numpy as np
    from flax import nnx

    from fd_jax.data.char_tokenizer import build_char_tokenizer
    from fd_jax.models.config import ModelConfig
    from fd_jax.models.transformer import Transformer
    from fd_jax.rollout.episodes import run_episodes
    from fd_jax.rollout.sampling import generate
    from fd_jax.tasks.tools import RESULT_TEMPLATE, ToolBox, ToolContext, ToolEnvironment

    tok = build_char_tokenizer()
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    heads = max(2, args.hidden // 32)
    cfg = ModelConfig(family="llama", vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_layers=args.layers, num_heads=heads, num_kv_heads=max(1, heads // 2),
                      head_dim=args.hidden // heads)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, len(tok), args.prompt).tolist() for _ in range(args.rows)]
    call = encode('<tool>{"name": "e"}</tool>')
    turn = encode("x" * (args.turn_tokens - len(call))) + call
    assert len(turn) == args.turn_tokens, "--turn-tokens must exceed the call's length"
    result = "7" * args.obs_chars
    obs_tokens = len(encode(RESULT_TEMPLATE.format(result=result)))
    budget = dict(max_turns=args.turns, max_turn_tokens=args.turn_tokens, max_obs_tokens=obs_tokens,
                  max_episode_tokens=args.turns * (args.turn_tokens + obs_tokens) + 1)

    def reuse():
        box = ToolBox({"e": lambda a, c: result}, timeout_s=10)
        env = ToolEnvironment(box, [ToolContext()] * args.rows)
        out = run_episodes(model, prompts, env, decode=decode, encode=encode, stop_strings=["</tool>"],
                           temperature=0.0, forced=[[turn] * args.turns] * args.rows, **budget)
        box.close()
        assert all(len(t) == args.turns for t in out.turns), "every episode must run all turns"
        return out.stats["prefill_tokens"], out

    def recompute():
        box = ToolBox({"e": lambda a, c: result}, timeout_s=10)
        histories = [list(p) for p in prompts]
        prefill = 0
        for t in range(args.turns):
            prefill += sum(map(len, histories))
            out = generate(model, histories, max_new_tokens=args.turn_tokens, temperature=0.0)
            texts = box.run([("e", {}, ToolContext())] * args.rows)
            for b in range(args.rows):
                histories[b] += out.tokens[b, : out.lengths[b]].tolist()
                if t + 1 < args.turns:
                    histories[b] += encode(RESULT_TEMPLATE.format(result=texts[b].text))
        box.close()
        return prefill, None

    def timed(fn):
        fn()  # compile
        times, value = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            value = fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times), value

    reuse_s, (reuse_prefill, out) = timed(reuse)
    recompute_s, (recompute_prefill, _) = timed(recompute)
    per_turn = [{k: round(v, 4) for k, v in seg.items()} for seg in out.segments]
    print(json.dumps({
        "settings": vars(args) | {"obs_tokens": obs_tokens},
        "reuse": {"prefill_tokens": reuse_prefill, "wall_s": round(reuse_s, 4), "per_turn": per_turn,
                  "totals": {k: round(out.stats[k], 4) for k in ("prefill_s", "generate_s", "append_s", "tool_s",
                                                                 "host_s", "total_s")}},
        "recompute": {"prefill_tokens": recompute_prefill, "wall_s": round(recompute_s, 4)},
        "prefill_ratio": round(recompute_prefill / reuse_prefill, 2),
        "speedup": round(recompute_s / reuse_s, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
