"""Separation: chunking, crossfade overlap-add, resampling and streaming file I/O.

The model sees fixed-shape chunks `(batch_size, channels, segment_samples)` at 44.1 kHz.
Everything around it streams, so memory does not grow with a file's length:

  input blocks (input rate) -> soxr resample to 44.1 kHz -> `OverlapAdd` (chunks, batched
  model calls, crossfade) -> soxr resample back -> vocals blocks aligned with the mixture
  -> accompaniment = mixture - vocals -> output files (temporary name, renamed when complete).

Chunking: chunk k covers `[k·hop, k·hop + segment)` with `hop = segment - overlap_samples`; the
tail chunk is zero-padded. Every chunk is weighted by a trapezoid window (linear ramps of
`overlap_samples`, strictly positive) and the sum is divided by the accumulated weights, so the
weights of overlapping chunks sum to one everywhere, edges included. With `overlap=0` the
window is all ones: exactly the official mode (chunks, zero-padded tail, concatenated, cropped).

Channels: a stereo model given mono input sees the channel duplicated and its two output
channels are averaged back to mono; a mono model given stereo input separates each channel as
its own batch item. More than two channels is an error.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import logging
import os
import shutil
import string
import time
import warnings
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import soundfile as sf
import soxr

from data_pipeline.musdb import is_within

MODEL_RATE = 44100
STEMS = ("vocals", "accompaniment")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff",
                    ".aifc", ".m4a")
# Longest accepted --segment: the model's memory grows with the chunk (it trained on 8 s).
MAX_SEGMENT_SECONDS = 600.0
SUBTYPES = {("wav", "16"): "PCM_16", ("wav", "24"): "PCM_24", ("wav", "32f"): "FLOAT",
            ("flac", "16"): "PCM_16", ("flac", "24"): "PCM_24"}
DEFAULT_TEMPLATE = "{track}/{stem}.{ext}"
# Output template fields: the input's name without extension, its extension, the name of its
# folder, the stem and the output extension (the first two and the last two as in demucs).
TEMPLATE_FIELDS = ("track", "trackext", "folder", "stem", "ext")

ChunkFn = Callable[[np.ndarray], np.ndarray]


class InputError(ValueError):
  """A bad input file; the message names the file and the problem."""


def crossfade_window(segment_samples: int, overlap_samples: int) -> np.ndarray:
  """Chunk weights (segment_samples,) float64: ones with linear ramps of `overlap_samples`.

  The ramps `(i + 0.5) / overlap` are strictly positive and complementary (up + down = 1), so
  consecutive chunks cross-fade; `overlap_samples = 0` gives all ones.
  """
  i = np.arange(segment_samples, dtype=np.float64)
  if overlap_samples == 0:
    return np.ones(segment_samples)
  up = (i + 0.5) / overlap_samples
  down = (segment_samples - i - 0.5) / overlap_samples
  return np.minimum(1.0, np.minimum(up, down))


class OverlapAdd:
  """Streaming chunked separation at the model rate.

  `push(block)` takes (C, n) float32 audio and returns the (C, m) vocals that are final so far
  (no later chunk touches them); `finish()` processes the zero-padded tail and returns the rest,
  so that the concatenated outputs have exactly the pushed length.
  """

  def __init__(self, separate_chunks: ChunkFn, channels: int, segment_samples: int,
               overlap_samples: int, batch_chunks: int):
    """`separate_chunks` maps (k, C, segment_samples) to vocals of the same shape, k <= batch_chunks."""
    if not 0 <= overlap_samples < segment_samples:
      raise ValueError(f"overlap must be in [0, segment): got {overlap_samples} of "
                       f"{segment_samples} samples")
    self._fn = separate_chunks
    self._segment = segment_samples
    self._hop = segment_samples - overlap_samples
    self._batch = batch_chunks
    self._window = crossfade_window(segment_samples, overlap_samples)
    self._input = np.zeros((channels, 0), np.float32)  # starts at sample self._input_start
    self._input_start = 0
    self._pushed = 0
    self._next = 0  # index of the next chunk to cut
    self._pending: list[tuple[int, np.ndarray]] = []  # (chunk index, (C, S)) awaiting a batch
    self._acc = np.zeros((channels, 0))  # weighted sum, starts at sample self._emitted
    self._wsum = np.zeros(0)
    self._emitted = 0

  def push(self, block: np.ndarray) -> np.ndarray:
    """Adds (C, n) samples; returns the (C, m) vocals now final."""
    self._input = np.concatenate([self._input, block], axis=1)
    self._pushed += block.shape[1]
    while self._next * self._hop + self._segment <= self._pushed:
      self._cut()
    while len(self._pending) >= self._batch:
      self._run()
    return self._emit()

  def finish(self) -> np.ndarray:
    """Cuts the remaining (zero-padded) chunks, runs them and returns the last vocals."""
    while self._next == 0 or (self._next - 1) * self._hop + self._segment < self._pushed:
      self._cut()
    while self._pending:
      self._run()
    return self._emit(until=self._pushed)

  def _cut(self):
    start = self._next * self._hop - self._input_start
    chunk = self._input[:, start:start + self._segment]
    if chunk.shape[1] < self._segment:
      chunk = np.pad(chunk, ((0, 0), (0, self._segment - chunk.shape[1])))
    self._pending.append((self._next, chunk))
    self._next += 1
    drop = min(self._next * self._hop - self._input_start, self._input.shape[1])
    self._input = self._input[:, drop:]
    self._input_start += drop

  def _run(self):
    batch, self._pending = self._pending[:self._batch], self._pending[self._batch:]
    vocals = np.asarray(self._fn(np.stack([c for _, c in batch])), np.float64)
    end = (batch[-1][0] * self._hop + self._segment) - self._emitted
    if end > self._wsum.shape[0]:
      grow = end - self._wsum.shape[0]
      self._acc = np.pad(self._acc, ((0, 0), (0, grow)))
      self._wsum = np.pad(self._wsum, (0, grow))
    for (k, _), v in zip(batch, vocals):
      start = k * self._hop - self._emitted
      self._acc[:, start:start + self._segment] += v * self._window
      self._wsum[start:start + self._segment] += self._window

  def _emit(self, until: int | None = None) -> np.ndarray:
    if until is None:  # samples before the first unprocessed chunk are final
      until = (self._pending[0][0] if self._pending else self._next) * self._hop
    n = max(0, min(until - self._emitted, self._wsum.shape[0]))
    out = (self._acc[:, :n] / self._wsum[:n]).astype(np.float32)
    self._acc, self._wsum = self._acc[:, n:], self._wsum[n:]
    self._emitted += n
    return out


class _Resampler:
  """Streaming soxr resampler on (C, n) float32 blocks; the identity when rates match."""

  def __init__(self, in_rate: int, out_rate: int, channels: int):
    self._stream = (None if in_rate == out_rate else
                    soxr.ResampleStream(in_rate, out_rate, channels, dtype="float32",
                                        quality="HQ"))

  def __call__(self, block: np.ndarray, last: bool = False) -> np.ndarray:
    if self._stream is None:
      return block
    out = self._stream.resample_chunk(np.ascontiguousarray(block.T), last=last)
    return np.ascontiguousarray(out.reshape(-1, block.shape[0]).T)


class Separator:
  """Vocal separation of arrays and files with a fixed-shape batched model function.

  `separate_batch` maps (batch_size, channels, segment_samples) float32 mixtures at
  `sample_rate` (44.1 kHz) to vocals of the same shape; it is always called with exactly that
  shape (the last batch is zero-padded), so a jitted model compiles once. With
  `fixed_batch=False` a last batch of k < batch_size chunks is padded only to the next power of
  two: a short file then costs what it holds, not a whole batch, for at most log2(batch_size)
  more compiled shapes (`from_model` does this). `shortest_segment`: the shortest chunk in
  seconds it accepts (a model's: one STFT window).
  """

  def __init__(self, separate_batch: ChunkFn, *, sample_rate: int = MODEL_RATE,
               channels: int = 2, segment: float = 8.0, overlap: float = 0.25,
               batch_size: int = 1, shortest_segment: float = 0.0, fixed_batch: bool = True):
    if sample_rate != MODEL_RATE:
      raise ValueError(f"the model must run at {MODEL_RATE} Hz, got sample_rate={sample_rate}")
    if channels not in (1, 2):
      raise ValueError(f"the model must have 1 or 2 channels, got {channels}")
    if not (0 < segment <= MAX_SEGMENT_SECONDS and segment >= shortest_segment):
      raise ValueError(f"segment must be positive seconds, at least {shortest_segment:.3f} "
                       f"(one STFT window of the model) and at most {MAX_SEGMENT_SECONDS:g}, "
                       f"got {segment}")
    if not 0 <= overlap < 1:
      raise ValueError(f"overlap must be a fraction in [0, 1), got {overlap}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.separate_batch = separate_batch
    self.sample_rate = sample_rate
    self.channels = channels
    self.segment = segment
    self.overlap = overlap
    self.batch_size = batch_size
    self.fixed_batch = fixed_batch
    self.segment_samples = int(round(segment * sample_rate))
    self.overlap_samples = int(round(overlap * self.segment_samples))
    if self.overlap_samples >= self.segment_samples:
      raise ValueError(f"overlap {overlap} leaves no hop for a {segment}-s segment")

  @classmethod
  def from_model(cls, model, params, **kwargs) -> "Separator":
    """A separator around a `BSMamba2` module and its params, jitted for one chunk shape."""
    import jax
    import jax.numpy as jnp

    config = model.config
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    params = jax.device_put(params)

    def separate_batch(chunks: np.ndarray) -> np.ndarray:
      return np.asarray(apply(params, jnp.asarray(chunks, jnp.float32)))

    kwargs.setdefault("fixed_batch", False)  # jit compiles each batch shape on first use
    return cls(separate_batch, sample_rate=config.sample_rate,
               channels=config.audio_channels,
               shortest_segment=config.n_fft / config.sample_rate, **kwargs)

  @classmethod
  def from_checkpoint(cls, path: str, **kwargs) -> "Separator":
    """A separator from an exported Orbax directory or an official PyTorch checkpoint."""
    from bsmamba2_jax import checkpoints

    model, params = checkpoints.load_model(path)
    return cls.from_model(model, params, **kwargs)

  def _separate_chunks(self, chunks: np.ndarray) -> np.ndarray:
    """(k, Ci, S) mixtures -> (k, Ci, S) vocals, adapting channels and padding the batch."""
    k, ci, s = chunks.shape
    if ci == self.channels:
      items = chunks
    elif self.channels == 2:  # mono input, stereo model: duplicate the channel
      items = np.repeat(chunks, 2, axis=1)
    else:  # stereo input, mono model: one batch item per channel
      items = chunks.reshape(k * ci, 1, s)
    out = np.concatenate([self._separate_batch_padded(items[i:i + self.batch_size])
                          for i in range(0, items.shape[0], self.batch_size)])
    if ci == self.channels:
      return out
    if self.channels == 2:
      return out.mean(axis=1, keepdims=True)
    return out.reshape(k, ci, s)

  def _separate_batch_padded(self, items: np.ndarray) -> np.ndarray:
    """(k, C, S) items, k <= batch_size -> their (k, C, S) vocals, zero-padded to the batch
    shape `separate_batch` takes (batch_size, or with fixed_batch False the next power of two)."""
    k = items.shape[0]
    size = self.batch_size if self.fixed_batch else min(self.batch_size, 1 << (k - 1).bit_length())
    padded = np.concatenate([items, np.zeros((size - k,) + items.shape[1:], np.float32)])
    return np.asarray(self.separate_batch(padded), np.float32)[:k]

  def stream(self, blocks: Iterable[np.ndarray], sample_rate: int,
             channels: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Separates a stream of (channels, n) float32 blocks at `sample_rate`.

    Yields aligned `(mixture, vocals)` blocks (channels, m) at `sample_rate` whose total length
    equals the input's. Raises ValueError on non-finite samples.
    """
    chunks_per_batch = max(1, self.batch_size // (channels if self.channels == 1 else 1))
    engine = OverlapAdd(self._separate_chunks, channels, self.segment_samples,
                        self.overlap_samples, chunks_per_batch)
    down = _Resampler(sample_rate, self.sample_rate, channels)
    up = _Resampler(self.sample_rate, sample_rate, channels)
    mixture = np.zeros((channels, 0), np.float32)  # input awaiting its vocals
    total = 0
    emitted = 0

    def aligned(vocals):
      nonlocal mixture, emitted
      n = min(vocals.shape[1], total - emitted)
      mix, mixture = mixture[:, :n], mixture[:, n:]
      emitted += n
      return mix, vocals[:, :n]

    for block in blocks:
      block = np.asarray(block, np.float32)
      if not np.isfinite(block).all():
        bad = total + int(np.argmax(~np.isfinite(block).all(axis=0)))
        raise ValueError(f"non-finite sample (NaN or Inf) at frame {bad}")
      mixture = np.concatenate([mixture, block], axis=1)
      total += block.shape[1]
      vocals = up(engine.push(down(block)))
      if vocals.shape[1]:
        yield aligned(vocals)
    tail = engine.push(down(np.zeros((channels, 0), np.float32), last=True))
    vocals = up(np.concatenate([tail, engine.finish()], axis=1), last=True)
    mix, vocals = aligned(vocals)
    if emitted < total:  # resampling there and back may come out a sample short
      vocals = np.pad(vocals, ((0, 0), (0, total - emitted)))
      mix = np.concatenate([mix, mixture], axis=1)
    yield mix, vocals

  def separate(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
    """Separates `audio` (samples,) or (channels, samples) at `sample_rate`.

    Float audio is taken as is (full scale ±1); integer PCM (int16, int32, or offset uint8 as
    `scipy.io.wavfile` reads them) is scaled to ±1 as soundfile reads it. Returns {"vocals",
    "accompaniment"} float32 arrays of the input's shape and rate, with accompaniment =
    mixture - vocals.
    """
    audio = np.asarray(audio)
    if audio.ndim not in (1, 2):
      raise ValueError(f"audio must be (samples,) or (channels, samples), got {audio.shape}")
    if np.issubdtype(audio.dtype, np.integer):
      half_scale = 2.0 ** (np.iinfo(audio.dtype).bits - 1)
      offset = half_scale if np.issubdtype(audio.dtype, np.unsignedinteger) else 0.0
      audio = (audio - offset) / half_scale
    elif not np.issubdtype(audio.dtype, np.floating):
      raise ValueError(f"audio must be float or integer PCM samples, got dtype {audio.dtype}")
    elif audio.size and np.isfinite(audio).all() and np.abs(audio).max() > np.finfo(np.float32).max:
      raise ValueError(f"audio exceeds the float32 range (largest |sample| "
                       f"{np.abs(audio).max():.3g}); full scale is ±1")
    is_number = (isinstance(sample_rate, (int, float, np.number))
                 and not isinstance(sample_rate, (bool, np.bool_)))
    if not (is_number and np.isfinite(sample_rate) and sample_rate > 0
            and sample_rate == int(sample_rate)):
      raise ValueError(f"sample_rate must be a positive whole number of Hz, got {sample_rate!r}")
    x = np.asarray(audio if audio.ndim == 2 else audio[None], np.float32)
    if x.shape[0] not in (1, 2):
      raise ValueError(f"audio has {x.shape[0]} channels; only mono and stereo are supported "
                       "(pass (channels, samples))")
    if x.shape[1] == 0:
      raise ValueError("audio is empty")
    block = self.segment_samples
    parts = list(self.stream((x[:, i:i + block] for i in range(0, x.shape[1], block)),
                             int(sample_rate), x.shape[0]))
    mixture = np.concatenate([m for m, _ in parts], axis=1)
    vocals = np.concatenate([v for _, v in parts], axis=1)
    out = {"vocals": vocals, "accompaniment": mixture - vocals}
    return {k: v.reshape(audio.shape) for k, v in out.items()}


# ----------------------------------------------------------------------------- files


@dataclasses.dataclass
class FileResult:
  """The outcome of one input: `outputs` written, or the `error` that skipped it."""
  path: str
  outputs: dict[str, str] = dataclasses.field(default_factory=dict)
  error: str | None = None
  seconds: float = 0.0
  wall_s: float = 0.0
  clipped: dict[str, int] = dataclasses.field(default_factory=dict)


def find_inputs(patterns: Sequence[str],
                exclude: str | None = None) -> tuple[list[str], list[FileResult]]:
  """Expands files, folders (recursively) and globs (folders they match are searched too).

  Files found in folders or by globs must have an audio extension and must not lie under
  `exclude` (the output folder: a second run does not separate the first run's stems); a file
  named directly is taken as it is. Returns (sorted paths, each file once however it was
  spelled, and failures for patterns that matched nothing).
  """
  def excluded(path: str) -> bool:
    return exclude is not None and is_within(path, exclude)

  def searched(path: str) -> list[str]:
    if excluded(path):
      return []
    if os.path.isfile(path):
      return [path] if path.lower().endswith(AUDIO_EXTENSIONS) else []
    matches, visited = [], {os.path.realpath(path)}
    for root, folders, names in os.walk(path, followlinks=True):
      # Not entered: the output folder, and folders seen before (symlink loops, two links).
      kept = []
      for f in folders:
        real = os.path.realpath(os.path.join(root, f))
        if not excluded(os.path.join(root, f)) and real not in visited:
          visited.add(real)
          kept.append(f)
      folders[:] = kept
      matches += [os.path.join(root, name) for name in names
                  if name.lower().endswith(AUDIO_EXTENSIONS)]
    return matches

  found, missing = [], []
  for pattern in patterns:
    if os.path.isfile(pattern):
      found.append(pattern)
      continue
    extensions = ", ".join(AUDIO_EXTENSIONS)
    if os.path.isdir(pattern):
      matches = searched(pattern)
      if excluded(pattern):
        problem = (f"folder lies inside the output folder {exclude}, whose files are never "
                   "searched for inputs; name the files, or choose another output folder")
      else:
        besides = (" besides the output folder's" if exclude is not None
                   and is_within(exclude, pattern) else "")
        problem = f"folder holds no audio files{besides} ({extensions})"
    else:
      hits = glob.glob(pattern, recursive=True)
      matches = [p for match in hits for p in searched(match)]
      problem = (f"matches no audio files ({extensions})" if hits
                 else "no such file, folder or match")
    if not matches:
      missing.append(FileResult(pattern, error=f"{pattern}: {problem}"))
    found += matches
  unique = {}
  for path in sorted(os.path.normpath(p) for p in found):
    unique.setdefault(os.path.realpath(path), path)
  return sorted(unique.values()), missing


def _path_problem(relative: str) -> str | None:
  """Why `relative` (a template, or one filled in) is not a file path inside the output folder:
  "no file name" (it ends in '/', '.' or '..'), "outside" (absolute, or with '..'), or None."""
  parts = relative.replace("\\", "/").split("/")
  if os.path.isabs(relative) or parts[0] == "" or ".." in parts:
    return "outside"
  return "no file name" if parts[-1] in ("", ".") else None


def output_paths(input_path: str, output_dir: str, template: str, ext: str) -> dict[str, str]:
  """The output file of each stem: `output_dir/template` with the `TEMPLATE_FIELDS`.

  Raises InputError when the filled-in template is not a file path inside `output_dir` (an
  empty {trackext} or {folder} at its start would make it absolute, a trailing '/' or '.'
  names no file)."""
  track, trackext = os.path.splitext(os.path.basename(input_path))
  folder = os.path.basename(os.path.dirname(os.path.abspath(input_path)))
  outputs = {}
  for stem in STEMS:
    try:
      relative = template.format(track=track, trackext=trackext.lstrip("."), folder=folder,
                                 stem=stem, ext=ext)
    except (ValueError, IndexError, KeyError, AttributeError) as e:
      raise InputError(f"{input_path}: output template {template!r} does not apply: {e}") from None
    if _path_problem(relative):
      raise InputError(f"{input_path}: output template {template!r} gives {relative!r}, which "
                       "is not a file inside the output folder (an empty field?)")
    outputs[stem] = os.path.join(output_dir, relative)
  return outputs


def check_template(template: str):
  """Raises ValueError unless `template` uses only `TEMPLATE_FIELDS` and has {stem}."""
  try:
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
  except ValueError as e:
    raise ValueError(f"bad output template {template!r}: {e}") from None
  unknown = fields - set(TEMPLATE_FIELDS)
  if unknown:
    raise ValueError(f"output template {template!r} uses unknown field(s) {sorted(unknown)}; "
                     f"use {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
  if "stem" not in fields:
    raise ValueError(f"output template {template!r} must contain {{stem}} (one file per stem)")
  try:
    template.format(track="track", trackext="wav", folder="folder", stem="vocals", ext="wav")
  except (ValueError, IndexError, KeyError, AttributeError) as e:
    raise ValueError(f"bad output template {template!r}: {e}") from None
  problem = _path_problem(template)
  if problem == "no file name":
    raise ValueError(f"output template {template!r} must end in a file name")
  if problem:
    raise ValueError(f"output template {template!r} must stay inside the output folder: a "
                     "relative path without '..'")


def _wav_data_chunk(path: str) -> tuple[int, int, int] | None:
  """(block align, data chunk size, offset of the data) of a RIFF/WAVE file, or None when the
  file is not such a WAV (or has no fmt chunk before its data chunk)."""
  with open(path, "rb") as f:
    riff = f.read(12)
    if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:] != b"WAVE":
      return None
    block_align = None
    while True:
      header = f.read(8)
      if len(header) < 8:
        return None
      chunk, size = header[:4], int.from_bytes(header[4:], "little")
      if chunk == b"fmt ":
        fmt = f.read(size)
        block_align = int.from_bytes(fmt[12:14], "little") if len(fmt) >= 14 else None
        f.seek(size % 2, os.SEEK_CUR)
      elif chunk == b"data":
        return (block_align, size, f.tell()) if block_align else None
      else:
        f.seek(size + size % 2, os.SEEK_CUR)


def wav_header_frames(path: str) -> int | None:
  """The frames a RIFF/WAVE file's header promises (data chunk size / block align), or None
  when the file is not such a WAV or the size is a streaming placeholder (0 or 0xFFFFFFFF)."""
  chunk = _wav_data_chunk(path)
  if chunk is None or chunk[1] in (0, 0xFFFFFFFF):
    return None
  return chunk[1] // chunk[0]


class _PatchedBytes(io.RawIOBase):
  """A file read with 4 bytes at `offset` replaced by `patch` (for soundfile's virtual IO)."""

  def __init__(self, path: str, offset: int, patch: bytes):
    super().__init__()
    self._file, self._offset, self._patch = open(path, "rb"), offset, patch

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
    return self._file.seek(position, whence)

  def tell(self) -> int:
    return self._file.tell()

  def readinto(self, buffer) -> int:
    start = self._file.tell()
    count = self._file.readinto(buffer)
    low, high = max(start, self._offset), min(start + count, self._offset + len(self._patch))
    if low < high:
      memoryview(buffer)[low - start:high - start] = self._patch[low - self._offset:
                                                                 high - self._offset]
    return count

  def close(self) -> None:
    self._file.close()
    super().close()


def _open_streamed_wav(path: str) -> tuple[sf.SoundFile, _PatchedBytes] | None:
  """`path` opened with its data through the end of the file, when it is a WAV whose data
  chunk size is 0 with samples after it (a streaming writer that never went back to fill the
  size in): the SoundFile and the file under it (close both); None otherwise."""
  chunk = _wav_data_chunk(path)
  if chunk is None or chunk[1] != 0:
    return None
  block_align, _, start = chunk
  size = (os.path.getsize(path) - start) // block_align * block_align
  if size <= 0 or size > 0xFFFFFFFF - 1:
    return None
  raw = _PatchedBytes(path, start - 4, size.to_bytes(4, "little"))
  try:
    opened = sf.SoundFile(raw)
  except BaseException:
    raw.close()
    raise
  logging.warning("%s: the WAV header gives a data size of 0 (a streaming writer's "
                  "placeholder); reading the %d frames up to the end of the file", path,
                  opened.frames)
  return opened, raw


class _Reader:
  """An input file opened for block reads: soundfile streams, librosa reads it whole."""

  def __init__(self, path: str):
    self.path = path
    self._file = None
    self._raw = None  # the patched file under a streamed WAV's SoundFile
    self._data = None
    if os.path.getsize(path) == 0:
      raise InputError(f"{path}: empty file (0 bytes)")
    try:
      self._file = sf.SoundFile(os.fsencode(path))  # names that are not UTF-8 too
      self.sample_rate, self.channels = self._file.samplerate, self._file.channels
      self.frames = self._file.frames
      streamed = _open_streamed_wav(path) if self.frames == 0 else None
      if streamed is not None:
        self._file.close()
        self._file, self._raw = streamed
        self.frames = self._file.frames
    except Exception as sf_error:  # pylint: disable=broad-except
      try:
        import librosa
        with warnings.catch_warnings():  # librosa warns before falling back to audioread
          warnings.simplefilter("ignore")
          data, rate = librosa.load(path, sr=None, mono=False)
      except Exception as e:  # pylint: disable=broad-except
        librosa_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise InputError(f"{path}: cannot read audio (soundfile: {sf_error}; librosa: "
                         f"{librosa_error})") from None
      self._data = np.atleast_2d(data).astype(np.float32)
      self.sample_rate, self.channels = int(rate), self._data.shape[0]
      self.frames = self._data.shape[1]
    promised = wav_header_frames(path) if self._file is not None else None
    if promised is not None and promised > self.frames:
      logging.warning("%s: truncated file? its header promises %d frames, %d are there; "
                      "separating those", path, promised, self.frames)
    if self.channels > 2:
      self.close()
      raise InputError(f"{path}: {self.channels} channels; only mono and stereo are supported")
    if self.frames == 0:
      self.close()
      raise InputError(f"{path}: empty (no samples)")

  def blocks(self, frames: int) -> Iterator[np.ndarray]:
    """Yields (channels, <= frames) float32 blocks.

    A file that decodes to fewer frames than its header promises (a truncated MP3 or FLAC) is
    separated as far as it decodes, with a warning; one that decodes nothing raises.
    """
    if self._data is not None:
      for i in range(0, self._data.shape[1], frames):
        yield self._data[:, i:i + frames]
      return
    decoded = 0
    while True:
      try:
        block = self._file.read(frames, dtype="float32", always_2d=True)
      except RuntimeError as e:  # libsndfile's decoders stop with an error mid-file
        if not decoded:
          raise
        logging.warning("%s: decoding stopped after %d of the %d frames its header promises "
                        "(%s); separating those", self.path, decoded, self.frames, e)
        return
      if not len(block):
        if decoded < self.frames:
          logging.warning("%s: truncated file? its header promises %d frames, %d decoded; "
                          "separating those", self.path, self.frames, decoded)
        return
      decoded += len(block)
      yield np.ascontiguousarray(block.T)

  def close(self):
    if self._file is not None:
      self._file.close()
    if self._raw is not None:
      self._raw.close()


class _Writer:
  """One output file written under a temporary name, renamed by `commit()`."""

  def __init__(self, path: str, sample_rate: int, channels: int, fmt: str, bit_depth: str):
    self.path = path
    directory, name = os.path.split(path)
    directory = directory or "."
    self._created = []  # folders made here, deepest first, removed again by abort()
    parent = os.path.abspath(directory)  # a relative path would walk down to "", never existing
    while not os.path.exists(parent):
      self._created.append(parent)
      parent = os.path.dirname(parent)
    os.makedirs(directory, exist_ok=True)
    self._directory = directory
    # Fixed-length: a name near the 255-byte limit must not overflow when the suffix is added.
    digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:12]
    self._tmp = os.path.join(directory, f".{digest}.partial-{os.getpid()}")
    self._integer = bit_depth != "32f"
    self.clipped = 0
    self._file = None
    try:
      self._file = sf.SoundFile(os.fsencode(self._tmp), "w", samplerate=sample_rate,
                                channels=channels, format=fmt.upper(),
                                subtype=SUBTYPES[fmt, bit_depth])
    except (RuntimeError, OSError) as e:
      self._remove_folders()
      raise self._error(e) from None

  def _error(self, e: Exception) -> OSError:
    """`e` (libsndfile says "System error." for a full disk) as an error naming the output."""
    try:
      free = f"; {shutil.disk_usage(self._directory).free / 1e6:.1f} MB free on its disk"
    except OSError:
      free = ""
    return OSError(f"cannot write {self.path} ({e}{free})")

  def write(self, block: np.ndarray):
    """Writes (channels, n) samples; integer formats clip to [-1, 1] and count the clips."""
    if self._integer:
      over = np.abs(block) > 1.0
      self.clipped += int(over.sum())
      if self.clipped:
        block = np.clip(block, -1.0, 1.0)
    try:
      self._file.write(np.ascontiguousarray(block.T))
    except (RuntimeError, OSError) as e:
      raise self._error(e) from None

  def commit(self):
    try:
      self._file.close()
      os.replace(self._tmp, self.path)
    except (RuntimeError, OSError) as e:
      raise self._error(e) from None

  def abort(self):
    if self._file is not None:
      try:
        self._file.close()
      except (RuntimeError, OSError):  # the disk that failed the write may fail the flush
        pass
    if os.path.exists(self._tmp):
      os.remove(self._tmp)
    self._remove_folders()

  def _remove_folders(self):
    for folder in self._created:
      try:
        os.rmdir(folder)
      except OSError:  # not empty: another stem or file lives there
        break


def separate_file(separator: Separator, path: str, outputs: dict[str, str], *,
                  fmt: str = "wav", bit_depth: str = "24", progress: bool = True) -> FileResult:
  """Separates one file into `outputs` (stem -> path), streaming; raises InputError."""
  from tqdm import tqdm

  reader = _Reader(path)
  result = FileResult(path, seconds=reader.frames / reader.sample_rate)
  writers = {}
  start = time.perf_counter()
  bar = tqdm(total=round(result.seconds, 2), unit="s", desc=os.path.basename(path),
             disable=not progress, leave=True,
             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s audio "
                        "[{elapsed}<{remaining}{postfix}]")
  try:
    for stem, out_path in outputs.items():
      writers[stem] = _Writer(out_path, reader.sample_rate, reader.channels, fmt, bit_depth)
    done = 0
    for mixture, vocals in separator.stream(reader.blocks(separator.segment_samples),
                                            reader.sample_rate, reader.channels):
      writers["vocals"].write(vocals)
      writers["accompaniment"].write(mixture - vocals)
      done += vocals.shape[1]
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
    for writer in reversed(writers.values()):  # the first one made the folders
      writer.abort()
    raise
  finally:
    bar.close()
    reader.close()
  result.wall_s = time.perf_counter() - start
  result.outputs = dict(outputs)
  result.clipped = {stem: w.clipped for stem, w in writers.items() if w.clipped}
  return result


def separate_files(inputs: Sequence[str], *, checkpoint: str | None = None,
                   separator: Separator | None = None, output_dir: str = "separated",
                   template: str = DEFAULT_TEMPLATE, fmt: str = "wav", bit_depth: str = "24",
                   segment: float = 8.0, overlap: float = 0.25, batch_size: int = 1,
                   overwrite: bool = False, progress: bool = True) -> list[FileResult]:
  """Separates every input (files, folders, globs) into vocals and accompaniment files.

  Give either `checkpoint` (Orbax export or PyTorch file) or a ready `separator`. Bad inputs
  are logged with their path and skipped; the returned results carry their `error`.
  """
  if isinstance(inputs, (str, bytes, os.PathLike)):  # one path, not a sequence of characters
    inputs = [inputs]
  inputs = [os.fsdecode(p) for p in inputs]
  fmt, bit_depth = fmt.lower(), str(bit_depth).lower()
  if (fmt, bit_depth) not in SUBTYPES:
    raise ValueError(f"unsupported --format={fmt} --bit_depth={bit_depth}; choose from "
                     f"{sorted(f'{f}/{b}' for f, b in SUBTYPES)} (FLAC has no 32-bit float)")
  check_template(template)
  if separator is None:
    if checkpoint is None:
      raise ValueError("give a checkpoint (Orbax directory or PyTorch .ckpt) or a separator")
    separator = Separator.from_checkpoint(checkpoint, segment=segment, overlap=overlap,
                                          batch_size=batch_size)
  paths, results = find_inputs(inputs, exclude=output_dir)
  for result in results:
    logging.error("%s", result.error)
  sources = {os.path.realpath(p): p for p in paths}
  claimed = {}  # output path -> the input that writes it in this run
  for path in paths:
    try:
      outputs = output_paths(path, output_dir, template, fmt)
    except InputError as e:
      logging.error("%s", e)
      results.append(FileResult(path, error=str(e)))
      continue
    clash = [p for p in outputs.values() if p in claimed]
    is_input = [p for p in outputs.values() if os.path.realpath(p) in sources]
    existing = [p for p in outputs.values() if os.path.exists(p)]
    if clash:
      result = FileResult(path, error=f"{path}: output {clash[0]} is already written by "
                                      f"{claimed[clash[0]]} in this run; tell them apart with "
                                      "{folder} or {trackext} in --template, e.g. "
                                      "'{folder}/{track}/{stem}.{ext}'")
    elif is_input:
      source = sources[os.path.realpath(is_input[0])]
      also = "" if source == is_input[0] else f" ({source})"
      result = FileResult(path, error=f"{path}: output {is_input[0]} is an input of this "
                                      f"run{also}; choose another --output_dir or --template")
    elif existing and not overwrite:
      result = FileResult(path, error=f"{path}: output {existing[0]} exists; pass --overwrite "
                                      "to replace it")
    else:
      try:
        result = separate_file(separator, path, outputs, fmt=fmt, bit_depth=bit_depth,
                               progress=progress)
        claimed.update({p: path for p in outputs.values()})
      except InputError as e:
        result = FileResult(path, error=str(e))
    if result.error:
      logging.error("%s", result.error)
    else:
      for stem, count in result.clipped.items():
        logging.warning("%s: %s clipped at %d samples (%s-bit %s cannot hold |x| > 1; use "
                        "--bit_depth=32f --format=wav to keep them)", path, stem, count,
                        bit_depth, fmt)
      logging.info("%s: %.1f s of audio in %.1f s (%.2fx real time)", path, result.seconds,
                   result.wall_s, result.seconds / max(result.wall_s, 1e-9))
    results.append(result)
  return results
