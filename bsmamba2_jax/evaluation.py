"""Evaluation on a MUSDB18-HQ-layout dataset: per-track cSDR/uSDR, aggregates, studies, reports.

Per track, the separator's stems (`Separator.stems`) are scored against the track's: a vocals
model's vocals and accompaniment (= mixture - vocals) against the true vocals and the true
accompaniment (drums + bass + other), a 4-stem model's four against the four sources. Scores
are `metrics.separation_scores`, as validation computes them (docs/metrics.md): cSDR (museval
v4, 1-s frames, the stems evaluated together, nanmedian over frames) and uSDR. The mixture-as-estimate baseline (SiSEC's "MIX": the
mixture given as the estimate of every stem) is scored alongside. Aggregates give median and
mean over tracks (the paper reports the median cSDR and the mean uSDR).

Sparse-vocal breakdown: a track's vocal activity is the fraction of its full 1-s frames whose
true-vocal RMS (over channels and samples) reaches ACTIVITY_THRESHOLD_DB dBFS; tracks are
bucketed by it (ACTIVITY_BINS).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from typing import Any, Iterable, Sequence

import numpy as np

from bsmamba2_jax import metrics, plots
from bsmamba2_jax.separator import RESIDUAL
from data_pipeline.musdb import SOURCES

STEMS = metrics.STEMS  # what a vocals model is scored on
ACTIVITY_THRESHOLD_DB = -40.0
ACTIVITY_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


def score_keys(stems: Sequence[str] = STEMS, prefix: str = "") -> tuple[str, ...]:
  """The score names of `stems`: <prefix><stem>_csdr, <prefix><stem>_usdr for each."""
  return tuple(f"{prefix}{stem}_{m}" for stem in stems for m in ("csdr", "usdr"))


SCORES = score_keys()
BASELINE_SCORES = score_keys(prefix="mix_")


def reference_stems(stems: Sequence[str], sources: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The true signal of each of `stems` from a track's `sources` {vocals, drums, bass, other}:
  a source itself, or the residual "accompaniment", the sum of the sources other than the
  model's one stem. ValueError for a name that is neither."""
  refs = {}
  for name in stems:
    if name in sources:
      refs[name] = sources[name]
    elif name == RESIDUAL and len(stems) == 2:
      own = next(s for s in stems if s != RESIDUAL)
      refs[name] = sum(x for s, x in sources.items() if s != own)
    else:
      raise ValueError(f"the model's stem {name!r} is not a MUSDB18 source ({', '.join(SOURCES)}) "
                       "and cannot be scored")
  return refs


def vocal_activity(vocals: np.ndarray, sample_rate: int = 44100,
                   threshold_db: float = ACTIVITY_THRESHOLD_DB) -> float:
  """Fraction of full 1-s frames of vocals (C, N) whose RMS reaches `threshold_db` dBFS; a
  track shorter than a second is one frame, as cSDR frames it."""
  n = vocals.shape[-1]
  if n == 0:
    return float("nan")
  width = min(sample_rate, n)
  frames = n // width
  x = np.asarray(vocals[:, :frames * width], np.float64)
  x = x.reshape(x.shape[0], frames, width).transpose(1, 0, 2).reshape(frames, -1)
  rms = np.sqrt(np.mean(x**2, axis=1))
  return float(np.mean(rms >= 10 ** (threshold_db / 20)))


# A MUSDB18-HQ mixture is the sum of its stems up to their 16-bit rounding (far below this);
# above it, the folder holds another mix (mastered, or of other stems).
MIXTURE_RESIDUAL_DB = -30.0


def _energy_ratio_db(part: np.ndarray, whole: np.ndarray) -> float:
  """10·log10(Σ part² / Σ whole²), -inf for a zero part (and for a silent whole, unless the
  part is not silent: +inf)."""
  num, den = float(np.sum(np.square(part, dtype=np.float64))), float(
      np.sum(np.square(whole, dtype=np.float64)))
  if num == 0:
    return -np.inf
  return np.inf if den == 0 else 10 * np.log10(num / den)


def evaluate_track(separator, track) -> dict[str, Any]:
  """Separates one track with `separator.separate(audio, rate)` and scores its
  `separator.stems` (one CSV row)."""
  sample_rate = track.sample_rate
  names = tuple(getattr(separator, "stems", STEMS))
  # Track.read refuses non-finite samples (MusdbError, a ValueError naming the file).
  mixture = track.read_all("mixture")
  sources = {s: track.read_all(s) for s in SOURCES}
  vocals = sources["vocals"]
  references = reference_stems(names, sources)
  residual_db = _energy_ratio_db(mixture - sum(sources.values()), mixture)
  if residual_db > MIXTURE_RESIDUAL_DB:  # then mixture - vocals is no accompaniment
    logging.warning("%s: not the sum of the four stems (residual %.1f dB of the mixture); its "
                    "accompaniment and mixture scores compare unlike signals",
                    track.file("mixture"), residual_db)
  start = time.perf_counter()
  estimates = separator.separate(mixture, sample_rate)
  wall = time.perf_counter() - start
  for stem in names:
    if not np.isfinite(estimates[stem]).all():
      raise ValueError(f"{track.name}: the separated {stem} have non-finite samples (NaN or "
                       "Inf); the model's weights or settings are broken")
  row = dict(track=track.name, seconds=mixture.shape[-1] / sample_rate,
             vocal_activity=vocal_activity(vocals, sample_rate), wall_s=wall)
  row.update(metrics.separation_scores(references, estimates, sample_rate, names))
  baseline = metrics.separation_scores(references, {s: mixture for s in names}, sample_rate,
                                       names)
  row.update({f"mix_{k}": v for k, v in baseline.items()})
  return row


def aggregate_rows(rows: Sequence[dict], keys: Iterable[str]) -> dict[str, dict]:
  """{key: metrics.aggregate(values over rows)}: median, mean and count of each score."""
  return {k: {n: float(v) for n, v in metrics.aggregate(np.array([r[k] for r in rows])).items()}
          for k in keys}


def sparse_breakdown(rows: Sequence[dict], bins: Sequence[float] = ACTIVITY_BINS,
                     keys: Sequence[str] = SCORES) -> list[dict]:
  """The scores `keys` aggregated per vocal-activity bucket [lo, hi) (the last bucket includes
  hi)."""
  out = []
  for i, (lo, hi) in enumerate(zip(bins[:-1], bins[1:])):
    last = i == len(bins) - 2
    members = [r for r in rows if lo <= r["vocal_activity"] < hi
               or (last and r["vocal_activity"] == hi)]
    entry = dict(activity=f"[{lo:.2f}, {hi:.2f}{']' if last else ')'}", tracks=len(members))
    if members:
      for key, agg in aggregate_rows(members, keys).items():
        entry[f"{key}_median"], entry[f"{key}_mean"] = agg["median"], agg["mean"]
    out.append(entry)
  return out


def evaluate(separator, data_dir: str, split: str = "test", *, progress: bool = True,
             max_tracks: int | None = None) -> dict[str, Any]:
  """Evaluates `separator` on the `split` tracks of the MUSDB18-HQ-layout `data_dir`.

  Returns {"stems": the scored stems, "tracks": per-track rows, "aggregate": median/mean/count
  per score,
  "baseline": the same for the mixture-as-estimate, "sparse": the vocal-activity breakdown,
  "failed": [{"track", "error"}] of tracks that could not be scored (logged, left out),
  "undefined": [{"track", "scores"}] of scored tracks with a NaN score (logged, listed)}.
  The split is listed first: a track folder with a missing or unreadable stem header raises
  `data_pipeline.musdb.MusdbError` naming the file before anything is separated (a score over
  an incomplete test set would not be comparable); "failed" holds the tracks that fail later,
  while their audio is read, separated or scored.
  """
  from tqdm import tqdm

  from data_pipeline.musdb import MusdbDataset

  if max_tracks is not None and max_tracks < 1:
    raise ValueError(f"max_tracks must be >= 1, got {max_tracks}")
  tracks = list(MusdbDataset(data_dir).tracks(split))[:max_tracks]
  if not tracks:
    raise ValueError(f"{data_dir}: no tracks in split {split!r}")
  rows, failed = [], []
  for track in tqdm(tracks, desc=f"evaluate {split}", disable=not progress):
    try:
      rows.append(evaluate_track(separator, track))
    except (ValueError, OSError) as e:
      error = str(e) if track.path in str(e) else f"{track.path}: {e}"
      logging.error("%s (track left out)", error)
      failed.append(dict(track=track.name, error=error))
  if not rows:
    raise ValueError(f"{data_dir}: no track of split {split!r} could be scored; the first: "
                     f"{failed[0]['error']}")
  stems = tuple(getattr(separator, "stems", STEMS))
  keys = score_keys(stems)
  undefined = [dict(track=r["track"], scores=", ".join(k for k in keys if np.isnan(r[k])))
               for r in rows if any(np.isnan(r[k]) for k in keys)]
  if undefined:
    logging.warning("%d track(s) with an undefined (NaN) score, left out of that score's "
                    "aggregate (a stem silent in every frame?): %s", len(undefined),
                    ", ".join(u["track"] for u in undefined))
  return dict(stems=list(stems), tracks=rows, aggregate=aggregate_rows(rows, keys),
              baseline=aggregate_rows(rows, score_keys(stems, "mix_")),
              sparse=sparse_breakdown(rows, keys=keys), failed=failed, undefined=undefined)


def segment_study(make_separator, segments: Sequence[float], data_dir: str,
                  split: str = "test", *, progress: bool = True,
                  max_tracks: int | None = None) -> list[dict]:
  """The input-length study: `make_separator(segment)` evaluated per segment length (s).

  Returns one row per segment: the segment and median/mean of every score over tracks.
  """
  out = []
  for segment in segments:
    result = evaluate(make_separator(segment), data_dir, split, progress=progress,
                      max_tracks=max_tracks)
    row = dict(segment=float(segment))
    for key, agg in result["aggregate"].items():
      row[f"{key}_median"], row[f"{key}_mean"] = agg["median"], agg["mean"]
    out.append(row)
  return out


def markdown_table(results: dict[str, Any]) -> str:
  """The aggregate table: median and mean over tracks of each score, model and baseline."""
  lines = ["| estimate | stem | cSDR median | cSDR mean | uSDR median | uSDR mean | tracks "
           "(cSDR / uSDR) |", "|---|---|---|---|---|---|---|"]
  for name, key, prefix in (("model", "aggregate", ""), ("mixture", "baseline", "mix_")):
    for stem in results.get("stems", STEMS):
      c, u = results[key][f"{prefix}{stem}_csdr"], results[key][f"{prefix}{stem}_usdr"]
      lines.append(f"| {name} | {stem} | {c['median']:.3f} | {c['mean']:.3f} | "
                   f"{u['median']:.3f} | {u['mean']:.3f} | {c['count']:.0f} / "
                   f"{u['count']:.0f} |")
  return "\n".join(lines)


def _table(rows: Sequence[dict], keys: Sequence[str]) -> str:
  fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
  return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                   + ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows])


def markdown_report(results: dict[str, Any], study: Sequence[dict] | None = None) -> str:
  """The aggregate table, the sparse-vocal breakdown and the segment study as markdown."""
  stems = results.get("stems", STEMS)
  text = ["## Aggregate (over tracks)", markdown_table(results),
          f"\n## Vocal activity (1-s frames with vocal RMS >= {ACTIVITY_THRESHOLD_DB:g} dBFS)",
          _table(results["sparse"], ["activity", "tracks"] + [
              f"{stem}_{m}" for stem in stems for m in ("csdr_median", "usdr_mean")])]
  if study:
    text += ["\n## Segment length (no overlap)",
             _table(study, ["segment"] + [f"{stem}_{m}" for stem in stems
                                          for m in ("csdr_median", "csdr_mean", "usdr_median",
                                                    "usdr_mean")])]
  if results.get("failed"):
    text += ["\n## Tracks left out (could not be scored)", _table(results["failed"],
                                                                   ["track", "error"])]
  if results.get("undefined"):
    text += ["\n## Undefined scores (a reference silent in every frame; left out of their "
             "aggregate)", _table(results["undefined"], ["track", "scores"])]
  return "\n".join(text)


def _write_csv(path: str, rows: Sequence[dict]):
  # Track names that are not UTF-8 (musdb.Track keeps them as os.fsdecode gives them) are
  # written back as their original bytes.
  with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
    fields = list(dict.fromkeys(k for r in rows for k in r))  # empty buckets lack scores
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)


OUTPUT_FILES = ("per_track.csv", "results.json", "results.md", "per_track.png",
                "sparse_vocals.csv", "segment_study.csv", "sdr_vs_segment.png")


def existing_reports(output_dir: str, overwrite: bool) -> list[str]:
  """The report files (OUTPUT_FILES) already in `output_dir`; FileExistsError if there are any
  and not `overwrite`."""
  existing = [f for f in OUTPUT_FILES if os.path.exists(os.path.join(output_dir, f))]
  if existing and not overwrite:
    raise FileExistsError(f"{output_dir}: already holds {', '.join(existing)}; pass "
                          "--overwrite or another --output_dir")
  return existing


def write_results(output_dir: str, results: dict[str, Any], study: Sequence[dict] | None = None,
                  *, overwrite: bool = False) -> list[str]:
  """Writes CSV, JSON, markdown and PNG reports into `output_dir`; returns their paths.

  Refuses to replace earlier reports there unless `overwrite`.
  """
  existing = existing_reports(output_dir, overwrite)
  os.makedirs(output_dir, exist_ok=True)
  path = lambda name: os.path.join(output_dir, name)
  _write_csv(path("per_track.csv"), results["tracks"])
  _write_csv(path("sparse_vocals.csv"), results["sparse"])
  stems = results.get("stems", STEMS)
  plots.per_track_scores(path("per_track.png"), results["tracks"], score_keys(stems))
  written = ["per_track.csv", "sparse_vocals.csv", "per_track.png"]
  if study:
    _write_csv(path("segment_study.csv"), study)
    plots.segment_study(path("sdr_vs_segment.png"), study,
                        [s for s in stems if s != RESIDUAL])
    written += ["segment_study.csv", "sdr_vs_segment.png"]
  with open(path("results.json"), "w") as f:
    json.dump(strict_json(dict(results, segment_study=list(study or []))), f, indent=1,
              allow_nan=False)
  with open(path("results.md"), "w", encoding="utf-8", errors="surrogateescape") as f:
    f.write("# Evaluation\n\n" + markdown_report(results, study) + "\n")
  written += ["results.json", "results.md"]
  for stale in set(existing) - set(written):  # e.g. an earlier run's segment study
    os.remove(path(stale))
  return [path(f) for f in written]


def strict_json(value: Any) -> Any:
  """`value` with every non-finite float (an undefined score) as None, so results.json is
  standard JSON (json.dump would write NaN, which strict parsers refuse)."""
  if isinstance(value, dict):
    return {k: strict_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict_json(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def run(checkpoint: str, data_dir: str, split: str = "test", output_dir: str = "evaluation",
        *, segment: float = 8.0, overlap: float = 0.0, batch_size: int = 1,
        segments: Sequence[float] = (), max_tracks: int | None = None, overwrite: bool = False,
        progress: bool = True) -> tuple[dict, list[dict], list[str]]:
  """Evaluates a checkpoint (main setting + optional segment study) and writes the reports.

  Returns (results, segment study rows, written paths).
  """
  from bsmamba2_jax import exports  # pylint: disable=g-import-not-at-top
  from bsmamba2_jax.separator import Separator  # pylint: disable=g-import-not-at-top
  from data_pipeline.musdb import split_folder_holding  # pylint: disable=g-import-not-at-top

  # Everything that can be checked before the long run is (the output folder again on writing).
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise FileExistsError(f"{output_dir}: exists and is not a folder; choose another "
                          "--output_dir")
  inside = split_folder_holding(data_dir, output_dir)
  if inside:
    raise ValueError(f"{output_dir}: the output folder lies inside the dataset's {inside}, "
                     "where it would be listed as a track; choose another --output_dir")
  parent = os.path.abspath(output_dir)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise PermissionError(f"{output_dir}: cannot be written ({parent} is not a writable "
                          "folder); choose another --output_dir")
  existing_reports(output_dir, overwrite)  # refused before the long run, not after it
  model, params = exports.load_model(checkpoint)
  separators = {}

  def make(seg, ov):  # one compiled separator per chunk shape
    if (seg, ov) not in separators:
      separators[seg, ov] = Separator.from_model(model, params, segment=seg, overlap=ov,
                                                 batch_size=batch_size)
    return separators[seg, ov]

  for seg in segments:  # bad study lengths fail now: a Separator checks its settings
    make(seg, 0.0)

  results = evaluate(make(segment, overlap), data_dir, split, progress=progress,
                     max_tracks=max_tracks)
  study = segment_study(lambda seg: make(seg, 0.0), segments, data_dir, split,
                        progress=progress, max_tracks=max_tracks)
  return results, study, write_results(output_dir, results, study, overwrite=overwrite)
