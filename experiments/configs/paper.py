"""The official recipe (docs/training.md §5): paper model, 8-s stereo segments, official loss.

5 segments per device; with 2 devices and `optimizer.accumulate=6` one update sees 60 segments
as in the paper. Override anything from the command line, e.g.
`--config=experiments/configs/paper.py --config.data.dir=/data/musdb18hq
--config.train.per_device_batch_size=2 --config.optimizer.accumulate=15`.
`config.model` is the model itself: a preset plus any `ModelConfig` field
(`--config.model.remat=false`, `--config.model.dim=128`); None keeps the preset's value.
"""
import ml_collections
from ml_collections import config_dict

from bsmamba2_jax.config import model_settings


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # bfloat16 matmuls (float32 residual stream, norms, STFT and scan decays), as the official
  # mixed-precision training. remat recomputes each block in the backward pass, so that the
  # recipe's 5 segments of 8 s fit one 80-GB GPU (one segment without it nearly fills one) and
  # one fits a 24-GB CPU machine (docs/performance.md). It changes no weights: a run can resume
  # with it toggled. "auto" dtype: float32 on CPU, bfloat16 elsewhere.
  config.model = model_settings("paper", dtype="bfloat16", remat=True)

  config.data = ml_collections.ConfigDict()
  config.data.dir = config_dict.placeholder(str)  # MUSDB18-HQ root; required.
  # generate=True writes (or reuses) the synthetic MUSDB18-HQ-layout dataset at data.dir.
  config.data.synthetic = ml_collections.ConfigDict(dict(
      generate=False, num_train=8, num_test=2, seconds=12.0, seed=0))
  config.data.segment_seconds = 8.0  # mono data: --config.model.audio_channels=1

  config.train = ml_collections.ConfigDict()
  # Batches (micro-steps), a multiple of optimizer.accumulate: 33,333 updates of 6. The paper
  # does not state a length.
  config.train.num_steps = 199_998
  config.train.per_device_batch_size = 5
  # Training steps per compiled call (`training.train_steps`, K batches stacked): K > 1 spreads
  # a call's fixed cost over K steps (a dispatch; on XLA:CPU the page faults on the call's fresh
  # buffers). A call never runs past a log, validation or checkpoint step.
  config.train.steps_per_execution = 1
  config.train.loss = "official"  # "official" (docs/training.md §4) or "fast" (3 magnitudes).

  config.optimizer = ml_collections.ConfigDict(dict(
      lr=5e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip=3.0, warmup_steps=0,
      schedule="constant", no_decay_mask=False, accumulate=6))
  config.ema_decay = 0.999
  # Fine-tuning: start from these weights (a registered model name, a PyTorch .ckpt or an
  # export) with a fresh optimiser state; a resumed run keeps its own.
  config.init_from = config_dict.placeholder(str)

  config.eval = ml_collections.ConfigDict(dict(
      segment_seconds=8.0, batch_size=4, max_examples=config_dict.placeholder(int)))
  config.log_every = 50
  config.eval_every = 2_000
  config.ckpt_every = 2_000
  config.keep_last = 3
  config.keep_best = 2
  config.seed = 0

  # Multi-host: every process runs the same command with its own process_id.
  config.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address=config_dict.placeholder(str),
      num_processes=config_dict.placeholder(int), process_id=config_dict.placeholder(int),
      cpu_collectives="gloo"))
  return config
