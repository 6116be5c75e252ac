"""Self-checks of the float64 NumPy official reference (tests/official_reference.py)."""
import numpy as np
import pytest

from tests import official_reference as ref

PAPER_WIDTHS = [2] * 24 + [4] * 12 + [12] * 8 + [24] * 8 + [48] * 8 + [128, 129]
MICRO_WIDTHS = [1] * 8 + [2] * 4 + [4] * 4 + [8] * 4 + [16] * 2 + [33]  # n_fft 256: 129 bins
MICRO = dict(widths=MICRO_WIDTHS, channels=2, dim=8, depth=1, d_state=4, expand=2, headdim=8,
             dt_rank=2, heads=2, dim_head=4)


def unique_parameter_count(sd):
  """Parameters as torch counts them: an array stored under several names counts once."""
  return sum(v.size for v in {id(v): v for v in sd.values()}.values())


# ----- Mamba1 -------------------------------------------------------------------------------


def test_selective_scan_equals_closed_form():
  """y_t = sum_{s<=t} C_t . (prod_{r=s+1..t} exp(delta_r A)) B_s delta_s x_s + D x_t."""
  rng = np.random.default_rng(0)
  b, l, ch, n = 2, 6, 3, 4
  x = rng.normal(size=(b, l, ch))
  delta = rng.uniform(0.1, 1.0, (b, l, ch))
  a = -rng.uniform(0.5, 2.0, (ch, n))
  bmat, cmat = rng.normal(size=(b, l, n)), rng.normal(size=(b, l, n))
  d = rng.normal(size=ch)
  want = np.zeros((b, l, ch))
  for i in range(b):
    for c in range(ch):
      for t in range(l):
        total = d[c] * x[i, t, c]
        for s in range(t + 1):
          for m in range(n):
            decay = np.prod([np.exp(delta[i, r, c] * a[c, m]) for r in range(s + 1, t + 1)])
            total += cmat[i, t, m] * decay * bmat[i, s, m] * delta[i, s, c] * x[i, s, c]
        want[i, t, c] = total
  np.testing.assert_allclose(ref.selective_scan(x, delta, a, bmat, cmat, d), want, rtol=1e-12)


def test_mamba1_is_causal_and_block_dispatches_on_x_proj():
  sd = ref.random_state_dict("mamba", **MICRO)
  mixer = "layers.0.0.forward_blocks.0.mixer"
  u = np.random.default_rng(1).normal(size=(2, 9, 8))
  y = ref.mamba1(sd, mixer, u)
  assert y.shape == u.shape and np.all(np.isfinite(y)) and np.abs(y).max() > 1e-3
  changed = u.copy()
  changed[:, 5:] += 1.0
  np.testing.assert_allclose(ref.mamba1(sd, mixer, changed)[:, :5], y[:, :5], rtol=1e-12)
  np.testing.assert_array_equal(ref.mixer(sd, mixer, u), y)
  block = ref.mamba_block(sd, "layers.0.0", u)
  assert block.shape == u.shape and np.all(np.isfinite(block))


# ----- rotary embedding and attention -------------------------------------------------------


def test_rotation_preserves_norms_and_scores_depend_on_offsets_only():
  rng = np.random.default_rng(2)
  dim_head, length, shift = 8, 7, 3
  freqs = ref.rotary_freqs(dim_head)
  x = rng.normal(size=(2, length, dim_head))
  rotated = ref.rotate_pairs(x, freqs)
  np.testing.assert_allclose(np.linalg.norm(rotated, axis=-1), np.linalg.norm(x, axis=-1))
  np.testing.assert_array_equal(rotated[:, 0], x[:, 0])   # position 0 is not rotated
  q, k = rng.normal(size=dim_head), rng.normal(size=dim_head)
  rq = ref.rotate_pairs(np.tile(q, (length + shift, 1)), freqs)
  rk = ref.rotate_pairs(np.tile(k, (length + shift, 1)), freqs)
  scores = rq @ rk.T                                      # scores[p, p'] for q at p, k at p'
  np.testing.assert_allclose(scores[shift:, shift:], scores[:length, :length], atol=1e-12)


def test_rotary_freqs_formula():
  np.testing.assert_allclose(ref.rotary_freqs(48)[[0, 1, 23]],
                             [1.0, 10000 ** (-2 / 48), 10000 ** (-46 / 48)])
  assert ref.rotary_freqs(48).shape == (24,)


TIME = "layers.0.0"                # the first layer's time Transformer
ATTENTION = TIME + ".layers.0.0"
FEED_FORWARD = TIME + ".layers.0.1"


def transformer_sd(seed=3, dim=8, heads=2, dim_head=4):
  """The time Transformer's weights of a random one-layer `transformer` state_dict."""
  sd = ref.random_state_dict("transformer", widths=[3], channels=1, dim=dim, depth=1,
                             heads=heads, dim_head=dim_head, seed=seed)
  return {k: v for k, v in sd.items() if k.startswith(TIME + ".")}


def test_attention_of_one_token_is_gated_value():
  sd = transformer_sd()
  name = ATTENTION
  x = np.random.default_rng(4).normal(size=(3, 1, 8))
  h = ref.band_rmsnorm(x, sd[name + ".norm.gamma"])
  v = (h @ sd[name + ".to_qkv.weight"].T)[..., 2 * 2 * 4:].reshape(3, 1, 2, 4)  # (b, 1, heads, dh)
  gates = ref.sigmoid(h @ sd[name + ".to_gates.weight"].T + sd[name + ".to_gates.bias"])
  want = (v * gates[..., None]).reshape(3, 1, 8) @ sd[name + ".to_out.0.weight"].T
  np.testing.assert_allclose(ref.attention(sd, name, x), want, rtol=1e-12)


def test_transformer_with_zero_weights_is_identity():
  sd = {k: (v if k.endswith("rotary_embed.freqs") else np.zeros_like(v))
        for k, v in transformer_sd().items()}
  x = np.random.default_rng(5).normal(size=(2, 5, 8))
  np.testing.assert_array_equal(ref.transformer(sd, TIME, x), x)


def test_attention_and_feed_forward_match_torch():
  torch = pytest.importorskip("torch")
  functional = torch.nn.functional
  sd = transformer_sd(seed=6, dim=16, heads=4, dim_head=8)
  t = {k: torch.tensor(v) for k, v in sd.items()}
  x = np.random.default_rng(7).normal(size=(2, 11, 16))
  tx = torch.tensor(x)

  def rms(y, gamma):
    return functional.normalize(y, dim=-1) * y.shape[-1] ** 0.5 * gamma

  def rotary(y, freqs):                                   # (b, h, l, dh) as complex pairs
    angle = torch.arange(y.shape[-2], dtype=y.dtype)[:, None] * freqs
    pairs = torch.view_as_complex(y.reshape(*y.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angle), angle)).flatten(-2)

  a = ATTENTION
  h = rms(tx, t[a + ".norm.gamma"])
  q, k, v = functional.linear(h, t[a + ".to_qkv.weight"]).unflatten(-1, (3, 4, 8)).permute(2, 0, 3, 1, 4)
  freqs = t[a + ".rotary_embed.freqs"]
  out = functional.scaled_dot_product_attention(rotary(q, freqs), rotary(k, freqs), v)
  gates = functional.linear(h, t[a + ".to_gates.weight"], t[a + ".to_gates.bias"]).sigmoid()
  out = (out * gates.transpose(1, 2)[..., None]).transpose(1, 2).flatten(-2)
  want = functional.linear(out, t[a + ".to_out.0.weight"]).numpy()
  np.testing.assert_allclose(ref.attention(sd, a, x), want, rtol=1e-10, atol=1e-12)

  f = FEED_FORWARD + ".net"
  hidden = functional.gelu(functional.linear(rms(tx, t[f + ".0.gamma"]), t[f + ".1.weight"], t[f + ".1.bias"]))
  want = functional.linear(hidden, t[f + ".4.weight"], t[f + ".4.bias"]).numpy()
  np.testing.assert_allclose(ref.feed_forward(sd, FEED_FORWARD, x), want, rtol=1e-10, atol=1e-12)


# ----- random state_dicts -------------------------------------------------------------------


def test_official_parameter_counts():
  common = dict(widths=PAPER_WIDTHS, channels=2, dim=256, depth=6)
  roformer = ref.random_state_dict("transformer", heads=8, dim_head=48, **common)
  assert unique_parameter_count(roformer) == 36_847_516
  assert len({id(v) for k, v in roformer.items() if k.endswith("rotary_embed.freqs")}) == 2
  mamba2 = ref.random_state_dict("mamba2", d_state=128, headdim=64, expand=4, **common)
  assert unique_parameter_count(mamba2) == 48_098_188


def test_keys_and_shapes_per_module_type():
  dim, d_inner, n = 8, 16, 4
  mamba2 = ref.random_state_dict("mamba2", **MICRO)
  micro_file = np.load("tests/data/official_micro.npz")
  official = {k[len("sd/model."):]: micro_file[k].shape for k in micro_file.files
              if k.startswith("sd/model.")}
  assert {k: v.shape for k, v in mamba2.items()} == official  # a file torch wrote
  mamba = ref.random_state_dict("mamba", **MICRO)
  m = "layers.0.1.backward_blocks.0.mixer."
  assert {k[len(m):]: v.shape for k, v in mamba.items() if k.startswith(m)} == {
      "in_proj.weight": (2 * d_inner, dim), "conv1d.weight": (d_inner, 1, 4),
      "conv1d.bias": (d_inner,), "x_proj.weight": (2 + 2 * n, d_inner),
      "dt_proj.weight": (d_inner, 2), "dt_proj.bias": (d_inner,), "A_log": (d_inner, n),
      "D": (d_inner,), "out_proj.weight": (dim, d_inner)}
  roformer = ref.random_state_dict("transformer", **MICRO)
  p = "layers.0.1.layers.0."
  assert {k[len(p):]: v.shape for k, v in roformer.items() if k.startswith(p)} == {
      "0.norm.gamma": (dim,), "0.to_qkv.weight": (3 * 2 * 4, dim), "0.to_gates.weight": (2, dim),
      "0.to_gates.bias": (2,), "0.to_out.0.weight": (dim, 2 * 4), "0.rotary_embed.freqs": (2,),
      "1.net.0.gamma": (dim,), "1.net.1.weight": (4 * dim, dim), "1.net.1.bias": (4 * dim,),
      "1.net.4.weight": (dim, 4 * dim), "1.net.4.bias": (dim,)}
  hybrid = ref.random_state_dict("mamba2-roformer", **dict(MICRO, depth=2))
  assert ref.module_types(hybrid) == [("mamba2", "transformer")] * 2
  assert ref.module_types(mamba) == [("mamba", "mamba")]
  assert ref.module_types(roformer) == [("transformer", "transformer")]
  for i in range(2):
    assert {k for k in hybrid if k.startswith(f"layers.{i}.0.")} == {
        k.replace("layers.0.", f"layers.{i}.", 1) for k in mamba2 if k.startswith("layers.0.0.")}
    assert {k for k in hybrid if k.startswith(f"layers.{i}.1.")} == {
        k.replace("layers.0.", f"layers.{i}.", 1) for k in roformer if k.startswith("layers.0.1.")}
  with pytest.raises(ValueError, match="module_type"):
    ref.random_state_dict("lstm", **MICRO)


# ----- the whole forward --------------------------------------------------------------------


@pytest.mark.parametrize("module_type", ref.MODULE_TYPES)
def test_separate_every_type_and_stem(module_type):
  sd = ref.random_state_dict(module_type, num_stems=3, **MICRO)
  audio = np.random.default_rng(8).uniform(-0.5, 0.5, (1, 2, 700))
  stems = ref.separate(sd, audio, channels=2, n_fft=256, hop=64)
  assert stems.shape == (1, 3, 2, 700) and np.all(np.isfinite(stems))
  assert np.abs(stems).max() > 1e-3
  assert not np.allclose(stems[:, 0], stems[:, 1])
  np.testing.assert_array_equal(ref.bsmamba2(sd, audio, channels=2, n_fft=256, hop=64), stems[:, 0])
  # A stem is its own mask estimator: stem 2's weights under stem 0's names give stem 2.
  swapped = dict(sd, **{k.replace("mask_estimators.2.", "mask_estimators.0."): v
                        for k, v in sd.items() if k.startswith("mask_estimators.2.")})
  np.testing.assert_allclose(ref.bsmamba2(swapped, audio, channels=2, n_fft=256, hop=64),
                             stems[:, 2], rtol=1e-12, atol=1e-15)
