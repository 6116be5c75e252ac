"""A training run's weights as an inference export: what `python -m experiments.export` runs.

It reads the run in a workdir (its recorded config and checkpoints), takes the EMA parameters
(or the raw ones) of the latest checkpoint, a given step or the best by validation uSDR, and
writes them with the model config as an export that `load_model`, separation and evaluation read.
"""
from __future__ import annotations

import os

from bsmamba2_jax import exports
from bsmamba2_jax.training import workdir as workdir_lib
from bsmamba2_jax.training.checkpoints import TrainingCheckpoints
from bsmamba2_jax.training.loop import Experiment


def restore_state(workdir: str, *, step: int | None = None, best: bool = False):
  """The host TrainState saved in `workdir` at `step` (default latest; `best`: best uSDR)."""
  experiment = Experiment(workdir_lib.read_config(workdir))
  folder = os.path.join(workdir, workdir_lib.CHECKPOINTS)
  none = FileNotFoundError(f"{workdir}: no training checkpoint in {workdir_lib.CHECKPOINTS}/")
  if not os.path.isdir(folder):  # checked first: the manager would create the folder
    raise none
  manager = TrainingCheckpoints(folder)
  try:
    available = manager.all_steps()
    if not available:
      raise none
    if best:
      step = manager.best_step()
      if step is None:
        raise ValueError(f"{workdir}: no checkpoint has a validation score yet (steps "
                         f"{available}); export one by --step, or the latest without --best")
    if step is not None and step not in available:
      raise ValueError(f"{workdir}: no checkpoint at step {step}; have {available}")
    state, _ = manager.restore(experiment.abstract_state(), step=step)
  finally:
    manager.close()
  return state


def export(workdir: str, output_dir: str, *, use_ema: bool = True, step: int | None = None,
           best: bool = False, overwrite: bool = False) -> str:
  """Writes the chosen weights of the run in `workdir` to `output_dir`; returns its path."""
  config = workdir_lib.read_config(workdir)
  state = restore_state(workdir, step=step, best=best)
  metadata = dict(source=os.path.abspath(workdir), step=int(state.step),
                  weights="ema" if use_ema else "raw", skipped_steps=int(state.skipped))
  return exports.save_inference(
      output_dir, workdir_lib.model_config(config),
      state.ema_params if use_ema else state.params, overwrite=overwrite, metadata=metadata)
