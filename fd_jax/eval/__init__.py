"""Evaluation of a policy: pass@k, entropy (`evaluation`) and the diversity of valid proofs (`diversity`)."""
