"""Benchmarks: `python -m experiments.benchmark [--only=scan,forward,train,data,separate]`.

Each section lives in `experiments/benchmarks/<name>.py` and exposes `run() -> (rows, markdown)`.
The report goes to stdout and to `benchmarks/results/<date>-<host>.{json,md}`.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import socket

from absl import app, flags

SECTIONS = ("scan", "forward", "train", "data", "separate")

_ONLY = flags.DEFINE_list("only", list(SECTIONS), f"Sections to run, from {SECTIONS}.")
_OUT = flags.DEFINE_string("output_dir", "benchmarks/results", "Where the report is written.")


def run_benchmarks(sections: list[str], output_dir: str) -> dict:
  """Runs `sections` and writes the JSON (every raw repeat) and markdown report."""
  import jax

  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    raise ValueError(f"unknown benchmark section(s) {unknown}; choose from {SECTIONS}")
  report = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                host=socket.gethostname(), machine=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), jax=jax.__version__,
                devices=[str(d) for d in jax.devices()], sections={})
  markdown = [f"# Benchmark {report['date']} on {report['host']} "
              f"({report['cpu_count']} CPUs, jax {report['jax']}, {report['devices'][0]})"]
  for name in sections:
    module = importlib.import_module(f"experiments.benchmarks.{name}")
    rows, text = module.run()
    report["sections"][name] = rows
    markdown += [f"\n## {name}\n", text]
    print(f"\n## {name}\n\n{text}", flush=True)
  os.makedirs(output_dir, exist_ok=True)
  stem = os.path.join(output_dir, f"{datetime.date.today().isoformat()}-{report['host']}")
  with open(stem + ".json", "w") as f:
    json.dump(report, f, indent=1, default=str)
  with open(stem + ".md", "w") as f:
    f.write("\n".join(markdown) + "\n")
  print(f"\nwrote {stem}.json and {stem}.md")
  return report


def main(argv):
  del argv
  run_benchmarks(_ONLY.value, _OUT.value)


if __name__ == "__main__":
  app.run(main)
