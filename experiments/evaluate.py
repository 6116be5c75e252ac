"""Evaluates a checkpoint on a MUSDB18-HQ-layout dataset (real or generated).

  python -m experiments.evaluate --checkpoint=exported/ --data_dir=/data/musdb18hq --split=test \
      --segments=1,2,4,8,16 --output_dir=eval/paper

Writes per_track.csv, sparse_vocals.csv, segment_study.csv, results.json, results.md and PNG
plots (per-track scores, SDR vs segment length) into --output_dir, and prints the aggregate
table (median and mean over tracks of cSDR and uSDR, model and mixture-as-estimate baseline).
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from bsmamba2_jax import evaluation, runtime
from experiments import cli

_CHECKPOINT = cli.DEFINE_path(
    "checkpoint", None, "Exported Orbax directory or official PyTorch checkpoint.")
_DATA_DIR = cli.DEFINE_path("data_dir", None, "MUSDB18-HQ-layout dataset root.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "valid", "test", "train_full"],
                           "Tracks to evaluate.")
_OUTPUT_DIR = cli.DEFINE_path("output_dir", "evaluation", "Where the reports are written.")
_SEGMENT = flags.DEFINE_float("segment", 8.0, "Chunk length (s) of the main evaluation.")
_OVERLAP = flags.DEFINE_float(
    "overlap", 0.0, "Chunk overlap of the main evaluation; 0 is the official protocol.")
_SEGMENTS = flags.DEFINE_list(
    "segments", [], "Input-length study: segment lengths in seconds, non-overlapping "
    "(the paper: 1,2,4,8,16). Empty skips the study.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1, "Chunks per model call.")
_MAX_TRACKS = flags.DEFINE_integer("max_tracks", None, "Evaluate only the first N tracks.",
                                   lower_bound=1)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace earlier reports in --output_dir.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar per pass over the tracks.")

flags.mark_flags_as_required(["checkpoint", "data_dir"])


def main(argv):
  runtime.configure(compilation_cache=True, verbose=cli.verbose(), inference=True)  # runtime.py
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    segments = [float(s) for s in _SEGMENTS.value]
  except ValueError:
    raise app.UsageError(f"--segments must be numbers of seconds, got {_SEGMENTS.value}")
  try:
    results, study, paths = evaluation.run(
        _CHECKPOINT.value, _DATA_DIR.value, _SPLIT.value, _OUTPUT_DIR.value,
        segment=_SEGMENT.value, overlap=_OVERLAP.value, batch_size=_BATCH_SIZE.value,
        segments=segments, max_tracks=_MAX_TRACKS.value, overwrite=_OVERWRITE.value,
        progress=_PROGRESS.value)
  except (ValueError, OSError) as e:  # bad paths, data or settings: one line
    logging.error("%s", e)
    sys.exit(2)
  print(evaluation.markdown_report(results, study))
  print("\nwrote " + ", ".join(paths))
  if results["failed"]:
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
