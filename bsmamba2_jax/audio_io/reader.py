"""Reading input audio for separation: any format soundfile or FFmpeg decodes, in blocks.

soundfile (libsndfile) streams WAV, FLAC, OGG/Opus, MP3 and AIFF; everything else (m4a/AAC, mp4,
webm, wma ...) is decoded by PyAV, which ships FFmpeg inside its wheel, also block by block, so
no system ffmpeg is needed and memory stays bounded. Damage is handled where it can be:
a WAV whose data size a streaming writer left at 0 is read through the end of the file, a
truncated file is separated as far as it decodes, each with a warning naming the file; what
cannot be read at all is an `InputError` naming the file and the problem.
"""
from __future__ import annotations

import io
import logging
import os
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


class _Decoder:
  """A file PyAV (FFmpeg) decodes: its first audio stream as float32 (channels, n) blocks.

  The first samples are decoded on opening, so a file that holds no decodable audio fails there.
  `frames` is the container's estimate (the codec may add or drop a few samples of padding).
  """

  def __init__(self, path: str):
    import av  # pylint: disable=g-import-not-at-top  (only files libsndfile cannot read)
    self._container = av.open(path)
    try:
      streams = self._container.streams.audio
      if not streams:
        raise ValueError("no audio stream")
      stream = streams[0]
      self.sample_rate = int(stream.rate or stream.codec_context.sample_rate)
      self.channels = stream.codec_context.channels
      duration = (float(stream.duration * stream.time_base) if stream.duration else
                  self._container.duration / 1e6 if self._container.duration else 0.0)
      self.frames = int(round(duration * self.sample_rate))
      self._resampler = av.AudioResampler(format="fltp", layout=stream.layout,
                                          rate=self.sample_rate)
      self._frames = self._container.decode(stream)
      self._pending = [] if self.channels > 2 else self._decode_next()
      if self.channels <= 2 and not self._pending:
        raise ValueError("no samples decode")
    except BaseException:
      self._container.close()
      raise

  def _decode_next(self) -> list[np.ndarray]:
    """The next decoded frame's samples as (channels, n) arrays; [] at the end."""
    for frame in self._frames:
      arrays = [f.to_ndarray().astype(np.float32, copy=False)
                for f in self._resampler.resample(frame)]
      arrays = [a for a in arrays if a.shape[1]]
      if arrays:
        return arrays
    return []

  def blocks(self, frames: int, path: str) -> Iterator[np.ndarray]:
    pending, held, decoded = self._pending, sum(a.shape[1] for a in self._pending), 0
    while True:
      while held < frames:
        try:
          more = self._decode_next()
        except Exception as e:  # pylint: disable=broad-except  (FFmpeg's errors mid-file)
          logging.warning("%s: decoding stopped after %d frames (%s); separating those", path,
                          decoded + held, e)
          more = []
          self._frames = iter(())
        if not more:
          break
        pending += more
        held += sum(a.shape[1] for a in more)
      if not held:
        return
      joined = np.concatenate(pending, axis=1)
      block, rest = joined[:, :frames], joined[:, frames:]
      pending, held = ([rest] if rest.shape[1] else []), rest.shape[1]
      decoded += block.shape[1]
      yield np.ascontiguousarray(block)

  def close(self):
    self._container.close()


class AudioReader:
  """An input file opened for block reads: soundfile streams what libsndfile reads, PyAV the rest.

  Attributes: path, sample_rate, channels, frames (what the header or the decoder gives).
  Raises InputError naming the file for anything it cannot read.
  """

  def __init__(self, path: str):
    self.path = path
    self._file = None
    self._raw = None  # the patched file under a streamed WAV's SoundFile
    self._decoder = None
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
      self._file = None
      try:
        self._decoder = _Decoder(path)
      except Exception as e:  # pylint: disable=broad-except
        av_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise InputError(f"{path}: cannot read audio (soundfile: {sf_error}; FFmpeg: "
                         f"{av_error})") from None
      self.sample_rate, self.channels = self._decoder.sample_rate, self._decoder.channels
      self.frames = max(self._decoder.frames, 1)  # it decoded samples on opening
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
    if self._decoder is not None:
      yield from self._decoder.blocks(frames, self.path)
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
    for opened in (self._file, self._raw, self._decoder):
      if opened is not None:
        opened.close()
