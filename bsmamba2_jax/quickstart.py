"""The quickstart as a library: data -> train -> evaluate -> export -> separate -> figures.

`run(config, workdir, minutes=...)` is what `python -m experiments.quickstart` runs: on a fresh
machine, in one command and a bounded time, it generates the synthetic MUSDB18-HQ-layout dataset,
trains the `tiny` model with the real training loop, evaluates it on the held-out test tracks
against the do-nothing baseline (the mixture as the estimate), exports the EMA weights,
separates one test track, draws figures and writes `summary.json`. Every step is cached in the
workdir, so running it again reuses or resumes what exists:

  W/data/             synthetic dataset (reused when complete)
  W/train/            training run: config.json, checkpoints/, metrics.csv, tensorboard/;
                      re-running resumes it until `minutes` of training are spent
  W/export/           inference export of the EMA weights (rewritten when training moved on)
  W/evaluation/       per-track CSV, results.json/.md, per-track figure
  W/separated/<track>/{vocals,accompaniment}.wav
  W/figures/          training_curves.png, spectrograms.png
  W/summary.json      vocals cSDR/uSDR of mixture and model on the test tracks, improvement
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import ml_collections

from bsmamba2_jax import atomic, evaluation, exports, plots
from bsmamba2_jax.separate import separate_files
from bsmamba2_jax.separator import Separator
from bsmamba2_jax.training import export as export_lib, loop, workdir as workdir_lib
from bsmamba2_jax.training.checkpoints import TrainingCheckpoints
from data_pipeline import synthetic

BUDGET_FILE = "budget.json"  # under W/train: minutes of training spent by earlier runs
SUMMARY_FILE = "summary.json"


def _read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: corrupted ({e}); delete it to recompute this step") from None


def make_data(config: ml_collections.ConfigDict) -> str:
  """Step 1: the synthetic dataset at `config.data.dir` (cached by its manifest)."""
  s = config.data.synthetic
  return synthetic.generate_dataset(config.data.dir, num_train=s.num_train, num_test=s.num_test,
                                    seconds=s.seconds, seed=s.seed)


def train(config: ml_collections.ConfigDict, train_dir: str, minutes: float, *,
          progress: bool = True) -> dict:
  """Step 2: trains until `minutes` of wall clock are spent over all runs in `train_dir`.

  Returns {"step", "minutes_spent", "stop_reason"}; trains nothing when the budget is spent or
  the run reached `config.train.num_steps`.
  """
  budget_path = os.path.join(train_dir, BUDGET_FILE)
  spent = _read_json(budget_path) or dict(minutes_spent=0.0, step=0, stop_reason=None)
  left = minutes - spent["minutes_spent"]
  if spent["stop_reason"] == "done" or left <= 0.05:
    logging.info("training: budget spent (%.1f of %.1f min, step %d); reusing it",
                 spent["minutes_spent"], minutes, spent["step"])
    return spent
  if math.isinf(minutes):  # a step budget (experiments.compare_models)
    logging.info("training: until step %d", config.train.num_steps)
  else:
    logging.info("training: %.1f of %.1f min left", left, minutes)
  start = time.time()
  result = loop.train_and_evaluate(config, train_dir, max_minutes=left, progress=progress)
  spent = dict(minutes_spent=spent["minutes_spent"] + (time.time() - start) / 60,
               step=int(result["step"]), stop_reason=result["stop_reason"])
  if result["stop_reason"] != "signal":
    atomic.write_json(budget_path, spent)
  return spent


def export(train_dir: str, export_dir: str) -> tuple[str, int]:
  """Step 4a: the EMA weights of the latest checkpoint as an export (reused when current).

  Returns (export path, its training step).
  """
  manager = TrainingCheckpoints(os.path.join(train_dir, workdir_lib.CHECKPOINTS))
  latest = manager.latest_step()
  manager.close()
  if latest is None:
    raise FileNotFoundError(f"{train_dir}: training left no checkpoint")
  previous = _read_json(os.path.join(export_dir, exports.CONFIG_FILE))
  if previous is not None and previous.get("metadata", {}).get("step") == latest:
    return export_dir, latest
  path = export_lib.export(train_dir, export_dir, use_ema=True, overwrite=previous is not None)
  return path, latest


def evaluate(get_separator, data_dir: str, output_dir: str, step: int) -> dict:
  """Step 3: per-track scores of model and mixture on the test split (reused for `step`);
  `get_separator()` gives the separator (built only when needed)."""
  results_path = os.path.join(output_dir, "results.json")
  previous = _read_json(results_path)
  if previous is not None and previous.get("step") == step:
    return previous
  results = evaluation.evaluate(get_separator(), data_dir, "test")
  evaluation.write_results(output_dir, results, overwrite=previous is not None)
  results["step"] = step
  atomic.write_json(results_path, dict(results, segment_study=[]))
  return results


def separate_track(separator, track_dir: str, output_dir: str) -> dict[str, str]:
  """Step 4b: `track_dir/mixture.wav` -> `output_dir/{vocals,accompaniment}.wav`."""
  (result,) = separate_files(
      [os.path.join(track_dir, "mixture.wav")], separator=separator, output_dir=output_dir,
      template="{stem}.{ext}", bit_depth="32f", overwrite=True, progress=False)
  if result.error:
    raise RuntimeError(result.error)
  return result.outputs


def _score(aggregate: dict, key: str) -> dict[str, float]:
  return dict(median=aggregate[key]["median"], mean=aggregate[key]["mean"])


def table(summary: dict) -> str:
  """The markdown table of vocals cSDR (median over tracks) and uSDR (mean) of the summary."""
  rows = ["| vocals on the test tracks | cSDR (dB, median) | uSDR (dB, mean) |", "|---|---|---|"]
  for name, key in (("mixture (do nothing)", "mixture"), ("BSMamba2 tiny", "model"),
                    ("improvement", "improvement")):
    s = summary[key]
    rows.append(f"| {name} | {s['csdr']:+.2f} | {s['usdr']:+.2f} |")
  return "\n".join(rows)


def run(config: ml_collections.ConfigDict, workdir: str, *, minutes: float,
        progress: bool = True) -> dict[str, Any]:
  """Every quickstart step in `workdir`; returns the summary (also in `workdir/summary.json`)."""
  if not minutes > 0:
    raise ValueError(f"--minutes must be positive, got {minutes}")
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.dir = os.path.join(workdir, "data")
  config.data.synthetic.generate = True
  train_dir = os.path.join(workdir, "train")
  figures = os.path.join(workdir, "figures")
  os.makedirs(figures, exist_ok=True)

  print(f"[1/6] synthetic dataset -> {make_data(config)}", flush=True)
  print(f"[2/6] training the tiny model for {minutes:g} min -> {train_dir}", flush=True)
  trained = train(config, train_dir, minutes, progress=progress)
  if trained["stop_reason"] == "signal":
    raise KeyboardInterrupt("training interrupted; re-run the same command to resume")
  export_dir, step = export(train_dir, os.path.join(workdir, "export"))
  previous = _read_json(os.path.join(workdir, SUMMARY_FILE)) or {}
  separator = None

  def get_separator():
    nonlocal separator
    if separator is None:
      s = config.separate
      separator = Separator.from_checkpoint(export_dir, segment=s.segment, overlap=s.overlap,
                                            batch_size=s.batch_size)
    return separator

  print(f"[3/6] evaluating step {step} on the test tracks", flush=True)
  results = evaluate(get_separator, config.data.dir, os.path.join(workdir, "evaluation"), step)
  track = results["tracks"][0]["track"]
  track_dir = os.path.join(config.data.dir, "test", track)
  print(f"[4/6] EMA weights exported -> {export_dir}; separating {track}", flush=True)
  outputs = previous.get("separated", {})
  if previous.get("step") != step or not all(map(os.path.isfile, outputs.values())):
    outputs = separate_track(get_separator(), track_dir,
                             os.path.join(workdir, "separated", track))
  print(f"[5/6] figures -> {figures}", flush=True)
  curves = os.path.join(figures, "training_curves.png")
  spectrograms = os.path.join(figures, "spectrograms.png")
  plots.training_curves(os.path.join(train_dir, "metrics.csv"), curves)
  plots.spectrograms([("mixture", os.path.join(track_dir, "mixture.wav")),
                      ("true vocals", os.path.join(track_dir, "vocals.wav")),
                      ("estimated vocals", outputs["vocals"])], spectrograms)

  model = {m: _score(results["aggregate"], f"vocals_{m}") for m in ("csdr", "usdr")}
  mixture = {m: _score(results["baseline"], f"mix_vocals_{m}") for m in ("csdr", "usdr")}
  # The paper's aggregates: median cSDR and mean uSDR over tracks.
  pick = lambda d: dict(csdr=d["csdr"]["median"], usdr=d["usdr"]["mean"])
  summary = dict(
      mixture=pick(mixture), model=pick(model),
      improvement={m: pick(model)[m] - pick(mixture)[m] for m in ("csdr", "usdr")},
      mixture_detail=mixture, model_detail=model, test_tracks=len(results["tracks"]),
      step=step, training_minutes=trained["minutes_spent"], workdir=workdir,
      export=export_dir, separated=outputs, figures=dict(curves=curves, spectrograms=spectrograms),
      evaluation=os.path.join(workdir, "evaluation"))
  atomic.write_json(os.path.join(workdir, SUMMARY_FILE), summary)
  print(f"[6/6] summary -> {os.path.join(workdir, SUMMARY_FILE)}\n\n{table(summary)}\n", flush=True)
  print(f"""Made in {workdir}:
  data/ (synthetic dataset), train/ (checkpoints, metrics.csv, tensorboard/), export/ (EMA
  weights), evaluation/ (per-track scores), separated/{track}/, figures/, summary.json

Separate your own song:
  python -m experiments.separate --checkpoint={export_dir} --input=song.wav --output_dir=separated
Train the paper model on MUSDB18-HQ:
  python -m experiments.train --config=experiments/configs/paper.py \\
    --config.data.dir=/path/to/musdb18hq --workdir=runs/paper""", flush=True)
  return summary
