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

from bsmamba2_jax.config import ModelConfig, default_stems
from bsmamba2_jax.errors import CheckpointError
from bsmamba2_jax.model import (LAYER_KINDS, abstract_params, band_groups, group_name,
                                mask_estimator_name)
from bsmamba2_jax.roformer import rotary_frequencies


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


Entry = tuple[str, "tuple[str, ...] | None", str, "int | None"]


def _mamba_entries(torch_block: str, ours: tuple[str, ...], kind: str) -> Iterator[Entry]:
  """One direction of a bidirectional Mamba2 ("mamba2") or Mamba1 ("mamba") block."""
  yield f"{torch_block}.norm.weight", ours + ("norm", "weight"), "copy", None
  mixer, torch_mixer = ours + ("mixer",), f"{torch_block}.mixer"
  yield f"{torch_mixer}.in_proj.weight", mixer + ("in_proj", "kernel"), "linear", None
  yield f"{torch_mixer}.conv1d.weight", mixer + ("conv1d", "kernel"), "conv", None
  yield f"{torch_mixer}.conv1d.bias", mixer + ("conv1d", "bias"), "copy", None
  if kind == "mamba":
    yield f"{torch_mixer}.x_proj.weight", mixer + ("x_proj", "kernel"), "linear", None
    yield f"{torch_mixer}.dt_proj.weight", mixer + ("dt_proj", "kernel"), "linear", None
    yield f"{torch_mixer}.dt_proj.bias", mixer + ("dt_proj", "bias"), "copy", None
    names = ("A_log", "D")
  else:
    names = ("dt_bias", "A_log", "D")
  for name in names:
    yield f"{torch_mixer}.{name}", mixer + (name,), "copy", None
  if kind == "mamba2":
    yield f"{torch_mixer}.norm.weight", mixer + ("norm", "weight"), "copy", None
  yield f"{torch_mixer}.out_proj.weight", mixer + ("out_proj", "kernel"), "linear", None


def _transformer_entries(torch_module: str, ours: tuple[str, ...]) -> Iterator[Entry]:
  """An official `Transformer` of depth 1: attention `layers.0.0`, feed-forward `layers.0.1`.
  Its rotary `freqs` are fixed values (layout 'rotary', no parameter: checked, then written)."""
  attn, ff = f"{torch_module}.layers.0.0", f"{torch_module}.layers.0.1.net"
  yield f"{attn}.norm.gamma", ours + ("attn", "norm", "gamma"), "copy", None
  yield f"{attn}.to_qkv.weight", ours + ("attn", "to_qkv", "kernel"), "linear", None
  yield f"{attn}.to_gates.weight", ours + ("attn", "to_gates", "kernel"), "linear", None
  yield f"{attn}.to_gates.bias", ours + ("attn", "to_gates", "bias"), "copy", None
  yield f"{attn}.to_out.0.weight", ours + ("attn", "to_out", "kernel"), "linear", None
  yield f"{attn}.rotary_embed.freqs", None, "rotary", None
  yield f"{ff}.0.gamma", ours + ("ff", "norm", "gamma"), "copy", None
  yield f"{ff}.1.weight", ours + ("ff", "net_in", "kernel"), "linear", None
  yield f"{ff}.1.bias", ours + ("ff", "net_in", "bias"), "copy", None
  yield f"{ff}.4.weight", ours + ("ff", "net_out", "kernel"), "linear", None
  yield f"{ff}.4.bias", ours + ("ff", "net_out", "bias"), "copy", None


def key_table(config: ModelConfig) -> Iterator[Entry]:
  """(official key, Flax param path, layout, index) for every tensor.

  layout is one of 'copy', 'linear', 'conv', 'convtranspose', or 'rotary' (a Transformer's
  fixed rotary frequencies, which have no Flax parameter: path None); index is None, or the
  position of the tensor in a stacked parameter (the per-band weights, stored per run of
  equal-width bands).
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
    for j, (axis, kind) in enumerate(zip(("time", "band"), LAYER_KINDS[config.module_type])):
      torch_module, ours = f"layers.{i}.{j}", (f"layers_{i}", axis)
      if kind == "transformer":
        yield from _transformer_entries(torch_module, ours)
        continue
      for direction in ("forward", "backward"):
        yield from _mamba_entries(f"{torch_module}.{direction}_blocks.0", ours + (direction,),
                                  kind)
      yield f"{torch_module}.linear.weight", ours + ("linear", "kernel"), "convtranspose", None
      yield f"{torch_module}.linear.bias", ours + ("linear", "bias"), "copy", None
  yield "final_norm.gamma", ("final_norm", "gamma"), "copy", None
  for stem in range(config.num_stems):
    estimator = mask_estimator_name(stem)
    for first, count, _ in groups:
      run = group_name(first, count)
      for j, k in enumerate(range(first, first + count)):
        mlp = f"mask_estimators.{stem}.to_freqs.{k}.0"
        yield f"{mlp}.0.weight", (estimator, "in_kernel"), "linear", k
        yield f"{mlp}.0.bias", (estimator, "in_bias"), "copy", k
        yield f"{mlp}.2.weight", (estimator, f"{run}_kernel"), "linear", j
        yield f"{mlp}.2.bias", (estimator, f"{run}_bias"), "copy", j


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
  """Every hyperparameter that the keys and shapes determine — the module type (from which
  modules layer 0 has), the number of stems (`mask_estimators.{n}`) and every size;
  `overrides` settle what they cannot (hop_length, sample_rate, ngroups, the stems' names —
  else `config.default_stems` — and audio_channels when ambiguous). Dropout rates are not in a
  state_dict: they stay 0 (inference).

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
  depth = 1 + max((int(k.split(".")[1]) for k in sd
                   if k.startswith("layers.") and k.split(".")[1].isdigit()), default=-1)
  if depth == 0:
    shape("layers.0.0.linear.bias")
  fields = dict(dim=dim, depth=depth)

  def kind(j: int) -> str:
    if f"layers.0.{j}.layers.0.0.to_qkv.weight" in sd:
      return "transformer"
    if f"layers.0.{j}.forward_blocks.0.mixer.x_proj.weight" in sd:
      return "mamba"
    return "mamba2"

  kinds = (kind(0), kind(1))
  module_type = next((t for t, k in LAYER_KINDS.items() if k == kinds), None)
  if module_type is None:
    raise CheckpointError(f"a {kinds[0]} time path with a {kinds[1]} band path is none of the "
                          f"official module types {tuple(LAYER_KINDS)}")
  fields["module_type"] = module_type
  ngroups = overrides.pop("ngroups", 1)
  if "mamba2" in kinds:
    mixer = f"layers.0.{kinds.index('mamba2')}.forward_blocks.0.mixer"
    d_inner = shape(f"{mixer}.norm.weight")[0]
    conv_channels, _, d_conv = shape(f"{mixer}.conv1d.weight")
    fields.update(d_state=(conv_channels - d_inner) // 2 // ngroups, expand=d_inner // dim,
                  headdim=d_inner // shape(f"{mixer}.A_log")[0], ngroups=ngroups, d_conv=d_conv)
  elif "mamba" in kinds:
    mixer = "layers.0.0.forward_blocks.0.mixer"
    d_inner, d_state = shape(f"{mixer}.A_log")
    rank = shape(f"{mixer}.dt_proj.weight")[1]
    fields.update(d_state=d_state, expand=d_inner // dim, d_conv=shape(f"{mixer}.conv1d.weight")[2],
                  dt_rank=0 if rank == -(-dim // 16) else rank)
  if "transformer" in kinds:
    attn = f"layers.0.{kinds.index('transformer')}.layers.0.0"
    heads = shape(f"{attn}.to_gates.weight")[0]
    fields.update(heads=heads, dim_head=shape(f"{attn}.to_qkv.weight")[0] // (3 * heads))
  stems = 0
  while f"mask_estimators.{stems}.to_freqs.0.0.0.weight" in sd:
    stems += 1
  hidden = shape("mask_estimators.0.to_freqs.0.0.0.weight")[0]
  names = tuple(overrides.pop("stems", None) or default_stems(stems))
  if len(names) != stems:
    raise CheckpointError(f"{len(names)} stem name(s) given ({', '.join(names)}) for a checkpoint "
                          f"of {stems} mask estimator(s)")
  fields.update(stems=names,
                mask_hidden_mult=hidden // dim)

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
  fields.update(audio_channels=channels, n_fft=2 * (sum(widths) - 1), band_widths=widths)
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
    if layout == "rotary":
      expected = rotary_frequencies(config.dim_head)
      if value.shape != expected.shape or not np.allclose(value, expected, rtol=1e-6, atol=0):
        wrong.append(f"{torch_key} (not the fixed rotary frequencies of dim_head "
                     f"{config.dim_head}, theta 10000)")
      continue
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
    raise CheckpointError(f"state_dict does not match a {config.module_type} model with "
                          f"{config.num_stems} stem(s): " + "; ".join(problems))
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
    if layout == "rotary":
      out[prefix + torch_key] = rotary_frequencies(config.dim_head)
      continue
    leaf = params
    for part in path:
      leaf = leaf[part]
    leaf = np.asarray(leaf)
    out[prefix + torch_key] = np.ascontiguousarray(
        _to_torch(leaf if index is None else leaf[index], layout))
  return out
