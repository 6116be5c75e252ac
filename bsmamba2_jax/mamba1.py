"""The Mamba1 mixer (mamba_ssm `Mamba`, the official code's `module_type="mamba"`).

Shapes: b batch, l sequence length, d model width, c inner channels (expand · d), n state size.
u -> in_proj -> (x, z); x -> causal depthwise conv -> SiLU -> x_proj -> (dt_low, B, C);
delta = softplus(dt_proj(dt_low)); per channel c and state n the selective scan
`h_t = exp(delta_t,c · A_c,n) · h_{t-1} + delta_t,c · B_t,n · x_t,c`,
`y_t,c = Σ_n h_t,c,n · C_t,n + D_c · x_t,c`; then `y · silu(z)` -> out_proj. No norm inside.
Parameter names are the official ones (`in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj`).
delta, A, the decays and the states are float32 in every precision mode.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bsmamba2_jax.mamba2 import CausalDepthwiseConv, dt_bias_init, torch_dense, torch_uniform

Dtype = Any


def selective_scan(x: jax.Array, delta: jax.Array, a: jax.Array, b_mat: jax.Array,
                   c_mat: jax.Array, d_skip: jax.Array, chunk_size: int = 64) -> jax.Array:
  """The exact Mamba1 recurrence. x, delta: (b, l, c); a: (c, n); b_mat, c_mat: (b, l, n);
  d_skip: (c,) -> y (b, l, c) float32.

  Chunks of `chunk_size` steps run one after another (`lax.scan`, carrying the (b, c, n) state);
  inside a chunk an associative scan over the pairs (decay, input) with
  `(a1, u1) ∘ (a2, u2) = (a1 a2, a2 u1 + u2)` gives every state, so memory grows with
  chunk_size · c · n per sequence, not l · c · n.
  """
  batch, length, channels = x.shape
  x, delta = x.astype(jnp.float32), delta.astype(jnp.float32)
  b_mat, c_mat = b_mat.astype(jnp.float32), c_mat.astype(jnp.float32)
  chunk = min(chunk_size, length)
  chunks = -(-length // chunk)
  pad = chunks * chunk - length

  def per_chunk(t):  # (b, l, ...) -> (chunks, b, chunk, ...), zero padding at the end
    t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
    return t.reshape(batch, chunks, chunk, *t.shape[2:]).swapaxes(0, 1)

  def step(state, inputs):
    xc, dc, bc, cc = inputs                                     # (b, q, c), (b, q, n)
    decay = jnp.exp(dc[..., None] * a)                          # (b, q, c, n)
    drive = (dc * xc)[..., None] * bc[:, :, None, :]            # (b, q, c, n)
    combine = lambda first, second: (first[0] * second[0], second[0] * first[1] + second[1])
    cum_decay, cum_drive = jax.lax.associative_scan(combine, (decay, drive), axis=1)
    states = cum_decay * state[:, None] + cum_drive             # (b, q, c, n)
    y = jnp.einsum("bqcn,bqn->bqc", states, cc)
    return states[:, -1], y

  state0 = jnp.zeros((batch, channels, a.shape[-1]), jnp.float32)
  _, y = jax.lax.scan(step, state0, tuple(map(per_chunk, (x, delta, b_mat, c_mat))))
  y = y.swapaxes(0, 1).reshape(batch, chunks * chunk, channels)[:, :length]
  return y + x * d_skip


def _a_log_init(key, shape, dtype=jnp.float32):
  """mamba_ssm: A[c, n] = n + 1 for every channel, stored as log A."""
  del key
  return jnp.log(jnp.broadcast_to(jnp.arange(1, shape[-1] + 1, dtype=jnp.float32), shape)).astype(
      dtype)


class Mamba1(nn.Module):
  """mamba_ssm's Mamba (no linear biases but dt_proj's, conv bias). u (b, l, d) -> (b, l, d)."""
  d_model: int
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int = 0          # 0: ceil(d_model / 16)
  chunk_size: int = 64
  dtype: Dtype = jnp.float32
  result_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, u: jax.Array) -> jax.Array:
    channels = self.expand * self.d_model
    rank = self.dt_rank or -(-self.d_model // 16)
    result_dtype = self.dtype if self.result_dtype is None else self.result_dtype
    dense = lambda features, fan_in, name: torch_dense(
        features, fan_in, use_bias=False, dtype=self.dtype, result_dtype=result_dtype, name=name)
    x, z = jnp.split(dense(2 * channels, self.d_model, "in_proj")(u), 2, axis=-1)
    x = jax.nn.silu(CausalDepthwiseConv(self.d_conv, dtype=result_dtype, name="conv1d")(x))
    dt_low, b_mat, c_mat = jnp.split(dense(rank + 2 * self.d_state, channels, "x_proj")(x),
                                     [rank, rank + self.d_state], axis=-1)
    dt_proj = nn.Dense(channels, dtype=jnp.float32, param_dtype=jnp.float32,
                       kernel_init=torch_uniform(rank), bias_init=dt_bias_init(),
                       name="dt_proj")                        # float32: delta stays exact
    delta = jax.nn.softplus(dt_proj(dt_low.astype(jnp.float32)))
    a = -jnp.exp(self.param("A_log", _a_log_init, (channels, self.d_state), jnp.float32))
    d_skip = self.param("D", nn.initializers.ones, (channels,), jnp.float32)
    y = selective_scan(x, delta, a, b_mat, c_mat, d_skip, self.chunk_size)
    y = y * jax.nn.silu(z.astype(jnp.float32))
    return dense(self.d_model, channels, "out_proj")(y.astype(self.dtype))
