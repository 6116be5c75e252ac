"""Separating files: inputs in, one file per stem out, bad inputs named and skipped.

`separate_files` is what `bsmamba2-separate` runs: it expands the inputs (`audio_io.paths`),
decides for each input whether it may be written (never over another input of the run, never
twice in one run, never over an existing file unless asked), streams it through a `Separator`
(`audio_io.reader` -> `Separator.stream` -> `audio_io.writer`) and reports per file. A file that
cannot be separated is logged with its path and the problem and the run goes on; its partial
outputs are removed.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Sequence

from bsmamba2_jax.audio_io.paths import (DEFAULT_TEMPLATE, check_template, find_inputs,
                                         output_paths)
from bsmamba2_jax.audio_io.reader import AudioReader
from bsmamba2_jax.audio_io.writer import LOSSY, AudioWriter, check_format
from bsmamba2_jax.errors import InputError
from bsmamba2_jax.separator import Separator


@dataclasses.dataclass
class FileResult:
  """The outcome of one input: `outputs` written, or the `error` that skipped it."""
  path: str
  outputs: dict[str, str] = dataclasses.field(default_factory=dict)
  error: str | None = None
  seconds: float = 0.0
  wall_s: float = 0.0
  clipped: dict[str, int] = dataclasses.field(default_factory=dict)


def separate_file(separator: Separator, path: str, outputs: dict[str, str], *,
                  fmt: str = "wav", bit_depth: str = "24", quality: float = 0.8,
                  progress: bool = True) -> FileResult:
  """Separates the file at `path` into `outputs` (stem -> path, any of `separator.stems`),
  streaming;
  raises InputError naming the file when it cannot (the outputs' temporary files are then
  removed)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  reader = AudioReader(path)
  result = FileResult(path, seconds=reader.frames / reader.sample_rate)
  writers = {}
  start = time.perf_counter()
  bar = tqdm(total=round(result.seconds, 2), unit="s", desc=os.path.basename(path),
             disable=not progress, leave=True,
             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s audio "
                        "[{elapsed}<{remaining}{postfix}]")
  try:
    for stem, out_path in outputs.items():
      writers[stem] = AudioWriter(out_path, reader.sample_rate, reader.channels, fmt, bit_depth,
                                  quality)
    done = 0
    for mixture, stems in separator.stream(reader.blocks(separator.segment_samples),
                                           reader.sample_rate, reader.channels):
      for stem, writer in writers.items():
        writer.write(stems[stem])
      done += mixture.shape[1]
      elapsed = time.perf_counter() - start
      bar.update(round(done / reader.sample_rate - bar.n, 2))
      bar.set_postfix_str(f"{done / reader.sample_rate / max(elapsed, 1e-9):.2f}x real time",
                          refresh=False)
    result.seconds = done / reader.sample_rate  # what was decoded, if less was there
    for writer in writers.values():
      writer.commit()
  except (ValueError, RuntimeError, OSError, MemoryError) as e:  # bad samples, read/write errors
    for writer in reversed(writers.values()):  # the first one made the folders
      writer.abort()
    out_of_memory = isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)  # host/device
    problem = "out of memory (lower --batch_size or --segment)" if out_of_memory else e
    raise InputError(f"{path}: {problem}") from None
  except BaseException:
    for writer in reversed(writers.values()):
      writer.abort()
    raise
  finally:
    bar.close()
    reader.close()
  result.wall_s = time.perf_counter() - start
  result.outputs = dict(outputs)
  result.clipped = {stem: w.clipped for stem, w in writers.items() if w.clipped}
  return result


def _refusal(path: str, outputs: dict[str, str], claimed: dict[str, str],
             inputs: dict[str, str], overwrite: bool) -> str | None:
  """Why `path` may not write `outputs`, or None. `claimed`: output -> the input of this run
  that wrote it; `inputs`: real path -> input path of every input of the run."""
  clash = [p for p in outputs.values() if p in claimed]
  if clash:
    return (f"{path}: output {clash[0]} is already written by {claimed[clash[0]]} in this run; "
            "tell them apart with {folder} or {trackext} in --template, e.g. "
            "'{folder}/{track}/{stem}.{ext}'")
  is_input = [p for p in outputs.values() if os.path.realpath(p) in inputs]
  if is_input:
    source = inputs[os.path.realpath(is_input[0])]
    also = "" if source == is_input[0] else f" ({source})"
    return (f"{path}: output {is_input[0]} is an input of this run{also}; choose another "
            "--output_dir or --template")
  existing = [p for p in outputs.values() if os.path.exists(p)]
  if existing and not overwrite:
    return f"{path}: output {existing[0]} exists; pass --overwrite to replace it"
  return None


def separate_files(inputs: Sequence[str], *, checkpoint: str | None = None,
                   model: str | None = None, separator: Separator | None = None,
                   precision: str = "auto", device: str | None = None,
                   output_dir: str = "separated",
                   template: str = DEFAULT_TEMPLATE, fmt: str = "wav", bit_depth: str = "24",
                   quality: float = 0.8, stems: Sequence[str] | None = None, segment: float = 8.0,
                   overlap: float = 0.25, batch_size: int = 1, overwrite: bool = False,
                   progress: bool = True) -> list[FileResult]:
  """Separates every input (files, folders, globs) into a file per stem of `stems` (None: every
  stem the model gives, `Separator.stems`, e.g. vocals and accompaniment).

  Give a `checkpoint` (export or PyTorch file), a registered `model` name (downloaded on first
  use, `registry`) or a ready `separator`; `precision` and `device` apply to the first two
  (`Separator.from_model`). Settings are checked before the model is loaded; bad inputs are
  logged with their path and skipped, and the returned results carry their `error`. `quality`
  in [0, 1] is the lossy formats'.
  """
  if isinstance(inputs, (str, bytes, os.PathLike)):  # one path, not a sequence of characters
    inputs = [inputs]
  inputs = [os.fsdecode(p) for p in inputs]
  fmt, bit_depth = fmt.lower(), str(bit_depth).lower()
  check_format(fmt, bit_depth)
  if not 0.0 <= quality <= 1.0:
    raise ValueError(f"--quality must be in [0, 1], got {quality}")
  if stems is not None and (isinstance(stems, str) or not stems):
    raise ValueError(f"stems must be a list of stem names, got {stems!r}")
  check_template(template)
  paths, missing = find_inputs(inputs, exclude=output_dir)
  results = [FileResult(pattern, error=problem) for pattern, problem in missing.items()]
  for result in results:
    logging.error("%s", result.error)
  if not paths:  # nothing to separate: no model to load (or download)
    return results
  if separator is None:
    settings = dict(segment=segment, overlap=overlap, batch_size=batch_size,
                    precision=precision, device=device)
    if checkpoint is not None:
      separator = Separator.from_checkpoint(checkpoint, **settings)
    elif model is not None:
      separator = Separator.from_pretrained(model, progress=progress, **settings)
    else:
      raise ValueError("give a checkpoint (export or PyTorch .ckpt), a model name or a "
                       "separator")
    logging.info("computing in %s (--precision %s)", separator.dtype, precision)
  unknown = sorted(set(stems or ()) - set(separator.stems))
  if unknown:
    raise ValueError(f"unknown stem(s) {', '.join(unknown)}: this model gives "
                     f"{', '.join(separator.stems)}")
  stems = [s for s in separator.stems if stems is None or s in stems]
  sources = {os.path.realpath(p): p for p in paths}
  claimed = {}  # output path -> the input that writes it in this run
  for path in paths:
    try:
      outputs = output_paths(path, output_dir, template, fmt, stems)
      refusal = _refusal(path, outputs, claimed, sources, overwrite)
      if refusal:
        raise InputError(refusal)
      result = separate_file(separator, path, outputs, fmt=fmt, bit_depth=bit_depth,
                             quality=quality, progress=progress)
      claimed.update({p: path for p in outputs.values()})
    except InputError as e:
      result = FileResult(path, error=str(e))
      logging.error("%s", result.error)
    else:
      for stem, count in result.clipped.items():
        held = fmt if fmt in LOSSY else f"{bit_depth}-bit {fmt}"
        logging.warning("%s: %s clipped at %d samples (%s cannot hold |x| > 1; use "
                        "--bit_depth=32f --format=wav to keep them)", path, stem, count, held)
      logging.info("%s: %.1f s of audio in %.1f s (%.2fx real time)", path, result.seconds,
                   result.wall_s, result.seconds / max(result.wall_s, 1e-9))
    results.append(result)
  return results
