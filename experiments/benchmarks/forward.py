"""Jitted model forward (inference) on 8-s stereo segments: compile time, median time, and the
real-time factor (audio seconds per wall second) per preset.

Modes: smoke (microscopic model, 0.5 s), default (tiny on 8 s), full (tiny, small and paper on
8 s). The `limit` section times the paper forward in default mode.
"""
from __future__ import annotations

import time

import jax

from bsmamba2_jax.config import ModelConfig
from bsmamba2_jax.model import BSMamba2, init_params
from experiments.benchmarks.common import format_table, timed

CASES = {
    "smoke": [("tiny", dict(dim=16, depth=1, d_state=8, expand=2, headdim=8), 0.5, 2)],
    "default": [("tiny", {}, 8.0, 5)],
    "full": [("tiny", {}, 8.0, 5), ("small", {}, 8.0, 3), ("paper", {}, 8.0, 1)],
}


def run(mode: str = "default") -> tuple[list[dict], str]:
  rows = []
  for preset, overrides, seconds, repeats in CASES[mode]:
    config = ModelConfig.preset(preset, **overrides)
    params = init_params(config, jax.random.PRNGKey(0))
    audio = jax.random.uniform(jax.random.PRNGKey(1), (1, 2, int(seconds * config.sample_rate)),
                               minval=-0.5, maxval=0.5)
    forward = jax.jit(BSMamba2(config).apply)
    start = time.perf_counter()
    compiled = forward.lower({"params": params}, audio).compile()
    compile_s = time.perf_counter() - start
    row = timed(f"forward {preset}", lambda: compiled({"params": params}, audio),
                repeats=repeats, preset=preset, audio_s=seconds, compile_s=compile_s)
    row["realtime_factor"] = seconds / row["median_s"]
    rows.append(row)
  text = format_table(rows, ["preset", "audio_s", "compile_s", "median_s", "min_s", "max_s",
                             "realtime_factor"])
  return rows, text
