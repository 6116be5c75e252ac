"""Benchmarks: `python -m experiments.benchmark [--only=scan,limit,...] [--mode=full|gpu|...]`.

Each section lives in `experiments/benchmarks/<name>.py` and exposes `run() -> (rows, markdown)`
(or `run(mode)`). With no flags the CPU sections (`CPU_SECTIONS`) run in mode "default" (about
15 minutes on a 2-core CPU; "full" measures paper sizes, "smoke" microscopic ones).
`--mode=gpu` is the run for a lent accelerator: with no `--only` it runs `GPU_SECTIONS` (the
paper recipe's training step, separation, bf16 numerics), about 10 minutes on one H100. The
report goes to stdout and to `benchmarks/results/<date>-<host>.{json,md}` with PNG plots beside
them (`experiments/benchmarks/report.py`).
"""
from __future__ import annotations

import os

from absl import flags

from bsmamba2_jax import runtime
from experiments import cli
from experiments.benchmarks import report

CPU_SECTIONS = ("scan", "scaling", "peers", "limit", "forward", "train", "separate", "data",
                "precision")
GPU_SECTIONS = ("recipe", "separate", "precision")
SECTIONS = CPU_SECTIONS + ("recipe",)
# Sections that run the model forward only: run alone, they get `runtime.configure(inference=True)`.
INFERENCE_SECTIONS = frozenset({"separate"})

_ONLY = flags.DEFINE_list("only", None, f"Sections to run, from {SECTIONS}; default: "
                          f"{GPU_SECTIONS} with --mode=gpu, else {CPU_SECTIONS}.")
_MODE = flags.DEFINE_enum("mode", "default", report.MODES,
                          "Sizes: smoke (tests), default (~15 min on a 2-core CPU), full "
                          "(paper sizes), gpu (one accelerator, ~10 min on an H100).")
_OUT = cli.DEFINE_path("output_dir", "benchmarks/results", "Where the report is written.")


def default_sections(mode: str) -> tuple[str, ...]:
  """The sections a run of `mode` measures when `--only` is not given."""
  return GPU_SECTIONS if mode == "gpu" else CPU_SECTIONS


def run_benchmarks(sections: list[str] | None, output_dir: str, mode: str = "default") -> dict:
  """Runs `sections` (None: `default_sections(mode)`) and writes the JSON (every raw repeat),
  markdown and plots."""
  if sections is None:
    sections = list(default_sections(mode))
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    raise ValueError(f"unknown benchmark section(s) {unknown}; choose from {SECTIONS}")
  os.makedirs(output_dir, exist_ok=True)  # before minutes of measuring, not after
  if not os.access(output_dir, os.W_OK):
    raise PermissionError(f"{output_dir}: cannot write the report there")
  return report.build(list(sections), mode, output_dir)


def main(argv):
  # XLA:CPU flags before JAX starts, those of a separation program when only inference sections
  # run; no compilation cache: the rows time compilation too.
  sections = _ONLY.value or default_sections(_MODE.value)
  runtime.configure(compilation_cache=False, verbose=cli.verbose(),
                    inference=set(sections) <= INFERENCE_SECTIONS)
  del argv
  try:
    run_benchmarks(_ONLY.value, _OUT.value, _MODE.value)
  except (ValueError, OSError) as e:
    raise SystemExit(f"experiments.benchmark: {e}") from None


if __name__ == "__main__":
  cli.run(main)
