"""Benchmark section `peers`: the same SSD scan in PyTorch on this CPU, next to ours, same run.

At the paper time-path shape of 8 s (801 frames, 16 heads × 64, d_state 128; `sequences` of the
62 measured, as in `scaling`) and in one process: our three JAX methods, and torch (optional
extra `benchmark`) as (a) `torch_ssd.ssd_loop`, a Python loop over time steps like the seed
port, and (b) `torch_ssd.ssd_chunked`, a chunked einsum SSD; forward and forward+backward
(autograd of Σ y·w). Before timing, both torch outputs are checked against `ssd_scan` on the
same inputs (`*_rel_err`: max |torch - ours| / max |ours|). The loop's cost is linear in the
steps: when `loop_steps` < seqlen it runs that many and its median/min/max are scaled to the
full length (`loop_scaled`; its raw `repeats` stay as measured).
Ratios: torch seconds / JAX seconds (> 1: ours is faster).
"""
from __future__ import annotations

import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from bsmamba2_jax.ssd import ssd_scan
from experiments.benchmarks import common, scaling, torch_ssd

SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": dict(scaling.SETTINGS["smoke"], seconds=0.3, loop_steps=None, repeats=2,
                  methods=("chunked", "sequential")),
    "default": dict(scaling.SETTINGS["default"], seconds=8, sequences=2, loop_steps=200,
                    repeats=3, methods=("chunked", "sequential")),
    "full": dict(scaling.SETTINGS["full"], seconds=8, sequences=16, loop_steps=None, repeats=5,
                 methods=("chunked", "associative", "sequential")),
}


def _torch_row(name: str, fn, arrays: tuple[np.ndarray, ...], direction: str, settings: dict,
               **fields: Any) -> dict:
  """Times torch `fn(x, dt, A, B, C, D)` forward, or forward+backward of Σ y·w: one warm-up
  call, then min(repeats, time_budget_s / warm-up seconds) calls (at least one)."""
  import torch

  *inputs, w = [torch.from_numpy(a) for a in arrays]
  if direction == "fwd+bwd":
    for t in inputs:
      t.requires_grad_(True)

  def call():
    if direction == "fwd":
      with torch.no_grad():
        return fn(*inputs)
    for t in inputs:
      t.grad = None
    (fn(*inputs) * w).sum().backward()
    return inputs[0].grad

  start = time.perf_counter()
  call()
  warmup_s = time.perf_counter() - start
  count = int(max(1, min(settings["repeats"], settings["time_budget_s"] // warmup_s)))
  return common.timed(name, call, repeats=count, warmup=0, direction=direction,
                      warmup_s=warmup_s, **fields)


def _check(arrays: tuple[np.ndarray, ...]) -> dict:
  """Max |torch - ssd_scan| / max |ssd_scan| of both torch versions on (a slice of) the inputs."""
  import torch

  x, dt, A, B, C, D, _ = arrays
  steps = min(x.shape[1], 256)  # the loop's check on the first steps keeps it short
  ours = np.asarray(ssd_scan(*(jnp.asarray(a) for a in (x, dt, A, B, C, D)), method="chunked"))
  scale = float(np.abs(ours).max())
  torch_in = [torch.from_numpy(np.ascontiguousarray(a)) for a in (x, dt, A, B, C, D)]
  with torch.no_grad():
    chunked = torch_ssd.ssd_chunked(*torch_in).numpy()
    head = [t[:, :steps] if t.ndim > 1 else t for t in torch_in]
    loop = torch_ssd.ssd_loop(*head).numpy()
  return dict(torch_chunked_rel_err=float(np.abs(chunked - ours).max()) / scale,
              torch_loop_rel_err=float(np.abs(loop - ours[:, :steps]).max()) / scale,
              checked_loop_steps=steps)


def run(mode: str = "default") -> tuple[list[dict], str]:
  import torch

  settings = SETTINGS[mode]
  seconds, sequences = settings["seconds"], settings["sequences"]
  seqlen = scaling.frames(seconds)
  shape = (settings["heads"], settings["headdim"], settings["d_state"])
  arrays = scaling.scan_inputs(sequences, seqlen, *shape)
  check = _check(arrays)
  for key in ("torch_chunked_rel_err", "torch_loop_rel_err"):
    if not check[key] < 1e-4:
      raise AssertionError(f"peers: torch SSD disagrees with ssd_scan ({key} = {check[key]:.3g})")
  common_fields = dict(audio_s=seconds, seqlen=seqlen, sequences=sequences,
                       torch_threads=torch.get_num_threads(), **check)
  rows = []
  for direction in ("fwd", "fwd+bwd"):
    for method in settings["methods"]:
      row = scaling.scan_row(method, direction, seconds, settings)
      row.update(peer="jax", **common_fields)
      rows.append(row)
    rows.append(_torch_row(f"torch chunked Q=64 {direction}", torch_ssd.ssd_chunked, arrays,
                           direction, settings, peer="torch chunked", **common_fields))
    steps = settings["loop_steps"] or seqlen
    head = tuple(a[:, :steps] if a.ndim > 1 else a for a in arrays)
    loop = _torch_row(f"torch loop {direction}", torch_ssd.ssd_loop, head, direction,
                      settings, peer="torch loop", loop_steps=steps,
                      loop_scaled=steps < seqlen, **common_fields)
    if steps < seqlen:
      loop["measured_median_s"] = loop["median_s"]
      for key in ("median_s", "min_s", "max_s"):
        loop[key] *= seqlen / steps
    rows.append(loop)
  _ratios(rows)
  columns = ["name", "median_s", "min_s", "max_s", "vs_torch_loop", "vs_torch_chunked",
             "skipped"]
  text = (common.format_table(rows, columns)
          + f"\n\n{seconds:g} s = {seqlen} frames, {sequences} of {scaling.BANDS} time-path "
          f"sequences, {shape[0]} heads × {shape[1]}, d_state {shape[2]}; torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads. vs_* = torch seconds / "
          "this row's seconds (same direction). torch vs ssd_scan: chunked max rel. error "
          f"{check['torch_chunked_rel_err']:.2g}, loop {check['torch_loop_rel_err']:.2g} "
          f"(first {check['checked_loop_steps']} steps)."
          + (f" The torch loop ran {settings['loop_steps']} steps, its times scaled × "
             f"{seqlen}/{settings['loop_steps']}."
             if settings["loop_steps"] and settings["loop_steps"] < seqlen else ""))
  return rows, text


def _ratios(rows: list[dict]) -> None:
  """Adds vs_torch_loop / vs_torch_chunked (torch time / row time) to every timed row."""
  for direction in ("fwd", "fwd+bwd"):
    same = [r for r in rows if r["direction"] == direction]
    peers = {r["peer"]: r["median_s"] for r in same if r["peer"] != "jax"}
    for r in same:
      for peer, key in (("torch loop", "vs_torch_loop"), ("torch chunked", "vs_torch_chunked")):
        if r.get("median_s") and peers.get(peer):
          r[key] = peers[peer] / r["median_s"]
