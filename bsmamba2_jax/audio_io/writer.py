"""Writing separated stems: an output file that appears only when complete.

Each stem is written under a hidden temporary name in its folder (fixed length, so long names do
not overflow) and renamed when the whole file is written; the folders made for it are removed
again if it fails. A write error (a full disk) names the output and the free space left.
"""
from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import soundfile as sf

# (format, bit depth) -> libsndfile subtype; FLAC has no float.
SUBTYPES = {("wav", "16"): "PCM_16", ("wav", "24"): "PCM_24", ("wav", "32f"): "FLOAT",
            ("flac", "16"): "PCM_16", ("flac", "24"): "PCM_24"}


class AudioWriter:
  """One output file written under a temporary name, renamed onto its path by `commit()`.

  `abort()` removes the temporary file and the folders this writer made, so a failed or
  interrupted separation leaves nothing behind; an existing file at `path` is replaced only by
  `commit()`. Integer formats clip samples beyond ±1 and count them (`clipped`).
  """

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
