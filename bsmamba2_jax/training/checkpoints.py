"""Training-state checkpoints of one workdir (Orbax), and resuming from the newest that restores.

Each step is a folder under `<workdir>/checkpoints` with two items: `state` (the TrainState
pytree: step, params, EMA, optimiser state, rng, skipped count) and `meta` (JSON: the data
position, the wall clock spent, and a CRC-32 of every array of the state). The checksums matter:
Orbax stores incompressible arrays as raw bytes, so a flipped bit in an array file restores
without any error; comparing checksums turns that into a damaged checkpoint. The last
`keep_last` steps (at least the latest) and the best `keep_best` by validation uSDR are kept.

`restore_newest` is how a run resumes: a checkpoint that fails to restore (truncated, damaged,
or half written by a run that was killed while saving) is named in a warning, skipped and
renamed `<folder>.damaged` (kept for inspection, out of Orbax's way), the newest one that
restores is used, and if none does it stops with a CheckpointError that says what to do; it
never starts from scratch while checkpoints are there.
"""
from __future__ import annotations

import logging
import os
import re
import zlib
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from bsmamba2_jax.errors import CheckpointError, ignore_abandoned_reads, one_line

CHECKSUMS = "crc32"  # the meta entry holding {array path: CRC-32 of its bytes}
# A step folder: "<step>", or "<step>.orbax-checkpoint-tmp-<n>" while (or if killed while) saving.
_STEP_FOLDER = re.compile(r"^(\d+)(\.orbax-checkpoint-tmp-\d+)?$")
# What a skipped step folder is renamed to: Orbax ignores it, and a later save of that step
# writes a new one instead of finding the damaged one "already saved".
DAMAGED_SUFFIX = ".damaged"


def checksums(tree: Any) -> dict[str, int]:
  """{key path: CRC-32 of the array's bytes} for every leaf of `tree` (host or device arrays)."""
  as_bytes = lambda leaf: np.ascontiguousarray(jax.device_get(leaf)).reshape(-1).view(np.uint8)
  return {jax.tree_util.keystr(path): zlib.crc32(as_bytes(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class TrainingCheckpoints:
  """The checkpoints of one workdir: keep the last k and the best k by validation uSDR.

  keep_last below 1 counts as 1: the latest step is always kept, so a run can resume. All
  processes of a multi-host run must call `save` / `restore*` together (Orbax synchronises them).
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

  def step_folders(self) -> list[str]:
    """Every folder that holds or was to hold a step, complete or not, newest first."""
    try:
      names = os.listdir(self.directory)
    except OSError:
      return []
    found = [(int(m.group(1)), name) for name in names if (m := _STEP_FOLDER.match(name))]
    return [os.path.join(self.directory, name) for _, name in sorted(found, reverse=True)]

  def save(self, step: int, state: Any, *, meta: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None) -> bool:
    """Saves host copies of `state` (an unreplicated pytree) and JSON `meta` at `step`, with the
    checksums of the state's arrays."""
    if step in self._manager.all_steps():
      return False  # Already saved (e.g. a final save right after a periodic one).
    state = jax.device_get(state)
    saved = self._manager.save(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({**meta, CHECKSUMS: checksums(state)})),
        metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
        force=True)
    self._manager.wait_until_finished()
    return saved

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """(state shaped like `target`, meta) of `step` (default: the latest); CheckpointError naming
    the step's folder when it cannot be read or its arrays do not match their checksums."""
    step = self._manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no training checkpoint to restore")
    folder = os.path.join(self.directory, str(step))
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                                      target)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                        meta=ocp.args.JsonRestore()))
      state, meta = restored["state"], dict(restored["meta"])
    except Exception as e:  # Orbax / TensorStore / json raise many types for damaged files
      ignore_abandoned_reads()
      raise CheckpointError(f"{folder}: cannot be restored ({one_line(e)})") from None
    expected = meta.pop(CHECKSUMS, None)
    if expected is not None:
      found = checksums(state)
      damaged = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
      if damaged:
        raise CheckpointError(f"{folder}: {len(damaged)} array(s) differ from the checksums "
                              f"saved with them, e.g. {damaged[0]} (damaged files)")
    return state, meta

  def restore_newest(self, target: Any) -> tuple[Any, dict] | None:
    """The newest checkpoint that restores, as `restore` gives it; None when there is none at
    all. The newer ones that fail are named in a warning and renamed (`DAMAGED_SUFFIX`); if
    every one fails, CheckpointError and nothing is renamed (a second attempt stops again)."""
    folders = self.step_folders()
    if not folders:
      return None
    complete = set(self.all_steps())
    failures = []
    for folder in folders:
      name = os.path.basename(folder)
      step = int(_STEP_FOLDER.match(name).group(1))
      if name == str(step) and step in complete:
        try:
          restored = self.restore(target, step)
        except CheckpointError as e:
          failures.append((folder, str(e)))
          continue
        for failed, problem in failures:
          logging.warning("%s; skipped%s", problem, self._set_aside(failed))
        if failures:
          logging.info("resuming from %s instead", folder)
        return restored
      failures.append((folder, f"{folder}: half written (its save never finished)"))
    for _, problem in failures:
      logging.warning("%s", problem)
    raise CheckpointError(
        f"{self.directory}: none of its {len(folders)} checkpoint(s) restores (newest: "
        f"{failures[0][1]}); to train from scratch move the folder away or choose another "
        "--workdir")

  def _set_aside(self, folder: str) -> str:
    """Renames a step folder that does not restore (process 0 only); says where it went."""
    if jax.process_index() != 0:
      return ""
    target, k = folder + DAMAGED_SUFFIX, 1
    while os.path.exists(target):
      k += 1
      target = f"{folder}{DAMAGED_SUFFIX}-{k}"
    try:
      os.rename(folder, target)
    except OSError as e:
      return f" (could not be renamed: {e.strerror or e})"
    self._manager.reload()
    return f" and renamed to {os.path.basename(target)} (delete it once you no longer need it)"

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
