"""Exported models with random parameters, for tests that need a model folder but not a trained
model (`model.random_params`: shapes from `abstract_params`, no slow init)."""
from bsmamba2_jax.config import ModelConfig
from bsmamba2_jax.model import random_params


def tiny_export(folder: str, seed: int = 0, **fields) -> str:
  """A one-layer `tiny` model (plus `fields`) with random parameters, exported to `folder`."""
  from bsmamba2_jax.exports import save_inference  # pylint: disable=g-import-not-at-top
  config = ModelConfig.preset("tiny", depth=1, **fields)
  return save_inference(folder, config, random_params(config, seed))
