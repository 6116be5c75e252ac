"""tf.data training batches (pmap shape, determinism, resume, sharding) and validation batches."""
import itertools

import numpy as np
import pytest

from data_pipeline import mixing, musdb, pipeline, salient, synthetic

SEGMENT_S = 0.5
N = 22050


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  path = tmp_path_factory.mktemp("pipeline") / "synthetic"
  return synthetic.generate_dataset(str(path), num_train=3, num_test=1, seconds=6, seed=0,
                                    vocal_density=1.0)


def take(iterator, n):
  return list(itertools.islice(iterator, n))


@pytest.mark.parametrize("mono", [False, True])
def test_batches_have_the_pmap_shape(root, mono):
  it = pipeline.train_iterator(root, segment_seconds=SEGMENT_S, local_devices=2,
                               per_device_batch=3, mono=mono, seed=0)
  batch = next(it)
  assert set(batch) == {"mixture", "vocals"}
  for x in batch.values():
    assert isinstance(x, np.ndarray) and x.dtype == np.float32
    assert x.shape == (2, 3, 1 if mono else 2, N)
  assert it.step == 1
  assert np.std(batch["mixture"]) > 1e-3


def test_batch_is_a_pure_function_of_seed_step_process(root):
  dataset = musdb.MusdbDataset(root)
  tracks = dataset.tracks("train")
  index = salient.salient_index(dataset, "train", SEGMENT_S, SEGMENT_S / 2)
  it = pipeline.train_iterator(root, segment_seconds=SEGMENT_S, local_devices=1,
                               per_device_batch=2, seed=7, start_step=5, process_index=1,
                               process_count=2)
  batch = next(it)
  for j in range(2):
    expected = mixing.random_mix(tracks, index, pipeline.example_rng(7, 1, 5, j), N)
    np.testing.assert_array_equal(batch["mixture"][0, j], expected["mixture"])
    np.testing.assert_array_equal(batch["vocals"][0, j], expected["vocals"])


def test_same_seed_same_batches_and_resume(root):
  kwargs = dict(segment_seconds=SEGMENT_S, local_devices=1, per_device_batch=2)
  run = take(pipeline.train_iterator(root, seed=1, num_parallel_calls=3, **kwargs), 4)
  again = take(pipeline.train_iterator(root, seed=1, num_parallel_calls=1, prefetch=1, **kwargs), 4)
  resumed = pipeline.train_iterator(root, seed=1, start_step=2, **kwargs)
  assert resumed.step == 2
  for a, b in zip(run, again):
    np.testing.assert_array_equal(a["mixture"], b["mixture"])
  for a, b in zip(run[2:], take(resumed, 2)):
    np.testing.assert_array_equal(a["mixture"], b["mixture"])
    np.testing.assert_array_equal(a["vocals"], b["vocals"])
  other_seed = next(pipeline.train_iterator(root, seed=2, **kwargs))
  other_process = next(pipeline.train_iterator(root, seed=1, process_index=1, process_count=2,
                                               **kwargs))
  assert not np.array_equal(run[0]["mixture"], other_seed["mixture"])
  assert not np.array_equal(run[0]["mixture"], other_process["mixture"])
  assert not np.array_equal(run[0]["mixture"], run[1]["mixture"])


def test_train_iterator_argument_errors(root):
  with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\), got 2"):
    pipeline.train_iterator(root, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="per_device_batch >= 1"):
    pipeline.train_iterator(root, per_device_batch=0)
  with pytest.raises(musdb.MusdbError, match="not a directory"):
    pipeline.train_iterator(root + "/missing")


def test_validation_iterator(root):
  batches = list(pipeline.validation_iterator(root, segment_seconds=2.0, batch_size=2))
  track = musdb.MusdbDataset(root).tracks("valid")[0]
  assert [b["mixture"].shape for b in batches] == [(2, 2, 88200), (1, 2, 88200)]  # 3 windows
  assert batches[0]["track"] == [track.name, track.name]
  np.testing.assert_array_equal(batches[1]["vocals"][0], track.read("vocals", 2 * 88200, 88200))
  np.testing.assert_array_equal(batches[0]["mixture"][1], track.read("mixture", 88200, 88200))
  mono = list(pipeline.validation_iterator(root, segment_seconds=2.0, mono=True, split="test",
                                           max_examples=2))
  assert [b["vocals"].shape for b in mono] == [(1, 1, 88200)] * 2
  spread = list(pipeline.validation_iterator(root, segment_seconds=2.0, max_examples=2))
  np.testing.assert_array_equal(spread[1]["vocals"][0], track.read("vocals", 2 * 88200, 88200))
  with pytest.raises(ValueError, match="no 10-s window in the 'valid' split"):
    pipeline.validation_iterator(root, segment_seconds=10.0)
  with pytest.raises(ValueError, match="max_examples must be >= 1"):
    pipeline.validation_iterator(root, segment_seconds=2.0, max_examples=0)


def test_a_failing_example_raises_its_own_error(root, monkeypatch):
  def unreadable(*args, **kwargs):
    raise musdb.MusdbError("/data/train/t/vocals.wav: unreadable audio file (truncated)")
  monkeypatch.setattr(mixing, "random_mix", unreadable)
  iterator = pipeline.train_iterator(root, segment_seconds=SEGMENT_S, per_device_batch=2)
  with pytest.raises(musdb.MusdbError, match="vocals.wav: unreadable audio file"):
    next(iterator)


def test_empty_validation_split_is_named(root, tmp_path):
  import shutil
  copy = shutil.copytree(root, tmp_path / "copy")
  (copy / musdb.VALIDATION_LIST).write_text("No - Such Track\n")
  with pytest.raises(ValueError, match="the 'valid' split has no tracks .*validation_tracks.txt"):
    pipeline.validation_iterator(str(copy), segment_seconds=SEGMENT_S)


def test_non_finite_audio_fails_in_one_line_not_as_nan_batches(root, tmp_path):
  """Inf in a training stem used to reach the batches (every step skipped), NaN in a validation
  mixture made NaN validation scores; both now name the file."""
  import shutil

  import soundfile as sf
  copy = shutil.copytree(root, tmp_path / "data")
  dataset = musdb.MusdbDataset(str(copy))
  train_track, valid_track = dataset.tracks("train")[0], dataset.tracks("valid")[0]
  for track, stem, value in ((train_track, "drums", np.inf), (valid_track, "mixture", np.nan)):
    audio = track.read_all(stem)
    audio[:, ::5000] = value
    sf.write(track.file(stem), audio.T, 44100, subtype="FLOAT")
  with pytest.raises(musdb.MusdbError, match=f"{train_track.file('drums')}: non-finite"):
    pipeline.training_tracks(str(copy), SEGMENT_S)
  with pytest.raises(musdb.MusdbError, match=f"{valid_track.file('mixture')}: non-finite"):
    take(pipeline.validation_iterator(str(copy), segment_seconds=SEGMENT_S), 1)


def test_tracks_shorter_than_a_segment_are_named_in_a_warning(root, tmp_path, caplog):
  import shutil

  import soundfile as sf
  copy = shutil.copytree(root, tmp_path / "data")
  short = copy / "train" / "Short - Intro"
  short.mkdir()
  for stem in ("mixture", "vocals", "drums", "bass", "other"):
    sf.write(str(short / f"{stem}.wav"), np.full((44100, 2), 0.1, np.float32), 44100)
  tracks, _ = pipeline.training_tracks(str(copy), 2.0)
  assert "Short - Intro" in [t.name for t in tracks]
  assert ("1 track(s) of the 'train' split are shorter than one 2-s segment and are not used: "
          "Short - Intro") in caplog.text
  caplog.clear()
  list(pipeline.validation_iterator(str(copy), segment_seconds=2.0, split="train"))
  assert "Short - Intro" in caplog.text
  caplog.clear()  # a validation after the first names them no more
  list(pipeline.validation_iterator(str(copy), segment_seconds=2.0, split="train", warn=False))
  assert "Short - Intro" not in caplog.text


STEMS4 = ("drums", "bass", "other", "vocals")


@pytest.mark.parametrize("mono", [False, True])
def test_four_stem_batches(root, mono):
  """Every stem as today's "vocals": (devices, b, C, N) float32; the mixture is their sum; the
  batch is the same pure function of the example seeds."""
  dataset = musdb.MusdbDataset(root)
  it = pipeline.train_iterator(root, segment_seconds=SEGMENT_S, local_devices=2,
                               per_device_batch=2, mono=mono, seed=3, stems=STEMS4)
  batch = next(it)
  assert list(batch) == ["mixture", *STEMS4]
  for x in batch.values():
    assert x.dtype == np.float32 and x.shape == (2, 2, 1 if mono else 2, N)
  np.testing.assert_allclose(batch["mixture"], sum(batch[s].astype(np.float64) for s in STEMS4),
                             atol=1e-5)
  tracks = dataset.tracks("train")
  index = salient.salient_index(dataset, "train", SEGMENT_S, SEGMENT_S / 2)
  expected = mixing.random_mix(tracks, index, pipeline.example_rng(3, 0, 0, 3), N, mono=mono,
                               stems=STEMS4)
  for key in batch:
    np.testing.assert_array_equal(batch[key][1, 1], expected[key])
  vocals_only = next(pipeline.train_iterator(root, segment_seconds=SEGMENT_S, local_devices=2,
                                             per_device_batch=2, mono=mono, seed=3))
  np.testing.assert_array_equal(vocals_only["vocals"], batch["vocals"])
  with pytest.raises(ValueError, match="stem 'piano' is not a MUSDB source"):
    pipeline.train_iterator(root, stems=("piano",))


def test_four_stem_validation_batches(root):
  batches = list(pipeline.validation_iterator(root, segment_seconds=2.0, batch_size=2,
                                              stems=STEMS4))
  track = musdb.MusdbDataset(root).tracks("valid")[0]
  assert [b["mixture"].shape for b in batches] == [(2, 2, 88200), (1, 2, 88200)]
  assert set(batches[0]) == {"mixture", "track", *STEMS4}
  for stem in STEMS4:
    assert batches[0][stem].shape == (2, 2, 88200)
    np.testing.assert_array_equal(batches[1][stem][0], track.read(stem, 2 * 88200, 88200))
  mono = list(pipeline.validation_iterator(root, segment_seconds=2.0, mono=True, split="test",
                                           max_examples=2, stems=("bass", "other")))
  assert [b["bass"].shape for b in mono] == [(1, 1, 88200)] * 2 and "vocals" not in mono[0]
  with pytest.raises(ValueError, match="stem 'accompaniment' is not a MUSDB source"):
    pipeline.validation_iterator(root, segment_seconds=2.0, stems=("accompaniment",))
