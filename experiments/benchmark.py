"""Benchmarks: `python -m experiments.benchmark [--only=scan,scaling,...] [--mode=default|full]`.

Each section lives in `experiments/benchmarks/<name>.py` and exposes `run() -> (rows, markdown)`
(or `run(mode)`). With no flags every section runs in mode "default" (about 15 minutes on
a 2-core CPU; "full" measures paper sizes, "smoke" microscopic ones). The report goes to stdout
and to `benchmarks/results/<date>-<host>.{json,md}` with PNG plots beside them
(`experiments/benchmarks/report.py`).
"""
from __future__ import annotations

import os

from absl import app, flags

from experiments import DEFINE_path, parse_flags
from experiments.benchmarks import report

SECTIONS = ("scan", "scaling", "peers", "limit", "forward", "train", "separate", "data",
            "precision")

_ONLY = flags.DEFINE_list("only", list(SECTIONS), f"Sections to run, from {SECTIONS}.")
_MODE = flags.DEFINE_enum("mode", "default", report.MODES,
                          "Sizes: smoke (tests), default (~15 min on a 2-core CPU), full "
                          "(paper sizes).")
_OUT = DEFINE_path("output_dir", "benchmarks/results", "Where the report is written.")


def run_benchmarks(sections: list[str], output_dir: str, mode: str = "default") -> dict:
  """Runs `sections` and writes the JSON (every raw repeat), markdown and plots."""
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    raise ValueError(f"unknown benchmark section(s) {unknown}; choose from {SECTIONS}")
  os.makedirs(output_dir, exist_ok=True)  # before minutes of measuring, not after
  if not os.access(output_dir, os.W_OK):
    raise PermissionError(f"{output_dir}: cannot write the report there")
  return report.build(list(sections), mode, output_dir)


def main(argv):
  del argv
  try:
    run_benchmarks(_ONLY.value, _OUT.value, _MODE.value)
  except (ValueError, OSError) as e:
    raise SystemExit(f"experiments.benchmark: {e}") from None


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
