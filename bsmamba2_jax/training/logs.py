"""Training metrics, logged once per step across resumes: `metrics.csv` and TensorBoard events.

A run that died after its last checkpoint may have logged steps that the resumed run trains
again; `MetricsLog(start_step=...)` drops those rows and summaries first, so every step appears
once. Only process 0 of a run writes. A model of n > 1 stems adds the per-stem validation
columns (`csv_fields`).
"""
from __future__ import annotations

import csv
import glob
import os
from typing import Sequence

from bsmamba2_jax.atomic import replacing

CSV_FILE = "metrics.csv"
TENSORBOARD = "tensorboard"
CSV_FIELDS = ("step", "loss", "grad_norm", "skipped", "lr", "steps_per_s", "examples_per_s",
              "valid_usdr", "valid_csdr", "valid_input_usdr", "elapsed_s")


def csv_fields(stems: Sequence[str] = ("vocals",)) -> tuple[str, ...]:
  """The columns of `metrics.csv` for a model of `stems`: CSV_FIELDS, then for n > 1 stems
  valid_<stem>_usdr and valid_<stem>_csdr of each (`validation.validate`'s keys)."""
  if len(stems) <= 1:
    return CSV_FIELDS
  return CSV_FIELDS + tuple(f"valid_{stem}_{name}" for stem in stems for name in ("usdr", "csdr"))


class MetricsLog:
  """Appends rows to `workdir/metrics.csv` and TensorBoard summaries to `workdir/tensorboard`."""

  def __init__(self, workdir: str, enabled: bool, start_step: int = 0,
               fields: Sequence[str] = CSV_FIELDS):
    """Rows and summaries of steps after `start_step` (logged past the checkpoint a run resumes
    from, by a run that then died) are dropped. `enabled` False: write nothing (not process 0).
    `fields`: the CSV columns (`csv_fields`); a file with other columns is rewritten with these."""
    self.enabled = enabled
    fields = tuple(fields)
    if not enabled:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (training only)
    self._tf = tf
    path = os.path.join(workdir, CSV_FILE)
    new = not os.path.exists(path)
    if not new:
      with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = tuple(reader.fieldnames or ())
      kept = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= start_step]
      if len(kept) < len(rows) or header != fields:
        with replacing(path) as tmp, open(tmp, "w", newline="") as f:
          writer = csv.DictWriter(f, fields, extrasaction="ignore")
          writer.writeheader()
          writer.writerows(kept)
    self._csv_file = open(path, "a", newline="")
    self._csv = csv.DictWriter(self._csv_file, fields)
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
