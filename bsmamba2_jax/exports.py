"""Inference exports: a model's config and weights in one folder, and loading any checkpoint.

An export is a directory holding

  config.json   {"format": "bsmamba2-jax-inference", "version": 1,
                 "model": ModelConfig.to_dict(), "metadata": {...}}
  params/       an Orbax (StandardCheckpointer) checkpoint of the Flax params tree,

written beside its target first and moved in when complete, `config.json` last, so a directory
with it is a complete export. `load_model` reads an export or an official PyTorch file (through
`torch_files` and `convert`); `convert_checkpoint` and `export_torch_checkpoint` turn one into
the other.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bsmamba2_jax import atomic, convert, torch_files
from bsmamba2_jax.config import ModelConfig
from bsmamba2_jax.errors import CheckpointError, ignore_abandoned_reads, one_line
from bsmamba2_jax.model import BSMamba2, abstract_params

EXPORT_FORMAT = "bsmamba2-jax-inference"
EXPORT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_inference(directory: str, config: ModelConfig, params: Any, *, overwrite: bool = False,
                   metadata: Mapping[str, Any] | None = None) -> str:
  """Writes `params` (a Flax params tree for `config`) and `config.json` into `directory`.

  Refuses an existing non-empty `directory` unless `overwrite`; even then it only replaces a
  previous export (a directory holding `config.json`), never unrelated files. `metadata` must be
  JSON-serialisable. Returns the absolute path of the export.
  """
  directory = os.path.abspath(os.fspath(directory))
  content = dict(format=EXPORT_FORMAT, version=EXPORT_VERSION, model=config.to_dict(),
                 metadata=dict(metadata or {}))
  try:
    json.dumps(content)
  except TypeError as e:  # checked before a previous export is touched
    raise TypeError(f"save_inference: metadata is not JSON-serialisable: {e}") from None
  if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
    if not overwrite:
      raise FileExistsError(f"{directory}: already exists and is not empty; pass overwrite=True "
                            "(--overwrite) to replace a previous export")
    if not _is_export(directory):
      raise FileExistsError(f"{directory}: exists and is not a bsmamba2-jax export (its "
                            f"{CONFIG_FILE} is missing or is not an export's, e.g. a training "
                            "workdir); refusing to overwrite it")
  try:
    os.fsencode(directory).decode("utf-8")
  except UnicodeDecodeError:
    raise CheckpointError(f"{directory}: not a UTF-8 path, which Orbax (TensorStore) cannot "
                          "write; choose another output folder") from None
  params = jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a), np.float32), params)
  # Written next to the target first: a failed or interrupted write leaves neither a half export
  # (which would block the next attempt) nor a previous export deleted.
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.partial-", dir=parent)
  try:
    try:
      with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(staging, PARAMS_DIR), params)
    except Exception as e:  # Orbax/TensorStore raise many types (full disk, bad path ...)
      raise CheckpointError(f"{directory}: cannot write the export ({one_line(e)})"
                            ) from None
    if os.path.isdir(directory) and os.listdir(directory):  # a previous export, checked above
      os.remove(os.path.join(directory, CONFIG_FILE))
      shutil.rmtree(os.path.join(directory, PARAMS_DIR), ignore_errors=True)
    os.makedirs(directory, exist_ok=True)
    os.replace(os.path.join(staging, PARAMS_DIR), os.path.join(directory, PARAMS_DIR))
    atomic.write_json(os.path.join(directory, CONFIG_FILE), content, sort_keys=True)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return directory


def check_params(path: str, config: ModelConfig, params: Any) -> None:
  """Raises CheckpointError naming `path` unless `params` has exactly the shapes `config` needs."""
  expected = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
  found = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  expected_keys = {jax.tree_util.keystr(k) for k, _ in expected}
  found_keys = {jax.tree_util.keystr(k): v for k, v in found.items()}
  missing = sorted(expected_keys - set(found_keys))
  extra = sorted(set(found_keys) - expected_keys)
  if missing or extra:
    raise CheckpointError(f"{path}: parameters do not match the config (missing {missing[:3]}"
                          f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
                          f"{'...' if len(extra) > 3 else ''})")
  for key, spec in expected:
    shape = tuple(np.shape(found_keys[jax.tree_util.keystr(key)]))
    if shape != tuple(spec.shape):
      raise CheckpointError(f"{path}: parameter {jax.tree_util.keystr(key)} has shape {shape}, "
                            f"the config needs {tuple(spec.shape)}")


def _is_export(directory: str) -> bool:
  """Whether `directory` holds an export's config.json (of any version)."""
  try:
    _export_content(directory)
  except CheckpointError:
    return False
  return True


def _export_content(path: str) -> dict:
  """The parsed config.json of the export at `path`; CheckpointError when there is none."""
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{path}: not a bsmamba2-jax export (no {CONFIG_FILE}); expected a "
                          "directory written by save_inference / `python -m experiments.export`, "
                          f"or a PyTorch checkpoint file ({', '.join(torch_files.SUFFIXES)})")
  try:
    with open(config_path) as f:
      content = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{config_path}: corrupted config ({e})") from None
  if not isinstance(content, dict) or content.get("format") != EXPORT_FORMAT:
    raise CheckpointError(f"{config_path}: not a bsmamba2-jax export config "
                          f"(format {content.get('format') if isinstance(content, dict) else None!r})")
  return content


def _read_export_config(path: str) -> tuple[ModelConfig, dict]:
  content = _export_content(path)
  config_path = os.path.join(path, CONFIG_FILE)
  if content.get("version") != EXPORT_VERSION:
    raise CheckpointError(f"{config_path}: unsupported export version {content.get('version')!r} "
                          f"(this code reads version {EXPORT_VERSION})")
  try:
    config = ModelConfig.from_dict(content["model"])
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{config_path}: invalid model config ({e})") from None
  return config, content.get("metadata", {})


def load_inference(path: str) -> tuple[ModelConfig, Any, dict]:
  """Reads an export directory: (ModelConfig, params as jnp arrays, metadata dict)."""
  path = os.path.abspath(os.fspath(path))
  config, metadata = _read_export_config(path)
  params_path = os.path.join(path, PARAMS_DIR)
  if not os.path.isdir(params_path):
    raise CheckpointError(f"{path}: export has no {PARAMS_DIR}/ directory (incomplete copy?)")
  target = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), abstract_params(config))
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      stored = checkpointer.metadata(params_path)
      stored_tree = getattr(stored, "item_metadata", stored)
      if not jax.tree_util.tree_leaves(stored_tree):
        raise CheckpointError(f"{params_path}: corrupted or unreadable parameters (no readable "
                              "array metadata)")
      check_params(path, config, stored_tree)
      params = checkpointer.restore(params_path, target)
  except CheckpointError:
    raise
  except Exception as e:  # Orbax/TensorStore raise many types for damaged files.
    ignore_abandoned_reads()
    raise CheckpointError(f"{params_path}: corrupted or unreadable parameters "
                          f"({one_line(e)})") from None
  return config, jax.tree_util.tree_map(jnp.asarray, params), metadata


def load_torch_checkpoint(path: str, *, use_ema: bool = False,
                          **overrides: Any) -> tuple[ModelConfig, dict]:
  """A `.ckpt`/state_dict file -> (config inferred from its shapes, params); errors name the
  file. `overrides` settle what the shapes cannot (see `convert.infer_config`)."""
  state_dict = torch_files.read_torch_checkpoint(path, use_ema=use_ema)
  try:
    return convert.params_from_torch_state_dict(state_dict, **overrides)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None


def load_model(path: str, **compute: Any) -> tuple[BSMamba2, Any]:
  """(BSMamba2 model, params) from an export directory or a PyTorch checkpoint file.

  `compute` replaces `config.COMPUTE_FIELDS` of the stored config (e.g. `dtype="bfloat16"`,
  `scan_method=...`, `chunk_size=...`, `remat=...`); the other fields are the weights'.
  """
  path = os.fsdecode(os.fspath(path))
  suffixes = "/".join(torch_files.SUFFIXES)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such checkpoint (expected an export directory or a "
                            f"PyTorch file {suffixes})")
  if os.path.isdir(path):
    config, params, _ = load_inference(path)
  elif path.lower().endswith(torch_files.SUFFIXES) or torch_files.looks_like_torch(path):
    config, params = load_torch_checkpoint(path)
  else:
    raise CheckpointError(f"{path}: unrecognised checkpoint file; expected an export directory "
                          f"or a PyTorch file ending in {suffixes}")
  if compute:
    try:
      config = config.with_compute(**compute)
    except (TypeError, ValueError) as e:
      raise CheckpointError(f"load_model({path}): {e}") from None
  return BSMamba2(config), params


def convert_checkpoint(torch_ckpt: str, output_dir: str, *, use_ema: bool = False,
                       overwrite: bool = False, **overrides: Any) -> str:
  """Official `.ckpt` -> an inference export that `load_model`, separation and evaluation read.
  Returns the export's path."""
  config, params = load_torch_checkpoint(torch_ckpt, use_ema=use_ema, **overrides)
  return save_inference(output_dir, config, params, overwrite=overwrite,
                        metadata=dict(source=os.path.abspath(torch_ckpt), use_ema=use_ema))


def export_torch_checkpoint(export_dir: str, output_path: str, *, overwrite: bool = False) -> str:
  """An inference export -> a Lightning-style `.ckpt` ({"state_dict": {model.*: tensor}}) that
  the official code loads. Needs torch."""
  torch_files.check_writable(output_path, overwrite)  # before reading the export
  config, params, _ = load_inference(export_dir)
  state_dict = convert.params_to_torch_state_dict(config, jax.device_get(params))
  return torch_files.write_torch_checkpoint(output_path, state_dict, overwrite=overwrite)
