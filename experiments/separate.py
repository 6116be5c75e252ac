"""Separates songs into stems (a vocals model: vocals, accompaniment): `bsmamba2-separate INPUT...`.

  bsmamba2-separate song.mp3                          # the default model, into ./separated
  bsmamba2-separate -n bsmamba2-vocals-official -o out --format=mp3 albums/ 'live/*.m4a'
  bsmamba2-separate --checkpoint=bs_mamba2_vocals.ckpt --stem=vocals song.flac
  bsmamba2-separate --list_models

INPUTs are files, folders (searched recursively) or globs, in any format soundfile or FFmpeg
(PyAV) reads; `--input` works too. A named model (`-n`, `--list_models`) is downloaded and
converted on first use and cached (`BSMAMBA2_HOME`). Outputs go to `-o/--output_dir` under
`--template` (default `{track}/{stem}.{ext}`), at the input's rate and channels. Bad inputs are
reported and skipped; the exit status is 1 if any input failed, 2 for bad settings.
"""
from __future__ import annotations

import signal
import sys

from absl import app, flags, logging

from bsmamba2_jax import registry, runtime, separate
from bsmamba2_jax.audio_io.paths import DEFAULT_TEMPLATE
from bsmamba2_jax.audio_io.writer import FORMATS
from experiments import cli

_INPUT = cli.DEFINE_multi_path("input", [], "Audio files, folders (recursive) or globs, as well "
                               "as the positional INPUTs.")
_MODEL = flags.DEFINE_string("model", registry.DEFAULT_MODEL, "A registered pretrained model "
                             "(--list_models).", short_name="n")
_CHECKPOINT = cli.DEFINE_path(
    "checkpoint", None, "Instead of --model: an export folder or a PyTorch .ckpt of the model.")
_LIST = flags.DEFINE_bool("list_models", False, "List the registered models and exit.")
_OUTPUT_DIR = cli.DEFINE_path("output_dir", "separated", "Where the stems are written.",
                              short_name="o")
_TEMPLATE = flags.DEFINE_string(
    "template", DEFAULT_TEMPLATE,
    "Output path under --output_dir; fields {track} (input name), {trackext} (its extension), "
    "{folder} (its folder's name), {stem}, {ext}.")
_STEM = flags.DEFINE_multi_string(
    "stem", [], "Write this stem only; repeat for several (default: every stem of the model, "
    "for a one-stem model also the accompaniment).")
_FORMAT = flags.DEFINE_enum("format", "wav", list(FORMATS), "Output file format.")
_BIT_DEPTH = flags.DEFINE_enum("bit_depth", "24", ["16", "24", "32f"],
                               "WAV/FLAC sample format (32f: float, WAV only).")
_QUALITY = flags.DEFINE_float("quality", 0.8, "mp3/ogg/opus quality in [0, 1] (1: best, "
                              "largest files).")
_DEVICE = flags.DEFINE_string("device", None, "cpu, gpu or gpu:N (default: JAX's first device).")
_PRECISION = flags.DEFINE_enum(
    "precision", "auto", ["auto", "float32", "bfloat16"],
    "How the matmuls compute, whatever the model was trained in: bfloat16 takes bf16 "
    "operands and accumulates in float32 (docs/separation.md); auto is that on a GPU "
    "and on a CPU with bf16 dot units (AVX512_BF16, AMX, Arm BF16), float32 elsewhere.")
_SEGMENT = flags.DEFINE_float("segment", 8.0, "Chunk length in seconds.")
_OVERLAP = flags.DEFINE_float(
    "overlap", 0.25, "Chunk overlap fraction in [0, 1); 0 is the official non-overlapping mode.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 1, "Chunks per model call; a file's last call takes the next power of two "
    "at or above the chunks it has left (compiled once per size).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")


def _interrupt(signum, frame):
  """SIGTERM handled as Ctrl-C, so the file being written is cleaned up the same way."""
  del frame
  raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv):
  # XLA:CPU flags before JAX starts (for a forward-only program); compiled programs kept, so a
  # second run starts at once; plain messages unless --verbose.
  runtime.configure(compilation_cache=True, verbose=cli.verbose(), inference=True)
  if _LIST.value:
    print(registry.listing())
    return
  inputs = list(argv[1:]) + list(_INPUT.value)
  if not inputs:
    raise app.UsageError("give the files, folders or globs to separate (bsmamba2-separate "
                         "song.mp3); --help lists the options")
  signal.signal(signal.SIGTERM, _interrupt)
  hangup = getattr(signal, "SIGHUP", None)  # the terminal closed (not on Windows)
  if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:  # nohup: ignored
    signal.signal(hangup, _interrupt)
  try:
    results = separate.separate_files(
        inputs, checkpoint=_CHECKPOINT.value,
        model=None if _CHECKPOINT.value else _MODEL.value, precision=_PRECISION.value,
        device=_DEVICE.value, output_dir=_OUTPUT_DIR.value, template=_TEMPLATE.value,
        fmt=_FORMAT.value, bit_depth=_BIT_DEPTH.value, quality=_QUALITY.value,
        stems=_STEM.value or None, segment=_SEGMENT.value,
        overlap=_OVERLAP.value, batch_size=_BATCH_SIZE.value, overwrite=_OVERWRITE.value,
        progress=_PROGRESS.value)
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
