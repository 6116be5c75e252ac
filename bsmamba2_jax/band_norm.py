"""The band-split RMSNorm of the official BS-RoFormer family: band split, Transformers, final norm.

`x / max(‖x‖₂, 1e-12) · sqrt(dim) · gamma` over the last axis — an L2 normalisation scaled back
to unit mean square, not the eps-inside-sqrt RMSNorm of Mamba (`mamba2.RMSNorm`).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def band_rmsnorm(x: jax.Array, gamma: jax.Array) -> jax.Array:
  """The band-split RMSNorm over the last axis: `x / max(‖x‖₂, 1e-12) · sqrt(dim) · gamma`.

  Not the eps-inside-sqrt RMSNorm of Mamba. Computed in fp32; returns fp32.
  """
  x32 = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
  return x32 / jnp.maximum(norm, 1e-12) * math.sqrt(x.shape[-1]) * gamma


class BandRMSNorm(nn.Module):
  """`band_rmsnorm` with its own `gamma` (dim,), initialised to one (the official final norm)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param("gamma", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    return band_rmsnorm(x, gamma)
