"""The quickstart: `python -m experiments.quickstart [--workdir=W] [--minutes=15]`.

On a fresh machine, in one command and a bounded time: generates the synthetic MUSDB18-HQ-layout
dataset, trains the `tiny` model with the real training loop, evaluates it on the held-out test
tracks against the do-nothing baseline (the mixture as the estimate), exports the EMA weights,
separates one test track, draws figures and writes `summary.json`. Every step is a library call
and is cached in the workdir:

  W/data/             synthetic dataset (reused when complete)
  W/train/            training run: config.json, checkpoints/, metrics.csv, tensorboard/;
                      re-running resumes it until `--minutes` of training are spent
  W/export/           Orbax inference export of the EMA weights (rewritten when training moved on)
  W/evaluation/       per-track CSV, results.json/.md, per-track figure
  W/separated/<track>/{vocals,accompaniment}.wav
  W/figures/          training_curves.png, spectrograms.png
  W/summary.json      vocals cSDR/uSDR of mixture and model on the test tracks, improvement

Override the experiment config like any launcher, e.g. `--config.model.overrides.dim=64`.
"""
from __future__ import annotations

import csv
import json
import os
import time
from typing import Any

from absl import app, flags, logging
import ml_collections
import numpy as np
from ml_collections import config_flags

from bsmamba2_jax.checkpoints import write_json_atomically
from experiments import DEFINE_path, parse_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "quickstart.py"),
    "Experiment config file.", lock_config=False)
_WORKDIR = DEFINE_path("workdir", "quickstart_workdir", "Folder for everything made.")
_MINUTES = flags.DEFINE_float(
    "minutes", 15.0, "Training budget (wall clock, all runs together, compilation included): "
    "training stops at the first step past it, then validates once; evaluation, export and "
    "separation come on top.")
_SEED = flags.DEFINE_integer("seed", None, "Random seed of data and training (default: config's).")

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
  from data_pipeline import synthetic  # pylint: disable=g-import-not-at-top
  s = config.data.synthetic
  return synthetic.generate_dataset(config.data.dir, num_train=s.num_train, num_test=s.num_test,
                                    seconds=s.seconds, seed=s.seed)


def train(config: ml_collections.ConfigDict, train_dir: str, minutes: float, *,
          progress: bool = True) -> dict:
  """Step 2: trains until `minutes` of wall clock are spent over all runs in `train_dir`.

  Returns {"step", "minutes_spent", "stop_reason"}; trains nothing when the budget is spent or
  the run reached `config.train.num_steps`.
  """
  from experiments import train as train_lib  # pylint: disable=g-import-not-at-top
  budget_path = os.path.join(train_dir, BUDGET_FILE)
  spent = _read_json(budget_path) or dict(minutes_spent=0.0, step=0, stop_reason=None)
  left = minutes - spent["minutes_spent"]
  if spent["stop_reason"] == "done" or left <= 0.05:
    logging.info("training: budget spent (%.1f of %.1f min, step %d); reusing it",
                 spent["minutes_spent"], minutes, spent["step"])
    return spent
  logging.info("training: %.1f of %.1f min left", left, minutes)
  start = time.time()
  result = train_lib.train_and_evaluate(config, train_dir, max_minutes=left, progress=progress)
  spent = dict(minutes_spent=spent["minutes_spent"] + (time.time() - start) / 60,
               step=int(result["step"]), stop_reason=result["stop_reason"])
  if result["stop_reason"] != "signal":
    write_json_atomically(budget_path, spent)
  return spent


def export(train_dir: str, export_dir: str) -> tuple[str, int]:
  """Step 4a: the EMA weights of the latest checkpoint as an Orbax export (reused when current).

  Returns (export path, its training step).
  """
  from bsmamba2_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from experiments import export as export_lib  # pylint: disable=g-import-not-at-top
  manager = checkpoints.TrainingCheckpoints(os.path.join(train_dir, "checkpoints"))
  latest = manager.latest_step()
  manager.close()
  if latest is None:
    raise FileNotFoundError(f"{train_dir}: training left no checkpoint")
  previous = _read_json(os.path.join(export_dir, checkpoints.CONFIG_FILE))
  if previous is not None and previous.get("metadata", {}).get("step") == latest:
    return export_dir, latest
  path = export_lib.export(train_dir, export_dir, use_ema=True, overwrite=previous is not None)
  return path, latest


def evaluate(get_separator, data_dir: str, output_dir: str, step: int) -> dict:
  """Step 3: per-track scores of model and mixture on the test split (reused for `step`);
  `get_separator()` gives the separator (built only when needed)."""
  from bsmamba2_jax import evaluation  # pylint: disable=g-import-not-at-top
  results_path = os.path.join(output_dir, "results.json")
  previous = _read_json(results_path)
  if previous is not None and previous.get("step") == step:
    return previous
  results = evaluation.evaluate(get_separator(), data_dir, "test")
  evaluation.write_results(output_dir, results, overwrite=previous is not None)
  results["step"] = step
  write_json_atomically(results_path, dict(results, segment_study=[]))
  return results


def separate_track(separator, track_dir: str, output_dir: str) -> dict[str, str]:
  """Step 4b: `track_dir/mixture.wav` -> `output_dir/{vocals,accompaniment}.wav`."""
  from bsmamba2_jax import separation  # pylint: disable=g-import-not-at-top
  (result,) = separation.separate_files(
      [os.path.join(track_dir, "mixture.wav")], separator=separator, output_dir=output_dir,
      template="{stem}.{ext}", bit_depth="32f", overwrite=True, progress=False)
  if result.error:
    raise RuntimeError(result.error)
  return result.outputs


def plot_curves(metrics_csv: str, path: str) -> None:
  """Step 5a: training loss and validation uSDR (model, mixture) against the step."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  with open(metrics_csv, newline="") as f:
    rows = list(csv.DictReader(f))
  series = lambda key: np.array([(float(r["step"]), float(r[key])) for r in rows if r.get(key)]
                                ).reshape(-1, 2).T
  fig, (ax_loss, ax_sdr) = plt.subplots(1, 2, figsize=(10, 3.6))
  step, loss = series("loss")
  ax_loss.plot(step, loss, lw=0.8)
  ax_loss.set(xlabel="step", ylabel="training loss", yscale="log", title="Training loss")
  step, usdr = series("valid_usdr")
  ax_sdr.plot(step, usdr, "o-", label="model (EMA weights)")
  step, base = series("valid_input_usdr")
  ax_sdr.plot(step, base, "--", color="gray", label="mixture (do nothing)")
  ax_sdr.set(xlabel="step", ylabel="vocals uSDR (dB)", title="Validation")
  ax_sdr.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_spectrograms(track_dir: str, estimate_path: str, path: str, *, n_fft: int = 2048,
                      hop: int = 441) -> None:
  """Step 5b: log-magnitude spectrograms of mixture, true vocals and estimated vocals."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import soundfile as sf  # pylint: disable=g-import-not-at-top
  from bsmamba2_jax import audio  # pylint: disable=g-import-not-at-top

  panels = [("mixture", os.path.join(track_dir, "mixture.wav")),
            ("true vocals", os.path.join(track_dir, "vocals.wav")),
            ("estimated vocals", estimate_path)]
  fig, axes = plt.subplots(len(panels), 1, figsize=(10, 8), sharex=True)
  for ax, (title, wav) in zip(axes, panels):
    data, rate = sf.read(wav, dtype="float32", always_2d=True)
    mono = data.mean(axis=1)[None, None]
    spec = np.abs(np.asarray(audio.stft(mono, n_fft, hop)))[0, 0]
    db = 20 * np.log10(spec + 1e-5)
    extent = (0, len(mono[0, 0]) / rate, 0, rate / 2000)
    ax.imshow(db, origin="lower", aspect="auto", extent=extent, vmin=db.max() - 80,
              vmax=db.max(), cmap="magma")
    ax.set(ylabel="kHz", ylim=(0, 8), title=title)
  axes[-1].set_xlabel("time (s)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


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
  from bsmamba2_jax.separation import Separator  # pylint: disable=g-import-not-at-top
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
  plot_curves(os.path.join(train_dir, "metrics.csv"), curves)
  plot_spectrograms(track_dir, outputs["vocals"], spectrograms, n_fft=2048, hop=441)

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
  write_json_atomically(os.path.join(workdir, SUMMARY_FILE), summary)
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO; show progress only.
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if _SEED.value is not None:
    config.seed = config.data.synthetic.seed = _SEED.value
  try:
    run(config, _WORKDIR.value, minutes=_MINUTES.value)
  except OSError as e:  # a workdir that cannot be written: one line naming it
    raise SystemExit(f"quickstart: {e}") from None


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
