"""Inference exports (save_inference / load_model) and training-state checkpoints."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bsmamba2_jax import checkpoints, training
from bsmamba2_jax.model import BSMamba2, ModelConfig

# Three bands and n_fft 256 keep init/apply compilation to seconds on a shared CPU.
CONFIG = ModelConfig.preset("tiny", dim=16, depth=1, d_state=16, expand=2, headdim=16, n_fft=256,
                            hop_length=64, band_widths=(32, 32, 65), audio_channels=1)


@pytest.fixture(scope="module")
def params():
  audio = jnp.zeros((1, 1, 1024), jnp.float32)
  return jax.jit(BSMamba2(CONFIG).init)(jax.random.PRNGKey(0), audio)["params"]


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_round_trip(tmp_path, params):
  path = checkpoints.save_inference(tmp_path / "export", CONFIG, params, metadata={"step": 7})
  with open(os.path.join(path, "config.json")) as f:
    content = json.load(f)
  assert content["metadata"] == {"step": 7}
  assert ModelConfig.from_dict(content["model"]) == CONFIG
  model, loaded = checkpoints.load_model(path)
  assert model.config == CONFIG
  _assert_trees_equal(params, loaded)
  audio = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 2000))
  np.testing.assert_array_equal(np.asarray(BSMamba2(CONFIG).apply({"params": params}, audio)),
                                np.asarray(model.apply({"params": loaded}, audio)))
  model_bf16, _ = checkpoints.load_model(path, dtype="bfloat16")
  assert model_bf16.config.dtype == "bfloat16" and model_bf16.config.dim == CONFIG.dim


def test_export_refuses_to_overwrite(tmp_path, params):
  path = str(tmp_path / "export")
  checkpoints.save_inference(path, CONFIG, params)
  with pytest.raises(FileExistsError, match="already exists"):
    checkpoints.save_inference(path, CONFIG, params)
  doubled = jax.tree_util.tree_map(lambda p: 2 * p, params)
  checkpoints.save_inference(path, CONFIG, doubled, overwrite=True)
  _assert_trees_equal(doubled, checkpoints.load_model(path)[1])
  other = tmp_path / "not_an_export"
  other.mkdir()
  (other / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not a bsmamba2-jax export"):
    checkpoints.save_inference(str(other), CONFIG, params, overwrite=True)
  assert (other / "notes.txt").read_text() == "keep me"
  workdir = tmp_path / "training_run"  # a training workdir's config.json is not an export's
  workdir.mkdir()
  (workdir / "config.json").write_text('{"model": {"preset": "tiny"}, "train": {}}')
  with pytest.raises(FileExistsError, match="not a bsmamba2-jax export"):
    checkpoints.save_inference(str(workdir), CONFIG, params, overwrite=True)
  assert (workdir / "config.json").read_text() == '{"model": {"preset": "tiny"}, "train": {}}'


def test_overwrite_with_bad_metadata_keeps_the_previous_export(tmp_path, params):
  path = str(tmp_path / "export")
  checkpoints.save_inference(path, CONFIG, params, metadata={"step": 1})
  doubled = jax.tree_util.tree_map(lambda p: 2 * p, params)
  with pytest.raises(TypeError, match="metadata is not JSON-serialisable"):
    checkpoints.save_inference(path, CONFIG, doubled, overwrite=True, metadata={"x": object()})
  _assert_trees_equal(params, checkpoints.load_model(path)[1])


def test_load_model_errors_name_the_path(tmp_path, params):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    checkpoints.load_model(missing)
  with pytest.raises(checkpoints.CheckpointError, match="not a bsmamba2-jax export"):
    checkpoints.load_model(str(tmp_path))
  odd = tmp_path / "weights.npz"
  odd.write_bytes(b"\0")
  with pytest.raises(checkpoints.CheckpointError, match="unrecognised checkpoint file"):
    checkpoints.load_model(str(odd))

  path = checkpoints.save_inference(tmp_path / "export", CONFIG, params)
  config_json = os.path.join(path, "config.json")
  original = open(config_json).read()
  with open(config_json, "w") as f:
    f.write(original[: len(original) // 2])
  with pytest.raises(checkpoints.CheckpointError, match="corrupted config"):
    checkpoints.load_model(path)

  content = json.loads(original)
  content["model"]["dim"] = 32  # The stored params were made for dim 16.
  with open(config_json, "w") as f:
    json.dump(content, f)
  with pytest.raises(checkpoints.CheckpointError, match="shape"):
    checkpoints.load_model(path)

  with open(config_json, "w") as f:
    f.write(original)
  for root, _, files in os.walk(os.path.join(path, "params")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(checkpoints.CheckpointError, match="params"):
    checkpoints.load_model(path)


def _optimizer_config(accumulate=1):
  return ml_collections.ConfigDict(dict(
      lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip=3.0, warmup_steps=0,
      schedule="constant", no_decay_mask=True, accumulate=accumulate))


def test_training_checkpoints_keep_last_and_best(tmp_path):
  optimizer = training.make_optimizer(_optimizer_config(accumulate=2), num_steps=10)
  params = {"w": jnp.arange(6.0).reshape(2, 3), "A_log": jnp.ones(2)}
  state = training.TrainState.create(params, optimizer, jax.random.PRNGKey(3))
  manager = checkpoints.TrainingCheckpoints(tmp_path / "ckpt", keep_last=2, keep_best=1)
  usdr = {1: 5.0, 2: 9.0, 3: 1.0, 4: 2.0, 5: None, 6: None}
  for step, value in usdr.items():
    state = state.replace(step=jnp.asarray(step, jnp.int32),
                          params={"w": params["w"] + step, "A_log": params["A_log"]})
    manager.save(step, state, meta={"data_position": step},
                 metrics=None if value is None else {"usdr": value})
  assert manager.all_steps() == [2, 5, 6]  # Best uSDR (step 2) plus the last two.
  assert manager.latest_step() == 6
  restored, meta = manager.restore(state)
  assert meta == {"data_position": 6}
  _assert_trees_equal(jax.device_get(state), restored)
  best, _ = manager.restore(state, step=manager.best_step())
  np.testing.assert_array_equal(best.params["w"], params["w"] + 2)
  assert isinstance(best.opt_state, type(state.opt_state))
  manager.close()
  reopened = checkpoints.TrainingCheckpoints(tmp_path / "ckpt", keep_last=2, keep_best=1)
  assert reopened.latest_step() == 6 and reopened.best_step() == 2
  reopened.save(7, state, meta={"data_position": 7}, metrics={"usdr": 0.0})
  assert reopened.all_steps() == [2, 6, 7]  # Step 2 stays best across the restart.
  reopened.close()


def test_load_model_reads_torch_files_by_content(tmp_path):
  """`.pth.tar` or `.PT`: what convert_torch reads, separation reads too."""
  torch = pytest.importorskip("torch")
  from bsmamba2_jax import convert
  from bsmamba2_jax.model import abstract_params
  config = ModelConfig.preset("tiny", dim=8, depth=1, d_state=4, expand=2, headdim=8,
                              n_fft=1024, band_widths=(256, 256, 1), audio_channels=1)
  params = jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype), abstract_params(config))
  sd = convert.params_to_torch_state_dict(config, params)
  for name in ("model.pth.tar", "model.PT"):
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / name)
    model, _ = checkpoints.load_model(str(tmp_path / name))
    assert model.config.n_fft == 1024 and model.config.hop_length == 441


def test_failed_export_write_keeps_the_previous_export(tmp_path, params, monkeypatch):
  path = tmp_path / "export"
  checkpoints.save_inference(path, CONFIG, params, metadata={"step": 1})

  def fail(self, *args, **kwargs):
    raise RuntimeError("disk full\nmore detail")
  monkeypatch.setattr(checkpoints.ocp.StandardCheckpointer, "save", fail)
  with pytest.raises(checkpoints.CheckpointError, match=r"export: cannot write the export "
                                                        r"\(RuntimeError: disk full\)$"):
    checkpoints.save_inference(path, CONFIG, params, overwrite=True, metadata={"step": 2})
  monkeypatch.undo()
  _, restored, metadata = checkpoints.load_inference(path)
  assert metadata == {"step": 1}
  _assert_trees_equal(params, restored)
  assert sorted(os.listdir(tmp_path)) == ["export"]  # nothing half-written left behind


def test_non_utf8_export_folder_is_refused_in_one_line(tmp_path, params):
  path = os.path.join(str(tmp_path), os.fsdecode(b"out\xfe"))
  with pytest.raises(checkpoints.CheckpointError, match="not a UTF-8 path"):
    checkpoints.save_inference(path, CONFIG, params)
  assert os.listdir(tmp_path) == []  # a rerun is not blocked by a half export
