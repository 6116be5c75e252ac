"""The quickstart: `python -m experiments.quickstart [--workdir=W] [--minutes=15]`.

Generates the synthetic MUSDB18-HQ-layout dataset, trains the `tiny` model for `--minutes`,
evaluates it against the do-nothing baseline, exports the EMA weights, separates one test track
and writes figures and `summary.json` into W (`bsmamba2_jax.quickstart.run`); running it again
reuses or resumes what exists. Override the experiment config like any launcher, e.g.
`--config.model.dim=64`.
"""
import os

from absl import app, flags
from ml_collections import config_flags

from bsmamba2_jax import quickstart, runtime
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "quickstart.py"),
    "Experiment config file.", lock_config=False)
_WORKDIR = cli.DEFINE_path("workdir", "quickstart_workdir", "Folder for everything made.")
_MINUTES = flags.DEFINE_float(
    "minutes", 15.0, "Training budget (wall clock, all runs together, compilation included): "
    "training stops at the first step past it, then validates once; evaluation, export and "
    "separation come on top.")
_SEED = flags.DEFINE_integer("seed", None, "Random seed of data and training (default: config's).")


def main(argv):
  # XLA:CPU flags before JAX starts; compiled programs kept, so a second run compiles nothing.
  runtime.configure(compilation_cache=True, verbose=cli.verbose())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = _CONFIG.value
  if _SEED.value is not None:
    config.seed = config.data.synthetic.seed = _SEED.value
  try:
    quickstart.run(config, _WORKDIR.value, minutes=_MINUTES.value)
  except OSError as e:  # a workdir that cannot be written: one line naming it
    raise SystemExit(f"quickstart: {e}") from None


if __name__ == "__main__":
  cli.run(main)
