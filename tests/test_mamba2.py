"""The Mamba2 mixer and the bidirectional block against the float64 NumPy official reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsmamba2_jax.mamba2 import BiMamba2Block, Mamba2, broadcast_leading, reverse_valid
from tests import official_reference as ref

MIXER = dict(d_state=8, d_conv=4, expand=2, headdim=8, chunk_size=8)


def torch_layout(params: dict, prefix: str) -> dict:
  """Mixer params -> official names/layouts (via the converter's own layout rules)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [p.key for p in path]
    leaf = np.asarray(leaf, np.float64)
    if names[-1] == "kernel" and names[-2] == "conv1d":
      out[prefix + ".".join(names[:-1]) + ".weight"] = leaf.transpose(2, 1, 0)
    elif names[-1] == "kernel" and names[-2] == "linear":
      out[prefix + ".".join(names[:-1]) + ".weight"] = leaf[:, :, None]
    elif names[-1] == "kernel":
      out[prefix + ".".join(names[:-1]) + ".weight"] = leaf.T
    else:
      out[prefix + ".".join(names)] = leaf
  return out


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("method", ["chunked", "sequential"])
def test_mixer_matches_numpy_reference(ngroups, method):
  d_model, length = 16, 21
  mixer = Mamba2(d_model=d_model, ngroups=ngroups, scan_method=method, **MIXER)
  u = jax.random.normal(jax.random.PRNGKey(0), (2, length, d_model))
  params = mixer.init(jax.random.PRNGKey(1), u)["params"]
  # Larger dt and a non-trivial norm so every term matters.
  params = dict(params, dt_bias=params["dt_bias"] + 1.0, D=params["D"] * 0.5)
  ours = np.asarray(mixer.apply({"params": params}, u))
  sd = torch_layout(params, "m.")
  expected = ref.mamba2(sd, "m", np.asarray(u, np.float64), ngroups=ngroups)
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_mamba_ssm_initialisation():
  mixer = Mamba2(d_model=64, d_state=16, expand=4, headdim=16)
  params = mixer.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 64)))["params"]
  a = np.exp(np.asarray(params["A_log"]))
  assert np.all((a >= 1) & (a <= 16))
  dt = np.log1p(np.exp(np.asarray(params["dt_bias"])))  # softplus(dt_bias) = the sampled dt
  assert np.all((dt >= 1e-4 - 1e-7) & (dt <= 0.1 + 1e-6))
  np.testing.assert_array_equal(params["D"], 1.0)
  bound = 1 / np.sqrt(64)
  assert np.abs(params["in_proj"]["kernel"]).max() <= bound
  assert params["in_proj"]["kernel"].shape == (64, 2 * 256 + 2 * 16 + 16)
  assert "bias" not in params["in_proj"] and "bias" not in params["out_proj"]
  assert params["conv1d"]["kernel"].shape == (4, 1, 256 + 32)


def test_bidirectional_block_matches_reference():
  d_model, length = 16, 13
  block = BiMamba2Block(MIXER)
  x = jax.random.normal(jax.random.PRNGKey(2), (3, length, d_model))
  params = block.init(jax.random.PRNGKey(3), x)["params"]
  ours = np.asarray(block.apply({"params": params}, x))
  sd = torch_layout(params, "blk.")
  sd = {k.replace(".forward.", ".forward_blocks.0.").replace(".backward.", ".backward_blocks.0."): v
        for k, v in sd.items()}
  expected = ref.mamba_block(sd, "blk", np.asarray(x, np.float64))
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("method", ["chunked", "associative"])
def test_padding_never_changes_real_outputs(method):
  """Garbage after each sequence's length leaves real outputs unchanged in both directions."""
  d_model, length, padded = 16, 11, 19
  block = BiMamba2Block(dict(MIXER, scan_method=method))
  key = jax.random.PRNGKey(4)
  x = jax.random.normal(key, (2, padded, d_model))
  params = block.init(key, x)["params"]
  lengths = jnp.array([length, 7])
  out = block.apply({"params": params}, x, lengths)
  garbage = x.at[0, length:].set(1e3).at[1, 7:].set(-5e2)
  out_garbage = block.apply({"params": params}, garbage, lengths)
  for i, n in enumerate([length, 7]):
    alone = block.apply({"params": params}, x[i:i + 1, :n])
    np.testing.assert_allclose(out[i, :n], alone[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_garbage[i, :n], alone[0], rtol=1e-5, atol=1e-5)


def test_reverse_valid_is_an_involution_that_keeps_padding_in_place():
  x = jnp.arange(12.0).reshape(2, 6)
  r = reverse_valid(x, jnp.array([4, 6]))
  np.testing.assert_array_equal(r, [[3, 2, 1, 0, 4, 5], [11, 10, 9, 8, 7, 6]])
  np.testing.assert_array_equal(reverse_valid(r, jnp.array([4, 6])), x)


def test_bf16_block_close_to_fp32_and_grads_finite():
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 40, 16))
  f32 = BiMamba2Block(MIXER)
  bf16 = BiMamba2Block(dict(MIXER, dtype=jnp.bfloat16), dtype=jnp.bfloat16)
  params = f32.init(jax.random.PRNGKey(6), x)["params"]
  y32 = f32.apply({"params": params}, x)
  y16 = bf16.apply({"params": params}, x)
  assert y16.dtype == jnp.float32  # the residual stream stays fp32
  rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
  assert rel < 2e-2, rel
  grads = jax.grad(lambda p: jnp.sum(bf16.apply({"params": p}, x) ** 2))(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_broadcast_leading_gradient_sums_over_the_leading_axes(dtype):
  rng = np.random.default_rng(7)
  param = rng.standard_normal((3, 5))
  cotangent = rng.standard_normal((4, 7, 3, 5))
  y, vjp = jax.vjp(lambda p: broadcast_leading(p, (4, 7)), jnp.asarray(param, dtype))
  np.testing.assert_array_equal(np.asarray(y, np.float64),
                                np.broadcast_to(np.asarray(jnp.asarray(param, dtype), np.float64),
                                                (4, 7, 3, 5)))
  (grad,) = vjp(jnp.asarray(cotangent, dtype))
  assert grad.dtype == dtype and grad.shape == (3, 5)
  expected = np.sum(np.asarray(jnp.asarray(cotangent, dtype), np.float64), axis=(0, 1))
  tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(grad, np.float64), expected, rtol=tolerance,
                             atol=tolerance * np.abs(expected).max())
