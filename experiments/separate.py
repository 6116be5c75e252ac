"""Separates audio files into vocals and accompaniment.

  python -m experiments.separate --checkpoint=exported/ --input=song.mp3 --input=albums/
  bsmamba2-separate --checkpoint=bs_mamba2_vocals.ckpt --input='music/**/*.flac' --format=flac

Inputs are files, folders (searched recursively) or globs. Outputs go to
`--output_dir/--template` (default `{track}/{stem}.{ext}`), at the input's rate and channels.
Bad inputs are reported and skipped; the exit status is non-zero if any input failed.
"""
from __future__ import annotations

import signal
import sys

from absl import app, flags, logging

from bsmamba2_jax import runtime, separate
from bsmamba2_jax.audio_io.paths import DEFAULT_TEMPLATE
from experiments import cli

_INPUT = cli.DEFINE_multi_path("input", None, "Audio files, folders (recursive) or globs.")
_CHECKPOINT = cli.DEFINE_path(
    "checkpoint", None, "Exported Orbax directory or official PyTorch checkpoint.")
_OUTPUT_DIR = cli.DEFINE_path("output_dir", "separated", "Where the stems are written.")
_TEMPLATE = flags.DEFINE_string(
    "template", DEFAULT_TEMPLATE,
    "Output path under --output_dir; fields {track} (input name), {trackext} (its extension), "
    "{folder} (its folder's name), {stem}, {ext}.")
_FORMAT = flags.DEFINE_enum("format", "wav", ["wav", "flac"], "Output file format.")
_BIT_DEPTH = flags.DEFINE_enum("bit_depth", "24", ["16", "24", "32f"],
                               "Output sample format (32f: float, WAV only).")
_SEGMENT = flags.DEFINE_float("segment", 8.0, "Chunk length in seconds.")
_OVERLAP = flags.DEFINE_float(
    "overlap", 0.25, "Chunk overlap fraction in [0, 1); 0 is the official non-overlapping mode.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 1, "Chunks per model call; a file's last call takes the next power of two "
    "at or above the chunks it has left (compiled once per size).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar per file.")

flags.mark_flags_as_required(["input", "checkpoint"])


def _interrupt(signum, frame):
  """SIGTERM handled as Ctrl-C, so the file being written is cleaned up the same way."""
  del frame
  raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv):
  # XLA:CPU flags before JAX starts; compiled programs kept, so a second run starts at once.
  runtime.configure(compilation_cache=True)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; pass files with --input")
  logging.set_verbosity(logging.INFO)
  signal.signal(signal.SIGTERM, _interrupt)
  hangup = getattr(signal, "SIGHUP", None)  # the terminal closed (not on Windows)
  if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:  # nohup: ignored
    signal.signal(hangup, _interrupt)
  try:
    results = separate.separate_files(
        _INPUT.value, checkpoint=_CHECKPOINT.value, output_dir=_OUTPUT_DIR.value,
        template=_TEMPLATE.value, fmt=_FORMAT.value, bit_depth=_BIT_DEPTH.value,
        segment=_SEGMENT.value, overlap=_OVERLAP.value, batch_size=_BATCH_SIZE.value,
        overwrite=_OVERWRITE.value, progress=_PROGRESS.value)
  except (ValueError, FileNotFoundError) as e:
    logging.error("%s", e)
    sys.exit(2)
  except KeyboardInterrupt as e:
    logging.error("interrupted (%s): the file in progress was not written and its partial "
                  "outputs were removed; finished files are kept", str(e) or "Ctrl-C")
    sys.exit(130)
  failed = [r for r in results if r.error]
  print(f"separated {len(results) - len(failed)} of {len(results)} input(s)"
        + (f"; {len(failed)} failed:" if failed else ""))
  for r in failed:
    print(f"  {r.error}")
  if failed:
    sys.exit(1)


def run():
  """Console-script entry point (`bsmamba2-separate`)."""
  cli.run(main)


if __name__ == "__main__":
  run()
