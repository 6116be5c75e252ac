"""Evaluation metrics uSDR and cSDR (docs/metrics.md), float64 NumPy.

* uSDR (MDX21 "new SDR"): `10·log10((Σ s² + eps) / (Σ (s − ŝ)² + eps))` over all
  channels and samples of a track.
* cSDR (SiSEC18, museval BSS-Eval v4 with window = hop = 1 s): per frame
  `10·log10(Σ s² / Σ (ŝ − s)²)` (+inf when the estimate is exact), which is what
  v4's image-mode SDR reduces to; nanmedian over frames per source.
  Framing follows museval: `floor((N − window + hop) / hop)` frames, so a
  trailing partial frame is not scored (a signal shorter than one window is
  one frame). A frame is NaN for all sources when any reference or any
  estimate of the evaluated set is silent in it, silent meaning (as in
  museval) that its channel sum is exactly 0 at every sample of the frame.

Arrays are (..., channels, samples) for uSDR and (sources, channels, samples)
for cSDR; museval's (sources, samples, channels) layout is not used here.
`separation_scores` is the one scoring of a separated track, used by validation
and by test-set evaluation alike.
"""

import warnings
from typing import Sequence

import numpy as np


def _pair(fn, reference, estimate, ndim=None):
  reference = np.asarray(reference, np.float64)
  estimate = np.asarray(estimate, np.float64)
  if reference.shape != estimate.shape:
    raise ValueError(f"metrics.{fn}: reference and estimate shapes differ: "
                     f"{reference.shape} vs {estimate.shape}.")
  if ndim is not None and reference.ndim != ndim:
    raise ValueError(f"metrics.{fn}: expects (sources, channels, samples), got "
                     f"shape {reference.shape}.")
  if reference.ndim < 2:
    raise ValueError(f"metrics.{fn}: expects (..., channels, samples), got "
                     f"shape {reference.shape}.")
  if reference.shape[-1] == 0:
    raise ValueError(f"metrics.{fn}: signals have no samples (shape {reference.shape}).")
  if reference.shape[-2] > reference.shape[-1]:
    raise ValueError(f"metrics.{fn}: expects (..., channels, samples), got {reference.shape[-2]} "
                     f"channels of {reference.shape[-1]} samples; transpose museval's "
                     "(..., samples, channels) layout.")
  return reference, estimate


def usdr(reference, estimate, eps: float = 1e-7) -> np.ndarray:
  """uSDR in dB: (..., C, N) x2 -> (...) float64."""
  s, s_hat = _pair("usdr", reference, estimate)
  num = np.sum(s ** 2, axis=(-2, -1)) + eps
  den = np.sum((s - s_hat) ** 2, axis=(-2, -1)) + eps
  return 10.0 * np.log10(num / den)


def _frames(x: np.ndarray, window: int, hop: int) -> np.ndarray:
  """museval framing: (S, C, N) -> (S, C, frames, window') as a view."""
  n = x.shape[-1]
  if window >= n:
    return x[..., None, :]
  n_frames = (n - window + hop) // hop
  view = np.lib.stride_tricks.sliding_window_view(x, window, axis=-1)
  return view[..., ::hop, :][..., :n_frames, :]


def csdr_frames(references, estimates, sample_rate: int = 44100,
                window=None, hop=None) -> np.ndarray:
  """Frame SDRs in dB: (S, C, N) x2 -> (S, frames) float64, NaN if silent."""
  s, s_hat = _pair("csdr_frames", references, estimates, ndim=3)
  window = int(sample_rate if window is None else window)
  hop = int(window if hop is None else hop)
  if window < 1 or hop < 1:
    raise ValueError(f"metrics.csdr_frames: window and hop must be >= 1, got "
                     f"{window}, {hop}.")
  ref = _frames(s, window, hop)
  est = _frames(s_hat, window, hop)
  num = np.sum(ref ** 2, axis=(1, 3))  # (S, frames)
  den = np.sum((est - ref) ** 2, axis=(1, 3))
  silent = lambda x: np.any(np.all(np.sum(x, axis=1) == 0, axis=-1), axis=0)
  skip = silent(ref) | silent(est)  # (frames,)
  with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 in silent frames: skipped below
    sdr = 10.0 * np.log10(num / den)
  sdr[:, skip] = np.nan
  return sdr


def csdr(references, estimates, sample_rate: int = 44100, window=None,
         hop=None) -> np.ndarray:
  """cSDR in dB: (S, C, N) x2 -> (S,) nanmedian over frames (NaN if none).

  The nanmedian skips the silent frames only: a source with any non-finite sample in its
  reference or estimate scores NaN, as `usdr` does, rather than the median of its finite frames.
  """
  frames = csdr_frames(references, estimates, sample_rate, window, hop)
  finite = np.isfinite(np.asarray(references, np.float64)) & np.isfinite(
      np.asarray(estimates, np.float64))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN source -> NaN
    result = np.nanmedian(frames, axis=-1)
  result[~np.all(finite, axis=(1, 2))] = np.nan
  return result


STEMS = ("vocals", "accompaniment")


def separation_scores(references: dict, estimates: dict, sample_rate: int = 44100,
                      stems: Sequence[str] = STEMS) -> dict[str, float]:
  """{stem}_csdr and {stem}_usdr (dB) of the (C, N) `estimates` of every stem of `stems`
  against the `references`, cSDR evaluating the stems together as one set (museval refuses a
  single estimate: a one-stem model is scored with its residual, e.g. vocals and
  accompaniment)."""
  refs = np.stack([references[s] for s in stems])
  ests = np.stack([estimates[s] for s in stems])
  scores = dict(csdr=csdr(refs, ests, sample_rate=sample_rate), usdr=usdr(refs, ests))
  return {f"{stem}_{name}": float(scores[name][i]) for i, stem in enumerate(stems)
          for name in ("csdr", "usdr")}


def aggregate(values) -> dict:
  """Median, mean and count over tracks, ignoring NaN: (tracks,) -> dict."""
  values = np.asarray(values, np.float64).ravel()
  values = values[~np.isnan(values)]
  if values.size == 0:
    return dict(median=float("nan"), mean=float("nan"), count=0)
  return dict(median=float(np.median(values)), mean=float(np.mean(values)),
              count=int(values.size))
