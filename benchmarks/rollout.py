"""Stage timings of one rollout step on CPU: generate, verify, feedback, batch building.

    python benchmarks/rollout.py                       # tiny random model, arithmetic, lean_errors feedback
    python benchmarks/rollout.py --feedback loopback   # an OpenAI-compatible stub on 127.0.0.1 with latency
    python benchmarks/rollout.py --quick               # fewer steps, for a smoke check

Uses the real sampler on a randomly initialised Llama-shaped model, the character tokenizer and the
arithmetic verifier (optionally slowed down with --verify-delay to mimic Lean). The first step compiles and
is reported apart; the others are summarised by their medians. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import http.server
import json
import statistics
import sys
import threading
import time


def _stub_llm(latency_s: float) -> tuple[http.server.ThreadingHTTPServer, str]:
    """An OpenAI-compatible chat-completions stub that answers after `latency_s`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            time.sleep(latency_s)
            body = json.dumps({"choices": [{"message": {"content": "Check the carry in the tens column."}}],
                               "usage": {"prompt_tokens": 200, "completion_tokens": 12}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=16, help="P problems per step")
    parser.add_argument("--generations", type=int, default=8, help="G samples per problem")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=4, help="problems per generate call (0 = all at once)")
    parser.add_argument("--level", default="hard", help="arithmetic level: easy | medium | hard")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="timed steps after the compiling one")
    parser.add_argument("--verify-delay", type=float, default=0.0, help="seconds per proof, to mimic Lean")
    parser.add_argument("--feedback", default="lean_errors", choices=["lean_errors", "loopback"])
    parser.add_argument("--llm-latency", type=float, default=0.3, help="seconds per stub LLM answer")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.problems, args.generations, args.steps = 4, 4, 2

    import jax

    from fd_jax.data.char_tokenizer import build_char_tokenizer
    from fd_jax.feedback import get_provider
    from fd_jax.models import ModelConfig, init_model
    from fd_jax.rollout.rollout import RolloutConfig, run_rollout
    from fd_jax.rollout.sampling import generate
    from fd_jax.tasks.arithmetic import ArithmeticFormat, ArithmeticVerifier, make_problems

    tokenizer = build_char_tokenizer()
    cfg = ModelConfig(family="llama", vocab_size=128, hidden_size=args.hidden,
                      intermediate_size=4 * args.hidden, num_layers=args.layers, num_heads=4, num_kv_heads=2, head_dim=args.hidden // 4)
    model = init_model(cfg, seed=0)
    server = None
    if args.feedback == "loopback":
        server, url = _stub_llm(args.llm_latency)
        provider = get_provider("openai", model="stub", base_url=url, api_key="unused", timeout_s=10,
                                max_concurrency=16)
    else:
        provider = get_provider("lean_errors")
    config = RolloutConfig(num_generations=args.generations, max_new_tokens=args.max_new_tokens,
                           chunk_problems=args.chunk, pad_multiple=32)
    fmt = ArithmeticFormat()
    steps = []
    with ArithmeticVerifier(delay_s=args.verify_delay) as verifier:
        for step in range(args.steps + 1):
            problems = make_problems(args.problems, seed=step, level=args.level)
            result = run_rollout(problems, model=model, tokenizer=tokenizer, fmt=fmt, verifier=verifier,
                                 feedback=provider, config=config, generate_fn=generate, seed=step, step=step)
            steps.append(result.timings)
    if server is not None:
        server.shutdown()
    timed = steps[1:]
    report = {
        "device": str(jax.devices()[0]),
        "rows": args.problems * args.generations,
        "settings": vars(args),
        "first_step_s": {k: round(v, 4) for k, v in steps[0].items()},
        "median_s": {k: round(statistics.median(t[k] for t in timed), 4) for k in timed[0]},
        "batch_shapes": {k: list(getattr(result.batch, k).shape)
                         for k in ("student_tokens_BS", "teacher_tokens_BU", "completion_tokens_BC")},
    }
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
