"""Random cross-track mixing (docs/training.md §3) and aligned validation windows.

Training example: each of vocals/drums/bass/other comes from an independently drawn salient
window of an independently drawn track; each is zeroed with probability `p_zero` (0.1),
otherwise scaled by a gain ~ U(0.5, 1.5); optional channel swap and polarity flip (off by
default, not in the official recipe); mixture = sum of the four, targets = the augmented sources
named by `stems` (default the vocals alone; any of `musdb.SOURCES`, in the order given).
`mono=True` averages the channels of all (the mixture's mean is the sum of the stems' means).

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


def check_stems(stems) -> tuple[str, ...]:
  """`stems` as a tuple of distinct MUSDB sources (`musdb.SOURCES`); ValueError naming the stem
  that is not one (a model's stems are the targets of the training mix)."""
  names = (stems,) if isinstance(stems, str) else tuple(stems)
  if not names:
    raise ValueError(f"no stems given; choose from the MUSDB sources {', '.join(musdb.SOURCES)}")
  for name in names:
    if name not in musdb.SOURCES:
      raise ValueError(f"stem {name!r} is not a MUSDB source; the stems of a model trained on "
                       f"MUSDB18-HQ must be among {', '.join(musdb.SOURCES)} (got {names})")
  if len(set(names)) != len(names):
    raise ValueError(f"stems named more than once: {names}")
  return names


def _stereo(x: np.ndarray) -> np.ndarray:
  """(1 or 2, N) → (2, N)."""
  return np.repeat(x, 2, axis=0) if x.shape[0] == 1 else x


def render_mix(tracks: list[musdb.Track], draws: dict[str, StemDraw], segment: int, *,
               mono: bool = False, stems: tuple[str, ...] = ("vocals",)
               ) -> dict[str, np.ndarray]:
  """Reads and sums the drawn sources: {"mixture", *stems} float32 (C, segment), C = 1 if mono
  else 2; each of `stems` (MUSDB sources) is its augmented source."""
  targets = check_stems(stems)
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
  out = dict(mixture=mixture, **{name: stems[name] for name in targets})
  if mono:
    out = {name: x.mean(axis=0, keepdims=True) for name, x in out.items()}
  return {name: np.ascontiguousarray(x) for name, x in out.items()}


def random_mix(tracks: list[musdb.Track], index: dict[str, list[tuple[int, int]]],
               rng: np.random.Generator, segment: int, *, mono: bool = False,
               config: MixConfig = MixConfig(), stems: tuple[str, ...] = ("vocals",)
               ) -> dict[str, np.ndarray]:
  """One training example: {"mixture", *stems} float32 (C, segment) (see `render_mix`)."""
  return render_mix(tracks, draw_mix(index, rng, config), segment, mono=mono, stems=stems)


def validation_windows(tracks: list[musdb.Track], segment: int) -> list[tuple[int, int]]:
  """Aligned, non-overlapping windows [(track index, start)] covering each track; a trailing
  part shorter than `segment` is left out (a track shorter than one segment gives none)."""
  return [(i, start) for i, track in enumerate(tracks)
          for start in range(0, track.num_samples - segment + 1, segment)]


def validation_example(track: musdb.Track, start: int, segment: int, *, mono: bool = False,
                       stems: tuple[str, ...] = ("vocals",)) -> dict[str, np.ndarray]:
  """The unaugmented window: {"mixture" (from mixture.wav), *stems} float32 (C, segment)."""
  out = {stem: _stereo(track.read(stem, start, segment))
         for stem in ("mixture",) + check_stems(stems)}
  if mono:
    out = {stem: x.mean(axis=0, keepdims=True) for stem, x in out.items()}
  return out
