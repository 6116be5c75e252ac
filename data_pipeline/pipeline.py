"""Input pipelines: random-mix training batches shaped for pmap, and validation windows.

Training (`train_iterator`): a tf.data graph over example numbers. Example j of step k on
process p is `mixing.random_mix` driven by `numpy.random.default_rng([seed, p, k, j])`, so a
batch is a pure function of (seed, step, process index): resuming at `start_step=k` replays
exactly what an uninterrupted run would have seen from step k on, whatever the parallelism.
The training loop saves `iterator.step` (the step of the next batch) with its checkpoint and
passes it back as `start_step`. Processes of a multi-host run draw disjoint random streams
(the process index is part of every example's seed).

Validation (`validation_iterator`): plain Python over the aligned windows of `mixing`, finite.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from data_pipeline import mixing, musdb, salient


def example_rng(seed: int, process_index: int, step: int, example: int) -> np.random.Generator:
  """The generator of one training example."""
  return np.random.default_rng([seed, process_index, step, example])


def segment_samples(segment_seconds: float) -> int:
  """Samples of a `segment_seconds` window at 44.1 kHz; ValueError unless positive."""
  segment = int(round(segment_seconds * musdb.SAMPLE_RATE))
  if segment <= 0:
    raise ValueError(f"segment_seconds must be positive, got {segment_seconds}")
  return segment


class TrainIterator:
  """Iterator of training batches; `step` is the step of the batch `next` returns.

  An exception raised while making an example (a file that fails to read, say) reaches tf.data
  as an opaque op error; `next` raises the original exception instead.
  """

  def __init__(self, numpy_iterator: Iterator[dict], start_step: int, seed: int,
               failures: list[Exception]):
    self._iterator = numpy_iterator
    self._failures = failures
    self.step = start_step
    self.seed = seed

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = next(self._iterator)
    except StopIteration:
      raise
    except Exception:  # pylint: disable=broad-except
      if self._failures:
        raise self._failures[0] from None
      raise
    self.step += 1
    return batch


def warn_short_tracks(tracks: list[musdb.Track], segment_seconds: float, split: str) -> None:
  """Logs the tracks of `split` shorter than one segment: they give no window at all."""
  short = [t.name for t in tracks if t.num_samples < segment_samples(segment_seconds)]
  if short:
    logging.warning("%d track(s) of the '%s' split are shorter than one %g-s segment and are not "
                    "used: %s", len(short), split, segment_seconds, ", ".join(short))


def training_tracks(data_dir: str, segment_seconds: float
                    ) -> tuple[list[musdb.Track], dict[str, list[tuple[int, int]]]]:
  """The checked tracks of the "train" split and their salient index (hop: half a segment,
  8 s / 4 s as in docs/training.md §2; cached on disk, so a second call is quick)."""
  dataset = musdb.MusdbDataset(data_dir)
  tracks = dataset.tracks("train")
  if not tracks:
    raise ValueError(f"{data_dir}: the train split has no tracks")
  warn_short_tracks(tracks, segment_seconds, "train")
  return tracks, salient.salient_index(dataset, "train", segment_seconds, segment_seconds / 2)


def train_iterator(data_dir: str, *, segment_seconds: float = 8.0, local_devices: int = 1,
                   per_device_batch: int = 1, mono: bool = False, seed: int = 0,
                   start_step: int = 0, process_index: int = 0, process_count: int = 1,
                   num_parallel_calls: int = 2, prefetch: int = 2,
                   mix_config: mixing.MixConfig = mixing.MixConfig(),
                   training_set: tuple[list[musdb.Track], dict] | None = None,
                   stems: tuple[str, ...] = ("vocals",)) -> TrainIterator:
  """Endless random-mix batches of the "train" split of `data_dir` (a MUSDB18-HQ layout).

  Yields {"mixture", *stems}: float32 (local_devices, per_device_batch, C, N) with C = 1 if
  `mono` else 2 and N = segment_seconds · 44100; `stems` are the targets, MUSDB sources
  (`mixing.render_mix`; ValueError naming one that is not). Windows come from `training_tracks`'
  salient index (`training_set`: what `training_tracks` already returned, so the split is not
  listed again). `num_parallel_calls` examples are generated concurrently, `prefetch` batches
  are kept ready.
  """
  stems = mixing.check_stems(stems)
  keys = ("mixture",) + stems
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")  # keep accelerators for JAX
  except RuntimeError:  # TF already initialised its devices; nothing to hide any more
    pass

  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  if local_devices < 1 or per_device_batch < 1 or start_step < 0:
    raise ValueError(f"need local_devices >= 1, per_device_batch >= 1, start_step >= 0; got "
                     f"{local_devices}, {per_device_batch}, {start_step}")
  segment = segment_samples(segment_seconds)
  tracks, index = training_set or training_tracks(data_dir, segment_seconds)
  batch = local_devices * per_device_batch
  channels = 1 if mono else 2

  failures = []  # exceptions of make_example, for TrainIterator to raise

  def make_example(number):
    step, example = divmod(int(number), batch)
    try:
      mix = mixing.random_mix(tracks, index, example_rng(seed, process_index, step, example),
                              segment, mono=mono, config=mix_config, stems=stems)
    except Exception as e:
      failures.append(e)
      raise
    return tuple(mix[key] for key in keys)

  def generate(number):
    arrays = tf.numpy_function(make_example, [number], (tf.float32,) * len(keys),
                               stateful=False)
    return tuple(tf.ensure_shape(x, (channels, segment)) for x in arrays)

  def shape_for_pmap(*arrays):
    shape = (local_devices, per_device_batch, channels, segment)
    return {key: tf.reshape(x, shape) for key, x in zip(keys, arrays)}

  ds = tf.data.Dataset.range(start_step * batch, np.iinfo(np.int64).max)
  ds = ds.map(generate, num_parallel_calls=num_parallel_calls, deterministic=True)
  ds = ds.batch(batch, drop_remainder=True).map(shape_for_pmap).prefetch(prefetch)
  return TrainIterator(iter(tfds.as_numpy(ds)), start_step, seed, failures)


def validation_iterator(data_dir: str, *, segment_seconds: float = 8.0, batch_size: int = 1,
                        mono: bool = False, split: str = "valid",
                        max_examples: int | None = None, warn: bool = True,
                        stems: tuple[str, ...] = ("vocals",)) -> Iterator[dict]:
  """Finite batches of aligned, unaugmented windows of `split` (see mixing.validation_windows).

  Yields {"mixture", *stems}: float32 (batch, C, N) and "track": list of track names; the last
  batch may be smaller than `batch_size`. `stems`: MUSDB sources (ValueError naming one that is
  not). `max_examples` keeps that many windows evenly spaced
  over all tracks and positions (the first windows alone are mostly the tracks' quiet intros).
  `warn`: name the tracks too short for a window (a caller that validates again and again names
  them once).
  """
  stems = mixing.check_stems(stems)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if max_examples is not None and max_examples < 1:
    raise ValueError(f"max_examples must be >= 1 (or None for every window), got {max_examples}")
  segment = segment_samples(segment_seconds)
  tracks = musdb.MusdbDataset(data_dir).tracks(split)
  if not tracks:
    where = (f" (the names in {musdb.VALIDATION_LIST} if present, else the musdb package's "
             "validation tracks, under train/)" if split == "valid" else "")
    raise ValueError(f"{data_dir}: the '{split}' split has no tracks{where}")
  if warn:
    warn_short_tracks(tracks, segment_seconds, split)
  windows = mixing.validation_windows(tracks, segment)
  if max_examples is not None and max_examples < len(windows):
    keep = np.unique(np.linspace(0, len(windows) - 1, max_examples).round().astype(int))
    windows = [windows[i] for i in keep]
  if not windows:
    raise ValueError(f"{data_dir}: no {segment_seconds:g}-s window in the '{split}' split")

  def batches():
    for first in range(0, len(windows), batch_size):
      chunk = windows[first:first + batch_size]
      examples = [mixing.validation_example(tracks[i], start, segment, mono=mono, stems=stems)
                  for i, start in chunk]
      batch = {key: np.stack([ex[key] for ex in examples]) for key in ("mixture",) + stems}
      yield dict(batch, track=[tracks[i].name for i, _ in chunk])

  return batches()
