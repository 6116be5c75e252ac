"""The `musdb18hq` tfds builder loads a generated dataset offline with `tfds.load`."""
import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import musdb, synthetic
import data_pipeline.tfds_musdb18hq  # registers "musdb18hq"  # pylint: disable=unused-import


def test_tfds_load_generated_dataset(tmp_path):
  root = synthetic.generate_dataset(str(tmp_path / "musdb"), num_train=1, num_test=1, seconds=1,
                                    seed=0)
  config = tfds.download.DownloadConfig(manual_dir=root)
  ds, info = tfds.load("musdb18hq", split="test", data_dir=str(tmp_path / "tfds"),
                       download_and_prepare_kwargs=dict(download_config=config), with_info=True)
  assert set(info.splits.keys()) == {"train", "test"}  # no validation track with 1 train song
  examples = list(tfds.as_numpy(ds))
  assert len(examples) == 1
  track = musdb.MusdbDataset(root).tracks("test")[0]
  assert examples[0]["name"].decode() == track.name
  for stem in musdb.STEMS:
    assert examples[0][stem].dtype == np.float32 and examples[0][stem].shape == (44100, 2)
    np.testing.assert_array_equal(examples[0][stem], track.read_all(stem).T)
  supervised = next(iter(tfds.as_numpy(tfds.load(
      "musdb18hq", split="train", data_dir=str(tmp_path / "tfds"), as_supervised=True))))
  train = musdb.MusdbDataset(root).tracks("train")[0]
  np.testing.assert_array_equal(supervised[1], train.read_all("vocals").T)
