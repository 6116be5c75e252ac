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

import jax
import numpy as np

from bsmamba2_jax.model import ModelConfig, abstract_params, band_groups, group_name


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

  # Pickles of dict and list subclasses (defaultdict, Lightning's AttributeDict, omegaconf
  # containers ...) fill the new object with SETITEMS / APPENDS.
  def __setitem__(self, key, value):
    self.__dict__.setdefault("items", {})[key] = value

  def append(self, value):
    self.__dict__.setdefault("values", []).append(value)

  def extend(self, values):
    for value in values:
      self.append(value)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2 as a NumPy copy."""
  if not size:  # a 0-dim tensor: an array, not a NumPy scalar (state_dict values are arrays)
    return np.array(storage[offset])
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


# How a torch.save file starts: a zip archive, or (legacy format) a pickle's PROTO opcode.
_ZIP_MAGIC, _PICKLE_PROTO = b"PK\x03\x04", b"\x80"


def looks_like_torch(path: str) -> bool:
  """Whether the file at `path` starts as torch.save writes, whatever its name (`.pth.tar`)."""
  try:
    with open(path, "rb") as f:
      head = f.read(len(_ZIP_MAGIC))
  except OSError:
    return False
  return head.startswith((_ZIP_MAGIC, _PICKLE_PROTO))


def error_summary(error: BaseException) -> str:
  """`Type: first line of the message` (at most 200 characters of it), for one-line errors."""
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def _load_any(path: str) -> Any:
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file")
  if os.path.isdir(path):
    raise CheckpointError(f"{path}: is a folder, not a PyTorch checkpoint file")
  try:
    with open(path, "rb") as f:
      head = f.read(len(_ZIP_MAGIC))
  except OSError as e:
    raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
  if zipfile.is_zipfile(path):
    try:
      return _load_torch_zip(path)
    except CheckpointError:
      raise
    except Exception as e:  # truncated zip, bad pickle, unknown storage ...
      raise CheckpointError(f"{path}: corrupted or unsupported PyTorch checkpoint "
                            f"({error_summary(e)})") from None
  if head.startswith(_ZIP_MAGIC):  # a zip's first entry, but no end record
    raise CheckpointError(f"{path}: truncated or corrupted PyTorch checkpoint (a zip archive "
                          "without its end; an incomplete download or copy?)")
  if not head.startswith(_PICKLE_PROTO):
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a "
                          "pickle)")
  try:
    import torch
  except ImportError:
    raise CheckpointError(f"{path}: not a zip-format PyTorch checkpoint; legacy files need torch "
                          "installed (pip install 'bsmamba2-jax[torch]')") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError:  # torch's text goes on to suggest weights_only=False
    raise CheckpointError(f"{path}: holds objects besides tensors and plain containers, or is "
                          "corrupted; it is not loaded, since that would run code from the "
                          "file") from None
  except Exception as e:
    raise CheckpointError(f"{path}: cannot be read by torch.load ({error_summary(e)})") from None
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
  """{str: array}; a module's `_extra_state` entries (any object) are allowed and dropped."""
  return isinstance(obj, dict) and bool(obj) and all(
      isinstance(k, str) and (isinstance(v, np.ndarray) or k.endswith("_extra_state"))
      for k, v in obj.items()) and any(isinstance(v, np.ndarray) for v in obj.values())


def _arrays(state_dict: dict) -> dict:
  return {k: v for k, v in state_dict.items() if isinstance(v, np.ndarray)}


# Where people keep the weights: Lightning (`state_dict`), plain training scripts (`model`,
# `model_state_dict`); and EMA copies saved next to them (timm's `state_dict_ema`, ...).
_WEIGHT_KEYS = ("state_dict", "model_state_dict", "model")
_EMA_KEYS = ("ema", "model_ema", "state_dict_ema", "ema_state_dict")


def _ema_weights(checkpoint: dict, state_dict: dict, path: str) -> dict:
  """EMA weights of a Lightning checkpoint, kept by the EMA optimizer wrapper in its state.

  The wrapper stores `ema` as a list of tensors in parameter order: the order of the model's
  entries (`model.*`) in the state_dict, which holds no buffers of the model. Buffers outside it
  (the STFT windows of the featurizers) are not parameters and are skipped.
  """
  for key in _EMA_KEYS:
    if _is_state_dict(checkpoint.get(key)):
      return _arrays(checkpoint[key])
  keys = [k for k in state_dict if k.startswith("model.")] or list(state_dict)
  for opt_state in checkpoint.get("optimizer_states", []) or []:
    if isinstance(opt_state, dict) and isinstance(opt_state.get("ema"), (list, tuple)):
      ema = list(opt_state["ema"])
      if len(ema) != len(keys) or any(
          np.shape(e) != np.shape(state_dict[k]) for k, e in zip(keys, ema)):
        raise CheckpointError(f"{path}: the {len(ema)} EMA tensors in the optimizer state do not "
                              f"line up with the {len(keys)} model parameters of the state_dict")
      return collections.OrderedDict(zip(keys, (np.asarray(e) for e in ema)))
  raise CheckpointError(f"{path}: no EMA weights found (optimizer_states[*]['ema'], or "
                        f"{'/'.join(_EMA_KEYS)} next to the weights); convert without use_ema")


def read_torch_checkpoint(path: str, use_ema: bool = False) -> dict[str, np.ndarray]:
  """Official weights as {name: array} from a Lightning `.ckpt` or a bare state_dict file.

  Lightning files keep weights under `state_dict` (keys prefixed `model.`); with `use_ema` the
  EMA weights of the optimizer state are returned under the same names.
  """
  obj = _load_any(path)
  for key in _WEIGHT_KEYS:
    if isinstance(obj, dict) and _is_state_dict(obj.get(key)):
      state_dict = _arrays(obj[key])
      return _ema_weights(obj, state_dict, path) if use_ema else state_dict
  if _is_state_dict(obj):
    if use_ema:
      raise CheckpointError(f"{path}: a bare state_dict holds no EMA weights")
    return _arrays(obj)
  found = f" (its top-level keys: {sorted(map(str, obj))[:8]})" if isinstance(obj, dict) else ""
  raise CheckpointError(f"{path}: holds no state_dict of tensors, bare or under "
                        f"{'/'.join(_WEIGHT_KEYS)}{found}")


# ------------------------------------------------------------------------------- the name table

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


def _strip_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
  """Drops the Lightning `model.` prefix (with it present, other entries such as STFT windows
  go) and the prefixes that wrappers add to every key: `module.` (DataParallel, DDP) and
  `_orig_mod.` (torch.compile), in whatever order they nest."""
  sd = dict(state_dict)
  while sd:
    wrapper = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
    if wrapper:
      sd = {k[len(wrapper):]: v for k, v in sd.items()}
    elif any(k.startswith("model.") for k in sd):
      sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    else:
      return sd
  return sd


Entry = tuple[str, tuple[str, ...], str, "int | None"]


def key_table(config: ModelConfig) -> Iterator[Entry]:
  """(official key, Flax param path, layout, index) for every tensor.

  layout is one of 'copy', 'linear', 'conv', 'convtranspose'; index is None, or the position of
  the tensor in a stacked parameter (the per-band weights, stored per run of equal-width bands).
  """
  groups = band_groups(config.band_widths)
  for first, count, _ in groups:
    run = group_name(first, count)
    for j, k in enumerate(range(first, first + count)):
      band = f"band_split.to_features.{k}"
      yield f"{band}.0.gamma", ("band_split", f"{run}_gamma"), "copy", j
      yield f"{band}.1.weight", ("band_split", f"{run}_kernel"), "linear", j
      yield f"{band}.1.bias", ("band_split", f"{run}_bias"), "copy", j
  for i in range(config.depth):
    for j, axis in enumerate(("time", "band")):
      for direction in ("forward", "backward"):
        torch_block = f"layers.{i}.{j}.{direction}_blocks.0"
        ours = (f"layers_{i}", axis, direction)
        yield f"{torch_block}.norm.weight", ours + ("norm", "weight"), "copy", None
        mixer = ours + ("mixer",)
        yield f"{torch_block}.mixer.in_proj.weight", mixer + ("in_proj", "kernel"), "linear", None
        yield f"{torch_block}.mixer.conv1d.weight", mixer + ("conv1d", "kernel"), "conv", None
        yield f"{torch_block}.mixer.conv1d.bias", mixer + ("conv1d", "bias"), "copy", None
        for name in ("dt_bias", "A_log", "D"):
          yield f"{torch_block}.mixer.{name}", mixer + (name,), "copy", None
        yield f"{torch_block}.mixer.norm.weight", mixer + ("norm", "weight"), "copy", None
        yield f"{torch_block}.mixer.out_proj.weight", mixer + ("out_proj", "kernel"), "linear", None
      linear = (f"layers_{i}", axis, "linear")
      yield f"layers.{i}.{j}.linear.weight", linear + ("kernel",), "convtranspose", None
      yield f"layers.{i}.{j}.linear.bias", linear + ("bias",), "copy", None
  yield "final_norm.gamma", ("final_norm", "gamma"), "copy", None
  for first, count, _ in groups:
    run = group_name(first, count)
    for j, k in enumerate(range(first, first + count)):
      mlp = f"mask_estimators.0.to_freqs.{k}.0"
      yield f"{mlp}.0.weight", ("mask_estimator", "in_kernel"), "linear", k
      yield f"{mlp}.0.bias", ("mask_estimator", "in_bias"), "copy", k
      yield f"{mlp}.2.weight", ("mask_estimator", f"{run}_kernel"), "linear", j
      yield f"{mlp}.2.bias", ("mask_estimator", f"{run}_bias"), "copy", j


# layout -> (official tensor -> ours, ours -> official tensor); each pair is mutually inverse.
LAYOUTS = {
    "copy": (lambda v: v, lambda v: v),
    "linear": (np.transpose, np.transpose),                          # (out, in) <-> (in, out)
    "conv": (lambda v: v.transpose(2, 1, 0), lambda v: v.transpose(2, 1, 0)),  # (c,1,k) <-> (k,1,c)
    "convtranspose": (lambda v: v[:, :, 0], lambda v: v[:, :, None]),  # (2d, d, 1) <-> (2d, d)
}


def _to_flax(value: np.ndarray, layout: str) -> np.ndarray:
  return LAYOUTS[layout][0](value)


def _to_torch(value: np.ndarray, layout: str) -> np.ndarray:
  return LAYOUTS[layout][1](value)


# ------------------------------------------------------------------------- hyperparameter inference

def _is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def infer_config(state_dict: dict[str, Any], **overrides: Any) -> ModelConfig:
  """Every hyperparameter that the shapes determine; `overrides` settle what they cannot
  (hop_length, sample_rate, ngroups, and audio_channels when ambiguous).

  Band input sizes are 2·channels·width. A stereo model's sizes also divide as mono ones, so
  without `audio_channels` the channel count whose n_fft = 2·(bins - 1) is a power of two wins;
  where neither or both give one, CheckpointError asks for `audio_channels`.
  """
  sd = _strip_prefix(state_dict)

  def shape(key: str) -> tuple[int, ...]:
    if key not in sd:
      raise CheckpointError(f"missing key {key!r}: cannot infer the model's hyperparameters "
                            f"(the state_dict's keys begin {sorted(sd)[:3]})")
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
  fitting = [c for c in ([channels] if channels else [2, 1])
             if all(n % (2 * c) == 0 for n in band_inputs)]
  if not fitting:
    what = f"a {channels}-channel" if channels else "either a mono or a stereo"
    raise CheckpointError(f"band inputs {band_inputs} do not fit {what} model")
  if len(fitting) > 1:
    power_of_two = [c for c in fitting
                    if _is_power_of_two(sum(band_inputs) // (2 * c) - 1)]
    if len(power_of_two) != 1:
      n_ffts = {c: 2 * (sum(band_inputs) // (2 * c) - 1) for c in fitting}
      raise CheckpointError(f"band inputs {band_inputs} fit a stereo model with n_fft "
                            f"{n_ffts[2]} and a mono one with n_fft {n_ffts[1]}: pass "
                            "audio_channels (convert_torch --audio_channels)")
    fitting = power_of_two
  channels = fitting[0]
  widths = tuple(n // (2 * channels) for n in band_inputs)
  fields = dict(audio_channels=channels, n_fft=2 * (sum(widths) - 1), band_widths=widths,
                dim=dim, depth=depth, d_state=bc_width // ngroups, expand=d_inner // dim,
                headdim=d_inner // nheads, ngroups=ngroups, d_conv=d_conv,
                mask_hidden_mult=hidden // dim)
  fields.update(overrides)
  try:
    return ModelConfig(**fields)
  except ValueError as e:
    hop_length = fields.get("hop_length", ModelConfig.hop_length)
    hint = ("" if 0 < hop_length <= fields["n_fft"] // 2 else
            " (a checkpoint does not store hop_length: pass it, e.g. `python -m "
            "experiments.convert_torch --hop_length=...`)")
    raise CheckpointError(f"the checkpoint's shapes give an invalid model: {e}{hint}") from None


# ------------------------------------------------------------------------------------ conversion

def params_from_torch_state_dict(state_dict: dict[str, Any], config: ModelConfig | None = None,
                                 **overrides: Any) -> tuple[ModelConfig, dict]:
  """Official state_dict (names with or without `model.`, NumPy values) -> (config, params).

  Refuses, in one line, a state_dict with missing, unexpected or mis-shaped keys.
  """
  sd = _strip_prefix(state_dict)
  config = config or infer_config(sd, **overrides)
  shapes = {tuple(p.key for p in path): tuple(leaf.shape) for path, leaf in
            jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]}
  leaves = {path: np.zeros(shape, np.float32) for path, shape in shapes.items()}
  missing, wrong = [], []
  table = list(key_table(config))
  for torch_key, path, layout, index in table:
    if torch_key not in sd:
      missing.append(torch_key)
      continue
    value = np.asarray(sd[torch_key])
    expected = shapes[path] if index is None else shapes[path][1:]
    torch_shape = _to_torch(np.empty(expected, np.int8), layout).shape
    if value.shape != torch_shape:
      wrong.append(f"{torch_key} {tuple(value.shape)} (expected {torch_shape})")
      continue
    target = leaves[path] if index is None else leaves[path][index]
    target[...] = _to_flax(value, layout)
  unexpected = sorted(set(sd) - {entry[0] for entry in table})
  problems = []
  for label, keys in (("missing keys", missing), ("unexpected keys", unexpected)):
    if keys:
      problems.append(f"{label} {keys[:5]}{' …' if len(keys) > 5 else ''} ({len(keys)} in all)")
  if wrong:
    problems.append(f"wrong shapes: {'; '.join(wrong[:5])}{' …' if len(wrong) > 5 else ''}")
  if problems:
    raise CheckpointError("state_dict does not match BSMamba2: " + "; ".join(problems))
  params: dict = {}
  for path, leaf in leaves.items():
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = leaf
  return config, params


def params_to_torch_state_dict(config: ModelConfig, params: dict,
                               prefix: str = "model.") -> "collections.OrderedDict[str, np.ndarray]":
  """Flax params -> official state_dict names and layouts (NumPy), e.g. for `torch.save`."""
  out = collections.OrderedDict()
  for torch_key, path, layout, index in key_table(config):
    leaf = params
    for part in path:
      leaf = leaf[part]
    leaf = np.asarray(leaf)
    out[prefix + torch_key] = np.ascontiguousarray(
        _to_torch(leaf if index is None else leaf[index], layout))
  return out


def load_torch_checkpoint(path: str, *, use_ema: bool = False,
                          **overrides: Any) -> tuple[ModelConfig, dict]:
  """A `.ckpt`/state_dict file -> (config, params); errors name the file."""
  state_dict = read_torch_checkpoint(path, use_ema=use_ema)
  try:
    return params_from_torch_state_dict(state_dict, **overrides)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None


def convert_checkpoint(torch_ckpt: str, output_dir: str, *, use_ema: bool = False,
                       overwrite: bool = False, **overrides: Any) -> str:
  """Official `.ckpt` -> an inference export (Orbax params + config.json) that `load_model`,
  separation and evaluation read. Returns the export's path."""
  from bsmamba2_jax.checkpoints import save_inference
  config, params = load_torch_checkpoint(torch_ckpt, use_ema=use_ema, **overrides)
  return save_inference(output_dir, config, params, overwrite=overwrite,
                        metadata=dict(source=os.path.abspath(torch_ckpt), use_ema=use_ema))


def export_torch_checkpoint(export_dir: str, output_path: str, *, overwrite: bool = False) -> str:
  """An inference export -> a Lightning-style `.ckpt` ({"state_dict": {model.*: tensor}}) that
  the official code loads. Needs torch."""
  try:
    import torch
  except ImportError:
    raise CheckpointError("writing a PyTorch checkpoint needs torch "
                          "(pip install 'bsmamba2-jax[torch]')") from None
  from bsmamba2_jax.checkpoints import load_inference
  if os.path.isdir(output_path):
    raise CheckpointError(f"{output_path}: is a folder; name the .ckpt file to write")
  if os.path.exists(output_path) and not overwrite:
    raise CheckpointError(f"{output_path}: exists; pass overwrite=True to replace it")
  parent = os.path.dirname(os.path.abspath(output_path))
  if not os.path.isdir(parent):
    raise CheckpointError(f"{output_path}: its folder {parent} is missing or not a folder")
  config, params, _ = load_inference(export_dir)
  state_dict = params_to_torch_state_dict(config, jax.device_get(params))
  tmp = output_path + ".partial"
  try:
    torch.save({"state_dict": collections.OrderedDict(
        # Copies: the arrays may be read-only views, which torch.from_numpy warns about.
        (k, torch.from_numpy(np.array(v))) for k, v in state_dict.items())}, tmp)
    os.replace(tmp, output_path)
  except (OSError, RuntimeError) as e:  # torch reports a full disk or no permission as either
    if os.path.exists(tmp):
      os.remove(tmp)
    raise CheckpointError(f"cannot write {output_path}: {e}") from None
  return output_path
