"""The official code's other sequence modules and several stems, against the float64 reference.

Each model is built from an official-named random state_dict (`official_reference.
random_state_dict`) through the converter, so a pass checks the graph, every layout and the
name table of that module type at once.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsmamba2_jax import convert
from bsmamba2_jax.config import ModelConfig
from bsmamba2_jax.model import BSMamba2, abstract_params, random_params
from bsmamba2_jax.roformer import rotary_frequencies
from tests import official_reference as ref

WIDTHS = [1] * 8 + [2] * 4 + [4] * 4 + [8] * 4 + [16] * 2 + [33]  # n_fft 256: 129 bins
SIZES = dict(dim=16, depth=2, d_state=4, expand=2, headdim=8, heads=2, dim_head=8)


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("module_type, stems, channels", [
    ("transformer", 1, 2), ("transformer", 2, 1), ("mamba2-roformer", 1, 2),
    ("mamba2-roformer", 3, 2), ("mamba", 1, 2), ("mamba", 2, 1), ("mamba2", 2, 2)])
def test_forward_equals_the_float64_reference(module_type, stems, channels):
  sd = ref.random_state_dict(module_type, widths=WIDTHS, channels=channels, num_stems=stems,
                             seed=stems, **SIZES)
  config, params = convert.params_from_torch_state_dict(
      {k: v.astype(np.float32) for k, v in sd.items()}, hop_length=64, audio_channels=channels)
  assert (config.module_type, config.num_stems, config.depth) == (module_type, stems, 2)
  audio = np.random.default_rng(0).uniform(-0.5, 0.5, (1, channels, 3000))
  ours = np.asarray(jax.jit(BSMamba2(config).apply)(
      {"params": jax.tree_util.tree_map(jnp.asarray, params)}, jnp.asarray(audio, jnp.float32)))
  want = ref.separate(sd, audio, channels=channels, n_fft=256, hop=64)
  assert ours.shape == ((1, channels, 3000) if stems == 1 else (1, stems, channels, 3000))
  ours = ours.reshape(want.shape)
  np.testing.assert_allclose(ours, want, rtol=1e-3, atol=2e-4 * np.abs(want).max())


def test_bsroformer_has_the_official_parameter_count():
  config = ModelConfig.preset("bsroformer")
  assert (config.dim, config.depth, config.heads, config.dim_head) == (256, 6, 8, 48)
  # torch counts each of the two shared rotary embeddings' fixed freqs once (24 values each).
  assert count(abstract_params(config)) + 2 * rotary_frequencies(48).size == 36_847_516
  state_dict = convert.params_to_torch_state_dict(
      config, jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32),
                                     abstract_params(config)))
  freqs = {k: v for k, v in state_dict.items() if k.endswith("rotary_embed.freqs")}
  assert len(freqs) == 12 and all(v.shape == (24,) for v in freqs.values())
  np.testing.assert_allclose(next(iter(freqs.values())), ref.rotary_freqs(48), rtol=1e-6)


def test_foreign_rotary_frequencies_are_refused():
  sd = ref.random_state_dict("transformer", widths=WIDTHS, channels=2, **SIZES)
  sd["layers.1.0.layers.0.0.rotary_embed.freqs"] = sd[
      "layers.1.0.layers.0.0.rotary_embed.freqs"] * 2
  with pytest.raises(convert.CheckpointError, match="layers.1.0.layers.0.0.rotary_embed.freqs"):
    convert.params_from_torch_state_dict(sd, hop_length=64)


def test_stem_names_are_inferred_or_given():
  sd = ref.random_state_dict("mamba2", widths=WIDTHS, channels=2, num_stems=4, **SIZES)
  assert convert.infer_config(sd, hop_length=64).stems == ("drums", "bass", "other", "vocals")
  given = convert.infer_config(sd, hop_length=64, stems=("a", "b", "c", "d"))
  assert given.stems == ("a", "b", "c", "d")
  with pytest.raises(convert.CheckpointError, match="2 stem name.* of 4 mask estimator"):
    convert.infer_config(sd, hop_length=64, stems=("a", "b"))
  two = ref.random_state_dict("mamba2", widths=WIDTHS, channels=2, num_stems=2, **SIZES)
  assert convert.infer_config(two, hop_length=64).stems == ("stem1", "stem2")


def test_transformer_dropout_only_in_training():
  config = ModelConfig.preset("tiny", module_type="transformer", depth=1, attn_dropout=0.1,
                              ff_dropout=0.1)
  params = random_params(config)
  audio = jnp.asarray(np.random.default_rng(1).uniform(-0.5, 0.5, (1, 2, 4096)), jnp.float32)
  model = BSMamba2(config)
  train = lambda key: model.apply({"params": params}, audio, train=True, rngs={"dropout": key})
  a, b = train(jax.random.PRNGKey(0)), train(jax.random.PRNGKey(1))
  assert not np.allclose(a, b) and np.array_equal(a, train(jax.random.PRNGKey(0)))
  inference = model.apply({"params": params}, audio)
  without = BSMamba2(config.with_compute(attn_dropout=0.0, ff_dropout=0.0)).apply(
      {"params": params}, audio, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
  np.testing.assert_allclose(inference, without, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("module_type", ["transformer", "mamba"])
def test_mixed_precision_stays_close_to_float32(module_type):
  config = ModelConfig.preset("tiny", module_type=module_type, depth=1)
  params = random_params(config)
  audio = jnp.asarray(np.random.default_rng(2).uniform(-0.5, 0.5, (1, 2, 8192)), jnp.float32)
  f32 = np.asarray(BSMamba2(config).apply({"params": params}, audio))
  mixed = np.asarray(BSMamba2(config.with_compute(dtype="mixed")).apply({"params": params}, audio))
  snr = 10 * np.log10(np.sum(f32 ** 2) / np.sum((f32 - mixed) ** 2))
  assert snr > 30, snr
