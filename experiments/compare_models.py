"""The paper's comparison in miniature: `python -m experiments.compare_models [--steps=500]`.

Trains the `tiny` BSMamba2 and BS-RoFormer on the same synthetic data for the same steps from the
same seed, evaluates both with 8-s chunks, by input length (1-16 s) and by vocal activity, and
writes docs/model_comparison.{md,png,json} (`bsmamba2_jax.comparison.run`). Running it again
resumes what exists in --workdir. Override the experiment config like any launcher.
"""
import os
import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from bsmamba2_jax import comparison, runtime
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                           "compare_models.py"), "Experiment config file.", lock_config=False)
_WORKDIR = cli.DEFINE_path("workdir", "compare_models_workdir", "Folder for data, runs, scores.")
_OUTPUT_DIR = cli.DEFINE_path("output_dir", "docs", "Where the table and the figure go.")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps of each model (default: config's "
                              "train.num_steps).")


def main(argv):
  # XLA:CPU flags before JAX starts; compiled programs kept, so a second run compiles less.
  runtime.configure(compilation_cache=True, verbose=cli.verbose())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = _CONFIG.value
  if _STEPS.value is not None:
    config.train.num_steps = _STEPS.value
  command = "python -m experiments.compare_models " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  comparison.run(config, _WORKDIR.value, _OUTPUT_DIR.value, command=command.strip())


if __name__ == "__main__":
  cli.run(main)
