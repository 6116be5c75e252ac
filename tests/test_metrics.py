"""uSDR / cSDR against the docs/metrics.md formulas on crafted signals (and museval)."""

import numpy as np
import pytest

from bsmamba2_jax import metrics

SR = 100  # a tiny "sample rate" keeps the 1-s frames short


def _usdr_formula(s, s_hat, eps=1e-7):
  s = np.asarray(s, np.float64).ravel()
  s_hat = np.asarray(s_hat, np.float64).ravel()
  return 10 * np.log10((np.dot(s, s) + eps) / (np.dot(s - s_hat, s - s_hat)
                                                + eps))


def _frame_sdr_formula(refs, ests, sr):
  """Loops over whole seconds; the silent rule of docs/metrics.md §2; (S, frames)."""
  n_frames = refs.shape[-1] // sr
  out = np.full((refs.shape[0], n_frames), np.nan)
  for t in range(n_frames):
    r = refs[..., t * sr:(t + 1) * sr].astype(np.float64)
    e = ests[..., t * sr:(t + 1) * sr].astype(np.float64)
    silent = any(np.all(x.sum(axis=0) == 0) for x in list(r) + list(e))
    if silent:
      continue
    for j in range(refs.shape[0]):
      out[j, t] = 10 * np.log10(np.sum(r[j] ** 2) / np.sum((e[j] - r[j]) ** 2))
  return out


def test_usdr_matches_formula_and_edge_cases():
  rng = np.random.default_rng(0)
  s = rng.standard_normal((3, 2, 2, 500)).astype(np.float32)  # (tracks, S, C, N)
  s_hat = s + 0.1 * rng.standard_normal(s.shape).astype(np.float32)
  got = metrics.usdr(s, s_hat)
  assert got.shape == (3, 2)
  for i in range(3):
    for j in range(2):
      np.testing.assert_allclose(got[i, j], _usdr_formula(s[i, j], s_hat[i, j]),
                                 rtol=1e-12)
  # Perfect estimate: 10·log10((Σs² + eps) / eps), huge.
  perfect = metrics.usdr(s[0, 0], s[0, 0])
  np.testing.assert_allclose(
      perfect, 10 * np.log10((np.sum(s[0, 0].astype(np.float64) ** 2) + 1e-7)
                             / 1e-7), rtol=1e-12)
  assert perfect > 90
  # Silence against a signal: numerator == denominator, 0 dB.
  assert metrics.usdr(s[0, 0], np.zeros_like(s[0, 0])) == 0.0
  # Silence against silence: also 0 dB thanks to eps.
  assert metrics.usdr(np.zeros((2, 10)), np.zeros((2, 10))) == 0.0
  # A scaled estimate a·s: -20·log10|1 - a| (eps negligible).
  np.testing.assert_allclose(metrics.usdr(s[0, 0], 0.9 * s[0, 0]), 20.0,
                             atol=1e-5)


def test_csdr_frames_match_formula_with_silence_and_partial_second():
  rng = np.random.default_rng(1)
  n = 5 * SR + SR // 2  # 5.5 s: the half second at the end is not scored
  refs = rng.standard_normal((2, 2, n))
  ests = refs + 0.5 * rng.standard_normal((2, 2, n))
  ests[..., 5 * SR:] = 1e6  # would dominate frame 5 if it were scored
  refs[0, :, 1 * SR:2 * SR] = 0.0  # reference 0 silent in frame 1
  ests[1, :, 3 * SR:4 * SR] = 0.0  # estimate 1 silent in frame 3
  refs[1, 0, 4 * SR:5 * SR] = -refs[1, 1, 4 * SR:5 * SR]  # channel sum 0
  frames = metrics.csdr_frames(refs, ests, sample_rate=SR)
  want = _frame_sdr_formula(refs, ests, SR)
  assert frames.shape == (2, 5)
  np.testing.assert_array_equal(np.isnan(frames), np.isnan(want))
  assert np.all(np.isnan(frames[:, [1, 3, 4]]))  # all sources, any silence
  np.testing.assert_allclose(frames, want, rtol=1e-12)
  np.testing.assert_allclose(metrics.csdr(refs, ests, sample_rate=SR),
                             np.nanmedian(want, axis=-1), rtol=1e-12)


def test_csdr_identical_scaled_and_all_silent():
  rng = np.random.default_rng(2)
  refs = rng.standard_normal((2, 1, 3 * SR))
  assert np.all(metrics.csdr(refs, refs, sample_rate=SR) == np.inf)
  # ŝ = a·s in every frame: frame SDR = -20·log10|1 - a|.
  scaled = metrics.csdr(refs, np.stack([0.9 * refs[0], 2.0 * refs[1]]),
                        sample_rate=SR)
  np.testing.assert_allclose(scaled, [20.0, 0.0], atol=1e-9)
  silent = np.zeros_like(refs)
  assert np.all(np.isnan(metrics.csdr(refs, silent, sample_rate=SR)))
  # Overlapping frames, museval's framing: floor((N - win + hop) / hop).
  frames = metrics.csdr_frames(refs, 0.5 * refs, window=SR, hop=SR // 2)
  assert frames.shape == (2, 5)
  np.testing.assert_allclose(frames, 20 * np.log10(2.0), rtol=1e-12)
  # A NaN sample in one source's estimate makes that source NaN, as in usdr, instead of
  # being skipped like a silent frame.
  broken = 0.5 * refs.copy()
  broken[0, 0, 100] = np.nan
  result = metrics.csdr(refs, broken, sample_rate=SR)
  assert np.isnan(result[0]) and np.isclose(result[1], 20 * np.log10(2.0))
  assert np.isnan(metrics.usdr(refs[0], broken[0]))


def test_aggregate_and_errors():
  agg = metrics.aggregate([1.0, np.nan, 3.0, 8.0])
  assert agg == dict(median=3.0, mean=4.0, count=3)
  assert metrics.aggregate([np.nan])["count"] == 0
  with pytest.raises(ValueError, match="shapes differ"):
    metrics.usdr(np.zeros((2, 10)), np.zeros((2, 11)))
  with pytest.raises(ValueError, match="sources, channels, samples"):
    metrics.csdr(np.zeros((2, 10)), np.zeros((2, 10)))
  museval_layout = np.ones((2, 88200, 2))  # (sources, samples, channels)
  with pytest.raises(ValueError, match="88200 channels of 2 samples; transpose museval"):
    metrics.csdr(museval_layout, 0.5 * museval_layout)
  for fn in (metrics.usdr, metrics.csdr):
    with pytest.raises(ValueError, match="signals have no samples"):
      fn(np.zeros((2, 2, 0)), np.zeros((2, 2, 0)))


def test_csdr_matches_museval():
  try:
    museval = pytest.importorskip("museval")
  except RuntimeError as e:  # museval imports musdb, which wants ffmpeg
    pytest.skip(f"museval unusable here: {e}")
  rng = np.random.default_rng(3)
  sr = 44100
  refs = rng.standard_normal((2, 2, 2 * sr + 1000))  # partial third second
  ests = refs + rng.uniform(0.2, 1.0, (2, 1, 1)) * rng.standard_normal(
      refs.shape)
  refs[1, :, :sr] = 0.0  # a silent first frame
  ours = metrics.csdr_frames(refs, ests, sample_rate=sr)
  sdr, _, _, _ = museval.evaluate(np.swapaxes(refs, 1, 2),
                                  np.swapaxes(ests, 1, 2), win=sr, hop=sr)
  np.testing.assert_array_equal(np.isnan(ours), np.isnan(sdr))
  np.testing.assert_allclose(ours, sdr, rtol=1e-6)
