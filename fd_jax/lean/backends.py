"""Lean back-ends by name, so that configs choose one with a string (`lean.backend = "local"`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fd_jax.lean.base import Verifier
from fd_jax.lean.kimina import KiminaVerifier
from fd_jax.lean.leandojo import LeanDojoVerifier
from fd_jax.lean.pool import LeanVerifier

BACKENDS: dict[str, Callable[..., Verifier]] = {
    "local": LeanVerifier,  # a pool of REPL processes on this host
    "kimina": KiminaVerifier,  # a Kimina Lean Server over HTTP
    "leandojo": LeanDojoVerifier,  # LeanDojo (optional extra)
}


def get_verifier(name: str, **options: Any) -> Verifier:
    """The back-end `name` built with `options` (its constructor's arguments); ValueError if unknown."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown Lean back-end {name!r}; choose one of {sorted(BACKENDS)}") from None
    return factory(**options)
