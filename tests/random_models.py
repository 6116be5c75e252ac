"""Models with random parameters for tests that need a model but not a trained one: shapes from
`abstract_params` (no slow init), N(0, scale²) values."""
import jax
import numpy as np

from bsmamba2_jax.config import ModelConfig
from bsmamba2_jax.model import abstract_params


def random_params(config: ModelConfig, seed: int = 0, scale: float = 0.1) -> dict:
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32),
      abstract_params(config))


def tiny_export(folder: str, seed: int = 0, **fields) -> str:
  """A one-layer `tiny` model (plus `fields`) with random parameters, exported to `folder`."""
  from bsmamba2_jax.exports import save_inference  # pylint: disable=g-import-not-at-top
  config = ModelConfig.preset("tiny", depth=1, **fields)
  return save_inference(folder, config, random_params(config, seed))
