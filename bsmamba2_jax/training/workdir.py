"""The run folder (workdir) of a training run: its lock, its recorded config, its resume rules.

  <workdir>/train.lock    held (flock) while a run uses the folder
  <workdir>/config.json   the experiment config of the run (a resumed run's replaces it)
  <workdir>/checkpoints/  `checkpoints.TrainingCheckpoints`
  <workdir>/metrics.csv, tensorboard/   `logs.MetricsLog`

A run may resume in a workdir only with the settings that shape its weights and optimiser state
unchanged (docs/training.md §7): the model's weight fields (`ModelConfig.weights_view`: all but
`config.COMPUTE_FIELDS`, so remat, the scan method, its chunk size or the dtype may change) and
`optimizer.accumulate`. Anything else (more steps, another learning rate) may change.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Any, Iterator, Mapping

import ml_collections

from bsmamba2_jax import atomic
from bsmamba2_jax.config import ModelConfig
from bsmamba2_jax.exports import EXPORT_FORMAT

LOCK_FILE = "train.lock"
CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive lock on `workdir/train.lock` while the body runs.

  A second run on the same workdir (a resume started twice, two launches with one --workdir)
  would interleave checkpoints and logs; it fails at once with an OSError naming the run that
  holds the lock. The lock is the kernel's (flock), so a run that dies, even by SIGKILL, leaves
  none behind. Without fcntl (Windows) nothing is locked.
  """
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
  except ImportError:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  with open(path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      raise OSError(f"{workdir}: another training run ({holder}) is using this workdir; wait "
                    "for it to end or choose another --workdir") from None
    try:
      f.seek(0)
      f.truncate()
      f.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
      f.flush()
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def model_config(config: Mapping[str, Any]) -> ModelConfig:
  """The ModelConfig of an experiment config: `config.model` passed straight in."""
  return ModelConfig.preset(**config["model"])


def _resume_view(config: Mapping[str, Any]) -> dict:
  """What a resumed run must share with the run that wrote the workdir."""
  return dict(model=model_config(config).weights_view(),
              accumulate=config["optimizer"]["accumulate"])


def prepare(config: ml_collections.ConfigDict, workdir: str, *, write: bool = True) -> None:
  """Records `config` in `workdir/config.json` (`write`: process 0 of a run) after checking that
  a run recorded there before can be resumed with it; ValueError naming the setting if not."""
  path = os.path.join(workdir, CONFIG_FILE)
  current, previous = json.loads(config.to_json_best_effort()), None
  if os.path.exists(path):
    previous = _recorded(workdir)
    try:
      before = _resume_view(previous)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path}: the config of the run there cannot be read ({e}); use a new "
                       "--workdir") from None
    now = _resume_view(current)
    for key in ("model", "accumulate"):
      if before[key] != now[key]:
        name = "model" if key == "model" else "optimizer.accumulate"
        changed = ([f"{k} {before[key].get(k)} != {now[key].get(k)}" for k in now[key]
                    if before[key].get(k) != now[key].get(k)] if key == "model"
                   else [f"{before[key]} != {now[key]}"])
        raise ValueError(f"{workdir}: holds a run with a different {name} config "
                         f"({', '.join(changed)}); use a new --workdir")
  if write and current != previous:
    atomic.write_json(path, current)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The experiment config a training run recorded in `workdir/config.json`."""
  return ml_collections.ConfigDict(_recorded(workdir))


def _recorded(workdir: str) -> dict:
  """`workdir/config.json` as JSON; errors say what the folder is instead."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir}: not a training workdir (no {CONFIG_FILE})")
  try:
    with open(path) as f:
      content = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: corrupted config ({e})") from None
  if not isinstance(content, dict) or content.get("format") == EXPORT_FORMAT:
    raise ValueError(f"{workdir}: an inference export, not a training workdir; it needs no "
                     "export (separate and evaluate load it as it is)")
  missing = [key for key in ("model", "data", "train", "optimizer") if key not in content]
  if missing:
    raise ValueError(f"{path}: not a training run's config (no {', '.join(missing)})")
  return content
