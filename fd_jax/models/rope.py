"""Rotary position embeddings (the Hugging Face "rotate half" layout) with linear and Llama-3 scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """[head_dim // 2] float64 inverse frequencies, scaled as `scaling["rope_type"]` says."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv_freq
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, smoothed, scaled)
    raise ValueError(f"rope_type={kind!r} is not supported")


def apply_rope(x_BTHK: jnp.ndarray, positions_BT: jnp.ndarray, inv_freq_K2: np.ndarray) -> jnp.ndarray:
    """Rotates [B, T, heads, head_dim] by each token's position (negative positions, i.e. padding, too)."""
    angles_BTK2 = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_K2, jnp.float32)
    cos_BT1K2 = jnp.cos(angles_BTK2)[:, :, None, :]
    sin_BT1K2 = jnp.sin(angles_BTK2)[:, :, None, :]
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_BT1K2 - x2 * sin_BT1K2, x2 * cos_BT1K2 + x1 * sin_BT1K2], axis=-1)
    return rotated.astype(x_BTHK.dtype)
