"""Random cross-track mixing (docs/training.md §3) and aligned validation windows.

Training example: each of vocals/drums/bass/other comes from an independently drawn salient
window of an independently drawn track; each is zeroed with probability `p_zero` (0.1),
otherwise scaled by a gain ~ U(0.5, 1.5); optional channel swap and polarity flip (off by
default, not in the official recipe); mixture = sum, target = the augmented vocals.
`mono=True` averages the channels of both (the mixture's mean is the sum of the stems' means).

A draw (`draw_mix`) and its rendering (`render_mix`) are separate so that the drawn values can be
inspected; `random_mix` does both.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline import musdb


@dataclasses.dataclass(frozen=True)
class MixConfig:
  """Augmentation settings of the random mix (defaults: the official recipe)."""
  p_zero: float = 0.1
  gain_low: float = 0.5
  gain_high: float = 1.5
  channel_swap: bool = False
  polarity_flip: bool = False


@dataclasses.dataclass(frozen=True)
class StemDraw:
  """Where one stem of a random mix comes from and how it is altered (gain 0: zeroed)."""
  track: int
  start: int
  gain: float
  swap: bool
  flip: bool


def draw_mix(index: dict[str, list[tuple[int, int]]], rng: np.random.Generator,
             config: MixConfig = MixConfig()) -> dict[str, StemDraw]:
  """Draws one random mix from a salient index (`salient.salient_index`): {stem: StemDraw}.

  Every value is drawn whether used or not, so the stream of draws has a fixed shape.
  """
  draws = {}
  for stem in musdb.SOURCES:
    track, start = index[stem][int(rng.integers(len(index[stem])))]
    zero = rng.random() < config.p_zero
    gain = float(rng.uniform(config.gain_low, config.gain_high))
    swap, flip = rng.random() < 0.5, rng.random() < 0.5
    draws[stem] = StemDraw(track=int(track), start=int(start), gain=0.0 if zero else gain,
                           swap=config.channel_swap and swap,
                           flip=config.polarity_flip and flip)
  return draws


def _stereo(x: np.ndarray) -> np.ndarray:
  """(1 or 2, N) → (2, N)."""
  return np.repeat(x, 2, axis=0) if x.shape[0] == 1 else x


def render_mix(tracks: list[musdb.Track], draws: dict[str, StemDraw], segment: int, *,
               mono: bool = False) -> dict[str, np.ndarray]:
  """Reads and sums the drawn stems: {"mixture", "vocals"} float32 (C, segment), C = 1 if mono
  else 2."""
  stems = {}
  for stem, draw in draws.items():
    if draw.gain == 0.0:
      stems[stem] = np.zeros((2, segment), np.float32)
      continue
    x = _stereo(tracks[draw.track].read(stem, draw.start, segment))
    if draw.swap:
      x = x[::-1]
    stems[stem] = x * np.float32(-draw.gain if draw.flip else draw.gain)
  mixture = stems["vocals"] + stems["drums"] + stems["bass"] + stems["other"]
  vocals = stems["vocals"]
  if mono:
    mixture, vocals = mixture.mean(axis=0, keepdims=True), vocals.mean(axis=0, keepdims=True)
  return dict(mixture=np.ascontiguousarray(mixture), vocals=np.ascontiguousarray(vocals))


def random_mix(tracks: list[musdb.Track], index: dict[str, list[tuple[int, int]]],
               rng: np.random.Generator, segment: int, *, mono: bool = False,
               config: MixConfig = MixConfig()) -> dict[str, np.ndarray]:
  """One training example: {"mixture", "vocals"} float32 (C, segment)."""
  return render_mix(tracks, draw_mix(index, rng, config), segment, mono=mono)


def validation_windows(tracks: list[musdb.Track], segment: int) -> list[tuple[int, int]]:
  """Aligned, non-overlapping windows [(track index, start)] covering each track; a trailing
  part shorter than `segment` is left out (a track shorter than one segment gives none)."""
  return [(i, start) for i, track in enumerate(tracks)
          for start in range(0, track.num_samples - segment + 1, segment)]


def validation_example(track: musdb.Track, start: int, segment: int, *,
                       mono: bool = False) -> dict[str, np.ndarray]:
  """The unaugmented window: {"mixture" (from mixture.wav), "vocals"} float32 (C, segment)."""
  out = {stem: _stereo(track.read(stem, start, segment)) for stem in ("mixture", "vocals")}
  if mono:
    out = {stem: x.mean(axis=0, keepdims=True) for stem, x in out.items()}
  return out
