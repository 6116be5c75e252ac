"""Validation during training: the EMA model scored on the validation split (docs/training.md §6).

Each track's windows are joined end to end and scored as one signal with the scoring that
test-set evaluation uses (`metrics.separation_scores`: uSDR, and cSDR over 1-s frames of the
estimates evaluated together). uSDR is averaged over tracks, cSDR is the median over tracks.
Scoring windows one by one would let windows with silent targets (uSDR ≈ −40 dB or lower) swamp
the mean. `valid_input_usdr` scores the mixture itself as every estimate, the do-nothing
baseline.

One stem (the model's `config.stems`, "vocals" by default): the stem with accompaniment =
mixture − stem, as `separation_scores` does; a track whose stem is digital silence (an
instrumental for vocals) has nothing to score and is left out, with a warning (its uSDR would be
-80 dB or lower whatever the model does). Keys: valid_usdr, valid_csdr, valid_input_usdr.

n > 1 stems: the n stems of a track are the references and estimates of one evaluated set (cSDR
of them together, as museval evaluates the four MUSDB sources); a stem that is digital silence in
a track is left out of that track's set (with one warning naming them all), a track with every
stem silent altogether. Keys: valid_<stem>_usdr, valid_<stem>_csdr per stem and valid_usdr,
valid_csdr, valid_input_usdr, the means over stems of the per-stem values.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np

from bsmamba2_jax import metrics
from bsmamba2_jax.training import workdir as workdir_lib


def stems(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The stems the experiment's model separates (its resolved `config.model.stems`); ("vocals",)
  for a config without a model."""
  if "model" not in config:
    return ("vocals",)
  return workdir_lib.model_config(config).stems


def validation_batches(config: ml_collections.ConfigDict, warn: bool = True) -> Iterator[dict]:
  """The validation split's windows, {"mixture", *stems, "track"}; its tracks are checked when
  this is called (`warn`: name the tracks too short for a window)."""
  from data_pipeline import pipeline  # pylint: disable=g-import-not-at-top  (training data)
  model = workdir_lib.model_config(config)
  return pipeline.validation_iterator(
      config.data.dir, segment_seconds=config.eval.segment_seconds,
      batch_size=config.eval.batch_size, mono=model.audio_channels == 1, split="valid",
      max_examples=config.eval.max_examples, warn=warn, stems=model.stems)


def _mean(scores) -> float:
  return float(np.mean(scores)) if len(scores) else float("nan")


def _median(scores) -> float:
  scores = np.asarray(scores, np.float64)
  return float(np.nanmedian(scores)) if np.isfinite(scores).any() else float("nan")


def _mean_over_stems(values) -> float:
  """The mean of the finite per-stem values (a stem silent in every track has none)."""
  values = np.asarray(values, np.float64)
  return float(np.mean(values[np.isfinite(values)])) if np.isfinite(values).any() else float("nan")


def validate(config: ml_collections.ConfigDict, estimate: Callable[[Any, np.ndarray], Any],
             params: Any, sample_rate: int, warn: bool = True) -> dict[str, float]:
  """The validation scores (module docstring) of `estimate(params, mixture)` on the validation
  split of `config.data.dir`: mixtures (eval.batch_size, C, N) -> the model's output, (b, C, N)
  for one stem, (b, n, C, N) for n > 1 (a short last batch is zero-padded, so one shape
  compiles). `warn`: name the tracks or stems left out (the loop does at its first validation
  only, not every eval_every steps)."""
  names = stems(config)
  batch_size = config.eval.batch_size
  windows = {}  # track -> list of (mixture (C, N), targets (n, C, N), estimates (n, C, N))
  for batch in validation_batches(config, warn):
    mixture = batch["mixture"]
    targets = np.stack([batch[name] for name in names], axis=1)
    count = len(mixture)
    padded = np.pad(mixture, ((0, batch_size - count), (0, 0), (0, 0)))
    estimated = np.asarray(estimate(params, padded))[:count]
    if len(names) == 1:
      estimated = estimated[:, None]
    if estimated.shape != targets.shape:
      raise ValueError(f"validation: the model's output for {len(names)} stem(s) {names} has "
                       f"shape {estimated.shape[1:]} per window, the targets {targets.shape[1:]}")
    for track, m, v, e in zip(batch["track"], mixture, targets, estimated):
      windows.setdefault(track, []).append((m, v, e))
  joined = {track: tuple(np.concatenate(x, axis=-1) for x in zip(*parts))
            for track, parts in windows.items()}
  if len(names) == 1:
    return _one_stem_scores(joined, names[0], sample_rate, warn)
  return _stems_scores(joined, names, sample_rate, warn)


def _one_stem_scores(joined: dict, stem: str, sample_rate: int, warn: bool) -> dict[str, float]:
  usdr, csdr, input_usdr, silent = [], [], [], []
  for track, (m, targets, estimates) in joined.items():
    v, e = targets[0], estimates[0]
    if not np.any(v):
      silent.append(track)
      continue
    scored = (stem, "accompaniment")
    references = {stem: v, "accompaniment": m - v}
    model = metrics.separation_scores(references, {stem: e, "accompaniment": m - e},
                                      sample_rate, scored)
    mixture = metrics.separation_scores(references, {stem: m, "accompaniment": m}, sample_rate,
                                        scored)
    usdr.append(model[f"{stem}_usdr"])
    csdr.append(model[f"{stem}_csdr"])
    input_usdr.append(mixture[f"{stem}_usdr"])
  if silent and warn:
    logging.warning("validation: %d track(s) with silent %s left out of the scores: %s",
                    len(silent), stem, ", ".join(map(str, silent)))
  return dict(valid_usdr=_mean(usdr), valid_csdr=_median(csdr), valid_input_usdr=_mean(input_usdr))


def _stems_scores(joined: dict, names: tuple[str, ...], sample_rate: int,
                  warn: bool) -> dict[str, float]:
  usdr = {name: [] for name in names}
  csdr = {name: [] for name in names}
  input_usdr = {name: [] for name in names}
  silent = {name: [] for name in names}
  for track, (m, targets, estimates) in joined.items():
    present = [i for i, name in enumerate(names) if np.any(targets[i])]
    for i, name in enumerate(names):
      if i not in present:
        silent[name].append(track)
    if not present:
      continue
    kept = [names[i] for i in present]
    references = {names[i]: targets[i] for i in present}
    # The present stems evaluated together as one set (cSDR frames silent in any reference or
    # estimate are skipped for all), as test-set evaluation scores a model's stems.
    model = metrics.separation_scores(references, {names[i]: estimates[i] for i in present},
                                      sample_rate, kept)
    mixture = metrics.separation_scores(references, {name: m for name in kept}, sample_rate, kept)
    for name in kept:
      usdr[name].append(model[f"{name}_usdr"])
      csdr[name].append(model[f"{name}_csdr"])
      input_usdr[name].append(mixture[f"{name}_usdr"])
  left_out = [f"{name} in {', '.join(map(str, tracks))}" for name, tracks in silent.items()
              if tracks]
  if left_out and warn:
    logging.warning("validation: stems that are silent in a track are left out of that track's "
                    "scores: %s", "; ".join(left_out))
  scores = {}
  for name in names:
    scores[f"valid_{name}_usdr"] = _mean(usdr[name])
    scores[f"valid_{name}_csdr"] = _median(csdr[name])
  return dict(valid_usdr=_mean_over_stems([scores[f"valid_{n}_usdr"] for n in names]),
              valid_csdr=_mean_over_stems([scores[f"valid_{n}_csdr"] for n in names]),
              valid_input_usdr=_mean_over_stems([_mean(input_usdr[n]) for n in names]),
              **scores)
