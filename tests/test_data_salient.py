"""Salient-segment rule (docs/training.md §2) on crafted signals, and the cached index."""
import os

import numpy as np
import pytest
import soundfile as sf

from data_pipeline import musdb, salient

SR = 44100
SEGMENT = 4410  # 0.1 s windows: 10 chunks of 441 samples
HOP = 2205


def reference_is_salient(window):
  """docs/training.md §2 in float64 loops: window (C, SEGMENT) → bool."""
  chunk = window.shape[1] // 10
  for channel in np.asarray(window, np.float64):
    rms = sorted(np.sqrt(np.mean(channel[k * chunk:(k + 1) * chunk]**2)) for k in range(10))
    position = 0.15 * 9  # linear-interpolation quantile of 10 sorted values
    low = int(np.floor(position))
    quantile = rms[low] + (position - low) * (rms[low + 1] - rms[low])
    threshold = max(quantile, 1e-3)
    if not sum(r > threshold for r in rms) > 5:
      return False
  return True


def chunk_pattern(active_chunks, rng, level=0.1, channels=2):
  """A window whose chunk k holds noise at `level` iff k in active_chunks, else silence."""
  x = np.zeros((channels, SEGMENT))
  for k in active_chunks:
    x[:, k * 441:(k + 1) * 441] = level * rng.standard_normal((channels, 441))
  return x


@pytest.mark.parametrize("active, expected", [
    (range(10), True), (range(6), True), (range(5), False), ((0, 2, 4, 6, 8, 9), True),
    ((1, 3, 5, 7, 9), False), ((), False)])
def test_more_than_half_of_the_chunks(active, expected):
  window = chunk_pattern(active, np.random.default_rng(0))
  assert reference_is_salient(window) == expected
  assert bool(salient.salient_mask(window)) == expected


def test_every_channel_must_be_active():
  window = chunk_pattern(range(10), np.random.default_rng(1))
  window[1] = 0.0
  assert not salient.salient_mask(window)
  window[1, :7 * 441] = 0.1  # 7 active chunks on the right channel too
  assert salient.salient_mask(window)


def test_floor_of_1e_3():
  rng = np.random.default_rng(2)
  quiet = 5e-4 * rng.standard_normal((2, SEGMENT))  # chunk RMS ≈ 5e-4 < floor
  loud = 3e-3 * rng.standard_normal((2, SEGMENT))
  assert not reference_is_salient(quiet) and not salient.salient_mask(quiet)
  assert reference_is_salient(loud) and salient.salient_mask(loud)


def test_constant_rms_is_not_salient():
  # Equal chunk RMS everywhere: none exceeds the 0.15 quantile (which equals it).
  t = np.arange(SEGMENT)
  window = np.stack([np.sin(2 * np.pi * t / 441)] * 2)  # one period per chunk
  assert not reference_is_salient(window)
  assert not salient.salient_mask(window)


def test_random_windows_match_reference():
  rng = np.random.default_rng(3)
  for _ in range(60):
    levels = rng.choice([0.0, 5e-4, 2e-3, 0.05, 0.5], size=(2, 10))
    window = (levels[:, :, None] * rng.standard_normal((2, 10, 441))).reshape(2, SEGMENT)
    assert bool(salient.salient_mask(window)) == reference_is_salient(window)


def test_salient_starts_follow_the_active_region():
  # Noise only in samples [20000, 30000), silence elsewhere.
  rng = np.random.default_rng(4)
  audio = np.zeros((2, 40000))
  audio[:, 20000:30000] = 0.2 * rng.standard_normal((2, 10000))
  starts = salient.salient_starts(audio, SEGMENT, HOP)
  expected = [s for s in range(0, 40000 - SEGMENT + 1, HOP)
              if reference_is_salient(audio[:, s:s + SEGMENT])]
  assert starts == expected
  # By construction: a window is salient iff more than 5 of its chunks lie in the region.
  by_region = [s for s in range(0, 40000 - SEGMENT + 1, HOP)
               if sum(20000 <= s + 441 * k and s + 441 * (k + 1) <= 30000 for k in range(10)) > 5]
  assert starts == by_region and len(starts) >= 2


def write_track(root, name, stems, split="train"):
  path = os.path.join(root, split, name)
  os.makedirs(path, exist_ok=True)
  for stem, data in stems.items():
    sf.write(os.path.join(path, f"{stem}.wav"), data.T, SR, subtype="FLOAT")
  sf.write(os.path.join(path, "mixture.wav"), sum(stems.values()).T, SR, subtype="FLOAT")


@pytest.fixture
def crafted(tmp_path):
  """Two tracks of 20000 samples: track 0 has silent vocals, track 1 vocals only in its end."""
  rng = np.random.default_rng(5)
  noise = lambda: 0.1 * rng.standard_normal((2, 20000)).astype(np.float32)
  late_vocals = noise()
  late_vocals[:, :11025] = 0  # 11025 = 5 hops
  write_track(tmp_path, "a", dict(vocals=np.zeros((2, 20000), np.float32), drums=noise(),
                                  bass=noise(), other=noise()))
  write_track(tmp_path, "b", dict(vocals=late_vocals, drums=noise(), bass=noise(), other=noise()))
  (tmp_path / "validation_tracks.txt").write_text("")
  return tmp_path


def test_index_per_stem_and_cache(crafted, monkeypatch, caplog):
  dataset = musdb.MusdbDataset(str(crafted))
  index = salient.salient_index(dataset, "train", SEGMENT / SR, HOP / SR)
  all_starts = list(range(0, 20000 - SEGMENT + 1, HOP))
  vocal_expected = [(1, s) for s in all_starts if 11025 <= s]  # 8820: only 5 chunks sung
  assert index["vocals"] == vocal_expected
  assert index["drums"] == [(t, s) for t in (0, 1) for s in all_starts]
  cache_files = os.listdir(crafted / salient.CACHE_DIR)
  assert len(cache_files) == 1 and cache_files[0].startswith("train-")

  def fail(*args, **kwargs):
    raise AssertionError("recomputed although cached")
  monkeypatch.setattr(salient, "salient_starts", fail)
  assert salient.salient_index(musdb.MusdbDataset(str(crafted)), "train", SEGMENT / SR,
                               HOP / SR) == index
  monkeypatch.undo()

  # A damaged cache is rebuilt with a warning.
  [cache_file] = [crafted / salient.CACHE_DIR / name for name in cache_files]
  for damage in ('{"index": {"vocals": [[0, 1]', "{}", '{"index": {"vocals": [[7, 0]]}}'):
    cache_file.write_text(damage)
    caplog.clear()
    assert salient.salient_index(musdb.MusdbDataset(str(crafted)), "train", SEGMENT / SR,
                                 HOP / SR) == index
    assert "damaged salient-segment cache" in caplog.text and str(cache_file) in caplog.text

  # A changed file invalidates the cache: vocals of track b become silent everywhere.
  sf.write(str(crafted / "train" / "b" / "vocals.wav"), np.zeros((20000, 2), np.float32), SR,
           subtype="FLOAT")
  with pytest.raises(ValueError, match="no salient .*'vocals'"):
    salient.salient_index(musdb.MusdbDataset(str(crafted)), "train", SEGMENT / SR, HOP / SR)


def test_segment_must_cut_into_the_chunks(crafted):
  with pytest.raises(ValueError, match="segment_seconds=0.33 is 14553 samples.*10 equal chunks"):
    salient.salient_index(musdb.MusdbDataset(str(crafted)), "train", 0.33, 0.165)


@pytest.mark.parametrize("damage", ['{"index": {"vocals": [[1, 999999]], "drums": [], "bass": [], '
                                    '"other": []}}',
                                    '{"index": {"vocals": [[1, 1e400]]}}', "[" * 100000])
def test_a_cache_that_parses_but_cannot_be_right_is_rebuilt(crafted, caplog, damage):
  """An entry past its track's end (it would fail mid-training, naming the audio file), a number
  too large for an int and JSON nested too deep are damage too, not tracebacks."""
  dataset = musdb.MusdbDataset(str(crafted))
  index = salient.salient_index(dataset, "train", SEGMENT / SR, HOP / SR)
  [cache_file] = (crafted / salient.CACHE_DIR).iterdir()
  cache_file.write_text(damage)
  assert salient.salient_index(musdb.MusdbDataset(str(crafted)), "train", SEGMENT / SR,
                               HOP / SR) == index
  assert "damaged salient-segment cache" in caplog.text


def test_a_cache_write_that_fails_half_way_leaves_no_file_behind(crafted, monkeypatch, caplog):
  def disk_full(obj, f, **kwargs):
    f.write('{"params": ')
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(salient.json, "dump", disk_full)
  index = salient.salient_index(musdb.MusdbDataset(str(crafted)), "train", SEGMENT / SR, HOP / SR)
  assert index["drums"]  # the index itself is fine, only not cached
  assert "cannot write the salient-segment cache" in caplog.text
  assert os.listdir(crafted / salient.CACHE_DIR) == []
