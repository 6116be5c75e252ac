"""SSD scan benchmark: the three `ssd_scan` methods at the paper's shapes, forward and fwd+bwd.

Paper shapes (one 8-s example): the time path scans 62 sequences × 801 steps, the band path
801 sequences × 62 steps; 16 heads, headdim 64, d_state 128, ngroups 1.

"sequential" fwd+bwd stores a (16, 64, 128) float32 state per step and sequence (26 GB on the
time path) and "associative" materialises all of them even forward, so these rows run on as
many sequences as `state_budget_bytes` allows (8 GB, less where less memory is free) and their
times are scaled linearly to the full batch (column `batch` gives the measured batch, `full_s`
the scaled median). Scaling favours them (a sub-batch runs faster per sequence than the whole
batch would), so the budget is as large as the machine allows (docs/performance.md).
"chunked" and "sequential" fwd always run the full batch.
A chunk-size sweep of "chunked" fwd+bwd on `sweep_batch` time-path sequences closes the section.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bsmamba2_jax.ssd import METHODS, ssd_scan
from experiments.benchmarks import scaling
from experiments.benchmarks.common import format_table, memory_budget_gb, timed

NHEADS, HEADDIM, D_STATE = 16, 64, 128
STATE_BUDGET_GB = 8.0  # per-step states a sub-batched measurement may hold, at most
SETTINGS = {  # per mode: paths (name, sequences, steps) and the chunk-size sweep
    "smoke": dict(paths=(("time", 2, 40),), sweep_chunks=(16,), sweep_batch=1, sweep_steps=40),
    "default": dict(paths=(("time", 62, 801), ("band", 801, 62)),
                    sweep_chunks=(16, 32, 64, 128, 256), sweep_batch=4, sweep_steps=801),
    "full": dict(paths=(("time", 62, 801), ("band", 801, 62)),
                 sweep_chunks=(16, 32, 64, 128, 256), sweep_batch=62, sweep_steps=801),
}
# Methods are timed lightest first: a row timed right after "sequential" or "associative" freed
# their gigabytes of per-step states ran slower, as the kernel then compacts memory to hand out
# huge pages again (docs/performance.md §1).
MEASUREMENT_ORDER = ("chunked", "associative", "sequential")
TABLE_ORDER = ("sequential", "associative", "chunked")  # the speed-ups' reference first
STATES_PER_STEP = {  # per-step full states held, per sequence, by method and direction
    ("sequential", "fwd"): 0, ("sequential", "fwd+bwd"): 1.5,
    ("associative", "fwd"): 3, ("associative", "fwd+bwd"): 8,
    ("chunked", "fwd"): 0, ("chunked", "fwd+bwd"): 0,
}


def inputs(batch: int, seqlen: int):
  """(x, dt, A, B, C, D) jnp arrays at the paper's head shapes, from `scaling.scan_inputs`
  (dt in the Mamba2 init range, A = -U(1, 16))."""
  arrays = scaling.scan_inputs(batch, seqlen, NHEADS, HEADDIM, D_STATE, weights=False)
  return tuple(jnp.asarray(a) for a in arrays)


def _step(method: str, direction: str, chunk_size: int = 64):
  """Jitted forward (y) or forward+backward (gradients w.r.t. x, dt, A, B, C, D)."""
  scan = lambda *args: ssd_scan(*args, method=method, chunk_size=chunk_size)
  if direction == "fwd":
    return jax.jit(scan)
  return jax.jit(jax.grad(lambda *args: jnp.sum(scan(*args) ** 2), argnums=tuple(range(6))))


def state_budget_bytes() -> float:
  """Bytes of per-step states a sub-batched measurement may hold: STATE_BUDGET_GB, or 40 % of
  the memory available now where that is less."""
  return 1e9 * min(STATE_BUDGET_GB, memory_budget_gb(0.4))


def _measured_batch(method: str, direction: str, batch: int, seqlen: int,
                    budget_bytes: float) -> int:
  """Sequences to run: all of them unless their per-step states exceed `budget_bytes`."""
  state_bytes = seqlen * NHEADS * HEADDIM * D_STATE * 4 * STATES_PER_STEP[(method, direction)]
  if state_bytes == 0:
    return batch
  return max(1, min(batch, int(budget_bytes // state_bytes)))


def _method_rows(method: str, settings: dict, budget_bytes: float) -> list[dict]:
  """One method's rows, per path and direction (fwd, then fwd+bwd)."""
  rows = []
  for path, batch, seqlen in settings["paths"]:
    for direction in ("fwd", "fwd+bwd"):
      measured = _measured_batch(method, direction, batch, seqlen, budget_bytes)
      args = inputs(measured, seqlen)
      step = _step(method, direction)
      row = timed(f"ssd {method} {direction} {path}", lambda: step(*args), repeats=3,
                  path=f"{path} {batch}x{seqlen}", method=method, direction=direction,
                  batch=measured, chunk_size=64 if method == "chunked" else None)
      row["full_s"] = row["median_s"] * batch / measured
      rows.append(row)
  return rows


def _sweep_rows(settings: dict) -> list[dict]:
  """"chunked" fwd+bwd on `sweep_batch` time-path sequences per chunk size."""
  batch, seqlen = settings["sweep_batch"], settings["sweep_steps"]
  args = inputs(batch, seqlen)
  rows = []
  for chunk_size in settings["sweep_chunks"]:
    step = _step("chunked", "fwd+bwd", chunk_size)
    rows.append(timed(f"ssd chunked fwd+bwd Q={chunk_size}", lambda: step(*args), repeats=2,
                      path=f"time {batch}x{seqlen}", method="chunked", direction="fwd+bwd",
                      batch=batch, chunk_size=chunk_size))
  return rows


def run(mode: str = "default") -> tuple[list[dict], str]:
  """Rows of every (path, direction, method) and of the chunk-size sweep, and their tables.

  Measured lightest first (`MEASUREMENT_ORDER`, the sweep after "chunked"), tabled by path,
  direction and `TABLE_ORDER`, with speed-ups over "sequential".
  """
  settings = SETTINGS[mode]
  budget_bytes = state_budget_bytes()  # once, so that every row of the run shares it
  by_method, sweep = {}, []
  for method in MEASUREMENT_ORDER:
    by_method[method] = _method_rows(method, settings, budget_bytes)
    if method == "chunked":
      sweep = _sweep_rows(settings)
  rows = []
  for index in range(len(by_method["sequential"])):
    group = [by_method[method][index] for method in TABLE_ORDER]
    for row in group:
      row["speedup"] = group[0]["full_s"] / row["full_s"]
    rows += group
  table = format_table(rows, ["path", "method", "direction", "batch", "median_s", "min_s",
                              "max_s", "full_s", "speedup"])
  sweep_table = format_table(sweep, ["path", "chunk_size", "median_s", "min_s", "max_s"])
  text = (f"Methods {METHODS}, measured in the order {MEASUREMENT_ORDER}; `full_s` = median "
          f"scaled to the full batch; speed-up over \"sequential\" at the same path and "
          f"direction.\n\n{table}\n\n"
          f"Chunk size (the longest chunk; `ssd_scan` balances chunk lengths), \"chunked\" "
          f"fwd+bwd:\n\n{sweep_table}")
  return rows + sweep, text
