"""MUSDB18-HQ reader: splits, random-access reads and every documented error."""
import logging
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from data_pipeline import musdb

SR = 44100


def write_track(root, split, name, n=3000, sr=SR, channels=2, seed=0):
  path = os.path.join(root, split, name)
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(seed)
  for stem in musdb.STEMS:
    data = (0.1 * rng.standard_normal((n, channels))).astype(np.float32)
    sf.write(os.fsencode(os.path.join(path, f"{stem}.wav")), data, sr, subtype="FLOAT")
  return path


@pytest.fixture
def root(tmp_path):
  for i, name in enumerate(["Actions - One Minute Smile", "Some - Song", "Other - Song"]):
    write_track(tmp_path, "train", name, seed=i)
  write_track(tmp_path, "test", "Test - Song", seed=9)
  return tmp_path


def test_splits_with_the_musdb_validation_names(root, caplog):
  dataset = musdb.MusdbDataset(str(root))
  with caplog.at_level(logging.WARNING):
    valid = dataset.tracks("valid")
  assert [t.name for t in valid] == ["Actions - One Minute Smile"]
  assert "13 validation track(s) not on disk" in caplog.text and "Leaf - Summerghost" in caplog.text
  assert [t.name for t in dataset.tracks("train")] == ["Other - Song", "Some - Song"]
  assert len(dataset.tracks("train_full")) == 3
  assert [t.name for t in dataset.tracks("test")] == ["Test - Song"]
  assert len(musdb.MUSDB_VALIDATION_TRACKS) == 14
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    dataset.tracks("dev")


def test_validation_list_file_overrides(root):
  (root / musdb.VALIDATION_LIST).write_text("Some - Song\n\nOther - Song\n")
  dataset = musdb.MusdbDataset(str(root))
  assert [t.name for t in dataset.tracks("valid")] == ["Other - Song", "Some - Song"]
  assert [t.name for t in dataset.tracks("train")] == ["Actions - One Minute Smile"]


def test_validation_list_that_is_not_utf8_matches_folder_names(root):
  """A list saved in Latin-1 (or with a UTF-8 BOM) still names folders as os.listdir does."""
  os.rename(root / "train" / "Some - Song", root / os.fsdecode(b"train/Caf\xe9 - Song"))
  (root / musdb.VALIDATION_LIST).write_bytes(b"\xef\xbb\xbfOther - Song\nCaf\xe9 - Song\n")
  dataset = musdb.MusdbDataset(str(root))
  assert [t.name for t in dataset.tracks("valid")] == [os.fsdecode(b"Caf\xe9 - Song"),
                                                        "Other - Song"]
  assert [t.name for t in dataset.tracks("test")] == ["Test - Song"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_validation_list_saved_as_utf16_is_read(root, encoding):
  """Windows Notepad's "Unicode" is UTF-16 with a byte-order mark, CRLF line ends."""
  text = "Other - Song\r\nSome - Song\r\n"
  data = text.encode(encoding)
  if encoding == "utf-16-be":
    data = b"\xfe\xff" + data
  (root / musdb.VALIDATION_LIST).write_bytes(data)
  dataset = musdb.MusdbDataset(str(root))
  assert [t.name for t in dataset.tracks("valid")] == ["Other - Song", "Some - Song"]


def test_track_attributes_and_random_access(root):
  track = musdb.MusdbDataset(str(root)).tracks("test")[0]
  assert (track.num_samples, track.sample_rate, track.num_channels) == (3000, SR, 2)
  reference, _ = sf.read(os.path.join(root, "test", "Test - Song", "drums.wav"), dtype="float64")
  segment = track.read("drums", 1234, 567)
  assert segment.dtype == np.float32 and segment.shape == (2, 567)
  np.testing.assert_array_equal(segment, reference[1234:1801].T)
  np.testing.assert_array_equal(track.read_all("drums"), reference.T)
  with pytest.raises(ValueError, match=r"drums\.wav: segment \[2900, 3001\) outside .* 3000 samp"):
    track.read("drums", 2900, 101)
  with pytest.raises(ValueError, match="unknown stem 'guitar'"):
    track.read("guitar", 0, 10)


def test_missing_stem(root):
  os.remove(root / "test" / "Test - Song" / "bass.wav")
  with pytest.raises(musdb.MusdbError, match=r"bass\.wav: missing stem 'bass' of track 'Test"):
    musdb.MusdbDataset(str(root)).tracks("test")


def test_stems_of_different_length(root):
  path = root / "test" / "Test - Song" / "other.wav"
  sf.write(str(path), np.zeros((2999, 2), np.float32), SR, subtype="FLOAT")
  with pytest.raises(musdb.MusdbError, match=r"Test - Song: stems of different lengths.*2999"):
    musdb.MusdbDataset(str(root)).tracks("test")


def test_stems_with_different_channels(root):
  path = root / "test" / "Test - Song" / "other.wav"
  sf.write(str(path), np.zeros((3000, 1), np.float32), SR, subtype="FLOAT")
  with pytest.raises(musdb.MusdbError, match="stems with different channel counts"):
    musdb.MusdbDataset(str(root)).tracks("test")


def test_wrong_sample_rate(tmp_path):
  write_track(tmp_path, "test", "Low - Rate", sr=22050)
  with pytest.raises(musdb.MusdbError, match=r"mixture\.wav: sample rate 22050 Hz, expected 44100"):
    musdb.MusdbDataset(str(tmp_path)).tracks("test")


def test_unreadable_file(root):
  (root / "test" / "Test - Song" / "vocals.wav").write_bytes(b"this is not audio")
  with pytest.raises(musdb.MusdbError, match=r"vocals\.wav: unreadable audio file"):
    musdb.MusdbDataset(str(root)).tracks("test")


def test_truncated_read(root):
  track = musdb.MusdbDataset(str(root)).tracks("test")[0]
  with open(track.file("vocals"), "r+b") as f:  # cut the data, keep the header's frame count
    f.truncate(os.path.getsize(track.file("vocals")) - 4000)
  with pytest.raises(musdb.MusdbError, match=r"vocals\.wav: read \d+ of 1000 samples"):
    track.read("vocals", 2000, 1000)


def test_bad_roots(tmp_path):
  with pytest.raises(musdb.MusdbError, match="not a directory"):
    musdb.MusdbDataset(str(tmp_path / "nowhere"))
  with pytest.raises(musdb.MusdbError, match="no train/ or test/ folder"):
    musdb.MusdbDataset(str(tmp_path))
  write_track(tmp_path, "train", "Only - Train")
  with pytest.raises(musdb.MusdbError, match="test: missing folder"):
    musdb.MusdbDataset(str(tmp_path)).tracks("test")


def test_hidden_and_plain_files_are_not_tracks(root):
  shutil.copytree(root / "test" / "Test - Song", root / "test" / ".hidden")
  shutil.copytree(root / "test" / "Test - Song", root / "test" / "__MACOSX")
  (root / "test" / "notes.txt").write_text("x")
  assert [t.name for t in musdb.MusdbDataset(str(root)).tracks("test")] == ["Test - Song"]


@pytest.mark.parametrize("channels,n,message", [(3, 3000, "stems with 3 channels"),
                                                (2, 0, r"empty stems \(0 samples\)")])
def test_stems_must_be_mono_or_stereo_and_not_empty(tmp_path, channels, n, message):
  path = write_track(tmp_path, "train", "Odd - Song", n=n, channels=channels)
  with pytest.raises(musdb.MusdbError, match=message) as e:
    musdb.Track(path)
  assert path in str(e.value)


def test_track_folder_name_that_is_not_utf8(tmp_path):
  name = os.fsdecode(b"Caf\xe9 - Latin-1")  # as Linux hands over such a name
  write_track(tmp_path, "test", name)
  [track] = musdb.MusdbDataset(str(tmp_path)).tracks("test")
  assert track.name == name and track.read("vocals", 10, 20).shape == (2, 20)


def test_a_broken_link_to_a_track_folder_is_named_not_skipped(root):
  """A track folder linked from an unmounted drive must not silently shrink the split (a test
  score over fewer tracks would not be comparable)."""
  os.symlink(str(root / "elsewhere" / "Gone - Song"), root / "test" / "Gone - Song")
  with pytest.raises(musdb.MusdbError,
                     match=r"test/Gone - Song: broken link to .*elsewhere/Gone - Song"):
    musdb.MusdbDataset(str(root)).tracks("test")
  os.remove(root / "test" / "Gone - Song")  # a working link is a track
  os.rename(root / "test" / "Test - Song", root / "Test - Song")
  os.symlink(str(root / "Test - Song"), root / "test" / "Test - Song")
  assert [t.name for t in musdb.MusdbDataset(str(root)).tracks("test")] == ["Test - Song"]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_named_where_they_are_read(root, value):
  track = musdb.MusdbDataset(str(root)).tracks("test")[0]
  drums = track.read_all("drums")
  drums[1, 1234] = value
  sf.write(track.file("drums"), drums.T, SR, subtype="FLOAT")
  np.testing.assert_array_equal(track.read("drums", 0, 1234), drums[:, :1234])
  with pytest.raises(musdb.MusdbError, match=r"drums\.wav: non-finite samples \(NaN or Inf\), "
                                             r"the first at sample 1234"):
    track.read("drums", 1000, 1000)
