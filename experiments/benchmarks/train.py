"""Training-step benchmark: the launcher's pmapped `train_step` for the tiny, small and (mode
full) paper configs (paper: batch 1, 8-s stereo segment), steps/s, examples/s, the loss's share
of a step, and achieved GFLOP/s as a fraction of a jitted fp32 matmul measured in the same run.

The pmapped step is compiled once; a case whose program needs more than 80 % of the memory
available (XLA memory_analysis, temporaries + outputs, × devices) is not run and its row says how
much it needs. The `limit` section times the paper training step on 1 s in the default mode.

FLOPs per step: `cost_analysis` of the compiled step (XLA's count; scans count one iteration)
and the analytic forward count of `limit.model_flops` × 3 (forward + backward). A case runs in
its own precision where it names one (the default mode's `small` runs in both, which is what
`config.model.dtype="auto"` rests on); otherwise fp32 on CPU and the config's elsewhere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common, limit, scaling

# (config module, per-device batch, segment seconds, mono, repeats, precision or None) per mode.
CASES = {
    "smoke": (("tiny", 1, 0.5, True, 1, None),),
    "default": (("tiny", 4, 1.0, True, 3, None), ("small", 1, 2.0, False, 2, "float32"),
                ("small", 1, 2.0, False, 2, "bfloat16")),
    "full": (("tiny", 4, 1.0, True, 5, None), ("small", 2, 4.0, False, 5, None),
             ("paper", 1, 8.0, False, 3, None)),
}
SMOKE_OVERRIDES = dict(dim=16, depth=1, d_state=16, expand=2, headdim=16, n_fft=256,
                       hop_length=64, band_widths=(32, 32, 65))


def experiment_config(name: str, batch: int, seconds: float, mono: bool, smoke: bool,
                      precision: str | None = None):
  """The experiment config of a case; precision None: fp32 on CPU, the config's elsewhere."""
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"experiments.configs.{name}").get_config()
  config.train.per_device_batch_size = batch
  config.data.segment_seconds = seconds
  config.model.audio_channels = 1 if mono else 2
  config.data.dir = "unused"
  if precision is not None:
    config.model.dtype = precision
  elif jax.default_backend() == "cpu":
    config.model.dtype = "float32"
  if smoke:
    config.model.update(SMOKE_OVERRIDES)
  return config


def case_row(name: str, batch: int, seconds: float, mono: bool, repeats: int,
             precision: str | None, smoke: bool, reference_gflops: float) -> dict:
  from bsmamba2_jax.training import loop  # pylint: disable=g-import-not-at-top
  from data_pipeline.pipeline import segment_samples  # pylint: disable=g-import-not-at-top
  config = experiment_config(name, batch, seconds, mono, smoke, precision)
  experiment = loop.Experiment(config)
  cfg = experiment.model_config
  devices = jax.local_device_count()
  samples = segment_samples(seconds)
  rng = np.random.default_rng(0)
  shape = (devices, batch, cfg.audio_channels, samples)
  mixture = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  data = dict(mixture=mixture, vocals=(0.5 * mixture).astype(np.float32))
  state = [loop.replicate(experiment.init_state(), devices)]

  compiled = experiment.train_step.lower(state[0], data).compile()
  stats = scaling.compile_stats(compiled)  # one device's program
  label = f"train step {name}" + (f" {precision}" if precision else "")
  fields = dict(preset=name, batch=batch * devices, seconds=seconds, channels=cfg.audio_channels,
                precision=cfg.dtype, loss=config.train.loss,
                analytic_gflop=3 * limit.model_flops(cfg, batch, samples)["total"] / 1e9,
                xla_gflop=(stats["xla_flops"] or float("nan")) / 1e9,
                peak_gb=None if stats["peak_bytes"] is None else stats["peak_bytes"] / 1e9)
  skipped = scaling.over_budget(
      None if stats["peak_bytes"] is None else stats["peak_bytes"] * devices,
      common.memory_budget_gb())
  if skipped:
    return dict(name=label, median_s=None, repeats=[], skipped=skipped, **fields)

  def step():
    state[0], metrics = compiled(state[0], data)
    return metrics

  row = common.timed(label, step, repeats=repeats, warmup=1, **fields)
  row["steps_per_s"] = 1.0 / row["median_s"]
  row["examples_per_s"] = batch * devices / row["median_s"]

  loss_grad = jax.jit(jax.value_and_grad(experiment.loss_fn))
  estimate, target = jnp.asarray(mixture[0]), jnp.asarray(data["vocals"][0])
  loss_times = common.measure(lambda: loss_grad(estimate, target), repeats=repeats, warmup=1)
  row["loss_s"] = float(np.median(loss_times))
  row["loss_share"] = row["loss_s"] * devices / row["median_s"]
  row["gflops"] = row["analytic_gflop"] * devices / row["median_s"]
  row["of_matmul"] = row["gflops"] / reference_gflops
  return row


def run(mode: str = "default") -> tuple[list[dict], str]:
  reference = common.matmul_gflops()
  rows = [reference]
  for name, batch, seconds, mono, repeats, precision in CASES[mode]:
    rows.append(case_row(name, batch, seconds, mono, repeats, precision, mode == "smoke",
                         reference["gflops"]))
  text = (f"Reference: jitted fp32 {reference['n']}² matmul {reference['gflops']:.1f} GFLOP/s. "
          "gflops = analytic (3 × forward) FLOPs / median step time; of_matmul = gflops / "
          "matmul rate; loss_share = loss value+grad time / step time.\n\n" + common.format_table(
              rows[1:], ["name", "batch", "seconds", "channels", "precision", "loss",
                         "median_s", "steps_per_s", "examples_per_s", "loss_share",
                         "xla_gflop", "analytic_gflop", "gflops", "of_matmul", "peak_gb",
                         "skipped"]))
  return rows, text
