"""Evaluation against an independent float64 NumPy cSDR/uSDR written from docs/metrics.md."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from bsmamba2_jax import evaluation
from data_pipeline.musdb import MusdbDataset
from data_pipeline.synthetic import generate_dataset
from tests.random_models import tiny_export

RATE = 44100


def reference_csdr(refs, ests):
  """cSDR (docs/metrics.md §2): 1-s frames, trailing part dropped, NaN frames if a signal is
  silent."""
  frames = refs.shape[-1] // RATE
  r = refs[..., :frames * RATE].astype(np.float64).reshape(*refs.shape[:2], frames, RATE)
  e = ests[..., :frames * RATE].astype(np.float64).reshape(*ests.shape[:2], frames, RATE)
  with np.errstate(divide="ignore"):
    sdr = 10 * np.log10((r**2).sum(axis=(1, 3)) / ((e - r)**2).sum(axis=(1, 3)))
  silent = lambda x: (x.sum(axis=1) == 0).all(axis=-1).any(axis=0)
  sdr[:, silent(r) | silent(e)] = np.nan
  return np.nanmedian(sdr, axis=1)


def reference_usdr(ref, est):
  ref, est = ref.astype(np.float64), est.astype(np.float64)
  return 10 * np.log10(((ref**2).sum() + 1e-7) / (((ref - est)**2).sum() + 1e-7))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("data") / "synthetic")
  return generate_dataset(root, num_train=0, num_test=2, seconds=4.5, seed=3)


def true_stems(track):
  vocals = track.read_all("vocals")
  accompaniment = sum(track.read_all(s) for s in ("drums", "bass", "other"))
  return track.read_all("mixture"), vocals, accompaniment


class ScaledOracle:
  """Returns `gain` times the true vocals of whichever dataset track it is given."""

  def __init__(self, data_dir, gain):
    self.tracks = MusdbDataset(data_dir).tracks("test")
    self.gain = gain

  def separate(self, audio, sample_rate):
    assert sample_rate == RATE
    [vocals] = [true_stems(t)[1] for t in self.tracks
                if t.num_samples == audio.shape[-1]
                and np.array_equal(sf.read(t.file("mixture"), dtype="float32")[0].T, audio)]
    return {"vocals": self.gain * vocals, "accompaniment": audio - self.gain * vocals}


def expected_row(track, vocals_estimate):
  mixture, vocals, accompaniment = true_stems(track)
  refs = np.stack([vocals, accompaniment])
  ests = np.stack([vocals_estimate, mixture - vocals_estimate])
  csdr = reference_csdr(refs, ests)
  mix_csdr = reference_csdr(refs, np.stack([mixture, mixture]))
  return dict(vocals_csdr=csdr[0], accompaniment_csdr=csdr[1],
              vocals_usdr=reference_usdr(vocals, vocals_estimate),
              accompaniment_usdr=reference_usdr(accompaniment, mixture - vocals_estimate),
              mix_vocals_csdr=mix_csdr[0], mix_accompaniment_csdr=mix_csdr[1],
              mix_vocals_usdr=reference_usdr(vocals, mixture),
              mix_accompaniment_usdr=reference_usdr(accompaniment, mixture))


@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_oracle_and_mixture_scores(dataset, gain):
  results = evaluation.evaluate(ScaledOracle(dataset, gain), dataset, "test", progress=False)
  tracks = MusdbDataset(dataset).tracks("test")
  assert [r["track"] for r in results["tracks"]] == [t.name for t in tracks]
  for row, track in zip(results["tracks"], tracks):
    vocals = true_stems(track)[1]
    expected = expected_row(track, gain * vocals)
    for key, value in expected.items():
      np.testing.assert_allclose(row[key], value, rtol=1e-6, err_msg=key)
    if gain == 1.0:  # the exact vocals: infinite cSDR, uSDR set by the 1e-7 floor
      assert row["vocals_csdr"] == np.inf
      np.testing.assert_allclose(
          row["vocals_usdr"], 10 * np.log10(((vocals.astype(np.float64)**2).sum() + 1e-7) / 1e-7))
    else:  # half the vocals: every scored frame is 20 log10(2) dB
      np.testing.assert_allclose(row["vocals_csdr"], 20 * np.log10(2), rtol=1e-6)
      np.testing.assert_allclose(row["vocals_usdr"], 20 * np.log10(2), rtol=1e-6)
  for key in evaluation.SCORES:
    values = np.array([r[key] for r in results["tracks"]])
    assert results["aggregate"][key]["count"] == 2
    np.testing.assert_allclose(results["aggregate"][key]["median"], np.median(values))
    np.testing.assert_allclose(results["aggregate"][key]["mean"], np.mean(values))
    np.testing.assert_allclose(results["baseline"]["mix_" + key]["mean"],
                               np.mean([r["mix_" + key] for r in results["tracks"]]))


def test_vocal_activity_and_sparse_breakdown():
  levels_db = [-30.0, -50.0, 0.0, -40.5, -39.5, -80.0, -10.0, -45.0]
  x = np.concatenate([np.full((2, RATE), 10 ** (db / 20)) for db in levels_db], axis=1)
  x = np.concatenate([x, np.ones((2, 100))], axis=1)  # trailing partial second: not scored
  assert evaluation.vocal_activity(x.astype(np.float32), RATE) == 4 / 8
  # Under a second: one frame of the whole track, as cSDR frames it.
  assert evaluation.vocal_activity(np.full((2, 100), 0.1, np.float32), RATE) == 1.0
  assert evaluation.vocal_activity(np.full((2, 100), 1e-3, np.float32), RATE) == 0.0
  rows = [dict(vocal_activity=a, **{k: float(i) for k in evaluation.SCORES})
          for i, a in enumerate([0.0, 0.1, 0.3, 1.0, 1.0])]
  breakdown = evaluation.sparse_breakdown(rows)
  assert [b["tracks"] for b in breakdown] == [2, 1, 0, 2]
  assert breakdown[0]["vocals_csdr_median"] == 0.5 and breakdown[3]["vocals_usdr_mean"] == 3.5


def test_reports_are_written_and_never_overwritten(dataset, tmp_path):
  results = evaluation.evaluate(ScaledOracle(dataset, 0.5), dataset, "test", progress=False)
  study = [dict(segment=s, vocals_csdr_median=float(s), vocals_csdr_mean=1.0,
                vocals_usdr_median=2.0, vocals_usdr_mean=3.0) for s in (1.0, 2.0)]
  out = str(tmp_path / "report")
  paths = evaluation.write_results(out, results, study)
  with open(os.path.join(out, "per_track.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["track"] for r in rows] == [r["track"] for r in results["tracks"]]
  np.testing.assert_allclose(float(rows[0]["vocals_csdr"]), 20 * np.log10(2), rtol=1e-6)
  with open(os.path.join(out, "results.json")) as f:
    assert json.load(f)["segment_study"] == study
  for name in ("per_track.png", "sdr_vs_segment.png"):
    with open(os.path.join(out, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "| model | vocals | 6.021 |" in open(os.path.join(out, "results.md")).read()
  assert len(paths) == 7
  with pytest.raises(FileExistsError, match="pass --overwrite"):
    evaluation.write_results(out, results, study)
  evaluation.write_results(out, results, None, overwrite=True)
  # The replaced reports are this run's only: no earlier segment study is left beside them.
  assert not os.path.exists(os.path.join(out, "segment_study.csv"))
  assert not os.path.exists(os.path.join(out, "sdr_vs_segment.png"))
  # An undefined score is null in results.json, which stays standard JSON.
  results["tracks"][0] = dict(results["tracks"][0], vocals_csdr=float("nan"))
  evaluation.write_results(out, results, None, overwrite=True)
  with open(os.path.join(out, "results.json")) as f:
    strict = json.load(f, parse_constant=lambda name: pytest.fail(f"{name} in results.json"))
  assert strict["tracks"][0]["vocals_csdr"] is None
  # A track folder whose name is not UTF-8 (os.fsdecode keeps its bytes as surrogates).
  odd = os.fsdecode(b"caf\xe9")
  results["tracks"][0] = dict(results["tracks"][0], track=odd)
  evaluation.write_results(out, results, None, overwrite=True)
  with open(os.path.join(out, "per_track.csv"), "rb") as f:
    assert b"caf\xe9," in f.read()


def test_output_folder_problems_fail_before_the_model_is_loaded(dataset, tmp_path, monkeypatch):
  from bsmamba2_jax import exports

  def not_yet(*args, **kwargs):
    raise AssertionError("the model was loaded before the output folder was checked")
  monkeypatch.setattr(exports, "load_model", not_yet)
  with pytest.raises(ValueError, match="lies inside the dataset's .*test"):
    evaluation.run("unused", dataset, "test", os.path.join(dataset, "test", "eval"))
  blocker = tmp_path / "afile"
  blocker.write_text("")
  with pytest.raises(PermissionError, match="is not a writable folder"):
    evaluation.run("unused", dataset, "test", str(blocker / "eval"))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  """A one-layer tiny model with random parameters, exported."""
  return tiny_export(str(tmp_path_factory.mktemp("model") / "export"))


@pytest.mark.integration
def test_run_on_generated_data(dataset, export, tmp_path):
  results, study, paths = evaluation.run(export, dataset, "test", str(tmp_path / "eval"),
                                         segment=1.0, segments=[1.0], progress=False)
  assert len(results["tracks"]) == 2 and all(os.path.exists(p) for p in paths)
  assert np.isfinite([r["vocals_usdr"] for r in results["tracks"]]).all()
  # The 1-s study row is the main evaluation (same chunking): identical scores.
  assert study[0]["vocals_csdr_median"] == results["aggregate"]["vocals_csdr"]["median"]
  with pytest.raises(FileExistsError, match="pass --overwrite"):
    evaluation.run(export, dataset, "test", str(tmp_path / "eval"))


@pytest.mark.integration
@pytest.mark.slow
def test_cli_on_generated_data(dataset, export, tmp_path):
  out = tmp_path / "eval"
  cmd = [sys.executable, "-m", "experiments.evaluate", f"--checkpoint={export}",
         f"--data_dir={dataset}", "--split=test", f"--output_dir={out}", "--segment=1",
         "--segments=0.5,1"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "## Segment length" in proc.stdout
  with open(out / "results.json") as f:
    results = json.load(f)
  assert [r["segment"] for r in results["segment_study"]] == [0.5, 1.0]
  assert len(results["tracks"]) == 2
  # The 1-s study row is the main evaluation (same chunking): identical scores.
  assert (results["segment_study"][1]["vocals_csdr_median"]
          == results["aggregate"]["vocals_csdr"]["median"])
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
  assert proc.returncode == 2 and "pass --overwrite" in proc.stderr


def test_a_track_that_cannot_be_scored_is_left_out_and_reported(dataset, tmp_path, caplog):
  import shutil
  copy = shutil.copytree(dataset, tmp_path / "data")
  broken, kept = MusdbDataset(str(copy)).tracks("test")
  mixture = broken.read_all("mixture")
  mixture[0, 100] = np.nan
  sf.write(broken.file("mixture"), mixture.T, RATE, subtype="FLOAT")
  results = evaluation.evaluate(ScaledOracle(str(copy), 0.5), str(copy), "test", progress=False)
  assert [r["track"] for r in results["tracks"]] == [kept.name]
  [failed] = results["failed"]
  assert failed["track"] == broken.name
  assert f"{broken.file('mixture')}: non-finite samples" in failed["error"]
  assert "track left out" in caplog.text
  assert results["aggregate"]["vocals_csdr"]["count"] == 1
  assert "## Tracks left out" in evaluation.markdown_report(results)


def test_silent_vocals_and_a_foreign_mixture_are_named(dataset, tmp_path, caplog):
  """A track whose vocals are silent throughout is scored but its cSDRs are undefined: listed
  in the report. A mixture that is not the sum of its stems is warned about."""
  import shutil
  copy = shutil.copytree(dataset, tmp_path / "data")
  quiet, foreign = MusdbDataset(str(copy)).tracks("test")
  mixture, vocals, _ = true_stems(quiet)
  sf.write(quiet.file("vocals"), np.zeros_like(vocals).T, RATE, subtype="FLOAT")
  sf.write(quiet.file("mixture"), (mixture - vocals).T, RATE, subtype="FLOAT")
  sf.write(foreign.file("mixture"), (0.3 * foreign.read_all("mixture")).T, RATE, subtype="FLOAT")
  results = evaluation.evaluate(ScaledOracle(str(copy), 0.5), str(copy), "test", progress=False)
  assert results["failed"] == []
  # cSDR's frames are those where no reference is silent: here none, for either source.
  scores = "vocals_csdr, accompaniment_csdr"
  assert results["undefined"] == [dict(track=quiet.name, scores=scores)]
  assert f"| {quiet.name} | {scores} |" in evaluation.markdown_report(results)
  assert f"{foreign.file('mixture')}: not the sum of the four stems (residual 7.4 dB" in caplog.text
  assert quiet.file("mixture") + ": not the sum" not in caplog.text


def test_a_non_finite_separation_is_left_out_not_scored(dataset):
  """cSDR's nanmedian must not score the finite frames of a partly NaN estimate."""
  class PartlyBroken(ScaledOracle):
    def separate(self, audio, sample_rate):
      out = super().separate(audio, sample_rate)
      if self.tracks[0].read_all("mixture").shape == audio.shape and np.array_equal(
          self.tracks[0].read_all("mixture"), audio):
        out["vocals"] = out["vocals"].copy()
        out["vocals"][:, :RATE] = np.nan
      return out
  separator = PartlyBroken(dataset, 0.5)
  results = evaluation.evaluate(separator, dataset, "test", progress=False)
  [failed] = results["failed"]
  assert failed["track"] == separator.tracks[0].name
  assert "separated vocals have non-finite samples" in failed["error"]


def test_bad_settings_fail_before_the_run(dataset, export, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  with pytest.raises(FileExistsError, match="is not a folder"):
    evaluation.run(export, dataset, "test", str(a_file))
  with pytest.raises(ValueError, match="segment must be positive"):
    evaluation.run(export, dataset, "test", str(tmp_path / "eval"), segments=[1.0, -1.0])
  with pytest.raises(ValueError, match="max_tracks must be >= 1"):
    evaluation.run(export, dataset, "test", str(tmp_path / "eval"), max_tracks=-1)
  assert not os.path.exists(tmp_path / "eval")
