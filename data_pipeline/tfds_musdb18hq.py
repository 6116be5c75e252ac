"""`tfds` builder `musdb18hq`: full MUSDB18-HQ tracks with all stems (manual download).

    import data_pipeline.tfds_musdb18hq  # registers the builder
    ds = tfds.load("musdb18hq", split="test", data_dir=DATA_DIR,
                   download_and_prepare_kwargs=dict(download_config=tfds.download.DownloadConfig(
                       manual_dir="/path/to/musdb18hq")))

Splits: "train" (without the validation tracks), "validation", "test", as
`data_pipeline.musdb.MusdbDataset` defines them (splits without tracks are left out). Examples:
{"name": str, "mixture"|"vocals"|"drums"|"bass"|"other": float32 (samples, 2)}. Works offline on
any folder in the layout, the synthetic dataset included.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipeline import musdb

try:
  tf.config.set_visible_devices([], "GPU")  # keep accelerators for JAX
except RuntimeError:  # TF already initialised its devices
  pass

_SPLITS = {"train": "train", "validation": "valid", "test": "test"}


class Musdb18hq(tfds.core.GeneratorBasedBuilder):
  """MUSDB18-HQ: 150 songs as 44.1 kHz stereo stems (mixture, vocals, drums, bass, other)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Full tracks, float32 stems, musdb validation split."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download MUSDB18-HQ (https://zenodo.org/record/3338373), extract it, and pass the folder that
  holds train/ and test/ as `manual_dir` (tfds.download.DownloadConfig(manual_dir=...)).
  A synthetic stand-in: python -m data_pipeline.synthetic --output_dir=DIR.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    audio = {stem: tfds.features.Audio(shape=(None, 2), dtype=np.float32,
                                       sample_rate=musdb.SAMPLE_RATE) for stem in musdb.STEMS}
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"name": tfds.features.Text(), **audio}),
        supervised_keys=("mixture", "vocals"),
        homepage="https://sigsep.github.io/datasets/musdb.html")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    dataset = musdb.MusdbDataset(dl_manager.manual_dir)
    splits = {}
    for tfds_split, split in _SPLITS.items():
      folder = os.path.join(dataset.root, "test" if split == "test" else "train")
      if os.path.isdir(folder) and dataset.tracks(split):
        splits[tfds_split] = self._generate_examples(dataset, split)
    return splits

  def _generate_examples(self, dataset: musdb.MusdbDataset, split: str):
    for track in dataset.tracks(split):
      if track.num_channels != 2:
        raise musdb.MusdbError(f"{track.path}: {track.num_channels} channel(s), the musdb18hq "
                               f"builder expects stereo")
      example = {"name": track.name}
      example.update({stem: track.read_all(stem).T for stem in musdb.STEMS})
      yield track.name, example
