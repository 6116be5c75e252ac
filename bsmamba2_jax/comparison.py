"""The paper's comparison in miniature: BSMamba2 against BS-RoFormer on equal terms, on a CPU.

The paper trains its BSMamba2 and a BS-RoFormer in one pipeline and compares them overall, by
input length (1 to 16 s chunks) and on sparse-vocal passages. Here both are the `tiny` size
(same width, depth, mask estimator), trained on the same synthetic dataset, for the same number
of steps from the same seed, differing only in `module_type` (and BS-RoFormer's official
dropout); then each is evaluated with 8-s chunks (the official inference), the input-length
study, and the vocal-activity breakdown. `run` is what `python -m experiments.compare_models`
runs; everything is kept in the workdir (a second run resumes training and redoes the scoring):

  W/data/                  the synthetic dataset (shared)
  W/<arm>/train/, export/  training run and EMA export of each arm
  W/<arm>/evaluation/      its per-track scores, segment study and reports
and writes the table (markdown) and the figure (PNG) to `output_dir`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np

from bsmamba2_jax import atomic, evaluation, plots, quickstart
from bsmamba2_jax.model import abstract_params
from bsmamba2_jax.training import workdir as workdir_lib

# The two arms: what each changes in the experiment's `config.model`.
ARMS = {
    "BSMamba2": dict(module_type="mamba2"),
    "BS-RoFormer": dict(module_type="transformer", attn_dropout=0.1, ff_dropout=0.1),
}
SEGMENTS = (1.0, 2.0, 4.0, 8.0, 16.0)
MAIN_SEGMENT = 8.0
TABLE_FILE, FIGURE_FILE, RESULTS_FILE = ("model_comparison.md", "model_comparison.png",
                                         "model_comparison.json")


@dataclasses.dataclass
class ArmResult:
  """One arm's measurements: sizes, training, the main scores, the study and the breakdown."""
  name: str
  module_type: str
  parameters: int
  steps: int
  training_minutes: float
  scores: dict            # vocals/mix cSDR median and uSDR mean at MAIN_SEGMENT, no overlap
  segment_study: list     # evaluation.segment_study rows
  sparse: list            # evaluation.sparse_breakdown rows


def arm_config(config: ml_collections.ConfigDict, arm: str) -> ml_collections.ConfigDict:
  """The experiment config of `arm`: `config` with the arm's model fields."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.model.update(ARMS[arm])
  return out


def _scores(results: dict) -> dict[str, float]:
  agg, base = results["aggregate"], results["baseline"]
  return dict(csdr=agg["vocals_csdr"]["median"], usdr=agg["vocals_usdr"]["mean"],
              mix_csdr=base["mix_vocals_csdr"]["median"], mix_usdr=base["mix_vocals_usdr"]["mean"])


def run_arm(config: ml_collections.ConfigDict, arm: str, workdir: str, *,
            segments: Sequence[float] = SEGMENTS, progress: bool = True) -> ArmResult:
  """Trains (or resumes) one arm for `config.train.num_steps` steps, exports its EMA weights
  and evaluates them on the test tracks."""
  config = arm_config(config, arm)
  folder = os.path.join(workdir, arm)
  trained = quickstart.train(config, os.path.join(folder, "train"), minutes=float("inf"),
                             progress=progress)
  if trained["stop_reason"] == "signal":
    raise KeyboardInterrupt("training interrupted; run the same command again to resume")
  export_dir, step = quickstart.export(os.path.join(folder, "train"),
                                       os.path.join(folder, "export"))
  results, study, _ = evaluation.run(
      export_dir, config.data.dir, "test", os.path.join(folder, "evaluation"),
      segment=MAIN_SEGMENT, overlap=0.0, batch_size=config.separate.batch_size,
      segments=segments, overwrite=True, progress=progress)
  model = workdir_lib.model_config(config)
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_params(model)))
  return ArmResult(name=arm, module_type=model.module_type, parameters=count, steps=step,
                   training_minutes=trained["minutes_spent"], scores=_scores(results),
                   segment_study=study, sparse=results["sparse"])


def markdown(arms: Sequence[ArmResult], command: str) -> str:
  """The comparison's tables: overall, by input length, by vocal activity."""
  lines = ["| model | module_type | parameters | steps | training (min) | vocals cSDR (median) "
           "| vocals uSDR (mean) | uSDR over the mixture |", "|---|---|---|---|---|---|---|---|"]
  for a in arms:
    s = a.scores
    lines.append(f"| {a.name} | {a.module_type} | {a.parameters:,} | {a.steps} | "
                 f"{a.training_minutes:.1f} | {s['csdr']:.2f} | {s['usdr']:.2f} | "
                 f"{s['usdr'] - s['mix_usdr']:+.2f} |")
  mix = arms[0].scores
  lines.append(f"| mixture (do nothing) | | | | | {mix['mix_csdr']:.2f} | {mix['mix_usdr']:.2f} "
               "| |")
  lines += ["", "Input length (chunks of the given length, no overlap): vocals cSDR median / "
            "uSDR mean (dB)", "",
            "| segment (s) | " + " | ".join(a.name for a in arms) + " |",
            "|---|" + "---|" * len(arms)]
  for i, row in enumerate(arms[0].segment_study):
    cells = [f"{a.segment_study[i]['vocals_csdr_median']:.2f} / "
             f"{a.segment_study[i]['vocals_usdr_mean']:.2f}" for a in arms]
    lines.append(f"| {row['segment']:g} | " + " | ".join(cells) + " |")
  lines += ["", f"Vocal activity (share of 1-s frames with vocals at or above "
            f"{evaluation.ACTIVITY_THRESHOLD_DB:g} dBFS; {MAIN_SEGMENT:g}-s chunks): vocals cSDR "
            "median / uSDR mean (dB)", "",
            "| activity | tracks | " + " | ".join(a.name for a in arms) + " |",
            "|---|---|" + "---|" * len(arms)]
  for i, row in enumerate(arms[0].sparse):
    cells = [(f"{a.sparse[i]['vocals_csdr_median']:.2f} / {a.sparse[i]['vocals_usdr_mean']:.2f}"
              if a.sparse[i]["tracks"] else "–") for a in arms]
    lines.append(f"| {row['activity']} | {row['tracks']} | " + " | ".join(cells) + " |")
  lines += ["", f"Made by `{command}`."]
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str, output_dir: str, *, command: str,
        segments: Sequence[float] = SEGMENTS, progress: bool = True) -> list[ArmResult]:
  """Both arms, then the table, the figure and the raw numbers into `output_dir`."""
  workdir = os.path.abspath(workdir)
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.dir = os.path.join(workdir, "data")
  config.data.synthetic.generate = True
  print(f"synthetic dataset -> {quickstart.make_data(config)}", flush=True)
  arms = []
  for arm in ARMS:
    print(f"{arm}: training {config.train.num_steps} steps, then evaluating", flush=True)
    arms.append(run_arm(config, arm, workdir, segments=segments, progress=progress))
  os.makedirs(output_dir, exist_ok=True)
  table = markdown(arms, command)
  with open(os.path.join(output_dir, TABLE_FILE), "w") as f:
    f.write(table + "\n")
  plots.model_comparison(os.path.join(output_dir, FIGURE_FILE),
                         [dataclasses.asdict(a) for a in arms])
  atomic.write_json(os.path.join(output_dir, RESULTS_FILE), evaluation.strict_json(
      dict(command=command, arms=[dataclasses.asdict(a) for a in arms])), allow_nan=False)
  print(table, flush=True)
  return arms

