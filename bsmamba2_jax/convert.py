"""Official PyTorch BSMamba2 state_dicts <-> our Flax params, through one name table.

The official names (docs/model.md §8) map one to one onto ours through `key_table`, used in both
directions, so a round trip is exact. PyTorch Linear weights are (out, in) and Flax Dense kernels
(in, out); a torch depthwise conv weight (c, 1, k) is our (k, 1, c) kernel; the merge layer is a
ConvTranspose1d whose weight (2d, d, 1) is already (in, out). Per-band weights are stacked per run
of equal-width bands (`model.band_groups`), so an entry also names the index of its band.
`infer_config` reads every hyperparameter that the shapes determine. Files are read by
`torch_files`; exports by `exports`.
"""
from __future__ import annotations

import collections
from typing import Any, Iterator

import jax
import numpy as np

from bsmamba2_jax.config import ModelConfig
from bsmamba2_jax.errors import CheckpointError
from bsmamba2_jax.model import abstract_params, band_groups, group_name


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
