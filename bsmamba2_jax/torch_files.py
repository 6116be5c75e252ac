"""PyTorch checkpoint files as NumPy, read without torch and without running code from them.

`read_torch_checkpoint` opens torch's zip format (torch >= 1.6) with a restricted unpickler that
rebuilds tensors as NumPy arrays from the archive's storages and turns every other class into an
inert stand-in, so a malicious or foreign pickle cannot execute anything. Legacy (non-zip) files
go through `torch.load(weights_only=True)` when torch is installed. It finds the weights where
training scripts keep them (Lightning's `state_dict`, `model`, `model_state_dict`, or a bare
state_dict) and, on request, the EMA weights (docs/model.md §8). `write_torch_checkpoint` writes
the other way and needs torch.
"""
from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any

import numpy as np

from bsmamba2_jax.atomic import replacing
from bsmamba2_jax.errors import CheckpointError, one_line

# A torch.save file (or a training checkpoint of another framework saved with it).
SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

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
                            f"({one_line(e)})") from None
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
    raise CheckpointError(f"{path}: cannot be read by torch.load ({one_line(e)})") from None
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


def check_writable(path: str, overwrite: bool = False):
  """Raises CheckpointError unless a torch checkpoint can be written at `path` (torch installed,
  not a folder, its folder there, not an existing file unless `overwrite`); returns torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  (an optional dependency)
  except ImportError:
    raise CheckpointError("writing a PyTorch checkpoint needs torch "
                          "(pip install 'bsmamba2-jax[torch]')") from None
  if os.path.isdir(path):
    raise CheckpointError(f"{path}: is a folder; name the .ckpt file to write")
  if os.path.exists(path) and not overwrite:
    raise CheckpointError(f"{path}: exists; pass overwrite=True to replace it")
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise CheckpointError(f"{path}: its folder {parent} is missing or not a folder")
  return torch


def write_torch_checkpoint(path: str, state_dict: dict[str, np.ndarray], *,
                           overwrite: bool = False) -> str:
  """Writes `{"state_dict": {name: tensor}}` (a Lightning-style file that the official code
  loads) to `path` atomically; refuses an existing file unless `overwrite`. Needs torch."""
  torch = check_writable(path, overwrite)
  # Copies: the arrays may be read-only views, which torch.from_numpy warns about.
  tensors = collections.OrderedDict((k, torch.from_numpy(np.array(v)))
                                    for k, v in state_dict.items())
  try:
    with replacing(path) as tmp:
      torch.save({"state_dict": tensors}, tmp)
  except (OSError, RuntimeError) as e:  # torch reports a full disk or no permission as either
    raise CheckpointError(f"cannot write {path}: {e}") from None
  return path
