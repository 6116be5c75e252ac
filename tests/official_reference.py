"""The official BSModel forward in float64 NumPy, read straight from an official state_dict.

Written from docs/model.md (§1-§8, §10) and the official code's data flow (view_as_real ->
"b c f t p -> b (f c) t p" -> "b t (f p)", per-band split, dual path, per-band MLP + GLU, complex
mask per stem), independently of the Flax model: it takes torch-layout weights by their official
names (without the `model.` prefix), so comparing it with our model checks the graph, the feature
order and every layout conversion at once.

All four official `module_type`s are covered; the kind of each layer's two modules is read from
the state_dict's keys:

| module_type | time module `layers.{i}.0` | band module `layers.{i}.1` |
|---|---|---|
| `mamba2` | bidirectional Mamba2 block | bidirectional Mamba2 block |
| `mamba` | bidirectional Mamba1 block | bidirectional Mamba1 block |
| `transformer` | Transformer (depth 1) | Transformer (depth 1) |
| `mamba2-roformer` | bidirectional Mamba2 block | Transformer (depth 1) |

`random_state_dict` draws a state_dict with the official names and shapes for any of them.
Letters: b batch, c audio channels, f bins, t frames, k bands, d = dim, n stems, l a sequence.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from tests.stft_reference import numpy_istft, numpy_stft


def stft(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
  """torch.stft(center=True, reflect, periodic Hann, onesided): (..., s) -> (..., f, t)."""
  return numpy_stft(x, n_fft, hop, n_fft)


def istft(spec: np.ndarray, n_fft: int, hop: int, length: int) -> np.ndarray:
  """torch.istft(center=True, length=length): (..., f, t) -> (..., length)."""
  return numpy_istft(spec, n_fft, hop, length, n_fft)


def linear(sd, name, x):
  """torch Linear `name`: x (..., in) -> (..., out); the bias only if the state_dict has one."""
  w = sd[name + ".weight"]
  y = x @ w.T
  return y + sd[name + ".bias"] if name + ".bias" in sd else y


def band_rmsnorm(x, gamma):
  """BS-RoFormer RMSNorm: x / max(|x|_2, 1e-12) * sqrt(d) * gamma over the last axis (..., d)."""
  norm = np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return x / norm * np.sqrt(x.shape[-1]) * gamma


def rmsnorm(x, weight, eps=1e-5):
  """mamba_ssm RMSNorm: x * rsqrt(mean(x^2) + eps) * weight over the last axis (..., d)."""
  return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + eps) * weight


def silu(x):
  """x * sigmoid(x)."""
  return x / (1 + np.exp(-x))


def softplus(x):
  """log(1 + exp(x)), stable."""
  return np.logaddexp(0.0, x)


def sigmoid(x):
  """1 / (1 + exp(-x))."""
  return 1 / (1 + np.exp(-x))


def gelu(x):
  """Exact GELU (torch's default): 0.5 x (1 + erf(x / sqrt 2))."""
  return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def softmax(x):
  """Softmax over the last axis."""
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Mamba2 (mamba_ssm `Mamba2`)


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


# ---------------------------------------------------------------------------------------------
# Mamba1 (mamba_ssm `Mamba`)


def causal_depthwise_conv(x, weight, bias):
  """Depthwise Conv1d with d_conv - 1 zeros of left padding, cut to length l.

  x (b, l, ch), weight (ch, 1, d_conv), bias (ch,) -> (b, l, ch).
  """
  b, l, ch = x.shape
  k = weight.shape[-1]
  padded = np.concatenate([np.zeros((b, k - 1, ch)), x], axis=1)
  return bias + sum(padded[:, j:j + l] * weight[:, 0, j] for j in range(k))


def selective_scan(x, delta, a, bmat, cmat, d):
  """Mamba1's selective scan, one step at a time.

  x, delta (b, l, ch); a (ch, n); bmat, cmat (b, l, n); d (ch,) -> y (b, l, ch) with
    h_t[c, s] = exp(delta_t[c] a[c, s]) h_{t-1}[c, s] + delta_t[c] B_t[s] x_t[c],  h_0 = 0,
    y_t[c]    = sum_s h_t[c, s] C_t[s] + D[c] x_t[c].
  """
  b, l, ch = x.shape
  state = np.zeros((b, ch, a.shape[-1]))
  y = np.zeros((b, l, ch))
  for t in range(l):
    decay = np.exp(delta[:, t, :, None] * a)                                 # (b, ch, n)
    state = decay * state + (delta[:, t] * x[:, t])[:, :, None] * bmat[:, t, None, :]
    y[:, t] = np.einsum("bcn,bn->bc", state, cmat[:, t]) + d * x[:, t]
  return y


def mamba1(sd, name, u):
  """mamba_ssm Mamba (Mamba1) forward, sequential recurrence. u (b, l, d) -> (b, l, d).

  xz = in_proj(u) = [x | z]; x = silu(causal conv(x)); x_proj(x) = [dt | B | C];
  delta = softplus(dt_proj(dt)); y = scan(x, delta, -exp(A_log), B, C, D) * silu(z); out_proj(y).
  """
  d_inner, d_state = sd[name + ".A_log"].shape
  dt_rank = sd[name + ".dt_proj.weight"].shape[1]
  xz = u @ sd[name + ".in_proj.weight"].T                                    # (b, l, 2 d_inner)
  x, z = xz[..., :d_inner], xz[..., d_inner:]
  x = silu(causal_depthwise_conv(x, sd[name + ".conv1d.weight"], sd[name + ".conv1d.bias"]))
  x_dbl = x @ sd[name + ".x_proj.weight"].T                                  # (b, l, r + 2 n)
  dt = x_dbl[..., :dt_rank]
  bmat = x_dbl[..., dt_rank:dt_rank + d_state]
  cmat = x_dbl[..., dt_rank + d_state:]
  delta = softplus(linear(sd, name + ".dt_proj", dt))                        # (b, l, d_inner)
  a = -np.exp(sd[name + ".A_log"])                                           # (d_inner, n)
  y = selective_scan(x, delta, a, bmat, cmat, sd[name + ".D"])
  return (y * silu(z)) @ sd[name + ".out_proj.weight"].T


# ---------------------------------------------------------------------------------------------
# The bidirectional Mamba block (official `MambaBlock`, either mixer)


def mixer(sd, name, u, ngroups=1):
  """The mixer `name` (Mamba1 if it has `x_proj`, else Mamba2): u (b, l, d) -> (b, l, d)."""
  if name + ".x_proj.weight" in sd:
    return mamba1(sd, name, u)
  return mamba2(sd, name, u, ngroups)


def mamba_block(sd, name, x, ngroups=1):
  """Official MambaBlock(bidirectional=True, n_layer=1): x (b, l, d) -> (b, l, d).

  fwd = x + mixer_f(rmsnorm_f(x)); bwd = flip(flip(x) + mixer_b(rmsnorm_b(flip(x))));
  out = ConvTranspose1d_k1([fwd | bwd]) + x.
  """
  def direction(prefix, seq):
    return seq + mixer(sd, prefix + ".mixer", rmsnorm(seq, sd[prefix + ".norm.weight"]), ngroups)
  fwd = direction(name + ".forward_blocks.0", x)
  bwd = direction(name + ".backward_blocks.0", x[:, ::-1])[:, ::-1]
  w = sd[name + ".linear.weight"][:, :, 0]               # ConvTranspose1d (in, out, 1)
  return np.concatenate([fwd, bwd], -1) @ w + sd[name + ".linear.bias"] + x


# ---------------------------------------------------------------------------------------------
# The Transformer (BS-RoFormer's pre-norm gated attention with rotary embeddings, GELU MLP)


def rotate_pairs(x, freqs):
  """Rotary embedding (rotary-embedding-torch, interleaved pairs) along the sequence axis.

  x (..., l, dh), freqs (dh/2,): the pair (x[2i], x[2i+1]) at position p is rotated by the angle
  p * freqs[i]: (a, b) -> (a cos - b sin, b cos + a sin). Positions are 0 .. l-1.
  """
  l = x.shape[-2]
  angle = np.arange(l)[:, None] * freqs[None, :]          # (l, dh/2)
  cos, sin = np.cos(angle), np.sin(angle)
  a, b = x[..., 0::2], x[..., 1::2]
  out = np.empty(x.shape)
  out[..., 0::2] = a * cos - b * sin
  out[..., 1::2] = b * cos + a * sin
  return out


def attention(sd, name, x):
  """Official gated Attention with rotary embedding `name.rotary_embed.freqs`: x (b, l, d) -> (b, l, d).

  h = band_rmsnorm(x); q, k, v = to_qkv(h) as "b l (qkv heads dh)"; q, k rotated;
  out = softmax(q k^T / sqrt(dh)) v, times sigmoid(to_gates(h)) per head, "(heads dh)" -> to_out.
  """
  heads = sd[name + ".to_gates.weight"].shape[0]
  dim_head = sd[name + ".to_qkv.weight"].shape[0] // (3 * heads)
  b, l, _ = x.shape
  h = band_rmsnorm(x, sd[name + ".norm.gamma"])
  qkv = (h @ sd[name + ".to_qkv.weight"].T).reshape(b, l, 3, heads, dim_head)
  q, k, v = qkv.transpose(2, 0, 3, 1, 4)                  # each (b, heads, l, dh)
  freqs = sd[name + ".rotary_embed.freqs"]
  q, k = rotate_pairs(q, freqs), rotate_pairs(k, freqs)
  scores = q @ k.transpose(0, 1, 3, 2) * dim_head ** -0.5  # (b, heads, l, l)
  out = softmax(scores) @ v                               # (b, heads, l, dh)
  gates = linear(sd, name + ".to_gates", h)               # (b, l, heads)
  out = out * sigmoid(gates).transpose(0, 2, 1)[..., None]
  out = out.transpose(0, 2, 1, 3).reshape(b, l, heads * dim_head)
  return out @ sd[name + ".to_out.0.weight"].T


def feed_forward(sd, name, x):
  """Official FeedForward: band_rmsnorm -> Linear -> GELU -> Linear. x (..., d) -> (..., d)."""
  h = band_rmsnorm(x, sd[name + ".net.0.gamma"])
  return linear(sd, name + ".net.4", gelu(linear(sd, name + ".net.1", h)))


def transformer(sd, name, x):
  """Official Transformer(depth=1, norm_output=False): x (b, l, d) -> (b, l, d).

  x = attention(x) + x; x = feed_forward(x) + x.
  """
  depth = 0
  while f"{name}.layers.{depth}.0.to_qkv.weight" in sd:
    depth += 1
  for i in range(depth):
    x = attention(sd, f"{name}.layers.{i}.0", x) + x
    x = feed_forward(sd, f"{name}.layers.{i}.1", x) + x
  return x


# ---------------------------------------------------------------------------------------------
# The whole model


def sequence_module(sd, name, x, ngroups=1):
  """Module `name` (a MambaBlock or a Transformer, whichever the keys show): x (b, l, d) -> (b, l, d)."""
  if name + ".linear.weight" in sd:
    return mamba_block(sd, name, x, ngroups)
  if name + ".layers.0.0.to_qkv.weight" in sd:
    return transformer(sd, name, x)
  raise KeyError(f"no MambaBlock or Transformer under {name!r}")


def module_types(sd) -> list:
  """Per layer, the (time, band) module kinds: 'mamba2', 'mamba' or 'transformer'."""
  def kind(name):
    if name + ".linear.weight" in sd:
      return "mamba" if name + ".forward_blocks.0.mixer.x_proj.weight" in sd else "mamba2"
    if name + ".layers.0.0.to_qkv.weight" in sd:
      return "transformer"
    raise KeyError(f"no MambaBlock or Transformer under {name!r}")
  return [(kind(f"layers.{i}.0"), kind(f"layers.{i}.1")) for i in range(count_indices(sd, "layers."))]


def count_indices(sd, prefix) -> int:
  """1 + the largest integer i with a key `{prefix}{i}.…` (0 if none)."""
  found = [int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)]
  return 1 + max(found) if found else 0


def spectrum_features(audio, n_fft, hop):
  """audio (b, c, s) -> spectrum (b, (f c), t) complex and band-split input (b, t, (f c p)).

  The official "b c f t p -> b (f c) t p -> b t (f c p)" layout: frequency-major, channels
  interleaved, (re, im) innermost.
  """
  b, c, _ = audio.shape
  spec = stft(audio, n_fft, hop)                          # (b, c, f, t)
  f, t = spec.shape[-2:]
  spec_fc = spec.transpose(0, 2, 1, 3).reshape(b, f * c, t)
  ri = np.stack([spec_fc.real, spec_fc.imag], -1)         # b (f c) t p
  feats = ri.transpose(0, 2, 1, 3).reshape(b, t, f * c * 2)
  return spec_fc, feats


def band_split(sd, feats):
  """Per band k: band_rmsnorm -> Linear(2cw -> d). feats (b, t, (f c p)) -> (b, t, k, d)."""
  num_bands = count_indices(sd, "band_split.to_features.")
  dims = [sd[f"band_split.to_features.{k}.0.gamma"].shape[0] for k in range(num_bands)]
  splits = np.split(feats, np.cumsum(dims)[:-1], axis=-1)
  return np.stack([linear(sd, f"band_split.to_features.{k}.1",
                          band_rmsnorm(part, sd[f"band_split.to_features.{k}.0.gamma"]))
                   for k, part in enumerate(splits)], axis=-2)


def dual_path(sd, x, ngroups=1):
  """`depth` layers of a time module on (b k, t, d), then a band module on (b t, k, d).

  x (b, t, k, d) -> (b, t, k, d).
  """
  b, t, k, d = x.shape
  for i in range(count_indices(sd, "layers.")):
    xt = x.transpose(0, 2, 1, 3).reshape(b * k, t, d)
    xt = sequence_module(sd, f"layers.{i}.0", xt, ngroups).reshape(b, k, t, d)
    xk = xt.transpose(0, 2, 1, 3).reshape(b * t, k, d)
    x = sequence_module(sd, f"layers.{i}.1", xk, ngroups).reshape(b, t, k, d)
  return x


def mask_estimator(sd, stem, x):
  """Mask estimator `stem`: per band Linear -> tanh -> Linear -> GLU, then "b t (f c p)" -> complex.

  x (b, t, k, d) (after the final norm) -> mask (b, (f c), t) complex.
  """
  b, t, k, _ = x.shape
  outs = []
  for band in range(k):
    name = f"mask_estimators.{stem}.to_freqs.{band}.0"
    h = np.tanh(linear(sd, name + ".0", x[:, :, band]))
    h = linear(sd, name + ".2", h)
    half = h.shape[-1] // 2
    outs.append(h[..., :half] * sigmoid(h[..., half:]))  # GLU
  mask = np.concatenate(outs, -1).reshape(b, t, -1, 2).transpose(0, 2, 1, 3)  # b (f c) t p
  return mask[..., 0] + 1j * mask[..., 1]


def separate(sd, audio, *, channels, n_fft=2048, hop=441, ngroups=1):
  """Official BSModel forward for every stem: audio (b, c, s) -> waveforms (b, n, c, s).

  `sd` has no `model.` prefix; the stems are `mask_estimators.{n}`, the layer types are read from
  the keys. `channels` is c (the audio's own channel count is what is used).
  """
  b, c, s = audio.shape
  spec_fc, feats = spectrum_features(audio, n_fft, hop)   # (b, (f c), t), (b, t, (f c p))
  x = dual_path(sd, band_split(sd, feats), ngroups)
  x = band_rmsnorm(x, sd["final_norm.gamma"])
  masks = np.stack([mask_estimator(sd, n, x) for n in range(count_indices(sd, "mask_estimators."))],
                   axis=1)                                # b n (f c) t
  masked = spec_fc[:, None] * masks
  f, t = masked.shape[2] // c, masked.shape[3]
  masked = masked.reshape(b, -1, f, c, t).transpose(0, 1, 3, 2, 4)  # b n c f t
  return istft(masked, n_fft, hop, s)


def bsmamba2(sd, audio, *, channels, n_fft=2048, hop=441, ngroups=1):
  """Official forward from waveform, first stem: audio (b, c, s) -> vocals (b, c, s)."""
  return separate(sd, audio, channels=channels, n_fft=n_fft, hop=hop, ngroups=ngroups)[:, 0]


# ---------------------------------------------------------------------------------------------
# Random state_dicts with the official names and shapes


MODULE_TYPES = ("mamba2", "mamba", "transformer", "mamba2-roformer")


def rotary_freqs(dim_head):
  """The fixed rotary frequencies: freqs[i] = 1 / 10000^(2i / dh), i < dh/2."""
  return 1.0 / 10000 ** (np.arange(0, dim_head, 2)[:dim_head // 2] / dim_head)


def random_state_dict(module_type, *, widths, channels, dim, depth, num_stems=1, d_state=16,
                      expand=4, headdim=16, ngroups=1, d_conv=4, dt_rank=None, heads=8,
                      dim_head=64, hidden_mult=4, ff_mult=4, seed=0) -> dict:
  """An official BSModel state_dict (no `model.` prefix) with random float64 values.

  widths: bins per band (sum n_fft/2 + 1); hidden_mult: mask-estimator hidden = hidden_mult * dim;
  ff_mult: Transformer feed-forward hidden = ff_mult * dim; Mamba: d_inner = expand * dim,
  mamba2 heads = d_inner / headdim, Mamba1 dt_rank defaults to ceil(dim / 16).
  Values: weights and biases U(±1/sqrt(fan_in)), gains (gamma, norm weights, D) 1 + 0.1 N(0, 1),
  A_log = log U(1, 16). The rotary freqs are the fixed ones; like torch's shared time and band
  embeddings, one array is stored under every time Transformer and one under every band one.
  """
  if module_type not in MODULE_TYPES:
    raise ValueError(f"module_type {module_type!r} not in {MODULE_TYPES}")
  rng = np.random.default_rng(seed)
  d_inner = expand * dim
  dt_rank = math.ceil(dim / 16) if dt_rank is None else dt_rank
  sd = {}

  def weight(key, shape, fan_in):
    sd[key] = rng.uniform(-1, 1, shape) / math.sqrt(fan_in)

  def dense(key, d_out, d_in, bias=True):
    weight(key + ".weight", (d_out, d_in), d_in)
    if bias:
      weight(key + ".bias", (d_out,), d_in)

  def gain(key, size):
    sd[key] = 1 + 0.1 * rng.normal(size=size)

  def mamba2_mixer(p):
    nheads = d_inner // headdim
    conv_ch = d_inner + 2 * ngroups * d_state
    dense(p + ".in_proj", 2 * d_inner + 2 * ngroups * d_state + nheads, dim, bias=False)
    weight(p + ".conv1d.weight", (conv_ch, 1, d_conv), d_conv)
    weight(p + ".conv1d.bias", (conv_ch,), d_conv)
    weight(p + ".dt_bias", (nheads,), 4)
    sd[p + ".A_log"] = np.log(rng.uniform(1, 16, nheads))
    gain(p + ".D", nheads)
    gain(p + ".norm.weight", d_inner)
    dense(p + ".out_proj", dim, d_inner, bias=False)

  def mamba1_mixer(p):
    dense(p + ".in_proj", 2 * d_inner, dim, bias=False)
    weight(p + ".conv1d.weight", (d_inner, 1, d_conv), d_conv)
    weight(p + ".conv1d.bias", (d_inner,), d_conv)
    dense(p + ".x_proj", dt_rank + 2 * d_state, d_inner, bias=False)
    dense(p + ".dt_proj", d_inner, dt_rank)
    sd[p + ".A_log"] = np.log(rng.uniform(1, 16, (d_inner, d_state)))
    gain(p + ".D", d_inner)
    dense(p + ".out_proj", dim, d_inner, bias=False)

  def mamba_block_keys(p, mixer_keys):
    for direction in ("forward", "backward"):
      q = f"{p}.{direction}_blocks.0"
      mixer_keys(q + ".mixer")
      gain(q + ".norm.weight", dim)
    weight(p + ".linear.weight", (2 * dim, dim, 1), 2 * dim)    # ConvTranspose1d (in, out, 1)
    weight(p + ".linear.bias", (dim,), 2 * dim)

  shared_freqs = {0: rotary_freqs(dim_head), 1: rotary_freqs(dim_head)}  # time, band

  def transformer_keys(p, j):
    a = p + ".layers.0.0"
    gain(a + ".norm.gamma", dim)
    dense(a + ".to_qkv", 3 * heads * dim_head, dim, bias=False)
    dense(a + ".to_gates", heads, dim)
    dense(a + ".to_out.0", dim, heads * dim_head, bias=False)
    sd[a + ".rotary_embed.freqs"] = shared_freqs[j]
    ff = p + ".layers.0.1.net"
    gain(ff + ".0.gamma", dim)
    dense(ff + ".1", ff_mult * dim, dim)
    dense(ff + ".4", dim, ff_mult * dim)

  kinds = {"mamba2": ("mamba2", "mamba2"), "mamba": ("mamba", "mamba"),
           "transformer": ("transformer", "transformer"),
           "mamba2-roformer": ("mamba2", "transformer")}[module_type]
  for k, w in enumerate(widths):
    gain(f"band_split.to_features.{k}.0.gamma", 2 * channels * w)
    dense(f"band_split.to_features.{k}.1", dim, 2 * channels * w)
  for i in range(depth):
    for j, kind in enumerate(kinds):
      p = f"layers.{i}.{j}"
      if kind == "transformer":
        transformer_keys(p, j)
      else:
        mamba_block_keys(p, mamba2_mixer if kind == "mamba2" else mamba1_mixer)
  gain("final_norm.gamma", dim)
  for n in range(num_stems):
    for k, w in enumerate(widths):
      p = f"mask_estimators.{n}.to_freqs.{k}.0"
      dense(p + ".0", hidden_mult * dim, dim)
      dense(p + ".2", 2 * 2 * channels * w, hidden_mult * dim)
  return sd
