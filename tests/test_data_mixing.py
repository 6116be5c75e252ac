"""Random cross-track mixing (docs/training.md §3): sums, gains, zeroing, mono, augmentation,
validation."""
import os

import numpy as np
import pytest
import soundfile as sf

from data_pipeline import mixing, musdb, salient

SR = 44100
SEGMENT = 4410


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Four tracks of noise stems (0.5 s), their salient index and the on-disk paths."""
  root = tmp_path_factory.mktemp("mixing")
  rng = np.random.default_rng(0)
  for t in range(4):
    path = root / "train" / f"track{t}"
    os.makedirs(path)
    stems = {s: (0.1 * rng.standard_normal((22050, 2))).astype(np.float32) for s in musdb.SOURCES}
    stems["mixture"] = sum(stems.values())
    for stem, x in stems.items():
      sf.write(str(path / f"{stem}.wav"), x, SR, subtype="FLOAT")
  (root / "validation_tracks.txt").write_text("track3\n")
  dataset = musdb.MusdbDataset(str(root))
  tracks = dataset.tracks("train")
  index = salient.salient_index(dataset, "train", SEGMENT / SR, SEGMENT / 2 / SR)
  return dataset, tracks, index


def read64(track, stem, start):
  x, _ = sf.read(os.path.join(track.path, f"{stem}.wav"), dtype="float64")
  return x[start:start + SEGMENT].T


def test_mix_is_the_sum_of_the_drawn_stems(data):
  _, tracks, index = data
  rng = np.random.default_rng(1)
  for _ in range(5):
    draws = mixing.draw_mix(index, rng)
    out = mixing.render_mix(tracks, draws, SEGMENT)
    expected = {stem: draw.gain * read64(tracks[draw.track], stem, draw.start)
                for stem, draw in draws.items()}
    assert out["mixture"].shape == out["vocals"].shape == (2, SEGMENT)
    assert out["mixture"].dtype == np.float32
    np.testing.assert_allclose(out["mixture"], sum(expected.values()), atol=1e-6)
    np.testing.assert_allclose(out["vocals"], expected["vocals"], atol=1e-7)


def test_draw_statistics(data):
  _, _, index = data
  rng = np.random.default_rng(2)
  draws = [mixing.draw_mix(index, rng) for _ in range(3000)]
  for stem in musdb.SOURCES:
    gains = np.array([d[stem].gain for d in draws])
    assert abs(np.mean(gains == 0) - 0.1) < 0.02  # zeroed with p = 0.1
    kept = gains[gains > 0]
    assert kept.min() >= 0.5 and kept.max() <= 1.5 and abs(kept.mean() - 1.0) < 0.02
    assert abs(np.mean(kept < 0.75) - 0.25) < 0.03  # uniform
    assert {d[stem].track for d in draws} == {0, 1, 2}  # every train track (3 is validation)
    assert not any(d[stem].swap or d[stem].flip for d in draws)  # off by default
  same_track = np.mean([len({d[s].track for s in musdb.SOURCES}) == 1 for d in draws])
  assert same_track < 0.1  # stems come from different tracks (3 tracks: 1/27 expected)


def test_mono_is_the_channel_mean(data):
  _, tracks, index = data
  draws = mixing.draw_mix(index, np.random.default_rng(3))
  stereo = mixing.render_mix(tracks, draws, SEGMENT)
  mono = mixing.render_mix(tracks, draws, SEGMENT, mono=True)
  for key in ("mixture", "vocals"):
    assert mono[key].shape == (1, SEGMENT)
    np.testing.assert_allclose(mono[key][0], stereo[key].astype(np.float64).mean(0), atol=1e-7)


def test_random_mix_equals_draw_then_render(data):
  _, tracks, index = data
  a = mixing.random_mix(tracks, index, np.random.default_rng(4), SEGMENT)
  draws = mixing.draw_mix(index, np.random.default_rng(4))
  b = mixing.render_mix(tracks, draws, SEGMENT)
  np.testing.assert_array_equal(a["mixture"], b["mixture"])


def test_channel_swap_and_polarity_flip(data):
  _, tracks, index = data
  config = mixing.MixConfig(channel_swap=True, polarity_flip=True, p_zero=0.0)
  rng = np.random.default_rng(5)
  seen = set()
  for _ in range(8):
    draws = mixing.draw_mix(index, rng, config)
    out = mixing.render_mix(tracks, draws, SEGMENT)
    v = draws["vocals"]
    ref = read64(tracks[v.track], "vocals", v.start)
    ref = (ref[::-1] if v.swap else ref) * (-v.gain if v.flip else v.gain)
    np.testing.assert_allclose(out["vocals"], ref, atol=1e-7)
    seen |= {(d.swap, d.flip) for d in draws.values()}
  assert seen == {(False, False), (False, True), (True, False), (True, True)}


def test_validation_windows_are_aligned_and_unaugmented(data):
  dataset, _, _ = data
  tracks = dataset.tracks("valid")
  windows = mixing.validation_windows(tracks, SEGMENT)
  assert windows == [(0, s) for s in range(0, 22050 - SEGMENT + 1, SEGMENT)]  # tail dropped
  out = mixing.validation_example(tracks[0], SEGMENT, SEGMENT)
  np.testing.assert_array_equal(out["mixture"], read64(tracks[0], "mixture", SEGMENT))
  np.testing.assert_array_equal(out["vocals"], read64(tracks[0], "vocals", SEGMENT))
  mono = mixing.validation_example(tracks[0], SEGMENT, SEGMENT, mono=True)
  np.testing.assert_allclose(mono["mixture"][0], out["mixture"].astype(np.float64).mean(0),
                             atol=1e-7)


STEMS4 = ("drums", "bass", "other", "vocals")


@pytest.mark.parametrize("mono", [False, True])
def test_four_stem_mix_targets_sum_to_the_mixture(data, mono):
  _, tracks, index = data
  rng = np.random.default_rng(6)
  for _ in range(4):
    draws = mixing.draw_mix(index, rng)
    out = mixing.render_mix(tracks, draws, SEGMENT, mono=mono, stems=STEMS4)
    assert list(out) == ["mixture", *STEMS4]
    for stem in STEMS4:
      assert out[stem].shape == (1 if mono else 2, SEGMENT) and out[stem].dtype == np.float32
      assert out[stem].flags.c_contiguous
      draw = draws[stem]
      expected = draw.gain * read64(tracks[draw.track], stem, draw.start)
      np.testing.assert_allclose(out[stem], expected.mean(0, keepdims=True) if mono else expected,
                                 atol=1e-7)
    np.testing.assert_allclose(out["mixture"], sum(out[s].astype(np.float64) for s in STEMS4),
                               atol=1e-6)
  # The one-stem default is unchanged: the same draw gives the same mixture and vocals.
  one = mixing.render_mix(tracks, draws, SEGMENT, mono=mono)
  assert list(one) == ["mixture", "vocals"]
  np.testing.assert_array_equal(one["mixture"], out["mixture"])
  np.testing.assert_array_equal(one["vocals"], out["vocals"])
  again = mixing.random_mix(tracks, index, np.random.default_rng(7), SEGMENT, stems=STEMS4)
  np.testing.assert_array_equal(
      again["bass"], mixing.render_mix(tracks, mixing.draw_mix(index, np.random.default_rng(7)),
                                       SEGMENT, stems=("bass",))["bass"])


def test_stems_must_be_musdb_sources(data):
  dataset, tracks, index = data
  draws = mixing.draw_mix(index, np.random.default_rng(8))
  with pytest.raises(ValueError, match="stem 'piano' is not a MUSDB source.*vocals, drums, bass"):
    mixing.render_mix(tracks, draws, SEGMENT, stems=("vocals", "piano"))
  with pytest.raises(ValueError, match="stem 'mixture' is not a MUSDB source"):
    mixing.random_mix(tracks, index, np.random.default_rng(8), SEGMENT, stems=("mixture",))
  with pytest.raises(ValueError, match="stem 'guitar' is not a MUSDB source"):
    mixing.validation_example(dataset.tracks("valid")[0], 0, SEGMENT, stems=("guitar",))
  with pytest.raises(ValueError, match="more than once"):
    mixing.check_stems(("bass", "bass"))
  assert mixing.check_stems("drums") == ("drums",)


def test_validation_example_with_stems(data):
  dataset, _, _ = data
  track = dataset.tracks("valid")[0]
  out = mixing.validation_example(track, SEGMENT, SEGMENT, stems=STEMS4)
  assert list(out) == ["mixture", *STEMS4]
  for stem in out:
    np.testing.assert_array_equal(out[stem], read64(track, stem, SEGMENT))
  mono = mixing.validation_example(track, SEGMENT, SEGMENT, mono=True, stems=("bass", "drums"))
  assert list(mono) == ["mixture", "bass", "drums"] and mono["bass"].shape == (1, SEGMENT)
