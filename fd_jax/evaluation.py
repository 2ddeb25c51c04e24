"""The public path of evaluation; the code lives in `fd_jax.eval.evaluation`."""

from fd_jax.eval.evaluation import (
    completion_logprobs_and_entropy,
    evaluate,
    mean_pass_at_k,
    pass_at_k,
    plot_pass_at_k,
    summarize,
    write_report,
)

__all__ = ["completion_logprobs_and_entropy", "evaluate", "mean_pass_at_k", "pass_at_k", "plot_pass_at_k",
           "summarize", "write_report"]
