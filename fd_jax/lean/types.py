"""The verifier contract as the Lean back-ends import it; it is defined in `fd_jax.verification`."""

from fd_jax.verification import (
    CRASHED,
    INVALID,
    REJECTED,
    SORRY,
    STATUSES,
    TIMEOUT,
    VALID,
    ProofTask,
    Verdict,
    Verifier,
)

__all__ = ["CRASHED", "INVALID", "REJECTED", "SORRY", "STATUSES", "TIMEOUT", "VALID", "ProofTask", "Verdict",
           "Verifier"]
