"""Benchmark section `scaling`: time and peak memory of `ssd_scan` vs audio length, per method.

The time-path shape of the paper model: sequences = 62 bands × batch 1, seqlen = frames =
1 + seconds·44100/441, 16 heads of headdim 64, one group, d_state 128; forward and
forward+backward (gradient of Σ y·w for a fixed random w, w.r.t. every input) for 1, 2, 4, 8,
16 s; then the chunk-size sweep (16…256) of "chunked" at 8 s.

Sequences are independent, so cost is linear in their number. To fit the shared CPU, a mode
measures `sequences` of the 62 and scales time and memory by 62 / sequences (columns `*_62`;
`sequences` says how many ran; mode "full" runs all 62). Peak memory is XLA's compiled
`memory_analysis()`: temp + output bytes of the measured program (argument bytes excluded), known
before running it; a program over `memory_budget_gb` is compiled but not run (row `skipped`).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bsmamba2_jax.ssd import ssd_scan
from experiments.benchmarks import common

SAMPLE_RATE, HOP, BANDS = 44100, 441, 62

# Mode -> settings. `time_budget_s` caps the timed repeats of one row (after its warm-up call).
SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": dict(heads=2, headdim=8, d_state=16, sequences=2, seconds=(0.1, 0.2),
                  methods=dict(chunked=(0.1, 0.2), associative=(0.1,), sequential=(0.1, 0.2)),
                  sweep_seconds=0.2, chunk_sizes=(8, 16), repeats=2, time_budget_s=1.0,
                  memory_budget_gb=1.0),
    "default": dict(heads=16, headdim=64, d_state=128, sequences=1, seconds=(1, 2, 4, 8, 16),
                    methods=dict(chunked=(1, 2, 4, 8, 16), associative=(1, 2, 4),
                                 sequential=(1, 2, 4, 8, 16)),
                    sweep_seconds=8, chunk_sizes=(16, 32, 64, 128, 256), repeats=5,
                    time_budget_s=3.0, memory_budget_gb=2.5),
    "full": dict(heads=16, headdim=64, d_state=128, sequences=BANDS, seconds=(1, 2, 4, 8, 16),
                 methods=dict(chunked=(1, 2, 4, 8, 16), associative=(1, 2, 4, 8, 16),
                              sequential=(1, 2, 4, 8, 16)),
                 sweep_seconds=8, chunk_sizes=(16, 32, 64, 128, 256), repeats=5,
                 time_budget_s=30.0, memory_budget_gb=48.0),
}


def frames(seconds: float) -> int:
  """STFT frames of `seconds` of 44.1-kHz audio (center=True, hop 441)."""
  return 1 + int(round(seconds * SAMPLE_RATE)) // HOP


def scan_inputs(sequences: int, seqlen: int, heads: int, headdim: int, d_state: int,
                seed: int = 0, *, weights: bool = True) -> tuple[np.ndarray, ...]:
  """(x, dt, A, B, C, D, w) float32 NumPy arrays shaped as `ssd_scan` takes them, w like y
  (the objective's weights; left out with weights=False).

  dt follows the Mamba2 init range exp(U(ln 1e-3, ln 0.1)) and A = -U(1, 16) (docs/model.md §4).
  """
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), (sequences, seqlen, heads)))
  A = -rng.uniform(1.0, 16.0, heads)
  arrays = (normal(sequences, seqlen, heads, headdim), dt.astype(np.float32), A.astype(np.float32),
            normal(sequences, seqlen, 1, d_state), normal(sequences, seqlen, 1, d_state),
            np.ones(heads, np.float32))
  return arrays + (normal(sequences, seqlen, heads, headdim),) if weights else arrays


def scan_functions(method: str, chunk_size: int = 64) -> dict[str, Callable]:
  """{"fwd": f(x, dt, A, B, C, D, w) -> y, "fwd+bwd": f(...) -> grads of Σ y·w (all inputs)}."""
  def forward(x, dt, A, B, C, D, w):
    del w
    return ssd_scan(x, dt, A, B, C, D, method=method, chunk_size=chunk_size)

  def objective(x, dt, A, B, C, D, w):
    return jnp.sum(forward(x, dt, A, B, C, D, w) * w)

  return {"fwd": forward, "fwd+bwd": jax.grad(objective, argnums=(0, 1, 2, 3, 4, 5))}


def compile_stats(compiled) -> dict:
  """Peak bytes (temp + output, XLA memory_analysis) and XLA flops of a compiled program."""
  stats = dict(peak_bytes=None, xla_flops=None)
  memory = compiled.memory_analysis()
  if memory is not None:
    stats["peak_bytes"] = int(memory.temp_size_in_bytes + memory.output_size_in_bytes)
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  if cost and "flops" in cost:
    stats["xla_flops"] = float(cost["flops"])
  return stats


def over_budget(peak_bytes: float | None, memory_budget_gb: float) -> str | None:
  """Why a compiled program needing `peak_bytes` must not run, or None if it fits."""
  if peak_bytes is not None and peak_bytes > memory_budget_gb * 1e9:
    return f"needs {peak_bytes / 1e9:.1f} GB > budget {memory_budget_gb:.1f} GB"
  return None


def timed_compiled(name: str, fn: Callable, args: tuple, *, repeats: int, time_budget_s: float,
                   memory_budget_gb: float, **fields: Any) -> dict:
  """Compiles `fn(*args)`, then times it unless its peak memory exceeds the budget.

  One untimed warm-up call, then min(repeats, time_budget_s / warm-up time) timed calls (at
  least one). The row carries compile seconds, peak bytes and XLA flops either way.
  """
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  stats = dict(compile_s=time.perf_counter() - start, **compile_stats(compiled))
  skipped = over_budget(stats["peak_bytes"], memory_budget_gb)
  if skipped:
    return dict(name=name, skipped=skipped, median_s=None, repeats=[], **stats, **fields)
  start = time.perf_counter()
  common.block(compiled(*args))
  warmup_s = time.perf_counter() - start
  count = int(max(1, min(repeats, time_budget_s // max(warmup_s, 1e-9))))
  row = common.timed(name, lambda: compiled(*args), repeats=count, warmup=0, **fields)
  row.update(warmup_s=warmup_s, **stats)
  return row


def scan_row(method: str, direction: str, seconds: float, settings: dict, *,
             chunk_size: int = 64, sweep: bool = False) -> dict:
  """One timed `ssd_scan` row at the time-path shape of `seconds` of audio."""
  seqlen, sequences = frames(seconds), settings["sequences"]
  shape = (settings["heads"], settings["headdim"], settings["d_state"])
  args = tuple(jnp.asarray(a) for a in scan_inputs(sequences, seqlen, *shape))
  label = f"{method}{f' Q={chunk_size}' if method == 'chunked' else ''}"
  row = timed_compiled(
      f"ssd {label} {direction} {seconds:g} s", scan_functions(method, chunk_size)[direction],
      args, repeats=settings["repeats"], time_budget_s=settings["time_budget_s"],
      memory_budget_gb=settings["memory_budget_gb"], method=method, direction=direction,
      audio_s=seconds, seqlen=seqlen, chunk_size=chunk_size if method == "chunked" else None,
      sequences=sequences, sweep=sweep)
  scale = BANDS / sequences
  row["median_s_62"] = None if row["median_s"] is None else row["median_s"] * scale
  row["peak_bytes_62"] = None if row["peak_bytes"] is None else row["peak_bytes"] * scale
  row["peak_gb_62"] = None if row["peak_bytes"] is None else row["peak_bytes_62"] / 1e9
  return row


def run(mode: str = "default") -> tuple[list[dict], str]:
  settings = SETTINGS[mode]
  rows = []
  for method, seconds_list in settings["methods"].items():
    for seconds in seconds_list:
      for direction in ("fwd", "fwd+bwd"):
        rows.append(scan_row(method, direction, seconds, settings))
  for chunk_size in settings["chunk_sizes"]:
    for direction in ("fwd", "fwd+bwd"):
      rows.append(scan_row("chunked", direction, settings["sweep_seconds"], settings,
                           chunk_size=chunk_size, sweep=True))
  columns = ["name", "seqlen", "sequences", "median_s", "min_s", "max_s", "median_s_62",
             "peak_gb_62", "compile_s", "skipped"]
  text = (common.format_table([r for r in rows if not r["sweep"]], columns)
          + f"\n\nChunk-size sweep of \"chunked\" at {settings['sweep_seconds']:g} s (Q = the "
          "longest chunk; `ssd_scan` balances chunk lengths):\n\n"
          + common.format_table([r for r in rows if r["sweep"]], columns)
          + f"\n\nShape: seqlen = 1 + seconds·100 frames, {settings['heads']} heads × headdim "
          f"{settings['headdim']}, d_state {settings['d_state']}; {settings['sequences']} of the "
          f"{BANDS} time-path sequences measured, `*_62` = scaled linearly to all {BANDS}. "
          "Peak memory = XLA memory_analysis temp + output bytes of the compiled program "
          f"(scaled the same way); programs over {settings['memory_budget_gb']:g} GB are "
          "compiled but not run. median/min/max over repeats after one warm-up call.")
  return rows, text
