"""A seconds-per-step CPU run on the synthetic dataset (quickstart, tests): `tiny` preset, mono,
1-s segments, the fast loss, fp32."""
import ml_collections

from experiments.configs import paper


def get_config() -> ml_collections.ConfigDict:
  config = paper.get_config()
  config.model.preset = "tiny"
  config.model.remat = None  # the preset's (off): small activations
  config.model.audio_channels = 1  # mono
  config.model.dtype = "float32"
  config.data.dir = "data/synthetic"
  config.data.synthetic.generate = True
  config.data.segment_seconds = 1.0
  config.train.num_steps = 300
  config.train.per_device_batch_size = 4
  config.train.loss = "fast"
  config.optimizer.lr = 2e-3
  config.optimizer.accumulate = 1
  config.optimizer.warmup_steps = 20
  config.ema_decay = 0.99
  config.eval.segment_seconds = 1.0
  config.eval.batch_size = 4
  config.eval.max_examples = 16
  config.log_every = 10
  config.eval_every = 100
  config.ckpt_every = 100
  return config
