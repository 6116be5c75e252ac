"""The embedded default dataset: synthetic songs written in the MUSDB18-HQ layout.

MUSDB18-HQ cannot be downloaded here, so this module writes a stand-in with the same on-disk
layout, `<root>/{train,test}/<track>/{mixture,vocals,drums,bass,other}.wav` (44.1 kHz stereo
float WAV, mixture = sum of the four stems; the songs are `songs.synthesize_track`'s), plus
`<root>/validation_tracks.txt` (the train tracks that form the validation split, read by
`data_pipeline.musdb.MusdbDataset`) and `<root>/synthetic_manifest.json` (the parameters,
written first with "complete": false and rewritten with true after the last file, so it marks a
complete dataset). Every odd test track has sparse vocals (docs/training.md §8).

CLI: python -m data_pipeline.synthetic --output_dir=DIR --num_train=N --num_test=M --seconds=S
     --seed=K
"""
from __future__ import annotations

import json
import logging
import os
import shutil

from absl import app, flags
import numpy as np
import soundfile as sf

from bsmamba2_jax import atomic
from data_pipeline.songs import SAMPLE_RATE, SOURCES, synthesize_track

MANIFEST = "synthetic_manifest.json"
VALIDATION_LIST = "validation_tracks.txt"
# 2: reverb tails of silence are exact zeros; 3: brighter vowel formants (songs._VOWEL_DB).
FORMAT_VERSION = 3
SPARSE_VOCAL_DENSITY = 0.2  # vocal density of the sparse-vocal test songs (every odd test track)


def _track_plan(num_train: int, num_test: int, num_valid: int, vocal_density: float, seed: int):
  """[(split folder, track name, split code, index, density)] for every track to write."""
  plan = []
  rng = np.random.default_rng(np.random.SeedSequence([seed, 99]))
  for i in range(num_train):
    density = float(np.clip(vocal_density * rng.uniform(0.6, 1.4), 0.05, 1.0))
    is_valid = i >= num_train - num_valid
    name = (f"synthetic-valid-{i - (num_train - num_valid):03d}" if is_valid
            else f"synthetic-train-{i:03d}")
    plan.append(("train", name, 0, i, density))
  for i in range(num_test):
    sparse = i % 2 == 1
    name = f"synthetic-test-{i:03d}" + ("-sparse" if sparse else "")
    plan.append(("test", name, 1, i, SPARSE_VOCAL_DENSITY if sparse else vocal_density))
  return plan


def _manifest_complete(root: str, manifest: dict) -> bool:
  return manifest.get("complete", False) and all(
      os.path.isfile(os.path.join(root, folder, name, f"{stem}.wav"))
      for folder, name in manifest.get("tracks", []) for stem in ("mixture",) + SOURCES)


def generate_dataset(output_dir: str, *, num_train: int, num_test: int, seconds: float,
                     seed: int, num_valid: int | None = None, vocal_density: float = 0.6,
                     overwrite: bool = False) -> str:
  """Writes a synthetic MUSDB18-HQ-layout dataset and returns `output_dir`.

  Args:
    output_dir: destination; created if missing. A non-empty folder that is not a synthetic
      dataset is refused.
    num_train: songs under train/, validation songs included (as in MUSDB18-HQ).
    num_test: songs under test/; every odd-numbered one is a sparse-vocal song (density 0.2).
    seconds: duration of each song.
    seed: everything is a function of the seed.
    num_valid: train songs listed in validation_tracks.txt (default: round(0.14 num_train),
      at least 1 when num_train >= 2, as 14 of MUSDB's 100).
    vocal_density: fraction of bars sung (train songs vary it by ±40 %).
    overwrite: replace a synthetic dataset generated with other parameters.

  Cached: when `output_dir` already holds a complete dataset with the same parameters, returns
  at once. Raises FileExistsError when it holds anything else (and `overwrite` does not apply),
  ValueError for bad parameters.
  """
  if num_train < 0 or num_test < 0 or num_train + num_test == 0:
    raise ValueError(f"need num_train >= 0, num_test >= 0 and at least one track, got "
                     f"num_train={num_train}, num_test={num_test}")
  if not seconds >= 1.0:
    raise ValueError(f"seconds must be >= 1, got {seconds}")
  if not 0.0 < vocal_density <= 1.0:
    raise ValueError(f"vocal_density must be in (0, 1], got {vocal_density}")
  if num_valid is None:
    num_valid = min(max(1, round(0.14 * num_train)), num_train - 1) if num_train >= 2 else 0
  if not 0 <= num_valid <= num_train:
    raise ValueError(f"num_valid must be in [0, num_train={num_train}], got {num_valid}")
  params = dict(format_version=FORMAT_VERSION, num_train=int(num_train), num_test=int(num_test),
                num_valid=int(num_valid), seconds=float(seconds), seed=int(seed),
                vocal_density=float(vocal_density))

  manifest_path = os.path.join(output_dir, MANIFEST)
  if os.path.isfile(manifest_path):
    with open(manifest_path) as f:
      manifest = json.load(f)
    if manifest.get("params") == params and _manifest_complete(output_dir, manifest):
      return output_dir
    older = dict(manifest.get("params", {}), format_version=FORMAT_VERSION) == params
    if older:  # same parameters, an older generator: generated data, safe to replace
      logging.info("%s: regenerating a synthetic dataset of format version %s", output_dir,
                   manifest["params"].get("format_version"))
    if manifest.get("params") != params and not (overwrite or older):
      raise FileExistsError(
          f"{output_dir} holds a synthetic dataset generated with other parameters "
          f"{manifest.get('params')}; pass overwrite=True (--overwrite) or another directory")
    for folder, name in manifest.get("tracks", []):
      shutil.rmtree(os.path.join(output_dir, folder, name), ignore_errors=True)
  elif os.path.isdir(output_dir) and os.listdir(output_dir):
    raise FileExistsError(f"{output_dir} is not empty and holds no {MANIFEST}: refusing to "
                          f"write a synthetic dataset into a foreign directory")

  plan = _track_plan(num_train, num_test, num_valid, vocal_density, seed)
  os.makedirs(output_dir, exist_ok=True)
  manifest = dict(params=params, complete=False,
                  tracks=[[folder, name] for folder, name, *_ in plan])
  atomic.write_json(manifest_path, manifest)
  for folder, name, split_code, index, density in plan:
    track_dir = os.path.join(output_dir, folder, name)
    os.makedirs(track_dir, exist_ok=True)
    audio = synthesize_track(seed, split_code, index, seconds, density)
    for stem, data in audio.items():
      sf.write(os.path.join(track_dir, f"{stem}.wav"), data.T, SAMPLE_RATE, subtype="FLOAT")
  with open(os.path.join(output_dir, VALIDATION_LIST), "w") as f:
    f.writelines(f"{name}\n" for _, name, *_ in plan if name.startswith("synthetic-valid-"))
  manifest["complete"] = True
  atomic.write_json(manifest_path, manifest)
  return output_dir


def main(argv):
  del argv
  values = flags.FLAGS
  try:
    path = generate_dataset(values.output_dir, num_train=values.num_train,
                            num_test=values.num_test, seconds=values.seconds, seed=values.seed,
                            num_valid=values.num_valid, vocal_density=values.vocal_density,
                            overwrite=values.overwrite)
  except (OSError, ValueError) as e:  # a folder in the way, no permission, bad sizes: one line
    raise SystemExit(f"data_pipeline.synthetic: {e}") from None
  print(f"synthetic MUSDB18-HQ layout in {path}")


if __name__ == "__main__":  # flags only for the CLI: importers keep their own flag names
  flags.DEFINE_string("output_dir", None, "Destination folder.", required=True)
  flags.DEFINE_integer("num_train", 20, "Songs under train/ (validation songs included).")
  flags.DEFINE_integer("num_test", 10, "Songs under test/ (odd ones have sparse vocals).")
  flags.DEFINE_float("seconds", 30.0, "Duration of each song.")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.DEFINE_integer("num_valid", None, "Train songs used for validation (default 14 %).")
  flags.DEFINE_float("vocal_density", 0.6, "Fraction of bars with singing.")
  flags.DEFINE_boolean("overwrite", False, "Replace a synthetic dataset with other parameters.")
  app.run(main)
