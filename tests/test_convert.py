"""Official checkpoints: the torch-free reader, hyperparameter inference, exact round trips and
one-line errors. `tests/data/official_micro.ckpt` was written by real torch
(tests/data/make_official_micro.py) and `official_micro.npz` holds its tensors as NumPy."""
import importlib.util
import os
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsmamba2_jax import convert, exports, torch_files
from bsmamba2_jax.config import ModelConfig, default_stems
from bsmamba2_jax.errors import CheckpointError
from bsmamba2_jax.model import BSMamba2, abstract_params
from tests import official_reference as ref

DATA = os.path.join(os.path.dirname(__file__), "data")
CKPT = os.path.join(DATA, "official_micro.ckpt")
MICRO = dict(dim=16, depth=1, d_state=8, expand=2, headdim=8, chunk_size=16)


@pytest.fixture(scope="module")
def expected():
  with np.load(os.path.join(DATA, "official_micro.npz")) as z:
    return {k: z[k] for k in z.files}


def test_reader_returns_exactly_what_torch_wrote(expected):
  sd = torch_files.read_torch_checkpoint(CKPT)
  want = {k[3:]: v for k, v in expected.items() if k.startswith("sd/")}
  assert list(sd) == list(want)  # order kept (the EMA list relies on it)
  for k, v in want.items():
    assert sd[k].dtype == v.dtype and np.array_equal(sd[k], v), k
  ema = torch_files.read_torch_checkpoint(CKPT, use_ema=True)
  assert list(ema) == [k for k in want if k.startswith("model.")]
  for k in ema:
    assert np.array_equal(ema[k], expected["ema/" + k]), k


def test_reader_rebuilds_strided_bfloat16(expected):
  whole = torch_files._load_torch_zip(CKPT)
  np.testing.assert_array_equal(np.asarray(whole["bf16_probe"], np.float32), expected["bf16_probe"])


def test_official_file_infers_config_and_matches_reference_forward(expected):
  with pytest.raises(CheckpointError,
                     match=r"official_micro.ckpt: .*hop_length=441 with n_fft=256.*--hop_length"):
    exports.load_torch_checkpoint(CKPT)  # the default hop does not fit its n_fft
  config, params = exports.load_torch_checkpoint(CKPT, hop_length=64)
  assert (config.audio_channels, config.n_fft, config.dim, config.depth) == (2, 256, 8, 1)
  assert (config.d_state, config.expand, config.headdim, config.d_conv) == (4, 2, 8, 4)
  assert config.mask_hidden_mult == 4 and len(config.band_widths) == 23
  sd = {k[len("sd/model."):]: v.astype(np.float64) for k, v in expected.items()
        if k.startswith("sd/model.")}
  audio = np.random.default_rng(1).uniform(-0.5, 0.5, (1, 2, 1000))
  ours = BSMamba2(config).apply({"params": jax.tree_util.tree_map(jnp.asarray, params)},
                                jnp.asarray(audio, jnp.float32))
  want = ref.bsmamba2(sd, audio, channels=2, n_fft=256, hop=64)
  np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-3, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("channels, module_type, stems", [
    (2, "mamba2", 1), (1, "mamba2", 1), (2, "transformer", 1), (2, "mamba2-roformer", 2),
    (1, "mamba", 4)])
def test_round_trip_is_bit_exact(channels, module_type, stems):
  config = ModelConfig.preset("tiny", audio_channels=channels, module_type=module_type,
                              stems=default_stems(stems), **MICRO)
  # Random values in every tensor (the init's ones and zeros would hide transposition slips).
  shapes = abstract_params(config)
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  rng = np.random.default_rng(channels)
  params = jax.tree_util.tree_unflatten(
      tree, [rng.normal(size=leaf.shape).astype(np.float32) for leaf in leaves])
  sd = convert.params_to_torch_state_dict(config, params)
  assert all(k.startswith("model.") for k in sd)
  if module_type == "mamba2":
    assert sd["model.layers.0.0.linear.weight"].shape == (32, 16, 1)
    assert sd["model.layers.0.1.forward_blocks.0.mixer.conv1d.weight"].shape == (48, 1, 4)
  if module_type != "mamba":
    assert ("model.layers.0.1.layers.0.0.to_qkv.weight" in sd) == (module_type != "mamba2")
  else:
    assert sd["model.layers.0.1.backward_blocks.0.mixer.A_log"].shape == (32, 8)
  assert f"model.mask_estimators.{stems - 1}.to_freqs.0.0.2.bias" in sd
  config2, params2 = convert.params_from_torch_state_dict(sd, hop_length=config.hop_length)
  assert config2.weights_view() == config.weights_view()
  leaves = jax.tree_util.tree_leaves_with_path(params)
  leaves2 = dict(jax.tree_util.tree_leaves_with_path(params2))
  for path, leaf in leaves:
    assert np.array_equal(leaf, leaves2[path]), jax.tree_util.keystr(path)
  sd2 = convert.params_to_torch_state_dict(config2, params2)
  assert all(np.array_equal(sd[k], sd2[k]) for k in sd)


@pytest.fixture(scope="module")
def micro_state_dict():
  config = ModelConfig.preset("tiny", **MICRO)
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                  abstract_params(config))
  return convert.params_to_torch_state_dict(config, params)


def test_missing_key_is_named(micro_state_dict):
  sd = dict(micro_state_dict)
  del sd["model.layers.0.1.backward_blocks.0.mixer.D"]
  with pytest.raises(CheckpointError) as e:
    convert.params_from_torch_state_dict(sd)
  assert "layers.0.1.backward_blocks.0.mixer.D" in str(e.value) and "\n" not in str(e.value)


def test_wrong_shape_is_named(micro_state_dict):
  sd = dict(micro_state_dict)
  sd["model.mask_estimators.0.to_freqs.3.0.2.bias"] = np.zeros(7, np.float32)
  with pytest.raises(CheckpointError, match=r"to_freqs\.3\.0\.2\.bias \(7,\)"):
    convert.params_from_torch_state_dict(sd)


def test_unexpected_key_is_named(micro_state_dict):
  sd = dict(micro_state_dict, **{"model.layers.0.0.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(CheckpointError, match=r"unexpected keys \['layers\.0\.0\.extra"):
    convert.params_from_torch_state_dict(sd)


def test_channels_of_a_non_power_of_two_n_fft_are_asked_for_then_used():
  """n_fft 200 stereo: the band sizes also fit mono (n_fft 402) and neither is a power of two."""
  config = ModelConfig.preset("tiny", dim=16, depth=1, d_state=16, expand=2, headdim=16,
                              n_fft=200, hop_length=50, band_widths=(50, 51))
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(config))
  sd = convert.params_to_torch_state_dict(config, params)
  with pytest.raises(CheckpointError,
                     match="stereo model with n_fft 200 and a mono one with n_fft 402: pass "
                           "audio_channels"):
    convert.infer_config(sd, hop_length=50)
  inferred = convert.infer_config(sd, hop_length=50, audio_channels=2)
  assert (inferred.audio_channels, inferred.n_fft, inferred.band_widths) == (2, 200, (50, 51))
  with pytest.raises(CheckpointError, match="do not fit a 2-channel model"):
    convert.infer_config({**sd, "model.band_split.to_features.1.0.gamma": np.ones(6, np.float32)},
                         hop_length=50, audio_channels=2)


def test_shape_inference_failure_is_named():
  with pytest.raises(CheckpointError, match="missing key 'band_split.to_features.0.0.gamma'"):
    convert.params_from_torch_state_dict({"model.final_norm.gamma": np.ones(4, np.float32)})


def test_corrupted_and_foreign_files(tmp_path):
  garbage = tmp_path / "garbage.ckpt"
  garbage.write_bytes(b"GARBAGE" + os.urandom(1000))
  legacy_foreign = tmp_path / "legacy_foreign.ckpt"  # a plain pickle that is not tensors
  legacy_foreign.write_bytes(b"\x80\x02cos\nsystem\nq\x00.")
  truncated = tmp_path / "truncated.ckpt"
  truncated.write_bytes(open(CKPT, "rb").read()[:300_000])
  foreign = tmp_path / "foreign.ckpt"
  with zipfile.ZipFile(foreign, "w") as z:
    z.writestr("readme.txt", "hello")
  for path in (garbage, legacy_foreign, truncated, foreign, tmp_path / "absent.ckpt"):
    with pytest.raises(CheckpointError) as e:
      torch_files.read_torch_checkpoint(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert "weights_only" not in str(e.value)  # never advice to run code from the file
  with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
    torch_files.read_torch_checkpoint(str(garbage))


def test_reader_never_runs_code_from_the_file(tmp_path):
  """A pickle that would call os.system gets an inert stand-in instead."""
  import pickle

  class Evil:
    def __reduce__(self):
      return (os.system, ("touch " + str(tmp_path / "pwned"),))
  path = tmp_path / "evil.ckpt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"state_dict": {"x": Evil()}}, protocol=2))
  with pytest.raises(CheckpointError):
    torch_files.read_torch_checkpoint(str(path))
  assert not (tmp_path / "pwned").exists()


@pytest.mark.integration
def test_cli_converts_to_an_export_that_load_model_reads(tmp_path, expected):
  from bsmamba2_jax.exports import load_model
  out = tmp_path / "export"
  cmd = [sys.executable, "-m", "experiments.convert_torch", f"--torch_ckpt={CKPT}",
         f"--output_dir={out}", "--hop_length=64", "--use_ema"]
  root = os.path.dirname(os.path.dirname(__file__))
  done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  model, params = load_model(str(out))
  assert model.config.hop_length == 64
  ema_in_proj = expected["ema/model.layers.0.0.forward_blocks.0.mixer.in_proj.weight"]
  np.testing.assert_array_equal(
      np.asarray(params["layers_0"]["time"]["forward"]["mixer"]["in_proj"]["kernel"]), ema_in_proj.T)
  again = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
  assert again.returncode != 0 and "exists" in again.stderr  # nothing overwritten silently
  if importlib.util.find_spec("torch") is not None:  # back to a torch file, read by our reader
    back = str(tmp_path / "back.ckpt")
    exports.export_torch_checkpoint(str(out), back)
    round_trip = torch_files.read_torch_checkpoint(back)
    ema = {k[len("ema/"):]: v for k, v in expected.items() if k.startswith("ema/")}
    assert sorted(round_trip) == sorted(ema)
    assert all(np.array_equal(round_trip[k], ema[k]) for k in ema)
    with pytest.raises(CheckpointError, match="exists"):
      exports.export_torch_checkpoint(str(out), back)
    for bad, message in ((tmp_path, "is a folder"),
                         (tmp_path / "nowhere" / "m.ckpt", "missing or not a folder")):
      with pytest.raises(CheckpointError, match=message):
        exports.export_torch_checkpoint(str(out), str(bad), overwrite=True)
    assert not list(tmp_path.glob("*.partial"))


# ---------------------------------------------------------------- checkpoints saved other ways

def _micro_tensors():
  torch = pytest.importorskip("torch")
  sd = torch_files.read_torch_checkpoint(CKPT)
  return torch, {k[len("model."):]: torch.from_numpy(v) for k, v in sd.items()
                 if k.startswith("model.")}


def _assert_same_as_official(path, **kwargs):
  _, want = exports.load_torch_checkpoint(CKPT, hop_length=64)
  _, got = exports.load_torch_checkpoint(str(path), hop_length=64, **kwargs)
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    assert np.array_equal(a, b)


def test_zero_dim_tensors_and_extra_state_do_not_hide_the_state_dict(tmp_path):
  """A 0-dim tensor (num_batches_tracked, n_averaged, a scalar buffer) is an array like the rest."""
  torch, sd = _micro_tensors()
  path = tmp_path / "scalar.ckpt"
  torch.save({"state_dict": {**{"model." + k: v for k, v in sd.items()},
                             "model_ema.n_averaged": torch.tensor(5),
                             "model.loss._extra_state": None}}, path)
  whole = torch_files._load_torch_zip(str(path))
  assert isinstance(whole["state_dict"]["model_ema.n_averaged"], np.ndarray)
  _assert_same_as_official(path)


def test_pickled_dict_and_list_subclasses_stay_inert(tmp_path):
  """Lightning's AttributeDict, defaultdict, list subclasses among the hyperparameters."""
  import collections
  torch, sd = _micro_tensors()
  path = tmp_path / "extras.ckpt"
  torch.save({"state_dict": {"model." + k: v for k, v in sd.items()},
              "hyper_parameters": _AttrDict(lr=1e-3),
              "loops": collections.defaultdict(list, fit=[1]), "cb": _List([1, 2])}, path)
  _assert_same_as_official(path)


class _AttrDict(dict):
  pass


class _List(list):
  pass


@pytest.mark.parametrize("layout", ["ddp", "compile", "lightning_ddp", "lightning_compile",
                                    "model", "model_state_dict", "ema", "state_dict_ema"])
def test_checkpoints_saved_the_usual_ways(tmp_path, layout):
  torch, sd = _micro_tensors()
  prefixed = lambda p: {p + k: v for k, v in sd.items()}
  noise = {k: v + 1 for k, v in sd.items()}
  obj = {"ddp": prefixed("module."), "compile": prefixed("_orig_mod."),
         "lightning_ddp": {"state_dict": prefixed("model.module.")},
         "lightning_compile": {"state_dict": prefixed("model._orig_mod.")},
         "model": {"model": sd, "epoch": 3}, "model_state_dict": {"model_state_dict": sd},
         "ema": {"model": noise, "ema": sd},
         "state_dict_ema": {"state_dict": noise, "state_dict_ema": sd}}[layout]
  path = tmp_path / f"{layout}.pth"
  torch.save(obj, path)
  _assert_same_as_official(path, use_ema=layout in ("ema", "state_dict_ema"))


def test_unknown_layout_names_what_it_found(tmp_path):
  torch, sd = _micro_tensors()
  path = tmp_path / "net.pt"
  torch.save({"net." + k: v for k, v in sd.items()}, path)
  with pytest.raises(CheckpointError, match=r"net\.pt: missing key .*keys begin \['net\."):
    exports.load_torch_checkpoint(str(path), hop_length=64)


def test_folder_and_truncated_zip_are_named(tmp_path):
  with pytest.raises(CheckpointError, match="is a folder"):
    torch_files.read_torch_checkpoint(str(tmp_path))
  truncated = tmp_path / "half.ckpt"
  data = open(CKPT, "rb").read()
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match=r"half\.ckpt: truncated or corrupted"):
    torch_files.read_torch_checkpoint(str(truncated))
