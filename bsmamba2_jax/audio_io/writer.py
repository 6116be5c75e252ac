"""Writing separated stems: an output file that appears only when complete.

Each stem is written under a hidden temporary name in its folder (fixed length, so long names do
not overflow) and renamed when the whole file is written; the folders made for it are removed
again if it fails. A write error (a full disk) names the output and the free space left.
Formats are libsndfile's: WAV and FLAC (16/24-bit, WAV also 32-bit float) and the lossy MP3,
Ogg Vorbis and Opus, whose `quality` in [0, 1] (1 best) is libsndfile's compression level
inverted. Opus encodes only 8, 12, 16, 24 or 48 kHz and MP3 only the MPEG rates, so other rates
are resampled (soxr) for those formats.
"""
from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import soundfile as sf
import soxr

# Output format -> (libsndfile format, {bit depth: subtype}, or the one subtype of a lossy codec).
FORMATS = {"wav": ("WAV", {"16": "PCM_16", "24": "PCM_24", "32f": "FLOAT"}),
           "flac": ("FLAC", {"16": "PCM_16", "24": "PCM_24"}),  # FLAC has no float
           "mp3": ("MP3", "MPEG_LAYER_III"), "ogg": ("OGG", "VORBIS"), "opus": ("OGG", "OPUS")}
LOSSY = ("mp3", "ogg", "opus")
# The sample rates a lossy codec encodes; others are resampled to the last one listed.
_RATES = {"opus": (8000, 12000, 16000, 24000, 48000),
          "mp3": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)}


def check_format(fmt: str, bit_depth: str) -> None:
  """ValueError unless `fmt` (and, for WAV and FLAC, `bit_depth`) can be written."""
  if fmt not in FORMATS:
    raise ValueError(f"unsupported --format={fmt}; choose from {', '.join(FORMATS)}")
  subtypes = FORMATS[fmt][1]
  if isinstance(subtypes, dict) and bit_depth not in subtypes:
    note = " (FLAC has no 32-bit float)" if fmt == "flac" else ""
    raise ValueError(f"unsupported --format={fmt} --bit_depth={bit_depth}; {fmt} takes "
                     f"{', '.join(subtypes)}{note}")


def encoded_rate(fmt: str, sample_rate: int) -> int:
  """The rate a file of `fmt` is written at for audio at `sample_rate`."""
  rates = _RATES.get(fmt)
  return sample_rate if rates is None or sample_rate in rates else rates[-1]


class AudioWriter:
  """One output file written under a temporary name, renamed onto its path by `commit()`.

  `abort()` removes the temporary file and the folders this writer made, so a failed or
  interrupted separation leaves nothing behind; an existing file at `path` is replaced only by
  `commit()`. Integer and lossy formats clip samples beyond ±1 and count them (`clipped`).
  """

  def __init__(self, path: str, sample_rate: int, channels: int, fmt: str, bit_depth: str,
               quality: float = 0.8):
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
    check_format(fmt, bit_depth)
    self._clips = fmt in LOSSY or bit_depth != "32f"
    self.clipped = 0
    self._file = None
    container, subtypes = FORMATS[fmt]
    rate = encoded_rate(fmt, sample_rate)
    self._resample = (None if rate == sample_rate else soxr.ResampleStream(
        sample_rate, rate, channels, dtype="float32", quality="HQ"))
    options = {} if fmt not in LOSSY else dict(compression_level=1.0 - float(quality))
    try:
      self._file = sf.SoundFile(os.fsencode(self._tmp), "w", samplerate=rate, channels=channels,
                                format=container, subtype=subtypes[bit_depth]
                                if isinstance(subtypes, dict) else subtypes, **options)
    except (RuntimeError, OSError, ValueError) as e:
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
    """Writes (channels, n) samples; integer and lossy formats clip to [-1, 1] and count the
    clips."""
    if self._clips:
      over = np.abs(block) > 1.0
      self.clipped += int(over.sum())
      if self.clipped:
        block = np.clip(block, -1.0, 1.0)
    try:
      self._write_frames(np.ascontiguousarray(block.T, np.float32))
    except (RuntimeError, OSError) as e:
      raise self._error(e) from None

  def _write_frames(self, frames: np.ndarray, last: bool = False):
    """(n, channels) frames into the file, through the resampler where there is one."""
    if self._resample is not None:
      frames = self._resample.resample_chunk(frames, last=last)
    self._file.write(frames)

  def commit(self):
    try:
      if self._resample is not None:  # the resampler's last samples
        self._write_frames(np.zeros((0, self._file.channels), np.float32), last=True)
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
