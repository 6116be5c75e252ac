"""Shared timing helpers for the benchmark sections.

Every figure is a median over repeats measured after warm-up; min and max travel with it, and
the raw repeats go into the JSON report. Sections return rows (plain dicts) built by `timed`.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def block(tree: Any) -> Any:
  """Waits for every array in `tree` (JAX dispatch is asynchronous)."""
  return jax.tree_util.tree_map(
      lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree)


def measure(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> list[float]:
  """Seconds per call of `fn()` for `repeats` calls after `warmup` untimed calls."""
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - start)
  return times


def progress(row: dict) -> dict:
  """Prints `row`'s name and float fields on one stderr line as soon as it is measured, so a run
  cut short (a timeout on a lent accelerator) still shows what it got; returns `row`."""
  numbers = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
  print(f"  {row['name']}: {numbers}", file=sys.stderr, flush=True)
  return row


def timed(name: str, fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1,
          **fields: Any) -> dict:
  """One benchmark row: median/min/max seconds of `fn` plus descriptive `fields`.

  user_s / sys_s: the process's CPU seconds per timed call (all threads) in user space and in
  the kernel. On CPU the kernel's share is mostly page faults on the memory XLA:CPU maps afresh
  for each call's buffers (and unmaps after it); on a VM that hands freed memory back to its
  host, each such fault goes through the host (2-7 ms per 2-MB page; 28-83 s of a 150-200 s
  paper 8-s training step on the 2-core VM).
  """
  measure(fn, repeats=0, warmup=warmup)
  before = os.times()
  times = measure(fn, repeats=repeats, warmup=0)
  after = os.times()
  return progress(dict(name=name, median_s=float(np.median(times)), min_s=float(np.min(times)),
                       max_s=float(np.max(times)), repeats=times,
                       user_s=(after.user - before.user) / len(times),
                       sys_s=(after.system - before.system) / len(times), **fields))


def matmul_gflops(n: int | None = None, repeats: int = 20, dtype: str = "float32") -> dict:
  """Achieved GFLOP/s of a jitted n×n matmul in `dtype` ("float32", "bfloat16", or "mixed": bf16
  operands accumulated and returned in float32, the separator's "mixed" mode), at JAX's default
  matmul precision (TF32 for fp32 on NVIDIA GPUs): the machine's reference rate.

  n None: 2048 on CPU, 8192 on an accelerator (a 2048² product is too short there to reach the
  card's rate; docs/performance.md).
  """
  if n is None:
    n = 2048 if jax.default_backend() == "cpu" else 8192
  short = {"float32": "fp32", "bfloat16": "bf16", "mixed": "bf16->fp32"}[dtype]
  operands = "bfloat16" if dtype == "mixed" else dtype
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (n, n), operands)
  b = jax.random.normal(key_b, (n, n), operands)
  result = jnp.float32 if dtype == "mixed" else None
  f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=result))
  row = timed(f"matmul {short} {n}x{n}", lambda: f(a, b), repeats=repeats, warmup=2,
              dtype=dtype)
  row["n"] = n
  row["gflops"] = 2 * n**3 / row["median_s"] / 1e9
  return row


def memory_budget_gb(fraction: float = 0.8, unknown_gb: float = 8.0) -> float:
  """`fraction` of the memory a computation can use now, in GB: on an accelerator its
  allocator's limit less what is in use (`memory_stats`), on CPU what the OS reports available
  (Linux MemAvailable); `unknown_gb` where neither says."""
  device = jax.devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
      return fraction * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) / 1e9
    return unknown_gb
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return fraction * int(line.split()[1]) * 1024 / 1e9
  except OSError:
    pass
  return unknown_gb


def format_table(rows: list[dict], columns: list[str]) -> str:
  """A markdown table of `rows` restricted to `columns` (floats to 4 significant digits)."""
  def fmt(v: Any) -> str:
    if isinstance(v, float):
      return f"{v:.4g}"
    return "" if v is None else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines)
