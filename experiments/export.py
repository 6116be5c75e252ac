"""Exports inference weights: `python -m experiments.export --workdir=W --output_dir=D`.

Reads the training run in `W` (its `config.json` and `checkpoints/`), takes the EMA parameters
(`--use_ema=false`: the raw ones) of the latest checkpoint (`--step=N`: that step; `--best`: the
best by validation uSDR) and writes them with the model config as an export that `load_model`,
`separate` and `evaluate` read (`bsmamba2_jax.training.export`).
"""
from absl import app, flags

from bsmamba2_jax import runtime
from bsmamba2_jax.training import export as export_lib
from experiments import cli

_WORKDIR = cli.DEFINE_path("workdir", None, "Training run directory.")
_OUTPUT_DIR = cli.DEFINE_path("output_dir", None, "Where the export is written.")
_USE_EMA = flags.DEFINE_bool("use_ema", True, "Export the EMA weights (else the raw ones).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_BEST = flags.DEFINE_bool("best", False, "Export the best checkpoint by validation uSDR.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing export in output_dir.")
flags.mark_flags_as_required(["workdir", "output_dir"])


def main(argv):
  runtime.configure(compilation_cache=True, verbose=cli.verbose())  # see runtime.py
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    path = export_lib.export(_WORKDIR.value, _OUTPUT_DIR.value, use_ema=_USE_EMA.value,
                             step=_STEP.value, best=_BEST.value, overwrite=_OVERWRITE.value)
  except (OSError, ValueError) as e:  # Bad paths or checkpoints: one line, no traceback.
    raise SystemExit(f"export: {e}") from None
  print(f"wrote {path}")


if __name__ == "__main__":
  cli.run(main)
