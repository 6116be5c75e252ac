"""Synthetic multitrack songs (`songs`) and the dataset writer (`synthetic`): layout, exact
mixtures, levels, determinism, caching, CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from data_pipeline import musdb, songs, synthetic

SR = 44100


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  path = tmp_path_factory.mktemp("synthetic") / "data"
  return synthetic.generate_dataset(str(path), num_train=3, num_test=2, seconds=12, seed=3)


def read(root, split, name, stem):
  x, sr = sf.read(os.path.join(root, split, name, f"{stem}.wav"), dtype="float64")
  assert sr == SR
  return x.T


def test_layout_and_splits(root):
  dataset = musdb.MusdbDataset(root)
  assert [t.name for t in dataset.tracks("train")] == ["synthetic-train-000", "synthetic-train-001"]
  assert [t.name for t in dataset.tracks("valid")] == ["synthetic-valid-000"]
  assert [t.name for t in dataset.tracks("test")] == ["synthetic-test-000",
                                                     "synthetic-test-001-sparse"]
  for track in dataset.tracks("train_full") + dataset.tracks("test"):
    assert (track.num_samples, track.num_channels) == (12 * SR, 2)
    assert sf.info(track.file("mixture")).subtype == "FLOAT"


def test_mixture_is_the_sum_of_the_stems_and_does_not_clip(root):
  for split, name in [("train", "synthetic-train-000"), ("test", "synthetic-test-001-sparse")]:
    stems = {s: read(root, split, name, s) for s in musdb.STEMS}
    np.testing.assert_allclose(stems["mixture"], sum(stems[s] for s in musdb.SOURCES), atol=1e-6)
    for stem, x in stems.items():
      assert np.max(np.abs(x)) < 0.96, stem
      assert np.sqrt(np.mean(x**2)) > 1e-3, stem
    assert not np.allclose(stems["drums"][0], stems["drums"][1])  # panned stereo


def frame_rms(x, frame=4410):
  """Per-0.1-s RMS over both channels: (frames,)."""
  n = x.shape[1] // frame * frame
  return np.sqrt(np.mean(x[:, :n].reshape(2, -1, frame)**2, axis=(0, 2)))


def test_vocal_level_and_sparsity(root):
  dense = {s: read(root, "test", "synthetic-test-000", s) for s in musdb.STEMS}
  sparse = read(root, "test", "synthetic-test-001-sparse", "vocals")
  sung = frame_rms(dense["vocals"]) > 0.1 * frame_rms(dense["vocals"]).max()
  accompaniment = dense["mixture"] - dense["vocals"]
  ratio_db = 20 * np.log10(np.sqrt(np.mean(frame_rms(dense["vocals"])[sung]**2))
                           / np.sqrt(np.mean(frame_rms(accompaniment)[sung]**2)))
  assert -5 < ratio_db < 5  # -3..+3 dB where sung, up to the reverb tails and frame edges
  silent = lambda x: np.mean(frame_rms(x) < 1e-4)
  assert silent(sparse) > silent(dense["vocals"]) + 0.2
  assert 0.05 < 1 - silent(sparse) < 0.6


def test_pauses_are_digital_silence(root):
  """Between phrases, after the reverb has rung out, the stems are exactly zero (no FFT
  round-off), as cSDR's silent-frame rule expects of real stems."""
  for name in ("synthetic-test-000", "synthetic-test-001-sparse"):
    level = np.abs(read(root, "test", name, "vocals"))
    assert np.mean(level == 0) > 0.2
    # Round-off residue (~1e-17) had filled the pauses of dense tracks (37 % of samples).
    assert np.mean((level > 0) & (level < 1e-12)) < 1e-4


def test_vocals_are_harmonic_with_moving_pitch(root):
  vocals = read(root, "train", "synthetic-train-000", "vocals").mean(0)
  rms = frame_rms(np.stack([vocals, vocals]), 2048)
  pitches = []
  for k in np.argsort(rms)[-8:]:  # the loudest 46-ms frames
    x = vocals[k * 2048:(k + 1) * 2048]
    x = x - x.mean()
    ac = np.correlate(x, x, "full")[2047:] / np.dot(x, x)
    lag = 44 + np.argmax(ac[44:442])  # 100..1000 Hz
    assert ac[lag] > 0.5  # periodic: a sung (voiced) sound
    pitches.append(SR / lag)
  assert np.ptp(pitches) > 5  # the melody / vibrato moves


def test_formant_filter_with_a_flat_response_is_the_identity():
  x = np.random.default_rng(0).standard_normal(5000)
  frames = len(range(0, 5000 + 512, 512))
  flat = np.ones((frames, 1))
  y = songs._formant_filter(x, 0 * flat, 1e12 * flat, flat)  # pylint: disable=protected-access
  np.testing.assert_allclose(y, x, atol=1e-5)


def test_deterministic_by_seed(root, tmp_path):
  again = synthetic.generate_dataset(str(tmp_path / "again"), num_train=3, num_test=2,
                                     seconds=12, seed=3)
  other = songs.synthesize_track(4, 0, 0, 12, 0.6)
  for stem in musdb.STEMS:
    a = read(root, "train", "synthetic-train-001", stem)
    np.testing.assert_array_equal(a, read(again, "train", "synthetic-train-001", stem))
    assert not np.array_equal(a.astype(np.float32), other[stem])


def test_cached_refuses_foreign_and_overwrites(tmp_path):
  out = str(tmp_path / "d")
  kwargs = dict(num_train=1, num_test=1, seconds=1, seed=0)
  synthetic.generate_dataset(out, **kwargs)
  manifest = json.load(open(os.path.join(out, synthetic.MANIFEST)))
  assert manifest["complete"] and manifest["params"]["num_valid"] == 0
  mtime = os.stat(os.path.join(out, "test", "synthetic-test-000", "vocals.wav")).st_mtime_ns
  synthetic.generate_dataset(out, **kwargs)  # same parameters: nothing rewritten
  assert os.stat(os.path.join(out, "test", "synthetic-test-000", "vocals.wav")).st_mtime_ns == mtime
  with pytest.raises(FileExistsError, match="other parameters"):
    synthetic.generate_dataset(out, **{**kwargs, "seed": 1})
  synthetic.generate_dataset(out, **{**kwargs, "seed": 1, "num_test": 0}, overwrite=True)
  assert os.listdir(os.path.join(out, "test")) == []  # old tracks removed
  # A dataset of an older generator with the same parameters is regenerated without asking.
  manifest = json.load(open(os.path.join(out, synthetic.MANIFEST)))
  manifest["params"]["format_version"] = synthetic.FORMAT_VERSION - 1
  json.dump(manifest, open(os.path.join(out, synthetic.MANIFEST), "w"))
  synthetic.generate_dataset(out, **{**kwargs, "seed": 1, "num_test": 0})
  manifest = json.load(open(os.path.join(out, synthetic.MANIFEST)))
  assert manifest["params"]["format_version"] == synthetic.FORMAT_VERSION and manifest["complete"]
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "thesis.tex").write_text("precious")
  with pytest.raises(FileExistsError, match="not empty and holds no synthetic_manifest"):
    synthetic.generate_dataset(str(foreign), overwrite=True, **kwargs)
  assert (foreign / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_train=0, num_test=0), "at least one track"),
    (dict(seconds=0.5), "seconds must be >= 1"),
    (dict(vocal_density=0.0), r"vocal_density must be in \(0, 1\]"),
    (dict(num_valid=5), r"num_valid must be in \[0, num_train=1\]")])
def test_bad_parameters(tmp_path, kwargs, message):
  with pytest.raises(ValueError, match=message):
    synthetic.generate_dataset(str(tmp_path), **{**dict(num_train=1, num_test=1, seconds=1,
                                                        seed=0), **kwargs})


@pytest.mark.integration
def test_cli(tmp_path):
  out = tmp_path / "cli"
  subprocess.run([sys.executable, "-m", "data_pipeline.synthetic", f"--output_dir={out}",
                  "--num_train=2", "--num_test=1", "--seconds=1", "--seed=5"], check=True,
                 capture_output=True)
  assert (out / "validation_tracks.txt").read_text() == "synthetic-valid-000\n"
  assert len(musdb.MusdbDataset(str(out)).tracks("train_full")) == 2
