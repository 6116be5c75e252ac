"""Salient-segment index (docs/training.md §2): which windows of which track carry each stem.

Rule, per stem and track: windows of `segment` samples every `hop` samples (those that fit
entirely); each window is split into 10 equal chunks; per channel, chunk RMS
`sqrt(mean(x²))`, threshold = max(0.15-quantile of the 10 chunk RMS values (linear
interpolation, as numpy/torch `quantile`), 1e-3); the window is salient if more than half of its
chunks exceed the threshold, on every channel.

The index is computed once per dataset split and cached as JSON in `<root>/.salient_cache/`,
keyed by the parameters and the size and mtime of every stem file, so it is recomputed when a
file changes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np

from bsmamba2_jax import atomic
from data_pipeline import musdb

CACHE_DIR = ".salient_cache"
NUM_CHUNKS = 10
QUANTILE = 0.15
FLOOR = 1e-3


def salient_mask(windows: np.ndarray, *, num_chunks: int = NUM_CHUNKS,
                 quantile: float = QUANTILE, floor: float = FLOOR) -> np.ndarray:
  """The salient test (docs/training.md §2): windows (..., channels, segment) → bool (...)."""
  segment = windows.shape[-1]
  if segment % num_chunks:
    raise ValueError(f"segment of {segment} samples does not split into {num_chunks} chunks")
  chunks = windows.reshape(*windows.shape[:-1], num_chunks, segment // num_chunks)
  rms = np.sqrt(np.mean(np.square(chunks, dtype=np.float64), axis=-1))  # (..., C, chunks)
  threshold = np.maximum(np.quantile(rms, quantile, axis=-1, keepdims=True), floor)
  active = np.sum(rms > threshold, axis=-1) > num_chunks / 2  # (..., C)
  return np.all(active, axis=-1)


def salient_starts(audio: np.ndarray, segment: int, hop: int, **rule) -> list[int]:
  """Start samples of the salient windows of `audio` (channels, samples)."""
  starts = range(0, audio.shape[-1] - segment + 1, hop)
  return [s for s in starts if salient_mask(audio[:, s:s + segment], **rule)]


def _cache_key(tracks: list[musdb.Track], stems: tuple[str, ...], params: dict) -> str:
  files = []
  for track in tracks:
    for stem in stems:
      stat = os.stat(track.file(stem))
      files.append([track.name, stem, stat.st_size, stat.st_mtime_ns])
  blob = json.dumps(dict(params=params, files=files), sort_keys=True)
  return hashlib.sha1(blob.encode()).hexdigest()[:20]


def salient_index(dataset: musdb.MusdbDataset, split: str = "train",
                  segment_seconds: float = 8.0, hop_seconds: float = 4.0, *,
                  stems: tuple[str, ...] = musdb.SOURCES,
                  cache: bool = True) -> dict[str, list[tuple[int, int]]]:
  """Per stem, the salient windows of `dataset.tracks(split)` as [(track index, start sample)].

  A track without a salient window for a stem contributes nothing to that stem; a stem without
  any salient window in the whole split raises ValueError.
  """
  tracks = dataset.tracks(split)
  segment = int(round(segment_seconds * musdb.SAMPLE_RATE))
  hop = int(round(hop_seconds * musdb.SAMPLE_RATE))
  if segment <= 0 or hop <= 0:
    raise ValueError(f"segment_seconds and hop_seconds must be positive, got "
                     f"{segment_seconds}, {hop_seconds}")
  if segment % NUM_CHUNKS:
    chunk_ms = 1000 * NUM_CHUNKS / musdb.SAMPLE_RATE
    raise ValueError(f"segment_seconds={segment_seconds:g} is {segment} samples, which the "
                     f"salient-segment test cannot cut into {NUM_CHUNKS} equal chunks; use a "
                     f"multiple of {NUM_CHUNKS} samples ({chunk_ms:.3f} ms), e.g. 8 s")
  params = dict(split=split, segment=segment, hop=hop, num_chunks=NUM_CHUNKS, quantile=QUANTILE,
                floor=FLOOR, stems=list(stems))
  key = _cache_key(tracks, stems, params)
  cache_dir = os.path.join(dataset.root, CACHE_DIR)
  cache_file = os.path.join(cache_dir, f"{split}-{key}.json")

  index = _read_cache(cache_file, stems, [t.num_samples - segment for t in tracks]) if cache \
      else None
  if index is None:
    index = {stem: [] for stem in stems}
    for i, track in enumerate(tracks):
      for stem in stems:
        index[stem] += [(i, s) for s in salient_starts(track.read_all(stem), segment, hop)]
    if cache:
      _write_cache(cache_dir, cache_file, split, params, index)

  for stem in stems:
    if not index[stem]:
      raise ValueError(f"{dataset.root}: no salient {segment_seconds:g}-s window of '{stem}' in "
                       f"any of the {len(tracks)} '{split}' tracks (tracks too short or silent?)")
  return index


def _read_cache(cache_file: str, stems: tuple[str, ...],
                last_starts: list[int]) -> dict[str, list[tuple[int, int]]] | None:
  """The cached index, or None when there is none or it is damaged (a warning, then rebuilt).
  `last_starts[i]`: the last start of a whole window in track i."""
  if not os.path.isfile(cache_file):
    return None
  try:
    with open(cache_file) as f:
      cached = json.load(f)["index"]
    index = {stem: [(int(i), int(start)) for i, start in cached[stem]] for stem in stems}
    if all(0 <= i < len(last_starts) and 0 <= start <= last_starts[i]
           for entries in index.values() for i, start in entries):
      return index
    problem = "entries outside the split's tracks"
  except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
    problem = f"{type(e).__name__}: {e}"
  logging.warning("%s: damaged salient-segment cache (%s); rebuilding it", cache_file, problem)
  return None


def _write_cache(cache_dir: str, cache_file: str, split: str, params: dict, index: dict) -> None:
  """Writes the index atomically and removes this split's stale cache files; a write that fails
  (a full disk) leaves no partial file behind."""
  try:
    os.makedirs(cache_dir, exist_ok=True)
    for name in os.listdir(cache_dir):
      if name.startswith(f"{split}-") and name.endswith(".json"):
        os.remove(os.path.join(cache_dir, name))
    atomic.write_json(cache_file, dict(params=params, index=index), indent=None)
  except OSError as e:  # a read-only dataset still works, just without the cache
    logging.warning("%s: cannot write the salient-segment cache (%s)", cache_dir, e)
