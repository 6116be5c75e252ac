"""Official PyTorch BSMamba2 checkpoints <-> our Flax params.

The official names (SPEC §4) map one to one onto ours through a single table (`key_table`), used
in both directions, so a round trip is exact. PyTorch Linear weights are (out, in) and Flax Dense
kernels (in, out); a torch depthwise conv weight (c, 1, k) is our (k, 1, c) kernel; the merge
layer is a ConvTranspose1d whose weight (2d, d, 1) is already (in, out).

Reading a `.ckpt` needs no torch: `read_torch_checkpoint` unpickles the zip format with a
restricted unpickler that rebuilds tensors as NumPy arrays and never runs code from the file.
"""
from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any, Iterator

import numpy as np

from bsmamba2_jax.model import ModelConfig


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the model (one-line message)."""


# ----------------------------------------------------------------------------- reading .ckpt files

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}


def _storage_dtype(name: str):
  if name == "BFloat16Storage":
    import ml_dtypes  # shipped with jax
    return ml_dtypes.bfloat16
  return _STORAGE_DTYPES[name]


class _Opaque:
  """Stands in for any object of the checkpoint that we do not need (hyperparameters, callbacks)."""

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs = args, kwargs

  def __setstate__(self, state):
    self.state = state

  def __call__(self, *args, **kwargs):
    return _Opaque(*args, **kwargs)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2 as a NumPy copy."""
  if not size:
    return storage[offset].copy()
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size), strides=[s * storage.itemsize for s in stride])
  return np.array(view)


class _TorchUnpickler(pickle.Unpickler):
  """Rebuilds tensors from the zip's storages; every other class becomes `_Opaque`."""

  _SAFE = {("collections", "OrderedDict"): collections.OrderedDict,
           ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
           ("builtins", "slice"): slice, ("torch", "Size"): tuple}

  def __init__(self, file, read_storage):
    super().__init__(file)
    self._read_storage = read_storage

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in self._SAFE:
      return self._SAFE[(module, name)]
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch._utils" and name.startswith("_rebuild_parameter"):
      return lambda data, *unused: data
    if module == "torch._tensor" and name == "_rebuild_from_type_v2":
      return lambda func, new_type, args, state: func(*args)
    if module == "torch" and name.endswith("Storage"):
      return name
    return type(name, (_Opaque,), {})

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    _, storage_type, key, _location, _numel = pid
    return self._read_storage(key, storage_type)


def _load_torch_zip(path: str) -> Any:
  """Unpickles a torch zip checkpoint (torch >= 1.6 format) into NumPy arrays."""
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl")]
    if not pickles:
      raise CheckpointError(f"{path}: not a PyTorch checkpoint (no data.pkl in the zip)")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode().strip()
    storages: dict[str, np.ndarray] = {}

    def read_storage(key: str, storage_type: str) -> np.ndarray:
      if key not in storages:
        dtype = np.dtype(_storage_dtype(storage_type))
        data = np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype=dtype.newbyteorder(
            "<" if byteorder == "little" else ">") if dtype.itemsize > 1 else dtype)
        storages[key] = data.astype(dtype, copy=False)
      return storages[key]

    with archive.open(pickles[0]) as f:
      return _TorchUnpickler(f, read_storage).load()


def _load_any(path: str) -> Any:
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file")
  if zipfile.is_zipfile(path):
    try:
      return _load_torch_zip(path)
    except CheckpointError:
      raise
    except Exception as e:  # truncated zip, bad pickle, unknown storage ...
      raise CheckpointError(f"{path}: corrupted or unsupported PyTorch checkpoint "
                            f"({type(e).__name__}: {e})") from None
  try:
    import torch
  except ImportError:
    raise CheckpointError(f"{path}: not a zip-format PyTorch checkpoint; legacy files need torch "
                          "installed (pip install 'bsmamba2-jax[torch]')") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise CheckpointError(f"{path}: cannot be read by torch.load ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
  return _tensors_to_numpy(obj)


def _tensors_to_numpy(obj: Any) -> Any:
  if hasattr(obj, "detach") and hasattr(obj, "numpy"):
    return obj.detach().cpu().float().numpy() if str(obj.dtype) == "torch.bfloat16" \
        else obj.detach().cpu().numpy()
  if isinstance(obj, dict):
    return collections.OrderedDict((k, _tensors_to_numpy(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_tensors_to_numpy(v) for v in obj)
  return obj


def _is_state_dict(obj: Any) -> bool:
  return isinstance(obj, dict) and bool(obj) and all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def _ema_weights(checkpoint: dict, state_dict: dict, path: str) -> dict:
  """EMA weights of a Lightning checkpoint, kept by the EMA optimizer wrapper in its state.

  The wrapper stores `ema` as a list of tensors in parameter order, which is the state_dict order.
  """
  for opt_state in checkpoint.get("optimizer_states", []) or []:
    if isinstance(opt_state, dict) and isinstance(opt_state.get("ema"), (list, tuple)):
      ema = list(opt_state["ema"])
      keys = list(state_dict)[:len(ema)]
      if len(ema) != len(state_dict) or any(
          np.shape(e) != np.shape(state_dict[k]) for k, e in zip(keys, ema)):
        raise CheckpointError(f"{path}: the EMA weights in the optimizer state do not line up with "
                              "the state_dict's parameters")
      return collections.OrderedDict(zip(keys, (np.asarray(e) for e in ema)))
  raise CheckpointError(f"{path}: no EMA weights found (optimizer_states[*]['ema']); "
                        "convert without use_ema")


def read_torch_checkpoint(path: str, use_ema: bool = False) -> dict[str, np.ndarray]:
  """Official weights as {name: array} from a Lightning `.ckpt` or a bare state_dict file.

  Lightning files keep weights under `state_dict` (keys prefixed `model.`); with `use_ema` the
  EMA weights of the optimizer state are returned under the same names.
  """
  obj = _load_any(path)
  if isinstance(obj, dict) and _is_state_dict(obj.get("state_dict")):
    state_dict = obj["state_dict"]
    return _ema_weights(obj, state_dict, path) if use_ema else dict(state_dict)
  if _is_state_dict(obj):
    if use_ema:
      raise CheckpointError(f"{path}: a bare state_dict holds no EMA weights")
    return dict(obj)
  raise CheckpointError(f"{path}: holds neither a Lightning checkpoint with a state_dict nor a "
                        "state_dict of tensors")


# ------------------------------------------------------------------------------- the name table

def _strip_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
  """Drops the Lightning `model.` prefix; with it present, other entries (STFT windows) go."""
  if any(k.startswith("model.") for k in state_dict):
    return {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
  return dict(state_dict)


def key_table(config: ModelConfig) -> Iterator[tuple[str, tuple[str, ...], str]]:
  """(official key, Flax param path, layout) for every tensor; layout in
  {'copy', 'linear', 'conv', 'convtranspose'}."""
  for k in range(len(config.band_widths)):
    yield f"band_split.to_features.{k}.0.gamma", ("band_split", f"to_features_{k}_norm", "gamma"), "copy"
    yield f"band_split.to_features.{k}.1.weight", ("band_split", f"to_features_{k}_dense", "kernel"), "linear"
    yield f"band_split.to_features.{k}.1.bias", ("band_split", f"to_features_{k}_dense", "bias"), "copy"
  for i in range(config.depth):
    for j, axis in enumerate(("time", "band")):
      for direction in ("forward", "backward"):
        torch_block = f"layers.{i}.{j}.{direction}_blocks.0"
        ours = (f"layers_{i}", axis, direction)
        yield f"{torch_block}.norm.weight", ours + ("norm", "weight"), "copy"
        mixer = ours + ("mixer",)
        yield f"{torch_block}.mixer.in_proj.weight", mixer + ("in_proj", "kernel"), "linear"
        yield f"{torch_block}.mixer.conv1d.weight", mixer + ("conv1d", "kernel"), "conv"
        yield f"{torch_block}.mixer.conv1d.bias", mixer + ("conv1d", "bias"), "copy"
        for name in ("dt_bias", "A_log", "D"):
          yield f"{torch_block}.mixer.{name}", mixer + (name,), "copy"
        yield f"{torch_block}.mixer.norm.weight", mixer + ("norm", "weight"), "copy"
        yield f"{torch_block}.mixer.out_proj.weight", mixer + ("out_proj", "kernel"), "linear"
      yield f"layers.{i}.{j}.linear.weight", (f"layers_{i}", axis, "linear", "kernel"), "convtranspose"
      yield f"layers.{i}.{j}.linear.bias", (f"layers_{i}", axis, "linear", "bias"), "copy"
  yield "final_norm.gamma", ("final_norm", "gamma"), "copy"
  for k in range(len(config.band_widths)):
    est = "mask_estimators.0.to_freqs"
    yield f"{est}.{k}.0.0.weight", ("mask_estimator", f"to_freqs_{k}_in", "kernel"), "linear"
    yield f"{est}.{k}.0.0.bias", ("mask_estimator", f"to_freqs_{k}_in", "bias"), "copy"
    yield f"{est}.{k}.0.2.weight", ("mask_estimator", f"to_freqs_{k}_out", "kernel"), "linear"
    yield f"{est}.{k}.0.2.bias", ("mask_estimator", f"to_freqs_{k}_out", "bias"), "copy"


def _to_flax(value: np.ndarray, layout: str) -> np.ndarray:
  if layout == "linear":
    return value.T
  if layout == "conv":
    return value.transpose(2, 1, 0)
  if layout == "convtranspose":
    return value[:, :, 0]
  return value


def _to_torch(value: np.ndarray, layout: str) -> np.ndarray:
  if layout == "linear":
    return value.T
  if layout == "conv":
    return value.transpose(2, 1, 0)
  if layout == "convtranspose":
    return value[:, :, None]
  return value


# ------------------------------------------------------------------------- hyperparameter inference

def _is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def infer_config(state_dict: dict[str, Any], **overrides: Any) -> ModelConfig:
  """Every hyperparameter that the shapes determine; `overrides` settle what they cannot
  (hop_length, sample_rate, ngroups, and audio_channels when ambiguous)."""
  sd = _strip_prefix(state_dict)

  def shape(key: str) -> tuple[int, ...]:
    if key not in sd:
      raise CheckpointError(f"missing key {key!r}: cannot infer the model's hyperparameters")
    return tuple(np.shape(sd[key]))

  num_bands = 0
  while f"band_split.to_features.{num_bands}.0.gamma" in sd:
    num_bands += 1
  if num_bands == 0:
    shape("band_split.to_features.0.0.gamma")
  band_inputs = [shape(f"band_split.to_features.{k}.0.gamma")[0] for k in range(num_bands)]
  dim = shape("band_split.to_features.0.1.weight")[0]
  depth = 0
  while f"layers.{depth}.0.linear.bias" in sd:
    depth += 1
  mixer = "layers.0.0.forward_blocks.0.mixer"
  d_inner = shape(f"{mixer}.norm.weight")[0]
  nheads = shape(f"{mixer}.A_log")[0]
  conv_channels, _, d_conv = shape(f"{mixer}.conv1d.weight")
  bc_width = (conv_channels - d_inner) // 2
  ngroups = overrides.pop("ngroups", 1)
  hidden = shape("mask_estimators.0.to_freqs.0.0.0.weight")[0]

  channels = overrides.pop("audio_channels", None)
  candidates = [channels] if channels else [2, 1]
  for c in candidates:
    if all(n % (2 * c) == 0 for n in band_inputs):
      bins = sum(band_inputs) // (2 * c)
      if channels or _is_power_of_two(bins - 1):
        channels = c
        break
  else:
    raise CheckpointError(f"band inputs {band_inputs} fit neither a mono nor a stereo model")
  widths = tuple(n // (2 * channels) for n in band_inputs)
  fields = dict(audio_channels=channels, n_fft=2 * (sum(widths) - 1), band_widths=widths,
                dim=dim, depth=depth, d_state=bc_width // ngroups, expand=d_inner // dim,
                headdim=d_inner // nheads, ngroups=ngroups, d_conv=d_conv,
                mask_hidden_mult=hidden // dim)
  fields.update(overrides)
  try:
    return ModelConfig(**fields)
  except ValueError as e:
    raise CheckpointError(f"the checkpoint's shapes give an invalid model: {e}") from None


# ------------------------------------------------------------------------------------ conversion

def params_from_torch_state_dict(state_dict: dict[str, Any], config: ModelConfig | None = None,
                                 **overrides: Any) -> tuple[ModelConfig, dict]:
  """Official state_dict (names with or without `model.`, NumPy values) -> (config, params).

  Refuses, in one line, a state_dict with missing, unexpected or mis-shaped keys.
  """
  sd = _strip_prefix(state_dict)
  config = config or infer_config(sd, **overrides)
  params: dict = {}
  missing, wrong = [], []
  expected = _expected_shapes(config)
  table = list(key_table(config))
  for torch_key, path, layout in table:
    if torch_key not in sd:
      missing.append(torch_key)
      continue
    value = np.asarray(sd[torch_key])
    flax_value = _to_flax(value, layout)
    if flax_value.shape != expected[path]:
      wrong.append(f"{torch_key} {tuple(value.shape)} (expected "
                   f"{_to_torch(np.empty(expected[path], np.int8), layout).shape})")
      continue
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.ascontiguousarray(flax_value, dtype=np.float32)
  unexpected = sorted(set(sd) - {k for k, _, _ in table})
  problems = []
  if missing:
    problems.append(f"missing keys {missing[:5]}{' …' if len(missing) > 5 else ''} "
                    f"({len(missing)} in all)")
  if unexpected:
    problems.append(f"unexpected keys {unexpected[:5]}{' …' if len(unexpected) > 5 else ''} "
                    f"({len(unexpected)} in all)")
  if wrong:
    problems.append(f"wrong shapes: {'; '.join(wrong[:5])}{' …' if len(wrong) > 5 else ''}")
  if problems:
    raise CheckpointError("state_dict does not match BSMamba2: " + "; ".join(problems))
  return config, params


def params_to_torch_state_dict(config: ModelConfig, params: dict,
                               prefix: str = "model.") -> "collections.OrderedDict[str, np.ndarray]":
  """Flax params -> official state_dict names and layouts (NumPy), e.g. for `torch.save`."""
  out = collections.OrderedDict()
  for torch_key, path, layout in key_table(config):
    node = params
    for part in path:
      node = node[part]
    out[prefix + torch_key] = np.ascontiguousarray(_to_torch(np.asarray(node), layout))
  return out


def _expected_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Param path -> shape, from the model itself (abstractly evaluated, no FLOPs)."""
  import jax
  import jax.numpy as jnp

  from bsmamba2_jax.model import BSMamba2
  frames_audio = jax.ShapeDtypeStruct((1, config.audio_channels, config.n_fft), jnp.float32)
  shapes = jax.eval_shape(lambda a: BSMamba2(config).init(jax.random.PRNGKey(0), a)["params"],
                          frames_audio)
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    flat[tuple(p.key for p in path)] = tuple(leaf.shape)
  return flat


def load_torch_checkpoint(path: str, *, use_ema: bool = False,
                          **overrides: Any) -> tuple[ModelConfig, dict]:
  """A `.ckpt`/state_dict file -> (config, params); errors name the file."""
  state_dict = read_torch_checkpoint(path, use_ema=use_ema)
  try:
    return params_from_torch_state_dict(state_dict, **overrides)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None
