"""The figures of reports: per-track scores, the segment study, model comparisons, training
curves, spectrograms.

matplotlib (Agg, no display) is imported only when a figure is drawn, so nothing else pays for
it. Each function writes one PNG to `path`.
"""
from __future__ import annotations

import csv
from typing import Sequence

import numpy as np


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: str, dpi: int) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  _pyplot().close(fig)


def per_track_scores(path: str, rows: Sequence[dict], keys: Sequence[str]) -> None:
  """Grouped bars of the scores `keys` (dB) of every evaluated track (`rows`, with "track")."""
  plt = _pyplot()
  names = [r["track"].encode("utf-8", "backslashreplace").decode() for r in rows]
  x = np.arange(len(rows))
  width = 0.8 / len(keys)
  fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows) + 2), 4))
  for i, key in enumerate(keys):
    ax.bar(x + (i - (len(keys) - 1) / 2) * width, [r[key] for r in rows], width, label=key)
  ax.set_xticks(x, names, rotation=90, fontsize=7)
  ax.set(ylabel="SDR (dB)", title="Per-track scores")
  ax.legend(fontsize=7)
  _save(fig, path, 120)


def segment_study(path: str, study: Sequence[dict], stems: Sequence[str] = ("vocals",)) -> None:
  """cSDR (median) and uSDR (mean) of each of `stems` against the segment length of the
  input-length study."""
  plt = _pyplot()
  seg = [r["segment"] for r in study]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for stem in stems:
    ax.plot(seg, [r[f"{stem}_csdr_median"] for r in study], "o-", label=f"{stem} cSDR (median)")
    ax.plot(seg, [r[f"{stem}_usdr_mean"] for r in study], "s--", label=f"{stem} uSDR (mean)")
  ax.set_xscale("log", base=2)
  ax.set_xticks(seg, [f"{s:g}" for s in seg])
  ax.set(xlabel="segment length (s), no overlap", ylabel="SDR (dB)")
  ax.legend(fontsize="small")
  _save(fig, path, 120)


def model_comparison(path: str, arms: Sequence[dict]) -> None:
  """Two panels for models compared on equal terms (`comparison.ArmResult` as dicts): vocals
  cSDR (median) and uSDR (mean) against the chunk length, and vocals cSDR by vocal activity."""
  plt = _pyplot()
  fig, (by_length, by_activity) = plt.subplots(1, 2, figsize=(10, 3.8))
  for i, arm in enumerate(arms):
    seg = [r["segment"] for r in arm["segment_study"]]
    line, = by_length.plot(seg, [r["vocals_csdr_median"] for r in arm["segment_study"]], "o-",
                           label=f"{arm['name']} cSDR (median)")
    by_length.plot(seg, [r["vocals_usdr_mean"] for r in arm["segment_study"]], "s--",
                   color=line.get_color(), label=f"{arm['name']} uSDR (mean)")
    buckets = [r for r in arm["sparse"] if r["tracks"]]
    x = np.arange(len(buckets))
    width = 0.8 / len(arms)
    by_activity.bar(x + (i - (len(arms) - 1) / 2) * width,
                    [r["vocals_csdr_median"] for r in buckets], width, color=line.get_color(),
                    label=arm["name"])
    by_activity.set_xticks(x, [f"{r['activity']}\n({r['tracks']} tracks)" for r in buckets],
                           fontsize=7)
  by_length.set_xscale("log", base=2)
  by_length.set_xticks(seg, [f"{s:g}" for s in seg])
  by_length.set(xlabel="chunk length (s), no overlap", ylabel="SDR (dB)",
                title="By input length")
  by_length.legend(fontsize=7)
  by_activity.set(xlabel="vocal activity (share of 1-s frames)", ylabel="vocals cSDR (dB)",
                  title="By vocal activity (8-s chunks)")
  by_activity.legend(fontsize=7)
  _save(fig, path, 120)


def training_curves(metrics_csv: str, path: str) -> None:
  """Training loss and validation uSDR (model, mixture) against the step, from metrics.csv."""
  plt = _pyplot()
  with open(metrics_csv, newline="") as f:
    rows = list(csv.DictReader(f))
  series = lambda key: np.array([(float(r["step"]), float(r[key])) for r in rows if r.get(key)]
                                ).reshape(-1, 2).T
  fig, (ax_loss, ax_sdr) = plt.subplots(1, 2, figsize=(10, 3.6))
  step, loss = series("loss")
  ax_loss.plot(step, loss, lw=0.8)
  ax_loss.set(xlabel="step", ylabel="training loss", yscale="log", title="Training loss")
  step, usdr = series("valid_usdr")
  ax_sdr.plot(step, usdr, "o-", label="model (EMA weights)")
  step, base = series("valid_input_usdr")
  ax_sdr.plot(step, base, "--", color="gray", label="mixture (do nothing)")
  ax_sdr.set(xlabel="step", ylabel="vocals uSDR (dB)", title="Validation")
  ax_sdr.legend()
  _save(fig, path, 110)


def spectrograms(panels: Sequence[tuple[str, str]], path: str, *, n_fft: int = 2048,
                 hop: int = 441, max_khz: float = 8.0) -> None:
  """Log-magnitude spectrograms (80 dB range) of the audio files of `panels` [(title, file)],
  one above the other, channels averaged."""
  import soundfile as sf  # pylint: disable=g-import-not-at-top

  from bsmamba2_jax import stft  # pylint: disable=g-import-not-at-top
  plt = _pyplot()
  fig, axes = plt.subplots(len(panels), 1, figsize=(10, 8), sharex=True, squeeze=False)
  for ax, (title, wav) in zip(axes[:, 0], panels):
    data, rate = sf.read(wav, dtype="float32", always_2d=True)
    mono = data.mean(axis=1)[None, None]
    spec = np.abs(np.asarray(stft.stft(mono, n_fft, hop)))[0, 0]
    db = 20 * np.log10(spec + 1e-5)
    extent = (0, len(mono[0, 0]) / rate, 0, rate / 2000)
    ax.imshow(db, origin="lower", aspect="auto", extent=extent, vmin=db.max() - 80,
              vmax=db.max(), cmap="magma")
    ax.set(ylabel="kHz", ylim=(0, max_khz), title=title)
  axes[-1, 0].set_xlabel("time (s)")
  _save(fig, path, 110)
