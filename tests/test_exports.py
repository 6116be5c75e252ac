"""Inference exports (save_inference / load_model / load_inference)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsmamba2_jax import exports
from bsmamba2_jax.config import ModelConfig
from bsmamba2_jax.model import BSMamba2

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
  path = exports.save_inference(tmp_path / "export", CONFIG, params, metadata={"step": 7})
  with open(os.path.join(path, "config.json")) as f:
    content = json.load(f)
  assert content["metadata"] == {"step": 7}
  assert ModelConfig.from_dict(content["model"]) == CONFIG
  model, loaded = exports.load_model(path)
  assert model.config == CONFIG
  _assert_trees_equal(params, loaded)
  audio = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 2000))
  np.testing.assert_array_equal(np.asarray(BSMamba2(CONFIG).apply({"params": params}, audio)),
                                np.asarray(model.apply({"params": loaded}, audio)))
  model_bf16, _ = exports.load_model(path, dtype="bfloat16")
  assert model_bf16.config.dtype == "bfloat16" and model_bf16.config.dim == CONFIG.dim
  with pytest.raises(exports.CheckpointError, match="not dim"):  # the weights fix the others
    exports.load_model(path, dim=32)


def test_export_refuses_to_overwrite(tmp_path, params):
  path = str(tmp_path / "export")
  exports.save_inference(path, CONFIG, params)
  with pytest.raises(FileExistsError, match="already exists"):
    exports.save_inference(path, CONFIG, params)
  doubled = jax.tree_util.tree_map(lambda p: 2 * p, params)
  exports.save_inference(path, CONFIG, doubled, overwrite=True)
  _assert_trees_equal(doubled, exports.load_model(path)[1])
  other = tmp_path / "not_an_export"
  other.mkdir()
  (other / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not a bsmamba2-jax export"):
    exports.save_inference(str(other), CONFIG, params, overwrite=True)
  assert (other / "notes.txt").read_text() == "keep me"
  workdir = tmp_path / "training_run"  # a training workdir's config.json is not an export's
  workdir.mkdir()
  (workdir / "config.json").write_text('{"model": {"preset": "tiny"}, "train": {}}')
  with pytest.raises(FileExistsError, match="not a bsmamba2-jax export"):
    exports.save_inference(str(workdir), CONFIG, params, overwrite=True)
  assert (workdir / "config.json").read_text() == '{"model": {"preset": "tiny"}, "train": {}}'


def test_overwrite_with_bad_metadata_keeps_the_previous_export(tmp_path, params):
  path = str(tmp_path / "export")
  exports.save_inference(path, CONFIG, params, metadata={"step": 1})
  doubled = jax.tree_util.tree_map(lambda p: 2 * p, params)
  with pytest.raises(TypeError, match="metadata is not JSON-serialisable"):
    exports.save_inference(path, CONFIG, doubled, overwrite=True, metadata={"x": object()})
  _assert_trees_equal(params, exports.load_model(path)[1])


def test_load_model_errors_name_the_path(tmp_path, params):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    exports.load_model(missing)
  with pytest.raises(exports.CheckpointError, match="not a bsmamba2-jax export"):
    exports.load_model(str(tmp_path))
  odd = tmp_path / "weights.npz"
  odd.write_bytes(b"\0")
  with pytest.raises(exports.CheckpointError, match="unrecognised checkpoint file"):
    exports.load_model(str(odd))

  path = exports.save_inference(tmp_path / "export", CONFIG, params)
  config_json = os.path.join(path, "config.json")
  original = open(config_json).read()
  with open(config_json, "w") as f:
    f.write(original[: len(original) // 2])
  with pytest.raises(exports.CheckpointError, match="corrupted config"):
    exports.load_model(path)

  content = json.loads(original)
  content["model"]["dim"] = 32  # The stored params were made for dim 16.
  with open(config_json, "w") as f:
    json.dump(content, f)
  with pytest.raises(exports.CheckpointError, match="shape"):
    exports.load_model(path)

  with open(config_json, "w") as f:
    f.write(original)
  for root, _, files in os.walk(os.path.join(path, "params")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(exports.CheckpointError, match="params"):
    exports.load_model(path)


def test_load_model_reads_torch_files_by_content(tmp_path):
  """`.pth.tar` or `.PT`: what convert_torch reads, separation reads too."""
  torch = pytest.importorskip("torch")
  from bsmamba2_jax import convert  # pylint: disable=g-import-not-at-top
  from bsmamba2_jax.model import abstract_params  # pylint: disable=g-import-not-at-top
  config = ModelConfig.preset("tiny", dim=8, depth=1, d_state=4, expand=2, headdim=8,
                              n_fft=1024, band_widths=(256, 256, 1), audio_channels=1)
  params = jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype), abstract_params(config))
  sd = convert.params_to_torch_state_dict(config, params)
  for name in ("model.pth.tar", "model.PT"):
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / name)
    model, _ = exports.load_model(str(tmp_path / name))
    assert model.config.n_fft == 1024 and model.config.hop_length == 441


def test_failed_export_write_keeps_the_previous_export(tmp_path, params, monkeypatch):
  path = tmp_path / "export"
  exports.save_inference(path, CONFIG, params, metadata={"step": 1})

  def fail(self, *args, **kwargs):
    raise RuntimeError("disk full\nmore detail")
  monkeypatch.setattr(exports.ocp.StandardCheckpointer, "save", fail)
  with pytest.raises(exports.CheckpointError, match=r"export: cannot write the export "
                                                        r"\(RuntimeError: disk full\)$"):
    exports.save_inference(path, CONFIG, params, overwrite=True, metadata={"step": 2})
  monkeypatch.undo()
  _, restored, metadata = exports.load_inference(path)
  assert metadata == {"step": 1}
  _assert_trees_equal(params, restored)
  assert sorted(os.listdir(tmp_path)) == ["export"]  # nothing half-written left behind


def test_non_utf8_export_folder_is_refused_in_one_line(tmp_path, params):
  path = os.path.join(str(tmp_path), os.fsdecode(b"out\xfe"))
  with pytest.raises(exports.CheckpointError, match="not a UTF-8 path"):
    exports.save_inference(path, CONFIG, params)
  assert os.listdir(tmp_path) == []  # a rerun is not blocked by a half export
