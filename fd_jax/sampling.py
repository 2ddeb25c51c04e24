"""The public path of the sampler; the code lives in `fd_jax.rollout.sampling`."""

from fd_jax.rollout.sampling import (
    FINISH_LENGTH,
    FINISH_STOP,
    SampleOutput,
    argmax,
    bucket,
    filter_logits,
    generate,
    sample_tokens,
)

__all__ = ["FINISH_LENGTH", "FINISH_STOP", "SampleOutput", "argmax", "bucket", "filter_logits", "generate",
           "sample_tokens"]
