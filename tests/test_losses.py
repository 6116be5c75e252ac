"""Losses against a float64 NumPy computation of docs/training.md §4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsmamba2_jax import losses
from tests.stft_reference import numpy_istft
from tests.stft_reference import numpy_stft

N = 8820  # 0.2 s at 44.1 kHz


def _numpy_loss(estimate, target, windows, magnitude, target_roundtrip):
  """10·mean|ŷ−y| + Σ_win mean STFT L1 with n_fft = max(win, 2048), hop 147."""
  estimate = estimate.astype(np.float64)
  target = target.astype(np.float64)
  if target_roundtrip:
    target = numpy_istft(numpy_stft(target, 2048, 441, 2048), 2048, 441,
                         target.shape[-1], 2048)
  total = 10 * np.mean(np.abs(estimate - target))
  for win in windows:
    n_fft = max(win, 2048)
    s_est = numpy_stft(estimate, n_fft, 147, win)
    s_tgt = numpy_stft(target, n_fft, 147, win)
    if magnitude:
      total += np.mean(np.abs(np.abs(s_est) - np.abs(s_tgt)))
    else:
      total += np.mean(np.abs(s_est - s_tgt))
  return total


def _pair(seed=0, shape=(2, 2, N)):
  rng = np.random.default_rng(seed)
  target = rng.standard_normal(shape).astype(np.float32)
  estimate = (target + 0.3 * rng.standard_normal(shape)).astype(np.float32)
  return estimate, target


@pytest.mark.parametrize("target_roundtrip", [True, False])
def test_official_loss_matches_numpy(target_roundtrip):
  estimate, target = _pair()
  got = losses.official_loss(estimate, target,
                             target_roundtrip=target_roundtrip)
  want = _numpy_loss(estimate, target, (4096, 2048, 1024, 512, 256), False,
                     target_roundtrip)
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=2e-5)


def test_fast_loss_matches_numpy():
  estimate, target = _pair(seed=1, shape=(1, 1, N))
  got = jax.jit(losses.fast_loss)(estimate, target)
  want = _numpy_loss(estimate, target, (2048, 1024, 512), True, True)
  np.testing.assert_allclose(float(got), want, rtol=2e-5)


@pytest.mark.parametrize("name", ["official", "fast"])
def test_zero_at_roundtripped_target_with_finite_grads(name):
  loss = losses.get_loss(name)
  _, target = _pair(seed=2, shape=(1, 2, N))
  estimate = losses.roundtrip(jnp.asarray(target))
  assert float(loss(estimate, target)) < 1e-5
  assert float(loss(target, target, target_roundtrip=False)) == 0.0
  # |z| has no derivative at 0: the gradient must be finite (zero) there,
  # also when only part of the estimate equals the target.
  partial = jnp.asarray(target).at[:, 0].set(0.0)
  for est in (jnp.asarray(target), partial):
    grad = jax.grad(lambda e: loss(e, target, target_roundtrip=False))(est)
    assert np.all(np.isfinite(np.asarray(grad)))
  grad = jax.grad(lambda e: loss(e, target, target_roundtrip=False))(
      jnp.asarray(target))
  assert np.all(np.asarray(grad) == 0.0)


def test_bf16_inputs_give_fp32_loss():
  estimate, target = _pair(seed=3, shape=(1, 1, N))
  got = losses.official_loss(jnp.asarray(estimate, jnp.bfloat16),
                             jnp.asarray(target, jnp.bfloat16))
  assert got.dtype == jnp.float32 and np.isfinite(float(got))


def test_get_loss_and_errors():
  assert losses.get_loss("official") is losses.official_loss
  assert losses.get_loss("fast") is losses.fast_loss
  with pytest.raises(ValueError, match="Unknown loss 'l2'"):
    losses.get_loss("l2")
  with pytest.raises(ValueError, match="same shape"):
    losses.official_loss(np.zeros((1, 2, N)), np.zeros((1, 1, N)))
  with pytest.raises(ValueError, match="estimate must be a real waveform"):
    losses.fast_loss(np.zeros((1, 2, N), np.complex64), np.zeros((1, 2, N)))


@pytest.mark.parametrize("name, windows, magnitude", [
    ("official", (4096, 2048, 1024, 512, 256), False), ("fast", (2048, 1024, 512), True)])
def test_stems_axis_is_one_more_leading_axis(name, windows, magnitude):
  """A model of n stems gives (b, n, C, N): the L1 terms are means over every element and the
  STFTs run over the last axis, as the official loss on the stacked stems."""
  estimate, target = _pair(seed=4, shape=(2, 2, 1, N))
  loss = losses.get_loss(name)
  got = loss(estimate, target)
  want = _numpy_loss(estimate, target, windows, magnitude, True)
  np.testing.assert_allclose(float(got), want, rtol=2e-5)
  flat = loss(estimate.reshape(4, 1, N), target.reshape(4, 1, N))
  np.testing.assert_allclose(float(got), float(flat), rtol=1e-6)
