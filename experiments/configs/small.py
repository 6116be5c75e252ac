"""A mid-size model for one GPU or a long CPU run: `small` preset, 4-s segments, fp32 on CPU."""
import ml_collections

from experiments.configs import paper


def get_config() -> ml_collections.ConfigDict:
  config = paper.get_config()
  config.model.preset = "small"
  config.model.remat = None  # the preset's (off): small activations
  config.model.dtype = "auto"  # float32 on CPU, bfloat16 on accelerators
  config.data.segment_seconds = 4.0
  config.train.num_steps = 50_000
  config.train.per_device_batch_size = 2
  config.optimizer.accumulate = 1
  config.optimizer.warmup_steps = 500
  config.optimizer.schedule = "cosine"
  config.eval.segment_seconds = 4.0
  config.eval_every = 1_000
  config.ckpt_every = 1_000
  return config
