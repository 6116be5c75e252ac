"""Benchmark section `data`: random-mix pipeline throughput (examples/s) on a generated dataset.

Generates 6 synthetic songs of 20 s into a temporary folder, then times `train_iterator`
batches after warm-up (index cached, prefetch buffer filled). A row's `examples_per_s` is
segments delivered per second; the training step's consumption is compared with it in the
report (the pipeline should deliver at least twice what a step consumes).
"""
from __future__ import annotations

import gc
import itertools
import os
import tempfile
import time

from data_pipeline import pipeline, synthetic
from experiments.benchmarks import common

BATCHES_PER_REPEAT = 10
# (segment seconds, mono, per-device batch, parallel calls): the paper's 8-s stereo examples
# and the `tiny` config's 1-s mono batches of 4.
SETTINGS = ((8.0, False, 4, 2), (8.0, False, 4, 1), (8.0, True, 4, 2), (1.0, True, 4, 2))


def run() -> tuple[list[dict], str]:
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    root = synthetic.generate_dataset(os.path.join(tmp, "synthetic"), num_train=6, num_test=0,
                                      seconds=20, seed=0)
    generate_s = time.perf_counter() - start
    rows.append(dict(name="generate 6 songs x 20 s", median_s=generate_s, min_s=generate_s,
                     max_s=generate_s, repeats=[generate_s]))
    for segment_s, mono, batch, parallel in SETTINGS:
      it = pipeline.train_iterator(root, segment_seconds=segment_s, per_device_batch=batch,
                                   mono=mono, num_parallel_calls=parallel, prefetch=2)
      row = common.timed(
          f"train_iterator {segment_s:g} s {'mono' if mono else 'stereo'} batch {batch} "
          f"parallel {parallel}",
          lambda it=it: list(itertools.islice(it, BATCHES_PER_REPEAT)), repeats=3, warmup=1,
          segment_seconds=segment_s, mono=mono, batch=batch, num_parallel_calls=parallel)
      row["examples_per_s"] = BATCHES_PER_REPEAT * batch / row["median_s"]
      row["audio_seconds_per_s"] = row["examples_per_s"] * segment_s
      rows.append(row)
      del it  # stop its prefetch threads before the folder goes away
      gc.collect()
  table = common.format_table(rows, ["name", "median_s", "min_s", "max_s", "examples_per_s",
                                     "audio_seconds_per_s"])
  note = (f"\nmedian_s: seconds for {BATCHES_PER_REPEAT} batches (3 repeats after one warm-up); "
          "the first row is the one-off generation of the dataset.")
  return rows, table + note
