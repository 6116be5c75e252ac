"""BSMamba2: parameter budget, feature order, identity mask, and the official graph end to end."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsmamba2_jax import convert
from bsmamba2_jax.mamba2 import MIXER_OUTPUT, SCAN_OUTPUT
from bsmamba2_jax.config import ModelConfig
from bsmamba2_jax.model import (BSMamba2, abstract_params, features_to_spectrum, init_params,
                                random_params, spectrum_to_features)
from tests import official_reference as ref

MICRO = dict(dim=16, depth=1, d_state=8, expand=2, headdim=8, chunk_size=16)


@pytest.fixture(scope="module", params=[2, 1], ids=["stereo", "mono"])
def micro(request):
  """(config, params) of a microscopic model, initialised once per channel count."""
  cfg = ModelConfig.preset("tiny", audio_channels=request.param, **MICRO)
  return cfg, init_params(cfg, jax.random.PRNGKey(0))


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_paper_parameter_budget_matches_spec():
  cfg = ModelConfig.preset("paper")
  audio = jax.ShapeDtypeStruct((1, 2, 4096), jnp.float32)
  params = jax.eval_shape(lambda a: BSMamba2(cfg).init(jax.random.PRNGKey(0), a), audio)["params"]
  assert count(params) == 48_098_188
  assert count(params["band_split"]) == 1_069_572
  assert count(params["mask_estimator"]) == 24_721_416
  assert count(params["final_norm"]) == 256
  assert count(params["layers_0"]["time"]) == 1_858_912
  assert count(params["layers_3"]["band"]["backward"]["mixer"]) == 863_536
  assert sum(count(params[f"layers_{i}"]) for i in range(6)) == 22_306_944


def test_feature_order_is_frequency_major_channels_then_re_im():
  b, c, f, t = 1, 2, 5, 3
  rng = np.random.default_rng(0)
  spec = rng.normal(size=(b, c, f, t)) + 1j * rng.normal(size=(b, c, f, t))
  feats = np.asarray(spectrum_to_features(jnp.asarray(spec, jnp.complex64)))
  for freq in range(f):
    for ch in range(c):
      for frame in range(t):
        z = spec[0, ch, freq, frame]
        np.testing.assert_allclose(feats[0, frame, (freq * c + ch) * 2 + 0], z.real, rtol=1e-6)
        np.testing.assert_allclose(feats[0, frame, (freq * c + ch) * 2 + 1], z.imag, rtol=1e-6)
  back = features_to_spectrum(jnp.asarray(feats), c)
  np.testing.assert_allclose(np.asarray(back), spec, rtol=1e-6)


@pytest.mark.parametrize("length", [22050, 10001])
def test_unit_mask_returns_the_input(micro, length):
  cfg, params = micro
  channels = cfg.audio_channels
  model = BSMamba2(cfg)
  audio = jax.random.uniform(jax.random.PRNGKey(1), (2, channels, length), minval=-1, maxval=1)
  frames = 1 + length // cfg.hop_length
  ones = jnp.ones((2, channels, cfg.n_fft // 2 + 1, frames), jnp.complex64)
  out = model.apply({"params": params}, audio, ones, method=BSMamba2.apply_mask)
  np.testing.assert_allclose(np.asarray(out), np.asarray(audio), atol=1e-5)


def test_forward_equals_official_graph_from_torch_weights(micro):
  """Our forward with converted weights == the float64 NumPy official forward on the state_dict."""
  cfg, params = micro
  channels = cfg.audio_channels
  state_dict = {k: v.astype(np.float64) for k, v in
                convert.params_to_torch_state_dict(cfg, jax.device_get(params), prefix="").items()}
  audio = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), (1, channels, 4410), minval=-.5, maxval=.5))
  ours = np.asarray(jax.jit(BSMamba2(cfg).apply)({"params": params}, jnp.asarray(audio)))
  expected = ref.bsmamba2(state_dict, audio.astype(np.float64), channels=channels)
  np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=2e-4 * np.abs(expected).max())


def test_wrong_channel_count_is_a_clear_error(micro):
  cfg, params = micro
  with pytest.raises(ValueError, match=rf"\(batch, {cfg.audio_channels}, samples\)"):
    BSMamba2(cfg).apply({"params": params}, jnp.zeros((1, 3, 4096)))


def test_bf16_forward_finite_and_close(micro):
  cfg, params = micro
  if cfg.audio_channels == 1:
    pytest.skip("one channel count suffices")
  audio = jax.random.uniform(jax.random.PRNGKey(1), (1, 2, 8820), minval=-.5, maxval=.5)
  y32 = jax.jit(BSMamba2(cfg).apply)({"params": params}, audio)
  bf16 = ModelConfig.from_dict(dict(cfg.to_dict(), dtype="bfloat16"))
  y16 = jax.jit(BSMamba2(bf16).apply)({"params": params}, audio)
  assert y16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y16)))
  assert float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32)) < 5e-2


@pytest.mark.slow
def test_paper_forward_one_second_stereo():
  cfg = ModelConfig.preset("paper")
  params = init_params(cfg, jax.random.PRNGKey(0))
  audio = jax.random.uniform(jax.random.PRNGKey(1), (1, 2, 44100), minval=-.5, maxval=.5)
  out = jax.jit(BSMamba2(cfg).apply)({"params": params}, audio)
  assert out.shape == audio.shape and bool(jnp.all(jnp.isfinite(out)))


def test_remat_keeps_the_named_mixer_values_and_the_gradients(micro, capsys):
  """remat=True recomputes each block but keeps every mixer's scan output and output
  (`REMAT_POLICY`), and gives the gradients of the plain model."""
  cfg, params = micro
  if cfg.audio_channels == 1:
    pytest.skip("one channel count suffices")
  audio = jax.random.uniform(jax.random.PRNGKey(1), (1, 2, 8820), minval=-.5, maxval=.5)
  weight = jax.random.normal(jax.random.PRNGKey(2), audio.shape)
  remat = ModelConfig.from_dict(dict(cfg.to_dict(), remat=True))

  def objective(config):
    return lambda p: jnp.sum(BSMamba2(config).apply({"params": p}, audio) * weight)

  jax.ad_checkpoint.print_saved_residuals(objective(remat), params)
  saved = capsys.readouterr().out
  mixers = 4 * cfg.depth  # two paths, two directions
  assert saved.count(f"named '{SCAN_OUTPUT}'") == mixers
  assert saved.count(f"named '{MIXER_OUTPUT}'") == mixers
  plain = jax.jit(jax.grad(objective(cfg)))(params)
  rematerialised = jax.jit(jax.grad(objective(remat)))(params)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematerialised)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(a))))


@pytest.mark.parametrize("tokens", [1, 50, 333, 10_000])
def test_blocks_over_groups_of_sequences_give_the_same_output(tokens):
  """`block_tokens` groups (one sequence each, several with a padded last group, all in one):
  the same vocals as the whole batch at once, and the same parameter tree."""
  config = ModelConfig.preset("tiny", depth=1)
  params = random_params(config, seed=5)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 2, 8000)).astype(np.float32))
  whole = BSMamba2(config).apply({"params": params}, x)
  grouped = BSMamba2(config.with_compute(block_tokens=tokens))
  np.testing.assert_allclose(np.asarray(grouped.apply({"params": params}, x)),
                             np.asarray(whole), rtol=1e-5, atol=1e-7)
  assert jax.tree_util.tree_structure(abstract_params(config.with_compute(block_tokens=tokens))) \
      == jax.tree_util.tree_structure(params)
  with pytest.raises(ValueError, match="block_tokens must be an int >= 0"):
    config.with_compute(block_tokens=-1)
