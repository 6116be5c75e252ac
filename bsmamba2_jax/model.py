"""BSMamba2: band split -> dual-path bidirectional Mamba2 -> per-band mask -> complex mask -> iSTFT.

The same skeleton carries the official code's other sequence modules (`ModelConfig.module_type`:
Transformers for BS-RoFormer, the Mamba2-Transformer hybrid, Mamba1) and several stems.

The official graph (docs/model.md), one small module per idea. Shapes: b batch, c audio channels,
s samples, f frequency bins, t frames, k bands, d model width.

Feature order inside a band (the official one): frequency-major with channels interleaved and
(re, im) innermost, i.e. element `((f - f0)·c + ch)·2 + p` of the band vector.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bsmamba2_jax import ssd_chunked, stft
from bsmamba2_jax.band_norm import BandRMSNorm, band_rmsnorm
from bsmamba2_jax.config import ModelConfig
from bsmamba2_jax.mamba1 import Mamba1
from bsmamba2_jax.mamba2 import MIXER_OUTPUT, SCAN_OUTPUT, BiMamba2Block, Mamba2, torch_uniform
from bsmamba2_jax.roformer import TransformerBlock

# What a rematerialised BiMamba2Block keeps: each mixer's scan output and output, 5 KiB per token
# and mixer in fp32. Without them the recomputation would run the scan forward again (the time
# path's blockwise scan then a third time inside its own backward) and out_proj, which the merge
# Dense's weight gradient needs: a little more memory buys a faster step (docs/performance.md).
REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(SCAN_OUTPUT, MIXER_OUTPUT)


def band_groups(widths: tuple[int, ...]) -> list[tuple[int, int, int]]:
  """Runs of consecutive bands of equal width as (first band, number of bands, width).

  Bands of one run share their shapes, so their weights are stored stacked and applied with one
  batched matmul (the paper's 62 bands form 7 runs).
  """
  groups: list[tuple[int, int, int]] = []
  for k, w in enumerate(widths):
    if groups and groups[-1][2] == w:
      first, count, _ = groups[-1]
      groups[-1] = (first, count + 1, w)
    else:
      groups.append((k, 1, w))
  return groups


def group_name(first: int, count: int) -> str:
  """Parameter-tree name of the run of bands first .. first+count-1."""
  return f"bands_{first}_{first + count - 1}"


def spectrum_to_features(spec: jax.Array) -> jax.Array:
  """(b, c, f, t) complex -> (b, t, f·c·2) real, frequency-major, channels then (re, im)."""
  b, c, f, t = spec.shape
  ri = jnp.stack([spec.real, spec.imag], axis=-1)             # (b, c, f, t, 2)
  return ri.transpose(0, 3, 2, 1, 4).reshape(b, t, f * c * 2)


def features_to_spectrum(features: jax.Array, channels: int) -> jax.Array:
  """Inverse of `spectrum_to_features`: (b, t, f·c·2) -> (b, c, f, t) complex64."""
  b, t, n = features.shape
  ri = features.astype(jnp.float32).reshape(b, t, n // (2 * channels), channels, 2)
  return jax.lax.complex(ri[..., 0], ri[..., 1]).transpose(0, 3, 2, 1)


class BandSplit(nn.Module):
  """Per band k: BandRMSNorm(2cw) -> Dense(2cw -> d); (b, t, f·c·2) -> (b, t, k, d).

  Parameters per run of equal-width bands (`band_groups`): `gamma` (n, 2cw), `kernel`
  (n, 2cw, d), `bias` (n, d) — band j of the run is the official `to_features.{first+j}`.
  """
  band_widths: tuple[int, ...]
  channels: int
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    outputs, start = [], 0
    for first, count, width in band_groups(self.band_widths):
      size = 2 * self.channels * width
      x = features[..., start:start + count * size]
      x = x.reshape(*x.shape[:-1], count, size)                # (b, t, n, 2cw)
      start += count * size
      name = group_name(first, count)
      gamma = self.param(f"{name}_gamma", nn.initializers.ones, (count, size), jnp.float32)
      kernel = self.param(f"{name}_kernel", torch_uniform(size), (count, size, self.dim), jnp.float32)
      bias = self.param(f"{name}_bias", torch_uniform(size), (count, self.dim), jnp.float32)
      x = band_rmsnorm(x, gamma).astype(self.dtype)
      y = jnp.einsum("btni,nio->btno", x, kernel.astype(self.dtype)) + bias.astype(self.dtype)
      outputs.append(y)
    return jnp.concatenate(outputs, axis=-2)


class MaskEstimator(nn.Module):
  """Per band k: Dense(d -> h·d) -> tanh -> Dense(h·d -> 2·2cw) -> GLU; (b, t, k, d) -> (b, t, f·c·2).

  Parameters: `in_kernel` (k, d, h·d) and `in_bias` (k, h·d) for all bands; per run of
  equal-width bands `<run>_kernel` (n, h·d, 2·2cw) and `<run>_bias` (n, 2·2cw).
  """
  band_widths: tuple[int, ...]
  channels: int
  hidden_mult: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    bands = len(self.band_widths)
    hidden = self.hidden_mult * dim
    in_kernel = self.param("in_kernel", torch_uniform(dim), (bands, dim, hidden), jnp.float32)
    in_bias = self.param("in_bias", torch_uniform(dim), (bands, hidden), jnp.float32)
    h = jnp.einsum("btkd,kdh->btkh", x.astype(self.dtype), in_kernel.astype(self.dtype))
    h = jnp.tanh(h + in_bias.astype(self.dtype))
    outputs = []
    for first, count, width in band_groups(self.band_widths):
      size = 2 * self.channels * width
      name = group_name(first, count)
      kernel = self.param(f"{name}_kernel", torch_uniform(hidden), (count, hidden, 2 * size),
                          jnp.float32)
      bias = self.param(f"{name}_bias", torch_uniform(hidden), (count, 2 * size), jnp.float32)
      out = jnp.einsum("btnh,nho->btno", h[..., first:first + count, :], kernel.astype(self.dtype))
      value, gate = jnp.split(out.astype(jnp.float32) + bias, 2, axis=-1)  # GLU
      glu = value * jax.nn.sigmoid(gate)                        # (b, t, n, 2cw)
      outputs.append(glu.reshape(*glu.shape[:-2], count * size))
    return jnp.concatenate(outputs, axis=-1)


# The sequence module of the time path and of the band path, per `ModelConfig.module_type`.
LAYER_KINDS = {
    "mamba2": ("mamba2", "mamba2"),
    "transformer": ("transformer", "transformer"),
    "mamba2-roformer": ("mamba2", "transformer"),
    "mamba": ("mamba", "mamba"),
}


def sequence_module(config: ModelConfig, kind: str, train: bool, name: str) -> nn.Module:
  """The module of `kind` ("mamba2", "mamba" or "transformer") mapping (n, l, d) -> (n, l, d)."""
  if kind == "transformer":
    block = nn.remat(TransformerBlock) if config.remat else TransformerBlock
    return block(**config.attention, deterministic=not train, name=name)
  mamba1_kind = kind == "mamba"
  block = (nn.remat(BiMamba2Block, policy=REMAT_POLICY) if config.remat and not mamba1_kind
           else nn.remat(BiMamba2Block) if config.remat else BiMamba2Block)
  return block(config.mamba1_mixer if mamba1_kind else config.mixer, config.operand_dtype,
               config.activation_dtype, Mamba1 if mamba1_kind else Mamba2, name=name)


class DualPathLayer(nn.Module):
  """One layer: a sequence module along time on (b·k, t, d), then one along bands on (b·t, k, d)
  (bidirectional Mamba2 blocks for BSMamba2; see `LAYER_KINDS`)."""
  config: ModelConfig
  train: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (b, t, k, d) -> (b, t, k, d)."""
    b, t, k, d = x.shape
    time_kind, band_kind = LAYER_KINDS[self.config.module_type]
    tokens = 0 if self.is_initializing() else self.config.block_tokens
    along_time = x.transpose(0, 2, 1, 3).reshape(b * k, t, d)
    along_time = in_blocks(sequence_module(self.config, time_kind, self.train, "time"),
                           along_time, tokens)
    x = along_time.reshape(b, k, t, d).transpose(0, 2, 1, 3)
    along_bands = in_blocks(sequence_module(self.config, band_kind, self.train, "band"),
                            x.reshape(b * t, k, d), tokens)
    return along_bands.reshape(b, t, k, d)


def in_blocks(module: nn.Module, x: jax.Array, tokens: int) -> jax.Array:
  """module(x) on x (n, l, d) computed a group of about `tokens` tokens (sequences × l) at a
  time, one group after another (a lifted `lax.scan` sharing the module's parameters); tokens
  0 or a group as big as x: in one call. The sequences are independent, so the result is the
  same; a group's activations are then small buffers that the loop reuses, instead of
  activations of the whole batch (docs/performance.md §7). The last group is padded with zero
  sequences, whose outputs are dropped."""
  n, length = x.shape[:2]
  per_group = max(1, tokens // length) if tokens > 0 else n
  if per_group >= n:
    return module(x)
  body = nn.scan(lambda mdl, carry, group: (carry, mdl(group)), variable_broadcast="params",
                 split_rngs={"params": False, "dropout": True})
  _, y = body(module, None, ssd_chunked.split_batch(x, per_group))
  return ssd_chunked.merge_batch(y, n)


def mask_estimator_name(stem: int) -> str:
  """Parameter-tree name of the mask estimator of stem `stem` (official `mask_estimators.{stem}`);
  the first keeps the name of a one-stem model's."""
  return "mask_estimator" if stem == 0 else f"mask_estimator_{stem}"


class BSMamba2(nn.Module):
  """The whole separator (the official BSModel, any `module_type`): waveform (b, c, s) at
  44.1 kHz -> the estimated stem (b, c, s), or the stems (b, n, c, s) of a model of n > 1."""
  config: ModelConfig

  def estimate_mask(self, spec: jax.Array, train: bool = False) -> jax.Array:
    """spec: (b, c, f, t) complex mixture STFT -> complex mask (b, c, f, t), or (b, n, c, f, t)
    for n > 1 stems. `train` turns the Transformers' dropout on."""
    cfg = self.config
    x = BandSplit(cfg.band_widths, cfg.audio_channels, cfg.dim, dtype=cfg.activation_dtype,
                  name="band_split")(spectrum_to_features(spec))
    x = x.astype(jnp.float32)  # the residual stream stays fp32; matmuls run in compute dtype
    for i in range(cfg.depth):
      x = DualPathLayer(cfg, train, name=f"layers_{i}")(x)
    x = BandRMSNorm(name="final_norm")(x)
    masks = [features_to_spectrum(
        MaskEstimator(cfg.band_widths, cfg.audio_channels, cfg.mask_hidden_mult,
                      dtype=cfg.activation_dtype, name=mask_estimator_name(n))(x),
        cfg.audio_channels) for n in range(cfg.num_stems)]
    return masks[0] if cfg.num_stems == 1 else jnp.stack(masks, axis=1)

  def masked_istft(self, spec: jax.Array, mask: jax.Array, length: int) -> jax.Array:
    """The iSTFT (…, c, length) of spec (b, c, f, t) times mask (b, c, f, t) or (b, n, c, f, t)."""
    if mask.ndim == spec.ndim + 1:
      spec = spec[:, None]
    return stft.istft(spec * mask, self.config.n_fft, self.config.hop_length, length=length)

  def apply_mask(self, audio_in: jax.Array, mask: jax.Array) -> jax.Array:
    """The model's output path with a given complex mask (as `estimate_mask` gives) for
    audio_in (b, c, s)."""
    spec = stft.stft(audio_in.astype(jnp.float32), self.config.n_fft, self.config.hop_length)
    return self.masked_istft(spec, mask, audio_in.shape[-1])

  @nn.compact
  def __call__(self, audio_in: jax.Array, *, return_mask: bool = False, train: bool = False):
    """audio_in: (b, c, s) float -> stem(s) float32 (b, c, s) or (b, n, c, s) [, the mask].

    `train=True` applies dropout (Transformers only) and needs a "dropout" rng."""
    cfg = self.config
    if audio_in.ndim != 3 or audio_in.shape[1] != cfg.audio_channels:
      raise ValueError(f"BSMamba2 expects audio of shape (batch, {cfg.audio_channels}, samples), "
                       f"got {tuple(audio_in.shape)}")
    spec = stft.stft(audio_in.astype(jnp.float32), cfg.n_fft, cfg.hop_length)
    mask = self.estimate_mask(spec, train)
    stems = self.masked_istft(spec, mask, audio_in.shape[-1])
    return (stems, mask) if return_mask else stems


def abstract_params(config: ModelConfig) -> dict:
  """The params tree of `BSMamba2(config)` as `jax.ShapeDtypeStruct`s (no compute)."""
  dummy = jax.ShapeDtypeStruct((1, config.audio_channels, config.n_fft), jnp.float32)
  return jax.eval_shape(lambda rng, a: BSMamba2(config).init(rng, a)["params"],
                        jax.random.PRNGKey(0), dummy)


def random_params(config: ModelConfig, seed: int = 0, scale: float = 0.1) -> dict:
  """Parameters of `BSMamba2(config)` drawn i.i.d. N(0, scale²) in NumPy (fp32).

  For tests and benchmarks that need a model of the right shapes but not a trained or initialised
  one: no model compile, and the same values on every backend for a given `seed`.
  """
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32),
      abstract_params(config))


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
  """Fresh parameters (fp32), initialised on a few STFT frames (shapes do not depend on length).

  Uses the non-partitionable threefry, which XLA:CPU compiles several times faster for the
  model's ~100 parameter draws (jax's partitionable default took minutes on 2 cores).
  """
  dummy = jnp.zeros((1, config.audio_channels, config.n_fft), jnp.float32)
  partitionable = getattr(jax, "threefry_partitionable", None)
  with partitionable(False) if partitionable is not None else contextlib.nullcontext():
    return jax.jit(BSMamba2(config).init)(rng, dummy)["params"]
