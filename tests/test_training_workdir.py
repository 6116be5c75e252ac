"""Training around the loop, without running it: validation scoring, the workdir's resume rules
and metrics logging, exporting from a workdir, the settings check and the shipped configs."""
import os

import numpy as np
import pytest

from bsmamba2_jax.training import loop, workdir as workdir_lib


def test_validation_leaves_out_tracks_with_silent_vocals(monkeypatch, caplog):
  import ml_collections

  from bsmamba2_jax import metrics
  from bsmamba2_jax.training import validation
  rng = np.random.default_rng(0)
  vocals = (0.1 * rng.standard_normal((2, 2, 44100))).astype(np.float32)
  vocals[1] = 0.0  # an instrumental
  mixture = vocals + (0.1 * rng.standard_normal(vocals.shape)).astype(np.float32)
  monkeypatch.setattr(validation, "validation_batches", lambda config, warn: iter([dict(
      mixture=mixture, vocals=vocals, track=np.array(["Singer - Song", "Band - Instrumental"]))]))
  config = ml_collections.ConfigDict(dict(eval=dict(batch_size=2)))
  half = lambda params, x: 0.5 * x
  scores = validation.validate(config, half, params=None, sample_rate=44100)
  assert scores["valid_usdr"] == pytest.approx(float(metrics.usdr(vocals[0], 0.5 * mixture[0])))
  assert scores["valid_input_usdr"] == pytest.approx(float(metrics.usdr(vocals[0], mixture[0])))
  assert "1 track(s) with silent vocals left out of the scores: Band - Instrumental" in caplog.text
  caplog.clear()  # the launcher's later validations leave them out without a word
  assert validation.validate(config, half, params=None, sample_rate=44100,
                             warn=False) == pytest.approx(scores, nan_ok=True)
  assert "silent vocals" not in caplog.text


def test_validation_of_four_stems_scores_them_together_per_stem(monkeypatch, caplog):
  """4 stems: per-stem uSDR (mean over tracks) and cSDR (median), their means over stems; a stem
  silent in a track is left out of that track's set, with one warning."""
  import ml_collections

  from bsmamba2_jax import metrics
  from bsmamba2_jax.config import model_settings
  from bsmamba2_jax.training import validation
  stems = ("drums", "bass", "other", "vocals")
  rng = np.random.default_rng(1)
  targets = {s: (0.1 * rng.standard_normal((2, 1, 44100))).astype(np.float32) for s in stems}
  targets["vocals"][1] = 0.0  # an instrumental
  mixture = sum(targets.values())
  monkeypatch.setattr(validation, "validation_batches", lambda config, warn: iter([dict(
      mixture=mixture, **targets, track=["Singer - Song", "Band - Instrumental"])]))
  config = ml_collections.ConfigDict(dict(
      eval=dict(batch_size=3), model=model_settings("tiny", stems=stems, audio_channels=1)))
  gains = np.array([0.2, 0.4, 0.6, 0.8], np.float32)
  seen = []

  def estimate(params, x):
    seen.append(x.shape)
    return x[:, None] * gains[None, :, None, None]  # (b, 4, C, N), stems in config order

  scores = validation.validate(config, estimate, params=None, sample_rate=44100)
  assert seen == [(3, 1, 44100)]  # padded to the batch size
  assert set(scores) == {"valid_usdr", "valid_csdr", "valid_input_usdr"} | {
      f"valid_{s}_{m}" for s in stems for m in ("usdr", "csdr")}
  refs = [np.stack([targets[s][t] for s in stems]) for t in range(2)]
  ests = [gains[:, None, None] * mixture[t] for t in range(2)]
  usdr = [metrics.usdr(refs[0], ests[0]), metrics.usdr(refs[1][:3], ests[1][:3])]
  csdr = [metrics.csdr(refs[0], ests[0]), metrics.csdr(refs[1][:3], ests[1][:3])]
  for i, stem in enumerate(stems):
    tracks = [0, 1] if stem != "vocals" else [0]
    assert scores[f"valid_{stem}_usdr"] == pytest.approx(np.mean([usdr[t][i] for t in tracks]))
    assert scores[f"valid_{stem}_csdr"] == pytest.approx(np.median([csdr[t][i] for t in tracks]))
  assert scores["valid_usdr"] == pytest.approx(np.mean([scores[f"valid_{s}_usdr"] for s in stems]))
  assert scores["valid_csdr"] == pytest.approx(np.mean([scores[f"valid_{s}_csdr"] for s in stems]))
  input_usdr = [np.mean([metrics.usdr(targets[s][t], mixture[t]) for t in range(2)
                         if np.any(targets[s][t])]) for s in stems]
  assert scores["valid_input_usdr"] == pytest.approx(np.mean(input_usdr))
  warned = [r.getMessage() for r in caplog.records if "silent" in r.getMessage()]
  assert len(warned) == 1 and "vocals in Band - Instrumental" in warned[0], warned
  caplog.clear()
  assert validation.validate(config, estimate, None, 44100, warn=False) == pytest.approx(scores)
  assert "silent" not in caplog.text
  wrong = lambda params, x: x  # a one-stem output for a 4-stem config
  with pytest.raises(ValueError, match="output for 4 stem"):
    validation.validate(config, wrong, None, 44100)


def test_metrics_csv_has_the_per_stem_columns_of_a_multi_stem_model(tmp_path):
  import csv

  from bsmamba2_jax.training import logs
  assert logs.csv_fields(("vocals",)) == logs.CSV_FIELDS
  fields = logs.csv_fields(("drums", "vocals"))
  assert fields[-4:] == ("valid_drums_usdr", "valid_drums_csdr", "valid_vocals_usdr",
                         "valid_vocals_csdr")
  workdir = str(tmp_path)
  log = logs.MetricsLog(workdir, enabled=True)  # a file with the one-stem columns
  log.write(1, dict(loss=0.5))
  log.close()
  log = logs.MetricsLog(workdir, enabled=True, start_step=1, fields=fields)
  log.write(2, dict(loss=0.4, valid_usdr=1.0, valid_drums_usdr=2.0, valid_vocals_csdr=3.0))
  log.close()
  with open(os.path.join(workdir, "metrics.csv")) as f:
    reader = csv.DictReader(f)
    rows = list(reader)
  assert tuple(reader.fieldnames) == fields
  assert [(r["step"], r["loss"], r["valid_drums_usdr"]) for r in rows] == [
      ("1", "0.5", ""), ("2", "0.4", "2.0")]


def test_shipped_configs_compute_in_their_dtype():
  from experiments.configs import paper, small
  assert workdir_lib.model_config(small.get_config()).dtype == "auto"  # float32 on CPU
  assert workdir_lib.model_config(paper.get_config()).dtype == "bfloat16"  # the recipe, anywhere


def test_export_best_without_any_validation_score_is_refused(tmp_path):
  """A run stopped before its first validation has no best step: --best says so instead of
  quietly exporting the latest."""
  import json

  from bsmamba2_jax.training import export
  from bsmamba2_jax.training.checkpoints import TrainingCheckpoints
  from experiments.configs import tiny
  (tmp_path / "config.json").write_text(json.dumps(tiny.get_config().to_dict()))
  manager = TrainingCheckpoints(str(tmp_path / "checkpoints"))
  for step in (1, 2):
    manager.save(step, {"w": np.full(3, step, np.float32)}, meta={"data_position": step})
  manager.close()
  with pytest.raises(ValueError, match=r"no checkpoint has a validation score yet \(steps \[1, 2\]\)"):
    export.restore_state(str(tmp_path), best=True)


def test_export_names_what_a_workdir_is_not(tmp_path):
  """An export, a foreign JSON or a run without checkpoints is named in one error, and nothing is
  created in the folder."""
  import json

  from bsmamba2_jax import exports
  from bsmamba2_jax.training import export
  from experiments.configs import tiny
  an_export = tmp_path / "an_export"
  an_export.mkdir()
  (an_export / "config.json").write_text(json.dumps({"format": exports.EXPORT_FORMAT}))
  with pytest.raises(ValueError, match="an inference export, not a training workdir"):
    export.restore_state(str(an_export))
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "config.json").write_text('{"model": {}}')
  with pytest.raises(ValueError, match=r"not a training run's config \(no data, train, optimizer\)"):
    export.restore_state(str(foreign))
  fresh = tmp_path / "fresh"
  fresh.mkdir()
  (fresh / "config.json").write_text(json.dumps(tiny.get_config().to_dict()))
  with pytest.raises(FileNotFoundError, match="no training checkpoint"):
    export.restore_state(str(fresh))
  assert os.listdir(fresh) == ["config.json"]


@pytest.mark.parametrize("change, message", [
    (dict(num_steps=0), "train.num_steps must be >= 1"),
    (dict(num_steps=5, accumulate=2), r"must be a multiple of optimizer.accumulate \(2\)"),
    (dict(lr=-1.0), "optimizer.lr must be > 0"),
    (dict(warmup_steps=-5), "optimizer.warmup_steps must be >= 0"),
    (dict(ema_decay=1.5), r"ema_decay must be in \[0, 1\)"),
    (dict(log_every=0), "log_every must be >= 1"),
    (dict(eval_every=0), "eval_every must be >= 1"),
    (dict(ckpt_every=0), "ckpt_every must be >= 1"),
    (dict(max_minutes=float("nan")), "--max_minutes must be > 0"),
    (dict(max_minutes=-1.0), "--max_minutes must be > 0"),
    (dict(stems=("vocals", "piano")), "config.model: stem 'piano' is not a MUSDB source"),
])
def test_settings_that_cannot_make_a_run_are_named(change, message):
  from experiments.configs import tiny
  config = tiny.get_config()
  change = dict(change)
  max_minutes = change.pop("max_minutes", None)
  for key, value in change.items():
    section = {"num_steps": config.train, "accumulate": config.optimizer, "lr": config.optimizer,
               "warmup_steps": config.optimizer, "stems": config.model}.get(key, config)
    section[key] = value
  with pytest.raises(ValueError, match=message):
    loop.check_config(config, max_minutes)
  loop.check_config(tiny.get_config(), None)


def test_resume_refuses_other_shapes_and_metrics_keep_each_step_once(tmp_path):
  import csv

  from bsmamba2_jax.training import logs
  from experiments.configs import tiny
  config = tiny.get_config()
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  workdir_lib.prepare(config, workdir)
  stereo = tiny.get_config()
  stereo.model.audio_channels = 2
  with pytest.raises(ValueError, match=r"different model config \(audio_channels 1 != 2\)"):
    workdir_lib.prepare(stereo, workdir)
  other = tiny.get_config()
  other.optimizer.accumulate = 3
  with pytest.raises(ValueError, match=r"different optimizer.accumulate config \(1 != 3\)"):
    workdir_lib.prepare(other, workdir)
  wider = tiny.get_config()
  wider.model.dim = 64
  with pytest.raises(ValueError, match=r"different model config \(dim 32 != 64\)"):
    workdir_lib.prepare(wider, workdir)
  # Same weights, other computation.
  for key, value in (("remat", True), ("chunk_size", 32), ("dtype", "bfloat16"),
                     ("scan_method", "sequential")):
    other = tiny.get_config()
    other.model[key] = value
    workdir_lib.prepare(other, workdir)
  same = tiny.get_config()
  same.model.dim = 32  # the preset's value, spelt out
  workdir_lib.prepare(same, workdir)
  longer = tiny.get_config()
  longer.train.num_steps = 2 * config.train.num_steps
  workdir_lib.prepare(longer, workdir)  # extending a run records its new length
  assert workdir_lib.read_config(workdir).train.num_steps == longer.train.num_steps
  # A run that died after logging steps 4-5 past its checkpoint at 3 resumes from 3.
  log = logs.MetricsLog(workdir, enabled=True)
  for step in range(1, 6):
    log.write(step, dict(loss=0.5))
  log.close()
  logs.MetricsLog(workdir, enabled=True, start_step=3).close()
  with open(os.path.join(workdir, "metrics.csv")) as f:
    assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3"]
  import tensorflow as tf
  events = sorted((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 2  # the dead run's file and the resumed run's
  logged = [(e.step, v.tag) for path in events for e in tf.compat.v1.train.summary_iterator(
      str(path)) for v in e.summary.value]
  assert logged == [(1, "loss"), (2, "loss"), (3, "loss")]


@pytest.mark.parametrize("name", ["paper", "small", "tiny", "quickstart"])
def test_shipped_configs_pass_the_settings_check(name):
  import importlib

  loop.check_config(importlib.import_module(f"experiments.configs.{name}").get_config(), None)


def test_fine_tuning_starts_from_given_weights_with_a_fresh_optimiser(tmp_path):
  import jax

  from bsmamba2_jax.errors import CheckpointError
  from bsmamba2_jax.exports import save_inference
  from bsmamba2_jax.model import abstract_params
  from experiments.configs import tiny
  config = tiny.get_config()
  config.model.update(dict(dim=16, depth=1, d_state=8, headdim=8))
  model_config = workdir_lib.model_config(config)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                                  abstract_params(model_config))
  export = save_inference(str(tmp_path / "export"), model_config, params)
  config.init_from = export
  state = loop.Experiment(config).init_state()
  for ours, given in ((state.params, params), (state.ema_params, params)):
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(given)):
      np.testing.assert_array_equal(a, b)
  assert int(state.step) == 0 and int(state.skipped) == 0
  assert all(not np.any(m) for m in jax.tree_util.tree_leaves(state.opt_state[1][0].mu))
  wider = tiny.get_config()
  wider.model.update(dict(dim=32, depth=1, d_state=8, headdim=8))
  with pytest.raises(CheckpointError, match=rf"config.init_from={export}: parameter "
                                            r"\S+ has shape \(.*\), the config needs"):
    loop.pretrained_params(export, workdir_lib.model_config(wider))
  with pytest.raises(ValueError, match="neither a file or folder nor a registered model"):
    loop.pretrained_params("no-such-model", model_config)
