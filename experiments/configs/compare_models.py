"""The paper's comparison in miniature (`python -m experiments.compare_models`): the quickstart's
`tiny` recipe for both BSMamba2 and BS-RoFormer (`bsmamba2_jax.comparison.ARMS`), stopped on a
step count rather than the clock so that both get the same budget, on test tracks of 20 s so
that the input-length study reaches 16-s chunks."""
import ml_collections

from experiments.configs import quickstart


def get_config() -> ml_collections.ConfigDict:
  config = quickstart.get_config()
  config.data.synthetic.seconds = 20.0
  config.train.num_steps = 500
  config.eval_every = 100
  config.ckpt_every = 100
  return config
