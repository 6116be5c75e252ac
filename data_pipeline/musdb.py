"""The MUSDB18-HQ on-disk layout: tracks, splits and random-access segment reads.

Layout: `<root>/{train,test}/<track>/{mixture,vocals,drums,bass,other}.wav`, 44.1 kHz.
Splits: "train_full" (everything under train/), "valid" (the 14 validation tracks of the `musdb`
package, or the names in `<root>/validation_tracks.txt` when that file exists, as the synthetic
generator writes it), "train" (train_full minus valid) and "test". Reads go through soundfile
with a start offset, so no track is ever loaded whole unless asked (`Track.read_all`).
"""
from __future__ import annotations

import codecs
import logging
import os

import numpy as np
import soundfile as sf

from bsmamba2_jax.audio_io.paths import is_within

SAMPLE_RATE = 44100
STEMS = ("mixture", "vocals", "drums", "bass", "other")
SOURCES = ("vocals", "drums", "bass", "other")
SPLITS = ("train", "valid", "test", "train_full")
VALIDATION_LIST = "validation_tracks.txt"
# The validation split of the `musdb` package (musdb/configs/mus.yaml), taken out of train/.
MUSDB_VALIDATION_TRACKS = (
    "Actions - One Minute Smile",
    "Clara Berry And Wooldog - Waltz For My Victims",
    "Johnny Lokke - Promises & Lies",
    "Patrick Talbot - A Reason To Leave",
    "Triviul - Angelsaint",
    "Alexander Ross - Goodbye Bolero",
    "Fergessen - Nos Palpitants",
    "Leaf - Summerghost",
    "Skelpolu - Human Mistakes",
    "Young Griffo - Pennies",
    "ANiMAL - Rockshow",
    "James May - On The Line",
    "Meaxic - Take A Step",
    "Traffic Experiment - Sirens",
)


def split_folder_holding(data_dir: str, path: str) -> str | None:
  """The `train/` or `test/` folder of `data_dir` that `path` lies in (where a folder would be
  listed as a track), else None."""
  for folder in ("train", "test"):
    if is_within(path, os.path.join(data_dir, folder)):
      return os.path.join(data_dir, folder)
  return None


class MusdbError(ValueError):
  """A MUSDB18-HQ folder, track or file that cannot be used; the message names the path."""


class Track:
  """One song folder. Checks on construction that all five stems exist, are readable, share
  length and channel count (mono or stereo, not empty) and are sampled at 44.1 kHz.

  Attributes: name (folder name), path, num_samples, sample_rate, num_channels.
  """

  def __init__(self, path: str):
    self.path = path
    self.name = os.path.basename(os.path.normpath(path))
    infos = {}
    for stem in STEMS:
      file = self.file(stem)
      if not os.path.isfile(file):
        raise MusdbError(f"{file}: missing stem '{stem}' of track '{self.name}' (a MUSDB18-HQ "
                         f"track needs {', '.join(s + '.wav' for s in STEMS)})")
      try:
        infos[stem] = sf.info(os.fsencode(file))  # bytes: names that are not UTF-8 open too
      except (sf.SoundFileError, RuntimeError) as e:
        raise MusdbError(f"{file}: unreadable audio file ({e})") from None
      if infos[stem].samplerate != SAMPLE_RATE:
        raise MusdbError(f"{file}: sample rate {infos[stem].samplerate} Hz, expected "
                         f"{SAMPLE_RATE} Hz")
    lengths = {stem: info.frames for stem, info in infos.items()}
    if len(set(lengths.values())) > 1:
      raise MusdbError(f"{path}: stems of different lengths (samples) {lengths}")
    channels = {stem: info.channels for stem, info in infos.items()}
    if len(set(channels.values())) > 1:
      raise MusdbError(f"{path}: stems with different channel counts {channels}")
    self.num_samples = lengths["mixture"]
    self.num_channels = channels["mixture"]
    if self.num_channels not in (1, 2):
      raise MusdbError(f"{path}: stems with {self.num_channels} channels; MUSDB18-HQ stems are "
                       "mono or stereo")
    if self.num_samples == 0:
      raise MusdbError(f"{path}: empty stems (0 samples)")
    self.sample_rate = SAMPLE_RATE

  def __repr__(self) -> str:
    return f"Track({self.name!r}, {self.num_samples / self.sample_rate:.1f} s)"

  def file(self, stem: str) -> str:
    """Path of `stem`'s WAV file."""
    return os.path.join(self.path, f"{stem}.wav")

  def read(self, stem: str, start: int, length: int) -> np.ndarray:
    """Samples [start, start + length) of `stem`: float32 (channels, length)."""
    if stem not in STEMS:
      raise ValueError(f"unknown stem {stem!r}; stems are {STEMS}")
    if start < 0 or length < 0 or start + length > self.num_samples:
      raise ValueError(f"{self.file(stem)}: segment [{start}, {start + length}) outside the "
                       f"track's {self.num_samples} samples")
    try:
      data, _ = sf.read(os.fsencode(self.file(stem)), frames=length, start=start,
                        dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as e:
      raise MusdbError(f"{self.file(stem)}: unreadable audio file ({e})") from None
    if data.shape[0] != length:
      raise MusdbError(f"{self.file(stem)}: read {data.shape[0]} of {length} samples at "
                       f"{start} (truncated file?)")
    finite = np.isfinite(data)
    if not finite.all():  # a float WAV can hold NaN/Inf; they would poison losses and scores
      first = start + int(np.argmin(finite.all(axis=1)))
      raise MusdbError(f"{self.file(stem)}: non-finite samples (NaN or Inf), the first at "
                       f"sample {first}")
    return np.ascontiguousarray(data.T)

  def read_all(self, stem: str) -> np.ndarray:
    """The whole `stem`: float32 (channels, num_samples)."""
    return self.read(stem, 0, self.num_samples)


class MusdbDataset:
  """A MUSDB18-HQ folder (`root` holds train/ and/or test/).

  `tracks(split)` lists the split's tracks sorted by name, built (and checked) on first use.
  The validation names come from `<root>/validation_tracks.txt` (one per line) if present,
  otherwise from the `musdb` package's list; names missing from train/ are skipped with a
  warning.
  """

  def __init__(self, root: str):
    self.root = os.fspath(root)
    if not os.path.isdir(self.root):
      raise MusdbError(f"{self.root}: not a directory (expected a MUSDB18-HQ folder with "
                       f"train/ and test/)")
    if not any(os.path.isdir(os.path.join(self.root, d)) for d in ("train", "test")):
      raise MusdbError(f"{self.root}: no train/ or test/ folder; not a MUSDB18-HQ layout")
    list_file = os.path.join(self.root, VALIDATION_LIST)
    if os.path.isfile(list_file):
      # Names that are not UTF-8 stay as os.listdir gives them (surrogates), so they match; a
      # UTF-16 file (Windows Notepad's "Unicode") is recognised by its byte-order mark.
      try:
        with open(list_file, "rb") as f:
          raw = f.read()
      except OSError as e:
        raise MusdbError(f"{list_file}: cannot be read ({e.strerror or e})") from None
      utf16 = raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
      text = raw.decode("utf-16" if utf16 else "utf-8-sig", errors="surrogateescape")
      self.validation_names = tuple(line.strip() for line in text.splitlines() if line.strip())
    else:
      self.validation_names = MUSDB_VALIDATION_TRACKS
    self._tracks: dict[str, list[Track]] = {}

  def __repr__(self) -> str:
    return f"MusdbDataset({self.root!r})"

  def _folder_names(self, folder: str) -> list[str]:
    path = os.path.join(self.root, folder)
    if not os.path.isdir(path):
      raise MusdbError(f"{path}: missing folder; {self.root} has no {folder} split")
    names = sorted(d for d in os.listdir(path)  # __MACOSX: what macOS zips add
                   if not d.startswith(".") and d != "__MACOSX")
    for name in names:  # a link to a folder that is gone (unmounted drive) is a missing track
      entry = os.path.join(path, name)
      if os.path.islink(entry) and not os.path.exists(entry):
        raise MusdbError(f"{entry}: broken link to {os.readlink(entry)} (a track folder that "
                         "is not there); restore it or remove the link")
    return [d for d in names if os.path.isdir(os.path.join(path, d))]

  def tracks(self, split: str) -> list[Track]:
    """The tracks of `split` in {"train", "valid", "test", "train_full"}, sorted by name."""
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
    if split not in self._tracks:
      folder = "test" if split == "test" else "train"
      names = self._folder_names(folder)
      if split == "valid":
        missing = sorted(set(self.validation_names) - set(names))
        if missing:
          logging.warning("%s: %d validation track(s) not on disk, skipped: %s",
                          os.path.join(self.root, "train"), len(missing), ", ".join(missing))
        names = [n for n in names if n in set(self.validation_names)]
      elif split == "train":
        names = [n for n in names if n not in set(self.validation_names)]
      self._tracks[split] = [Track(os.path.join(self.root, folder, n)) for n in names]
    return self._tracks[split]
