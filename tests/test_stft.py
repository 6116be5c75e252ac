"""STFT / iSTFT against jax.scipy.signal and float64 NumPy references (docs/model.md §1)."""

import jax
import jax.numpy as jnp
import jax.scipy.signal as jss
import numpy as np
import pytest

from bsmamba2_jax import stft as audio
from tests.stft_reference import numpy_istft
from tests.stft_reference import numpy_stft
from tests.stft_reference import padded_window
from tests.stft_reference import periodic_hann

# (n_fft, hop, win_length): the model's front end, a loss resolution with a
# window shorter than n_fft, and a small one.
CONFIGS = [(2048, 441, None), (2048, 147, 512), (256, 64, None)]
# (leading shape, samples): 1-D, mono batch, stereo batch; odd and even lengths.
SHAPES = [((), 3001), ((3, 1), 2500), ((2, 2), 2207)]


def _signal(lead, n, seed=0):
  return np.random.default_rng(seed).standard_normal(lead + (n,)).astype(
      np.float32)


def test_hann_window_isperiodic_hann():
  for n in (1, 2, 7, 2048):
    w = audio.hann_window(n)
    assert w.dtype == jnp.float32 and w.shape == (n,)
    np.testing.assert_allclose(np.asarray(w), periodic_hann(n), atol=1e-7)


@pytest.mark.parametrize("n_fft,hop,win_length", CONFIGS)
@pytest.mark.parametrize("lead,n", SHAPES)
def test_stft_matches_jax_scipy_and_numpy(n_fft, hop, win_length, lead, n):
  x = _signal(lead, n)
  spec = audio.stft(x, n_fft, hop, win_length)
  assert spec.dtype == jnp.complex64
  assert spec.shape == lead + (n_fft // 2 + 1, 1 + n // hop)
  win = padded_window(n_fft, win_length or n_fft)
  # docs/model.md §1: jax.scipy.signal.stft with boundary='even', padded=False equals
  # the torch STFT divided by the window sum.
  _, _, oracle = jss.stft(jnp.asarray(x), window=jnp.asarray(win, jnp.float32),
                          nperseg=n_fft, noverlap=n_fft - hop, boundary="even",
                          padded=False)
  oracle = np.asarray(oracle) * win.sum()
  scale = np.abs(oracle).max()
  np.testing.assert_allclose(np.asarray(spec) / scale, oracle / scale,
                             atol=1e-5)
  ref = numpy_stft(x, n_fft, hop, win_length or n_fft)
  np.testing.assert_allclose(np.asarray(spec) / scale, ref / scale, atol=1e-5)


@pytest.mark.parametrize("n_fft,hop,win_length", CONFIGS)
@pytest.mark.parametrize("lead,n", SHAPES)
def test_istft_matches_oracles_and_reconstructs(n_fft, hop, win_length, lead,
                                                n):
  x = _signal(lead, n, seed=1)
  spec = audio.stft(x, n_fft, hop, win_length)
  y = audio.istft(spec, n_fft, hop, length=n, win_length=win_length)
  assert y.dtype == jnp.float32 and y.shape == x.shape
  np.testing.assert_allclose(np.asarray(y), x, atol=1e-5)
  ref = numpy_istft(np.asarray(spec, np.complex128), n_fft, hop, n,
                     win_length or n_fft)
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
  # jax.scipy.signal.istft (no length=; its output stops at
  # hop * (frames - 1)): compare on the common prefix.
  win = padded_window(n_fft, win_length or n_fft)
  _, oracle = jss.istft(spec / win.sum(), window=jnp.asarray(win, jnp.float32),
                        nperseg=n_fft, noverlap=n_fft - hop)
  m = min(oracle.shape[-1], n)
  np.testing.assert_allclose(np.asarray(y)[..., :m], np.asarray(oracle)[..., :m],
                             atol=1e-5)


def test_istft_length_crops_and_zero_pads_like_torch():
  n_fft, hop = 256, 64
  spec = audio.stft(_signal((2,), 1000), n_fft, hop)  # 16 frames
  full = hop * (spec.shape[-1] - 1) + n_fft // 2  # samples before zero padding
  env = np.zeros(full + 77 + n_fft)
  for t in range(spec.shape[-1]):
    env[t * hop:t * hop + n_fft] += periodic_hann(n_fft) ** 2
  env = env[n_fft // 2:]
  for length in (10, 999, full, full + 77):
    y = audio.istft(spec, n_fft, hop, length=length)
    ref = numpy_istft(np.asarray(spec, np.complex128), n_fft, hop, length,
                       n_fft)
    assert y.shape == (2, length)
    # Near the end the squared-window envelope is tiny and division amplifies
    # fp32 rounding; compare before the division.
    np.testing.assert_allclose(np.asarray(y) * env[:length], ref * env[:length],
                               atol=1e-5)
  assert np.all(np.asarray(audio.istft(spec, n_fft, hop, full + 77))[:, full:]
                == 0)
  default = audio.istft(spec, n_fft, hop)
  assert default.shape == (2, hop * (spec.shape[-1] - 1))


def test_jit_grad_and_bf16_input():
  n_fft, hop, n = 256, 64, 1001
  x = jnp.asarray(_signal((2, 2), n, seed=2))
  roundtrip = jax.jit(lambda v: audio.istft(audio.stft(v, n_fft, hop), n_fft,
                                            hop, length=n))
  np.testing.assert_allclose(np.asarray(roundtrip(x)), np.asarray(x), atol=1e-5)
  # istft(stft(.)) is the identity map, so the gradient of 0.5 * ||.||^2 is x.
  grad = jax.grad(lambda v: 0.5 * jnp.sum(roundtrip(v) ** 2))(x)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(x), atol=1e-4)
  # The front end stays fp32 for a bf16 waveform.
  spec = audio.stft(x.astype(jnp.bfloat16), n_fft, hop)
  assert spec.dtype == jnp.complex64
  np.testing.assert_allclose(
      np.asarray(spec),
      np.asarray(audio.stft(x.astype(jnp.bfloat16).astype(jnp.float32), n_fft,
                            hop)), atol=1e-5)


def test_bad_input_gives_clear_errors():
  with pytest.raises(ValueError, match="reflect padding"):
    audio.stft(np.zeros((2, 100), np.float32), 256, 64)
  with pytest.raises(ValueError, match="real waveform"):
    audio.stft(np.zeros(1000, np.complex64), 256, 64)
  with pytest.raises(ValueError, match="win_length"):
    audio.stft(np.zeros(1000, np.float32), 256, 64, win_length=512)
  with pytest.raises(ValueError, match="129"):
    audio.istft(np.zeros((2, 100, 5), np.complex64), 256, 64, length=100)
  with pytest.raises(ValueError, match="NOLA"):
    audio.istft(np.zeros((129, 5), np.complex64), 256, 256, length=800,
                win_length=128)


@pytest.mark.parametrize("n_fft,hop,n", [(7, 3, 9), (255, 64, 1001)])
def test_odd_n_fft_frames_and_default_length_follow_torch(n_fft, hop, n):
  """Odd n_fft: frames = 1 + (n + 2·(n_fft // 2) - n_fft) // hop, one sample short of the even
  count's framing; the default iSTFT length is hop·(frames - 1) + 1, as torch.istft gives."""
  x = _signal((2,), n, seed=2)
  spec = audio.stft(x, n_fft, hop)
  frames = 1 + (n - 1) // hop
  assert spec.shape == (2, n_fft // 2 + 1, frames)
  ref = numpy_stft(x, n_fft, hop, n_fft)
  np.testing.assert_allclose(np.asarray(spec), ref, atol=1e-4 * np.abs(ref).max())
  assert audio.istft(spec, n_fft, hop).shape == (2, hop * (frames - 1) + 1)
  np.testing.assert_allclose(np.asarray(audio.istft(spec, n_fft, hop, length=n)), x, atol=1e-5)
