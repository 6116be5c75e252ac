"""The quickstart run (`python -m experiments.quickstart`): the `tiny` preset on the synthetic
dataset, set for a 15-minute wall-clock budget on 2 CPU cores (mono, 1-s segments, the official
loss).

The run stops on the wall clock (`--minutes`), so `train.num_steps` is only an upper bound and
the learning rate is constant after warm-up. With a few hundred steps, the EMA decay is short
(0.95: the initial weights keep < 1e-2 of the average after 100 steps). The official loss (time
L1 + complex STFT L1) rather than tiny's magnitude-only one: uSDR scores the waveform, phase
included, and the official loss reached a higher uSDR in the same budget (docs/performance.md).
`data.dir` is set by the quickstart to `<workdir>/data`.
"""
import ml_collections

from experiments.configs import tiny


def get_config() -> ml_collections.ConfigDict:
  config = tiny.get_config()
  config.data.synthetic.num_train = 12
  config.data.synthetic.num_test = 6  # 3 of them sparse-vocal (every odd one).
  config.data.synthetic.seconds = 15.0
  config.train.num_steps = 100_000
  config.train.loss = "official"
  config.optimizer.lr = 3e-3
  config.optimizer.warmup_steps = 10
  config.ema_decay = 0.95
  config.eval.max_examples = 8
  config.log_every = 5
  config.eval_every = 40
  config.ckpt_every = 40
  config.keep_best = 1
  # Separation of the test tracks: chunk length (s), crossfade overlap (fraction), batch.
  config.separate = ml_collections.ConfigDict(dict(segment=1.0, overlap=0.25, batch_size=4))
  return config
