"""Exports inference weights: `python -m experiments.export --workdir=W --output_dir=D`.

Reads the training run in `W` (its `config.json` and `checkpoints/`), takes the EMA parameters
(`--use_ema=false`: the raw ones) of the latest checkpoint (`--step=N`: that step; `--best`: the
best by validation uSDR) and writes them with the model config as an Orbax export that
`load_model`, `separate` and `evaluate` read.
"""
from __future__ import annotations

import json
import os

from absl import app, flags
import ml_collections

from bsmamba2_jax import checkpoints
from experiments import DEFINE_path, parse_flags


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The experiment config a training run recorded in `workdir/config.json`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir}: not a training workdir (no config.json)")
  try:
    with open(path) as f:
      content = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: corrupted config ({e})") from None
  if not isinstance(content, dict) or content.get("format") == checkpoints.EXPORT_FORMAT:
    raise ValueError(f"{workdir}: an inference export, not a training workdir; it needs no "
                     "export (separate and evaluate load it as it is)")
  missing = [key for key in ("model", "data", "train", "optimizer") if key not in content]
  if missing:
    raise ValueError(f"{path}: not a training run's config (no {', '.join(missing)})")
  return ml_collections.ConfigDict(content)


def restore_state(workdir: str, *, step: int | None = None, best: bool = False):
  """The host TrainState saved in `workdir` at `step` (default latest; `best`: best uSDR)."""
  from experiments import train  # pylint: disable=g-import-not-at-top
  experiment = train.Experiment(read_config(workdir))
  folder = os.path.join(workdir, "checkpoints")
  none = FileNotFoundError(f"{workdir}: no training checkpoint in checkpoints/")
  if not os.path.isdir(folder):  # checked first: the manager would create the folder
    raise none
  manager = checkpoints.TrainingCheckpoints(folder)
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
  from experiments import train  # pylint: disable=g-import-not-at-top
  config = read_config(workdir)
  state = restore_state(workdir, step=step, best=best)
  metadata = dict(source=os.path.abspath(workdir), step=int(state.step),
                  weights="ema" if use_ema else "raw", skipped_steps=int(state.skipped))
  return checkpoints.save_inference(
      output_dir, train.model_config(config), state.ema_params if use_ema else state.params,
      overwrite=overwrite, metadata=metadata)


def define_flags() -> None:
  """The program's flags; defined only when run as a program, so importing is side-effect free."""
  DEFINE_path("workdir", None, "Training run directory.")
  DEFINE_path("output_dir", None, "Where the export is written.")
  flags.DEFINE_bool("use_ema", True, "Export the EMA weights (else the raw ones).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_bool("best", False, "Export the best checkpoint by validation uSDR.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing export in output_dir.")
  flags.mark_flags_as_required(["workdir", "output_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  try:
    path = export(f.workdir, f.output_dir, use_ema=f.use_ema, step=f.step, best=f.best,
                  overwrite=f.overwrite)
  except (OSError, ValueError) as e:  # Bad paths or checkpoints: one line, no traceback.
    raise SystemExit(f"export: {e}") from None
  print(f"wrote {path}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
