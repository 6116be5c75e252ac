"""Orbax persistence: inference exports (`save_inference`/`load_model`) and training state.

An inference export is a directory holding

  config.json   {"format": "bsmamba2-jax-inference", "version": 1,
                 "model": ModelConfig.to_dict(), "metadata": {...}}
  params/       an Orbax (StandardCheckpointer) checkpoint of the Flax params tree.

`config.json` is written last, so a directory with it is a complete export.

Training state lives under `<workdir>/checkpoints` in an Orbax `CheckpointManager` with two items
per step: `state` (the TrainState pytree: step, params, EMA, optimiser state, rng, skipped count)
and `meta` (JSON: the data-pipeline position and anything else the launcher wants to keep). The
last `keep_last` steps (at least the latest one, which resuming needs) and the best `keep_best`
by validation uSDR are kept.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from bsmamba2_jax.convert import (CheckpointError, error_summary, load_torch_checkpoint,
                                   looks_like_torch)
from bsmamba2_jax.model import BSMamba2, ModelConfig, abstract_params

EXPORT_FORMAT = "bsmamba2-jax-inference"
EXPORT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def write_json_atomically(path: str, content: Mapping[str, Any]) -> None:
  """Writes JSON to `path` via a temporary file, so a reader never sees a half-written file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(content, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


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
      raise CheckpointError(f"{directory}: cannot write the export ({error_summary(e)})"
                            ) from None
    if os.path.isdir(directory) and os.listdir(directory):  # a previous export, checked above
      os.remove(os.path.join(directory, CONFIG_FILE))
      shutil.rmtree(os.path.join(directory, PARAMS_DIR), ignore_errors=True)
    os.makedirs(directory, exist_ok=True)
    os.replace(os.path.join(staging, PARAMS_DIR), os.path.join(directory, PARAMS_DIR))
    write_json_atomically(os.path.join(directory, CONFIG_FILE), content)
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
                          f"or a PyTorch checkpoint file ({', '.join(TORCH_SUFFIXES)})")
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
    raise CheckpointError(f"{params_path}: corrupted or unreadable parameters "
                          f"({error_summary(e)})") from None
  return config, jax.tree_util.tree_map(jnp.asarray, params), metadata


def load_model(path: str, **config_overrides: Any) -> tuple[BSMamba2, Any]:
  """(BSMamba2 model, params) from an export directory or a PyTorch checkpoint file.

  `config_overrides` replace compute-only ModelConfig fields of the stored config (e.g.
  `dtype="bfloat16"`, `scan_method=...`, `chunk_size=...`, `remat=...`).
  """
  path = os.fsdecode(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such checkpoint (expected an export directory or a "
                            f"PyTorch file {'/'.join(TORCH_SUFFIXES)})")
  if os.path.isdir(path):
    config, params, _ = load_inference(path)
  elif path.lower().endswith(TORCH_SUFFIXES) or looks_like_torch(path):
    config, params = load_torch_checkpoint(path)
  else:
    raise CheckpointError(f"{path}: unrecognised checkpoint file; expected an export directory "
                          f"or a PyTorch file ending in {'/'.join(TORCH_SUFFIXES)}")
  if config_overrides:
    try:
      config = dataclasses.replace(config, **config_overrides)
    except TypeError as e:
      raise TypeError(f"load_model({path}): bad config override ({e})") from None
  return BSMamba2(config), params


class TrainingCheckpoints:
  """Training-state checkpoints of one workdir: keep last k and best k by validation uSDR.

  keep_last below 1 counts as 1: the latest step is always kept, so a run can resume.

  All processes of a multi-host run must call `save`/`restore` together (Orbax synchronises them).
  """

  def __init__(self, directory: str, *, keep_last: int = 3, keep_best: int = 1,
               best_metric: str = "usdr"):
    metric = lambda metrics: metrics[best_metric]
    policies = [checkpoint_managers.LatestN(n=max(keep_last, 1))]
    if keep_best > 0:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=metric, reverse=False, n=keep_best,
          keep_checkpoints_without_metrics=False))
    # best_fn makes Orbax write the metrics next to each step, so `best_step` and the BestN
    # policy still see them after a restart.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies), best_fn=metric,
        best_mode="max", create=True, enable_async_checkpointing=False)
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, meta: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None) -> bool:
    """Saves host copies of `state` (an unreplicated pytree) and JSON `meta` at `step`."""
    if step in self._manager.all_steps():
      return False  # Already saved (e.g. a final save right after a periodic one).
    state = jax.device_get(state)
    saved = self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(dict(meta))),
        metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
        force=True)
    self._manager.wait_until_finished()
    return saved

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """(state shaped like `target`, meta) at `step` (default: latest)."""
    step = self._manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no training checkpoint to restore")
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                                      target)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
