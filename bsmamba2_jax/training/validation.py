"""Validation during training: the EMA model scored on the validation split (docs/training.md §6).

Each track's windows are joined end to end and scored as one signal with the same
`metrics.separation_scores` that test-set evaluation uses: uSDR averaged over tracks, cSDR
(vocals with accompaniment = mixture − vocals, 1-s frames) as the median over tracks. Scoring
windows one by one would let windows with silent vocals (uSDR ≈ −40 dB or lower) swamp the mean;
a track whose vocals are digital silence (an instrumental) has no vocals to score and is left
out, with a warning (its uSDR would be -80 dB or lower whatever the model does).
`valid_input_usdr` scores the mixture itself, the do-nothing baseline.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np

from bsmamba2_jax import metrics


def validation_batches(config: ml_collections.ConfigDict, warn: bool = True) -> Iterator[dict]:
  """The validation split's windows; its tracks are checked when this is called (`warn`: name
  the tracks too short for a window)."""
  from data_pipeline import pipeline  # pylint: disable=g-import-not-at-top  (training data)
  return pipeline.validation_iterator(
      config.data.dir, segment_seconds=config.eval.segment_seconds,
      batch_size=config.eval.batch_size, mono=config.model.audio_channels == 1, split="valid",
      max_examples=config.eval.max_examples, warn=warn)


def validate(config: ml_collections.ConfigDict, estimate: Callable[[Any, np.ndarray], Any],
             params: Any, sample_rate: int, warn: bool = True) -> dict[str, float]:
  """{"valid_usdr", "valid_csdr", "valid_input_usdr"} of `estimate(params, mixture)` (vocals
  (b, C, N) of mixtures (eval.batch_size, C, N); a short last batch is zero-padded, so one shape
  compiles) on the validation split of `config.data.dir`. `warn`: name the tracks left out (the
  loop does at its first validation only, not every eval_every steps)."""
  batch_size = config.eval.batch_size
  windows = {}  # track -> list of (mixture, vocals, estimate), each (C, N)
  for batch in validation_batches(config, warn):
    mixture, vocals = batch["mixture"], batch["vocals"]
    count = len(mixture)
    padded = np.pad(mixture, ((0, batch_size - count), (0, 0), (0, 0)))
    estimated = np.asarray(estimate(params, padded))[:count]
    for track, m, v, e in zip(batch["track"], mixture, vocals, estimated):
      windows.setdefault(track, []).append((m, v, e))
  usdr, csdr, input_usdr, silent = [], [], [], []
  for track, parts in windows.items():
    m, v, e = (np.concatenate(x, axis=-1) for x in zip(*parts))
    if not np.any(v):
      silent.append(track)
      continue
    references = dict(vocals=v, accompaniment=m - v)
    model = metrics.separation_scores(references, dict(vocals=e, accompaniment=m - e),
                                      sample_rate)
    mixture = metrics.separation_scores(references, dict(vocals=m, accompaniment=m),
                                        sample_rate)
    usdr.append(model["vocals_usdr"])
    csdr.append(model["vocals_csdr"])
    input_usdr.append(mixture["vocals_usdr"])
  if silent and warn:
    logging.warning("validation: %d track(s) with silent vocals left out of the scores: %s",
                    len(silent), ", ".join(map(str, silent)))
  csdr = np.asarray(csdr)
  mean = lambda scores: float(np.mean(scores)) if scores else float("nan")
  return dict(valid_usdr=mean(usdr),
              valid_csdr=float(np.nanmedian(csdr)) if np.isfinite(csdr).any() else float("nan"),
              valid_input_usdr=mean(input_usdr))
