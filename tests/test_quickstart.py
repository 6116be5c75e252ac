"""The quickstart end to end with a microscopic model and a seconds-long budget."""
import json
import os

import numpy as np
import pytest
import soundfile as sf

from bsmamba2_jax import quickstart
from experiments.configs import quickstart as quickstart_config

pytestmark = pytest.mark.integration  # the whole pipeline, end to end


def microscopic_config():
  config = quickstart_config.get_config()
  config.model.update(dict(dim=8, depth=1, d_state=4, expand=2, headdim=8, n_fft=256,
                           hop_length=64))
  config.data.synthetic.update(dict(num_train=2, num_test=2, seconds=2.0))
  config.data.segment_seconds = config.eval.segment_seconds = 0.5
  config.train.num_steps = 4
  config.train.per_device_batch_size = 2
  config.eval.batch_size = 2
  config.eval.max_examples = 2
  config.log_every = config.eval_every = config.ckpt_every = 2
  config.separate.update(dict(segment=0.5, overlap=0.25, batch_size=2))
  return config


def usdr_float64(reference, estimate):
  """uSDR of one track (docs/metrics.md §1), float64."""
  s, e = np.asarray(reference, np.float64), np.asarray(estimate, np.float64)
  return 10 * np.log10((np.sum(s**2) + 1e-7) / (np.sum((s - e)**2) + 1e-7))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("quickstart"))
  summary = quickstart.run(microscopic_config(), workdir, minutes=10.0, progress=False)
  return workdir, summary


def test_every_artefact_exists(run):
  workdir, summary = run
  for name in ("data/synthetic_manifest.json", "train/metrics.csv", "train/config.json",
               "export/config.json", "evaluation/results.json", "evaluation/per_track.csv",
               "figures/training_curves.png", "figures/spectrograms.png", "summary.json"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  for png in summary["figures"].values():
    with open(png, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(os.path.join(workdir, "train", "checkpoints"))
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f) == json.loads(json.dumps(summary))


def test_numbers_are_finite_and_consistent(run):
  workdir, summary = run
  assert summary["step"] == 4 and summary["test_tracks"] == 2
  for key in ("mixture", "model", "improvement"):
    assert np.isfinite([summary[key]["csdr"], summary[key]["usdr"]]).all(), key
  for metric in ("csdr", "usdr"):
    assert summary["improvement"][metric] == pytest.approx(
        summary["model"][metric] - summary["mixture"][metric])
  # The do-nothing baseline, recomputed from the test files: mean uSDR of mixture vs vocals.
  test_dir = os.path.join(workdir, "data", "test")
  baseline = np.mean([usdr_float64(sf.read(os.path.join(test_dir, t, "vocals.wav"))[0],
                                   sf.read(os.path.join(test_dir, t, "mixture.wav"))[0])
                      for t in sorted(os.listdir(test_dir))])
  assert summary["mixture"]["usdr"] == pytest.approx(baseline, abs=1e-4)


def test_separated_track_adds_up_to_the_mixture(run):
  workdir, summary = run
  outputs = summary["separated"]
  track = os.path.basename(os.path.dirname(outputs["vocals"]))
  mixture, rate = sf.read(os.path.join(workdir, "data", "test", track, "mixture.wav"))
  vocals, vocals_rate = sf.read(outputs["vocals"])
  accompaniment, _ = sf.read(outputs["accompaniment"])
  assert vocals_rate == rate and vocals.shape == mixture.shape
  assert np.isfinite(vocals).all()
  np.testing.assert_allclose(vocals + accompaniment, mixture, atol=1e-5)


def test_rerun_reuses_everything(run):
  workdir, summary = run
  stamps = {p: os.path.getmtime(p) for p in
            (os.path.join(workdir, "evaluation", "results.json"), summary["separated"]["vocals"],
             os.path.join(workdir, "export", "config.json"))}
  again = quickstart.run(microscopic_config(), workdir, minutes=10.0, progress=False)
  assert again["step"] == summary["step"]
  assert again["model"] == summary["model"]
  assert {p: os.path.getmtime(p) for p in stamps} == stamps


def test_rejects_a_non_positive_budget(tmp_path):
  with pytest.raises(ValueError, match="--minutes must be positive"):
    quickstart.run(microscopic_config(), str(tmp_path), minutes=0.0, progress=False)
