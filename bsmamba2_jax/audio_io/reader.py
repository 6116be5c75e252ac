"""Reading input audio for separation: any format soundfile or librosa decodes, in blocks.

soundfile (libsndfile) streams WAV, FLAC, OGG/Opus, MP3 and AIFF block by block; anything else
librosa (audioread / ffmpeg where installed) decodes whole. Damage is handled where it can be:
a WAV whose data size a streaming writer left at 0 is read through the end of the file, a
truncated file is separated as far as it decodes, each with a warning naming the file; what
cannot be read at all is an `InputError` naming the file and the problem.
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from typing import Iterator

import numpy as np
import soundfile as sf

from bsmamba2_jax.errors import InputError


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


class AudioReader:
  """An input file opened for block reads: soundfile streams, librosa reads it whole.

  Attributes: path, sample_rate, channels, frames (what the header or the decoder gives).
  Raises InputError naming the file for anything it cannot read.
  """

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
