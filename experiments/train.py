"""Trains BSMamba2: `python -m experiments.train --config=experiments/configs/tiny.py --workdir=W`.

Any config field can be overridden, e.g. `--config.train.num_steps=1000 --config.optimizer.lr=1e-3
--config.data.dir=/data/musdb18hq --config.model.remat=true`. A run resumes from the newest
checkpoint in `W/checkpoints` that restores; SIGTERM/SIGINT save a checkpoint and stop. Logs:
`W/metrics.csv`, TensorBoard events in `W/tensorboard`, a progress bar. Multi-host: run the same
command on every host with `--config.distributed.enabled=true` (plus coordinator_address,
num_processes, process_id where the cluster does not provide them). The loop is
`bsmamba2_jax.training.loop.train_and_evaluate`.
"""
import json

from absl import app, flags
from ml_collections import config_flags

from bsmamba2_jax import runtime
from bsmamba2_jax.training import loop
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = cli.DEFINE_path("workdir", None, "Run directory (checkpoints, logs).")
_MAX_MINUTES = flags.DEFINE_float("max_minutes", None, "Wall-clock budget; stop, save, validate.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  # XLA:CPU flags before JAX starts, and the compilation cache so a resumed run does not
  # compile its steps again (see bsmamba2_jax/runtime.py).
  runtime.configure(compilation_cache=True, verbose=cli.verbose())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    summary = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                      max_minutes=_MAX_MINUTES.value, progress=_PROGRESS.value)
  except (OSError, ValueError) as e:  # Bad data dir, workdir, checkpoints or config: one line.
    raise SystemExit(f"train: {e}") from None
  summary.pop("state")
  print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
  cli.run(main)
