"""Models of several stems through separation (array API, streaming, CLI) and evaluation."""
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from bsmamba2_jax import evaluation, exports
from bsmamba2_jax.separate import separate_files
from bsmamba2_jax.separator import Separator
from data_pipeline.synthetic import generate_dataset
from tests.random_models import tiny_export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = 44100
FOUR = ("drums", "bass", "other", "vocals")


@pytest.fixture(scope="module")
def four_stem_export(tmp_path_factory):
  return tiny_export(str(tmp_path_factory.mktemp("four") / "export"), seed=4, stems=FOUR)


class StemGains:
  """A 3-stem stand-in model whose stem n is (n + 1)/10 of the mixture: (k, C, S) -> (k, 3, C, S)."""

  def __call__(self, chunks):
    return np.stack([(n + 1) / 10 * chunks for n in range(3)], axis=1)


@pytest.mark.parametrize("channels, model_channels", [(2, 2), (1, 2), (2, 1)])
def test_every_stem_overlap_adds_and_adapts_channels(channels, model_channels):
  separator = Separator(StemGains(), channels=model_channels, segment=0.5, overlap=0.25,
                        batch_size=2, stems=("a", "b", "c"))
  assert separator.stems == ("a", "b", "c")       # no residual for several stems
  audio = np.random.default_rng(0).uniform(-0.5, 0.5, (channels, 30_000)).astype(np.float32)
  out = separator.separate(audio, RATE)
  assert sorted(out) == ["a", "b", "c"]
  for n, name in enumerate(("a", "b", "c")):
    np.testing.assert_allclose(out[name], (n + 1) / 10 * audio, atol=1e-5)


def test_one_stem_models_keep_their_residual():
  separator = Separator(lambda x: 0.5 * x, channels=2, segment=0.5, stems=("drums",))
  assert separator.stems == ("drums", "accompaniment")
  audio = np.random.default_rng(1).uniform(-0.5, 0.5, (2, 20_000)).astype(np.float32)
  out = separator.separate(audio, 22050)
  np.testing.assert_allclose(out["drums"] + out["accompaniment"], audio, atol=1e-6)


def test_a_four_stem_model_writes_its_four_stems(tmp_path, four_stem_export):
  model, params = exports.load_model(four_stem_export)
  assert model.config.stems == FOUR
  song = tmp_path / "song.wav"
  audio = np.random.default_rng(2).uniform(-0.3, 0.3, (RATE, 2)).astype(np.float32)
  sf.write(song, audio, RATE, subtype="FLOAT")
  results = separate_files([str(song)], checkpoint=four_stem_export,
                           output_dir=str(tmp_path / "out"), segment=0.5, precision="float32",
                           progress=False)
  assert not results[0].error and sorted(results[0].outputs) == sorted(FOUR)
  direct = Separator.from_model(model, params, segment=0.5).separate(audio.T, RATE)
  for stem in FOUR:
    written, rate = sf.read(tmp_path / "out" / "song" / f"{stem}.wav", dtype="float32")
    assert rate == RATE and written.shape == audio.shape
    np.testing.assert_allclose(written.T, direct[stem], atol=2e-6)  # 24-bit rounding


def test_the_cli_picks_stems_and_names_unknown_ones(tmp_path, four_stem_export):
  song = tmp_path / "song.wav"
  sf.write(song, np.zeros((RATE // 2, 2), np.float32), RATE)
  cli = lambda *args: subprocess.run(
      [sys.executable, "-m", "experiments.separate", str(song), "-o", str(tmp_path / "out"),
       f"--checkpoint={four_stem_export}", "--segment=0.5", "--noprogress", *args],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  ok = cli("--stem=bass", "--stem=vocals")
  assert ok.returncode == 0, ok.stderr
  assert sorted(os.listdir(tmp_path / "out" / "song")) == ["bass.wav", "vocals.wav"]
  bad = cli("--stem=accompaniment")
  assert bad.returncode == 2
  assert "unknown stem(s) accompaniment: this model gives drums, bass, other, vocals" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_evaluation_scores_each_of_four_stems(tmp_path, four_stem_export):
  data = generate_dataset(str(tmp_path / "data"), num_train=0, num_test=2, seconds=3.0, seed=5)
  model, params = exports.load_model(four_stem_export)
  separator = Separator.from_model(model, params, segment=1.0, overlap=0.0)
  results = evaluation.evaluate(separator, data, "test", progress=False)
  assert results["stems"] == list(FOUR)
  for stem in FOUR:
    for score in ("csdr", "usdr"):
      assert np.isfinite(results["tracks"][0][f"{stem}_{score}"])
      assert f"mix_{stem}_{score}" in results["baseline"]
  paths = evaluation.write_results(str(tmp_path / "report"), results)
  report = open(os.path.join(tmp_path, "report", "results.md")).read()
  assert all(f"| model | {stem} |" in report for stem in FOUR) and len(paths) == 5


def test_evaluation_of_an_oracle_stem_is_exact(tmp_path):
  """A stand-in 4-stem "model" returning the true sources scores their uSDR at its ceiling."""
  data = generate_dataset(str(tmp_path / "data"), num_train=0, num_test=1, seconds=6.0, seed=6)
  from data_pipeline.musdb import MusdbDataset  # pylint: disable=g-import-not-at-top
  [track] = MusdbDataset(data).tracks("test")

  class Oracle:
    stems = FOUR

    def separate(self, audio, rate):
      return {s: track.read_all(s) for s in FOUR}

  row = evaluation.evaluate_track(Oracle(), track)
  assert row["vocal_activity"] > 0
  assert all(row[f"{s}_usdr"] > 60 and row[f"{s}_csdr"] > 60 for s in FOUR), row
