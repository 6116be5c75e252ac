"""The official BSMamba2 forward in float64 NumPy, read straight from an official state_dict.

Written from docs/model.md (§1-§8) and the official code's data flow (view_as_real -> "b c f t p -> b (f c) t p"
-> "b t (f p)", per-band split, dual path, per-band MLP + GLU, complex mask), independently of the
Flax model: it takes torch-layout weights by their official names, so comparing it with
`BSMamba2` checks the graph, the feature order and every layout conversion at once.
"""
from __future__ import annotations

import numpy as np

from tests.stft_reference import numpy_istft, numpy_stft


def stft(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
  """torch.stft(center=True, reflect, periodic Hann, onesided): (..., s) -> (..., f, t)."""
  return numpy_stft(x, n_fft, hop, n_fft)


def istft(spec: np.ndarray, n_fft: int, hop: int, length: int) -> np.ndarray:
  """torch.istft(center=True, length=length): (..., f, t) -> (..., length)."""
  return numpy_istft(spec, n_fft, hop, length, n_fft)


def linear(sd, name, x):
  w = sd[name + ".weight"]
  y = x @ w.T
  return y + sd[name + ".bias"] if name + ".bias" in sd else y


def band_rmsnorm(x, gamma):
  norm = np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return x / norm * np.sqrt(x.shape[-1]) * gamma


def rmsnorm(x, weight, eps=1e-5):
  return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + eps) * weight


def silu(x):
  return x / (1 + np.exp(-x))


def softplus(x):
  return np.logaddexp(0.0, x)


def mamba2(sd, name, u, ngroups=1):
  """mamba_ssm Mamba2 forward, sequential recurrence. u (b, l, d) -> (b, l, d)."""
  d_inner = sd[name + ".norm.weight"].shape[0]
  nheads = sd[name + ".A_log"].shape[0]
  headdim = d_inner // nheads
  conv_w = sd[name + ".conv1d.weight"]                   # (channels, 1, k)
  d_state = (conv_w.shape[0] - d_inner) // (2 * ngroups)
  b, l, _ = u.shape
  zxbcdt = u @ sd[name + ".in_proj.weight"].T
  z = zxbcdt[..., :d_inner]
  xbc = zxbcdt[..., d_inner:2 * d_inner + 2 * ngroups * d_state]
  dt = zxbcdt[..., 2 * d_inner + 2 * ngroups * d_state:]
  k = conv_w.shape[-1]
  padded = np.concatenate([np.zeros((b, k - 1, xbc.shape[-1])), xbc], axis=1)
  conv = sd[name + ".conv1d.bias"] + sum(
      padded[:, j:j + l] * conv_w[:, 0, j] for j in range(k))
  xbc = silu(conv)
  x = xbc[..., :d_inner].reshape(b, l, nheads, headdim)
  bmat = xbc[..., d_inner:d_inner + ngroups * d_state].reshape(b, l, ngroups, d_state)
  cmat = xbc[..., d_inner + ngroups * d_state:].reshape(b, l, ngroups, d_state)
  dt = softplus(dt + sd[name + ".dt_bias"])
  a = -np.exp(sd[name + ".A_log"])
  y = np.zeros((b, l, nheads, headdim))
  for h in range(nheads):
    g = h // (nheads // ngroups)
    state = np.zeros((b, headdim, d_state))
    for t in range(l):
      state = (np.exp(dt[:, t, h] * a[h])[:, None, None] * state
               + dt[:, t, h, None, None] * x[:, t, h, :, None] * bmat[:, t, g, None, :])
      y[:, t, h] = np.einsum("bpn,bn->bp", state, cmat[:, t, g]) + sd[name + ".D"][h] * x[:, t, h]
  y = y.reshape(b, l, d_inner) * silu(z)
  group = d_inner // ngroups
  y = y.reshape(b, l, ngroups, group)
  y = (y / np.sqrt(np.mean(y ** 2, -1, keepdims=True) + 1e-5)).reshape(b, l, d_inner)
  y = y * sd[name + ".norm.weight"]
  return y @ sd[name + ".out_proj.weight"].T


def mamba_block(sd, name, x, ngroups=1):
  """Official MambaBlock(bidirectional=True, n_layer=1): x (b, l, d) -> (b, l, d)."""
  def direction(prefix, seq):
    return seq + mamba2(sd, prefix + ".mixer", rmsnorm(seq, sd[prefix + ".norm.weight"]), ngroups)
  fwd = direction(name + ".forward_blocks.0", x)
  bwd = direction(name + ".backward_blocks.0", x[:, ::-1])[:, ::-1]
  w = sd[name + ".linear.weight"][:, :, 0]               # ConvTranspose1d (in, out, 1)
  return np.concatenate([fwd, bwd], -1) @ w + sd[name + ".linear.bias"] + x


def bsmamba2(sd, audio, *, channels, n_fft=2048, hop=441, ngroups=1):
  """Official forward from waveform: audio (b, c, s) -> vocals (b, c, s); sd without `model.`."""
  b, c, s = audio.shape
  spec = stft(audio, n_fft, hop)                          # (b, c, f, t)
  f, t = spec.shape[-2:]
  ri = np.stack([spec.real, spec.imag], -1)               # b c f t p
  ri = ri.transpose(0, 2, 1, 3, 4).reshape(b, f * c, t, 2)  # b (f c) t p
  feats = ri.transpose(0, 2, 1, 3).reshape(b, t, f * c * 2)  # b t (f p)
  num_bands = len([k for k in sd if k.startswith("band_split.to_features.") and k.endswith(".0.gamma")])
  dims = [sd[f"band_split.to_features.{k}.0.gamma"].shape[0] for k in range(num_bands)]
  splits = np.split(feats, np.cumsum(dims)[:-1], axis=-1)
  x = np.stack([linear(sd, f"band_split.to_features.{k}.1",
                       band_rmsnorm(part, sd[f"band_split.to_features.{k}.0.gamma"]))
                for k, part in enumerate(splits)], axis=-2)  # b t k d
  depth = len([k for k in sd if k.endswith(".0.linear.bias") and k.startswith("layers.")])
  for i in range(depth):
    d = x.shape[-1]
    xt = x.transpose(0, 2, 1, 3).reshape(-1, t, d)
    xt = mamba_block(sd, f"layers.{i}.0", xt, ngroups).reshape(b, num_bands, t, d)
    x = xt.transpose(0, 2, 1, 3).reshape(-1, num_bands, d)
    x = mamba_block(sd, f"layers.{i}.1", x, ngroups).reshape(b, t, num_bands, d)
  x = band_rmsnorm(x, sd["final_norm.gamma"])
  outs = []
  for k in range(num_bands):
    name = f"mask_estimators.0.to_freqs.{k}.0"
    h = np.tanh(linear(sd, name + ".0", x[:, :, k]))
    h = linear(sd, name + ".2", h)
    half = h.shape[-1] // 2
    outs.append(h[..., :half] / (1 + np.exp(-h[..., half:])))  # GLU
  mask = np.concatenate(outs, -1).reshape(b, t, f * c, 2).transpose(0, 2, 1, 3)  # b (f c) t p
  mask = mask[..., 0] + 1j * mask[..., 1]
  spec_fc = ri[..., 0] + 1j * ri[..., 1]                  # b (f c) t
  masked = (spec_fc * mask).reshape(b, f, c, t).transpose(0, 2, 1, 3)  # b c f t
  return istft(masked, n_fft, hop, s)
