"""Benchmark section `recipe`: the paper recipe's training step as the launcher runs it.

The section of `python -m experiments.benchmark --mode=gpu` (with `separate` and `precision`).
Rows, in order, each printed as soon as it is measured (`common.progress`):

1. `env`: devices, Python / jax / jaxlib / flax / optax versions, XLA_FLAGS and
   JAX_DEFAULT_MATMUL_PRECISION, and where `nvidia-smi` exists the card's name, memory, driver and
   SM clocks (current and max).
2. Jitted n×n matmuls in fp32 (JAX's default precision: TF32 on NVIDIA GPUs) and bf16, median of
   20: n = 8192 on an accelerator, 2048 on CPU (128 in mode "smoke").
3. The `paper` experiment config's pmapped `train_step` (`training.loop.Experiment`: official
   loss, clip + AdamW, EMA; bf16 on accelerators, fp32 on CPU) on 8-s stereo, per device: batch 5
   with remat (the recipe) and batch 1 without. Per case: lowering and compile seconds, median of
   5 steps after one warm-up step, examples/s, analytic TFLOP/s (3 × `limit.model_flops`), peak
   GB (XLA memory analysis, temp + output of one device's program), and the loss and gradient
   norm after the 6 steps. A case whose program needs more than 90 % of the free device memory is
   compiled but not run; a case that fails is recorded with its error and the next one runs.

Mode "smoke" runs the same two cases on a microscopic model (`train.SMOKE_OVERRIDES`, 0.25 s of
audio, 2 timed steps, no gradient accumulation): 30-40 s on a 2-core CPU, nearly all of it
compiling. Every other mode measures the paper sizes above. On one H100 each paper case compiles
for about 100 s (60-70 s on an H200) and its steps take about 1 s (batch 5) and 0.2 s (batch 1),
so the section takes 4-5 minutes there; the whole `--mode=gpu` run (`separate` about 1
minute, `precision`'s scan check under 1) takes about 7-8, inside 10 with JAX's start-up.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np

from experiments.benchmarks import common, limit, scaling, train

MODES = ("smoke", "default", "full", "gpu")
# (per-device batch, remat) of the training-step cases, the recipe first.
CASES = ((5, True), (1, False))
# Per mode: segment seconds, timed steps, matmul size (None: common.matmul_gflops's default).
SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": dict(seconds=0.25, repeats=2, matmul_n=128),
    "paper": dict(seconds=8.0, repeats=5, matmul_n=None),
}
MEMORY_FRACTION = 0.9
SMI_FIELDS = ("name", "memory.total", "driver_version", "clocks.sm", "clocks.max.sm")


def nvidia_smi() -> dict[str, str]:
  """`SMI_FIELDS` of the first GPU from nvidia-smi as {field: value}; {} where it is missing."""
  try:
    result = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=30, check=False)
  except (OSError, subprocess.SubprocessError):
    return {}
  lines = result.stdout.strip().splitlines()
  if result.returncode or not lines:
    return {}
  values = [v.strip() for v in lines[0].split(",")]
  return dict(zip((f"gpu_{f.replace('.', '_')}" for f in SMI_FIELDS), values))


def env_row() -> dict:
  """The machine and software the section ran on (no times)."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top

  def version(package: str) -> str | None:
    try:
      return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      return None

  devices = jax.devices()
  row = dict(devices=[str(d) for d in devices], device_kind=devices[0].device_kind,
             device_count=len(devices), backend=jax.default_backend(),
             python=platform.python_version(), jax=jax.__version__, jaxlib=version("jaxlib"),
             flax=version("flax"), optax=version("optax"),
             xla_flags=os.environ.get("XLA_FLAGS", ""),
             matmul_precision=os.environ.get("JAX_DEFAULT_MATMUL_PRECISION", ""), **nvidia_smi())
  summary = ", ".join(filter(None, [f"{len(devices)} × {row['device_kind']}",
                                    row.get("gpu_memory_total"), f"jax {row['jax']}"]))
  return common.progress(dict(name=f"env: {summary}", **row))


def matmul_row(dtype: str, n: int | None) -> dict:
  row = common.matmul_gflops(n, dtype=dtype)
  row["tflops"] = row["gflops"] / 1e3
  return row


def case_row(batch: int, remat: bool, settings: dict, smoke: bool,
             matmul_tflops: dict[str, float]) -> dict:
  """One training-step case of the `paper` config (see the module docstring)."""
  from bsmamba2_jax.training import loop  # pylint: disable=g-import-not-at-top
  from data_pipeline.pipeline import segment_samples  # pylint: disable=g-import-not-at-top

  seconds = settings["seconds"]
  config = train.experiment_config("paper", batch, seconds, False, smoke)
  config.model.remat = remat
  if smoke:  # optax.MultiSteps doubles XLA:CPU's compile time of the microscopic step
    config.optimizer.accumulate = 1
  name = f"paper step batch {batch}{' remat' if remat else ''}"
  experiment = loop.Experiment(config)
  cfg = experiment.model_config
  devices = jax.local_device_count()
  samples = segment_samples(seconds)
  mixture = (0.1 * np.random.default_rng(0).standard_normal(
      (devices, batch, cfg.audio_channels, samples))).astype(np.float32)
  data = dict(mixture=mixture, vocals=(0.5 * mixture).astype(np.float32))
  state = [loop.replicate(experiment.init_state(), devices)]
  fields = dict(preset="paper", smoke=smoke, batch=batch * devices, per_device_batch=batch,
                seconds=seconds, channels=cfg.audio_channels, remat=remat, precision=cfg.dtype,
                analytic_gflop=3 * limit.model_flops(cfg, batch, samples)["total"] / 1e9)

  start = time.perf_counter()
  lowered = experiment.train_step.lower(state[0], data)
  fields["lower_s"] = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  fields["compile_s"] = time.perf_counter() - start
  stats = scaling.compile_stats(compiled)  # one device's program
  fields["peak_gb"] = None if stats["peak_bytes"] is None else stats["peak_bytes"] / 1e9
  fields["xla_gflop"] = None if stats["xla_flops"] is None else stats["xla_flops"] / 1e9
  budget_gb = common.memory_budget_gb(MEMORY_FRACTION)
  skipped = scaling.over_budget(stats["peak_bytes"], budget_gb)
  if skipped:
    return common.progress(dict(name=name, median_s=None, repeats=[], skipped=skipped, **fields))

  last = {}

  def step():
    state[0], last["metrics"] = compiled(state[0], data)
    return last["metrics"]

  row = common.timed(name, step, repeats=settings["repeats"], warmup=1, **fields)
  metrics = {k: np.asarray(jax.device_get(v)).ravel()[0] for k, v in last["metrics"].items()}
  row.update(steps_run=settings["repeats"] + 1, loss_after=float(metrics["loss"]),
             grad_norm_after=float(metrics["grad_norm"]),
             finite_after=bool(metrics.get("finite", True)))
  row["steps_per_s"] = 1.0 / row["median_s"]
  row["examples_per_s"] = row["batch"] / row["median_s"]
  row["tflops"] = row["analytic_gflop"] * devices / row["median_s"] / 1e3
  reference = matmul_tflops.get(cfg.dtype)
  row["of_matmul"] = row["tflops"] / reference if reference else None
  return row


def run(mode: str = "gpu") -> tuple[list[dict], str]:
  if mode not in MODES:
    raise ValueError(f"recipe: unknown mode {mode!r}; choose from {MODES}")
  smoke = mode == "smoke"
  settings = SETTINGS["smoke" if smoke else "paper"]
  rows = [env_row()]
  matmuls = [matmul_row(dtype, settings["matmul_n"]) for dtype in ("float32", "bfloat16")]
  rows += matmuls
  for row in matmuls:
    row["precision"] = row["dtype"]
  rates = {r["dtype"]: r["tflops"] for r in matmuls}
  for batch, remat in CASES:
    try:
      rows.append(case_row(batch, remat, settings, smoke, rates))
    except Exception as e:  # pylint: disable=broad-except  (an OOM must not lose the other case)
      print(f"  paper step batch {batch}: failed: {type(e).__name__}: {e}", file=sys.stderr,
            flush=True)
      rows.append(dict(name=f"paper step batch {batch}{' remat' if remat else ''}",
                       median_s=None, repeats=[], batch=batch * jax.local_device_count(),
                       per_device_batch=batch, remat=remat,
                       error=f"{type(e).__name__}: {str(e)[:300]}"))
  env = rows[0]
  card = env.get("gpu_name") or env["device_kind"]
  if "gpu_name" in env:
    card += (f" ({env['gpu_memory_total']}, driver {env['gpu_driver_version']}, SM clock "
             f"{env['gpu_clocks_sm']} of {env['gpu_clocks_max_sm']})")
  text = (
      common.format_table(rows[1:], [
          "name", "precision", "batch", "lower_s", "compile_s", "median_s", "min_s", "max_s",
          "examples_per_s", "tflops", "of_matmul", "peak_gb", "loss_after", "grad_norm_after",
          "skipped", "error"])
      + f"\n\n{env['device_count']} × {card}; jax {env['jax']}, flax {env['flax']}, optax "
      f"{env['optax']}; XLA_FLAGS `{env['xla_flags'] or '(none)'}`. Matmuls: jitted n×n at "
      "JAX's default precision (fp32 is TF32 on NVIDIA GPUs). Steps: the `paper` config's "
      "pmapped `train_step` as the launcher builds it (official loss, clip + AdamW, EMA) on "
      f"{settings['seconds']:g}-s stereo noise" + (", microscopic model" if smoke else "")
      + f"; batch = examples per step, all {jax.local_device_count()} device(s); median of "
      f"{settings['repeats']} steps after one warm-up; examples_per_s = batch / median; tflops = "
      "analytic model FLOPs (3 × forward) / median; of_matmul = tflops / the matmul rate in the "
      "step's precision; peak_gb = XLA memory analysis of one device's program; loss and "
      f"gradient norm after the {settings['repeats'] + 1} steps.")
  return rows, text
