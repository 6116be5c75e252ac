"""Training metrics, logged once per step across resumes: `metrics.csv` and TensorBoard events.

A run that died after its last checkpoint may have logged steps that the resumed run trains
again; `MetricsLog(start_step=...)` drops those rows and summaries first, so every step appears
once. Only process 0 of a run writes.
"""
from __future__ import annotations

import csv
import glob
import os

from bsmamba2_jax.atomic import replacing

CSV_FILE = "metrics.csv"
TENSORBOARD = "tensorboard"
CSV_FIELDS = ("step", "loss", "grad_norm", "skipped", "lr", "steps_per_s", "examples_per_s",
              "valid_usdr", "valid_csdr", "valid_input_usdr", "elapsed_s")


class MetricsLog:
  """Appends rows to `workdir/metrics.csv` and TensorBoard summaries to `workdir/tensorboard`."""

  def __init__(self, workdir: str, enabled: bool, start_step: int = 0):
    """Rows and summaries of steps after `start_step` (logged past the checkpoint a run resumes
    from, by a run that then died) are dropped. `enabled` False: write nothing (not process 0)."""
    self.enabled = enabled
    if not enabled:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (training only)
    self._tf = tf
    path = os.path.join(workdir, CSV_FILE)
    new = not os.path.exists(path)
    if not new:
      with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
      kept = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= start_step]
      if len(kept) < len(rows):
        with replacing(path) as tmp, open(tmp, "w", newline="") as f:
          writer = csv.DictWriter(f, CSV_FIELDS)
          writer.writeheader()
          writer.writerows(kept)
    self._csv_file = open(path, "a", newline="")
    self._csv = csv.DictWriter(self._csv_file, CSV_FIELDS)
    if new:
      self._csv.writeheader()
    tensorboard = os.path.join(workdir, TENSORBOARD)
    for events in sorted(glob.glob(os.path.join(tensorboard, "events.out.tfevents.*"))):
      self._drop_summaries_after(events, start_step)
    self._tb = tf.summary.create_file_writer(tensorboard)

  def _drop_summaries_after(self, path: str, last_step: int) -> None:
    """Rewrites the event file `path` without the summaries of steps after `last_step` (and
    without a record a killed writer left truncated)."""
    tf = self._tf
    events, complete = [], True
    try:
      for record in tf.data.TFRecordDataset(path):
        events.append(tf.compat.v1.Event.FromString(record.numpy()))
    except tf.errors.DataLossError:
      complete = False
    kept = [e for e in events if not (e.HasField("summary") and e.step > last_step)]
    if complete and len(kept) == len(events):
      return
    with replacing(path) as tmp, tf.io.TFRecordWriter(tmp) as writer:
      for event in kept:
        writer.write(event.SerializeToString())

  def write(self, step: int, row: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._csv.writerow(dict(step=step, **row))
    self._csv_file.flush()
    with self._tb.as_default(step=step):
      for name, value in row.items():
        self._tf.summary.scalar(name, value)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._csv_file.close()
      self._tb.close()
