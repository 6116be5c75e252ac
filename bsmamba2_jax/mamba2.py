"""The Mamba2 mixer and the bidirectional block of BSMamba2, as the official graph defines them.

Shapes: b batch, l sequence length, d model width, h heads, p head dim, g groups, n state size.
Parameter names follow the official state_dict (docs/model.md §8), so that `convert.py` stays a
table:
`norm.weight`, `mixer.{in_proj, conv1d, dt_bias, A_log, D, norm, out_proj}`, `linear`.
Parameters are fp32; `dtype` is the operand dtype of the projections and `result_dtype` that of
their results and of the conv (bf16 operands with float32 results: the "mixed" mode, see
`config.DTYPES`). dt, A and the scan state stay fp32 (the scan upcasts; `ssd_scan` keeps the
output in x's dtype).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from bsmamba2_jax.ssd import ssd_scan

Dtype = Any

# Names of the mixer's values that a rematerialised block keeps for its backward pass
# (`model.REMAT_POLICY`): the scan output y (b, l, d_inner) and the mixer output (b, l, d_model).
SCAN_OUTPUT = "mamba2_scan_output"
MIXER_OUTPUT = "mamba2_mixer_output"


def torch_uniform(fan_in: int) -> Callable:
  """PyTorch's default Linear/Conv init, U(±1/sqrt(fan_in)), for any parameter shape."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_leading(param: jax.Array, leading: tuple[int, ...]) -> jax.Array:
  """`param` (*p) repeated along new leading axes: (*leading, *p), e.g. one copy per token.

  `jnp.broadcast_to`, except for its gradient, the cotangent summed over the leading axes: here
  one matrix-vector product with a vector of ones. XLA:CPU turns such a sum over many rows into
  reduce-windows of 32 rows (its tree reduction), which is several times slower and was a large
  share of a training step when the per-channel weights of the norms and the conv summed their
  gradients that way. Use it for per-channel weights and biases applied to every token.
  """
  return jnp.broadcast_to(param, leading + param.shape)


def _broadcast_leading_fwd(param, leading):
  return broadcast_leading(param, leading), None


def _broadcast_leading_bwd(leading, _, cotangent):
  """(*leading, *p) cotangent -> the (*p) gradient, accumulated in fp32."""
  rows = math.prod(leading)
  flat = cotangent.reshape(rows, -1)
  total = jnp.dot(jnp.ones((rows,), flat.dtype), flat, precision=jax.lax.Precision.HIGHEST,
                  preferred_element_type=jnp.float32)
  return (total.reshape(cotangent.shape[len(leading):]).astype(cotangent.dtype),)


broadcast_leading.defvjp(_broadcast_leading_fwd, _broadcast_leading_bwd)


def torch_dense(features: int, fan_in: int, *, use_bias: bool = True, dtype: Dtype = jnp.float32,
                result_dtype: Dtype | None = None, name: str | None = None) -> nn.Dense:
  """`nn.Dense` initialised like `torch.nn.Linear(fan_in, features)`, with operands in `dtype`;
  a wider `result_dtype` makes the dot accumulate and return in it (bf16 -> float32)."""
  dot_general = jax.lax.dot_general
  if result_dtype is not None and jnp.dtype(result_dtype) != jnp.dtype(dtype):
    dot_general = functools.partial(jax.lax.dot_general, preferred_element_type=result_dtype)
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=torch_uniform(fan_in), bias_init=torch_uniform(fan_in),
                  dot_general=dot_general, name=name)


class RMSNorm(nn.Module):
  """Mamba's RMSNorm: `x · rsqrt(mean(x²) + eps) · weight` over the last axis, computed in fp32."""
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * broadcast_leading(weight, y.shape[:-1])).astype(x.dtype)


class GatedRMSNorm(nn.Module):
  """mamba_ssm's `RMSNormGated` (norm_before_gate=False): `RMSNorm(y · silu(z)) · weight`.

  The mean square runs over groups of `group_size` channels (d_inner / ngroups).
  """
  group_size: int
  eps: float = 1e-5

  @nn.compact
  def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
    """y, z: (..., channels) -> (..., channels)."""
    channels = y.shape[-1]
    weight = self.param("weight", nn.initializers.ones, (channels,), jnp.float32)
    gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    grouped = gated.reshape(*gated.shape[:-1], channels // self.group_size, self.group_size)
    normed = grouped * jax.lax.rsqrt(jnp.mean(jnp.square(grouped), -1, keepdims=True) + self.eps)
    return (normed.reshape(gated.shape) * broadcast_leading(weight, gated.shape[:-1])).astype(
        y.dtype)


def dt_bias_init(dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> Callable:
  """mamba_ssm: dt = exp(U(log dt_min, log dt_max)) floored, stored as inverse softplus."""
  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, dt_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
  return init


def _a_log_init(key, shape, dtype=jnp.float32):
  """mamba_ssm: A ~ U(1, 16), stored as log A."""
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


class CausalDepthwiseConv(nn.Module):
  """Causal depthwise conv1d along time, like torch Conv1d(groups=c, padding=k-1)[..., :l].

  Parameters `kernel` (k, 1, c) — the Flax layout of a torch (c, 1, k) weight, no flip — and
  `bias` (c,). Written as k shifted multiply-adds, which XLA:CPU runs far faster than a grouped
  convolution.
  """
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (b, l, c) -> (b, l, c)."""
    channels, length = x.shape[-1], x.shape[1]
    kernel = self.param("kernel", torch_uniform(self.width), (self.width, 1, channels), jnp.float32)
    bias = self.param("bias", torch_uniform(self.width), (channels,), jnp.float32)
    x = x.astype(self.dtype)
    padded = jnp.pad(x, ((0, 0), (self.width - 1, 0), (0, 0)))
    leading = x.shape[:-1]
    out = broadcast_leading(bias, leading).astype(self.dtype)
    for tap in range(self.width):
      weight = broadcast_leading(kernel[tap, 0], leading).astype(self.dtype)
      out = out + padded[:, tap:tap + length, :] * weight
    return out


class Mamba2(nn.Module):
  """The Mamba2 mixer of mamba_ssm 2.2.2 (no linear bias, conv bias, gated RMSNorm).

  Attributes follow mamba_ssm's names; `scan_method`/`chunk_size` select the exact SSD algorithm.
  """
  d_model: int
  d_state: int = 128
  d_conv: int = 4
  expand: int = 4
  headdim: int = 64
  ngroups: int = 1
  scan_method: str = "chunked"
  chunk_size: int = 64
  dtype: Dtype = jnp.float32
  result_dtype: Dtype | None = None   # None: dtype

  @nn.compact
  def __call__(self, u: jax.Array) -> jax.Array:
    """u: (b, l, d_model) -> (b, l, d_model)."""
    d_inner = self.expand * self.d_model
    if d_inner % self.headdim:
      raise ValueError(f"expand*d_model={d_inner} is not a multiple of headdim={self.headdim}")
    nheads = d_inner // self.headdim
    if nheads % self.ngroups:
      raise ValueError(f"nheads={nheads} is not a multiple of ngroups={self.ngroups}")
    bc_width = self.ngroups * self.d_state
    batch, length, _ = u.shape

    result_dtype = self.dtype if self.result_dtype is None else self.result_dtype
    zxbcdt = torch_dense(2 * d_inner + 2 * bc_width + nheads, self.d_model, use_bias=False,
                         dtype=self.dtype, result_dtype=result_dtype, name="in_proj")(u)
    z, xbc, dt_raw = jnp.split(zxbcdt, [d_inner, 2 * d_inner + 2 * bc_width], axis=-1)

    xbc = jax.nn.silu(CausalDepthwiseConv(self.d_conv, dtype=result_dtype, name="conv1d")(xbc))
    x, b_mat, c_mat = jnp.split(xbc, [d_inner, d_inner + bc_width], axis=-1)

    dt_bias = self.param("dt_bias", dt_bias_init(), (nheads,), jnp.float32)
    a_log = self.param("A_log", _a_log_init, (nheads,), jnp.float32)
    d_skip = self.param("D", nn.initializers.ones, (nheads,), jnp.float32)
    dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + dt_bias)          # (b, l, h) fp32
    a = -jnp.exp(a_log)                                                   # (h,) fp32

    y = ssd_scan(
        x.reshape(batch, length, nheads, self.headdim), dt, a,
        b_mat.reshape(batch, length, self.ngroups, self.d_state),
        c_mat.reshape(batch, length, self.ngroups, self.d_state),
        d_skip, method=self.scan_method, chunk_size=self.chunk_size)
    y = checkpoint_name(y.reshape(batch, length, d_inner), SCAN_OUTPUT)
    y = GatedRMSNorm(group_size=d_inner // self.ngroups, name="norm")(y, z)
    out = torch_dense(self.d_model, d_inner, use_bias=False, dtype=self.dtype,
                      result_dtype=result_dtype, name="out_proj")(y)
    return checkpoint_name(out, MIXER_OUTPUT)


class MambaBlock(nn.Module):
  """Pre-norm residual mixer: `x + mixer(RMSNorm(x))` (official `{forward,backward}_blocks.0`);
  the mixer is `mixer_cls(d_model, **mixer)`, Mamba2 or `mamba1.Mamba1`."""
  mixer: dict
  mixer_cls: Callable[..., nn.Module] = Mamba2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (b, l, d) -> (b, l, d)."""
    return x + self.mixer_cls(d_model=x.shape[-1], **self.mixer, name="mixer")(
        RMSNorm(name="norm")(x))


def reverse_valid(x: jax.Array, lengths: jax.Array | None) -> jax.Array:
  """Reverses each sequence of x (b, l, ...) within its first `lengths[b]` steps.

  Positions at or past the length stay where they are, so padding at the end stays at the end
  and never enters a causal computation before real positions. The map is its own inverse.
  With `lengths=None` the whole axis is flipped.
  """
  if lengths is None:
    return jnp.flip(x, axis=1)
  steps = jnp.arange(x.shape[1])[None, :]
  lengths = jnp.asarray(lengths)[:, None]
  index = jnp.where(steps < lengths, lengths - 1 - steps, steps)
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


class BiMamba2Block(nn.Module):
  """Bidirectional Mamba2 with separate weights per direction (official `layers.{i}.{0,1}`).

  fwd = x + Mamba2_f(RMSNorm_f(x)); bwd = x + flip(Mamba2_b(RMSNorm_b(flip(x))));
  out = x + Dense(2d -> d)([fwd, bwd]). With `mixer_cls=mamba1.Mamba1` it is the official
  bidirectional Mamba1 block (`module_type="mamba"`), the same in every other respect.
  """
  mixer: dict
  dtype: Dtype = jnp.float32
  result_dtype: Dtype | None = None   # of the merge Dense; None: dtype
  mixer_cls: Callable[..., nn.Module] = Mamba2

  @nn.compact
  def __call__(self, x: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """x: (b, l, d); lengths: optional (b,) valid lengths (padding at the end) -> (b, l, d)."""
    dim = x.shape[-1]
    fwd = MambaBlock(self.mixer, self.mixer_cls, name="forward")(x)
    bwd = reverse_valid(MambaBlock(self.mixer, self.mixer_cls, name="backward")(
        reverse_valid(x, lengths)), lengths)
    # A torch ConvTranspose1d(2d, d, 1): its default init takes fan_in from weight.shape[1] = d.
    merged = torch_dense(dim, dim, dtype=self.dtype, result_dtype=self.result_dtype,
                         name="linear")(
        jnp.concatenate([fwd, bwd], axis=-1))
    return x + merged.astype(x.dtype)
