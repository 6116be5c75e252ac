"""The Transformer of the official BS-RoFormer option: rotary, gated attention and a GELU MLP.

Shapes: b batch (sequences), n sequence length, d model width, h heads, e head width.
One block (the official `Transformer` of depth 1, without output norm) is
`x = x + Attention(x); x = x + FeedForward(x)`; both normalise their input with the band-split
RMSNorm first. Parameter names follow the official state_dict (docs/model.md §9), which
`convert.py` maps: `attn.{norm.gamma, to_qkv, to_gates, to_out}`, `ff.{norm.gamma, net_in,
net_out}`. The rotary frequencies are fixed, not parameters. Operands of the dense layers in
`dtype`, their results in `result_dtype` (the "mixed" mode, `config.DTYPES`); the softmax, the
rotation and the residual stream stay float32.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bsmamba2_jax.band_norm import BandRMSNorm
from bsmamba2_jax.mamba2 import torch_dense

Dtype = Any
ROTARY_THETA = 10000.0


def rotary_frequencies(dim_head: int, theta: float = ROTARY_THETA) -> np.ndarray:
  """(dim_head / 2,) float32 angular frequencies, `theta^(-2i / dim_head)` (rotary-embedding-torch's
  "lang" frequencies, computed in float32 as it computes them)."""
  exponents = np.arange(0, dim_head, 2, dtype=np.float32)[:dim_head // 2] / np.float32(dim_head)
  return (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)


def rotate_pairs(x: jax.Array, freqs: jax.Array) -> jax.Array:
  """Rotary position embedding along the sequence: x (..., n, e), freqs (e / 2,) -> (..., n, e).

  Channels (2i, 2i+1) at position p are rotated by the angle p · freqs[i]:
  (a, b) -> (a cos − b sin, b cos + a sin). Computed in float32.
  """
  n, e = x.shape[-2:]
  angles = jnp.arange(n, dtype=jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)  # (n, e/2)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], e // 2, 2)
  a, b = pairs[..., 0], pairs[..., 1]
  return jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(x.shape)


class Attention(nn.Module):
  """Band-RMSNorm -> q, k, v (rotary on q, k) -> softmax attention, each head gated by
  sigmoid(Dense(d -> h)(normed x)) -> Dense(h·e -> d). (b, n, d) -> (b, n, d)."""
  heads: int
  dim_head: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  result_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    b, n, d = x.shape
    h, e = self.heads, self.dim_head
    dense = lambda features, fan_in, **kw: torch_dense(
        features, fan_in, dtype=self.dtype, result_dtype=self.result_dtype, **kw)
    normed = BandRMSNorm(name="norm")(x)
    qkv = dense(3 * h * e, d, use_bias=False, name="to_qkv")(normed)
    q, k, v = qkv.reshape(b, n, 3, h, e).transpose(2, 0, 3, 1, 4)        # 3 × (b, h, n, e)
    freqs = rotary_frequencies(e)
    q, k = rotate_pairs(q, freqs), rotate_pairs(k, freqs)
    scores = jnp.einsum("bhie,bhje->bhij", q.astype(self.dtype), k.astype(self.dtype),
                        preferred_element_type=jnp.float32) * (e ** -0.5)
    weights = jax.nn.softmax(scores, axis=-1)
    weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
    out = jnp.einsum("bhij,bhje->bhie", weights.astype(self.dtype), v.astype(self.dtype),
                     preferred_element_type=jnp.float32)
    gates = dense(h, d, name="to_gates")(normed).astype(jnp.float32)      # (b, n, h)
    out = out * jax.nn.sigmoid(gates).transpose(0, 2, 1)[..., None]
    out = out.transpose(0, 2, 1, 3).reshape(b, n, h * e)
    out = dense(d, h * e, use_bias=False, name="to_out")(out)
    return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class FeedForward(nn.Module):
  """Band-RMSNorm -> Dense(d -> 4d) -> exact GELU -> Dense(4d -> d), dropout after each of the
  last two (training only). (b, n, d) -> (b, n, d)."""
  mult: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  result_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    d = x.shape[-1]
    hidden = self.mult * d
    h = BandRMSNorm(name="norm")(x)
    h = torch_dense(hidden, d, dtype=self.dtype, result_dtype=self.result_dtype,
                    name="net_in")(h)
    h = jax.nn.gelu(h.astype(jnp.float32), approximate=False)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = torch_dense(d, hidden, dtype=self.dtype, result_dtype=self.result_dtype,
                    name="net_out")(h)
    return nn.Dropout(self.dropout)(h, deterministic=deterministic)


class TransformerBlock(nn.Module):
  """`x + Attention(x)`, then `+ FeedForward(·)` (official `layers.{i}.{j}`, one layer, no output
  norm). x: (b, n, d) -> (b, n, d) float32. `deterministic=False` (training) applies dropout and
  needs a "dropout" rng."""
  heads: int
  dim_head: int
  attn_dropout: float = 0.0
  ff_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  result_dtype: Dtype | None = None
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    x = x + Attention(self.heads, self.dim_head, self.attn_dropout, self.dtype,
                      self.result_dtype, name="attn")(x, self.deterministic).astype(jnp.float32)
    return x + FeedForward(4, self.ff_dropout, self.dtype, self.result_dtype, name="ff")(
        x, self.deterministic).astype(jnp.float32)
