"""Separation speed: real-time factor of `paper` (random weights) and `tiny` on stereo audio.

The whole `Separator.separate` path (8-s chunks, overlap 0.25, batch 1) on 60 s of stereo
noise at 44.1 kHz; one untimed call compiles first. Paper-size CPU runs are slow, so on CPU
`paper` is measured on PAPER_SECONDS and scaled to 60 s by the number of chunks (the cost is
linear in it); the row says which duration was measured. `paper` runs at precision "float32"
and "auto" (what a user gets by default: bf16 operands with float32 accumulation where the
device has bf16 dots, docs/separation.md); where auto is not float32 its row gives how far its
vocals land from float32's (`sdr_vs_fp32_db` = 20·log10(‖fp32‖ / ‖auto − fp32‖), same input
and weights). The sizes follow the backend in every mode ("gpu" included).
"""
from __future__ import annotations

import time

import numpy as np

from experiments.benchmarks import common

SECONDS = 60.0
PAPER_SECONDS = 8.0
SEGMENT, OVERLAP = 8.0, 0.25


def _chunks(seconds: float) -> int:
  hop = SEGMENT * (1 - OVERLAP)
  return 1 + int(np.ceil(max(0.0, seconds - SEGMENT) / hop))


MODES = ("smoke", "default", "full", "gpu")


def _row(preset: str, seconds: float, precision: str = "float32", repeats: int = 1,
         outputs: dict | None = None) -> dict:
  """One timed separation at `precision` (`Separator.from_model`'s); the vocals of the last call
  go to `outputs[precision]` if given."""
  from bsmamba2_jax.config import ModelConfig
  from bsmamba2_jax.model import BSMamba2, random_params
  from bsmamba2_jax.separator import Separator

  config = ModelConfig.preset(preset)
  # The timing does not depend on the parameters' values.
  params = random_params(config, scale=0.02)
  separator = Separator.from_model(BSMamba2(config), params, precision=precision,
                                   segment=SEGMENT, overlap=OVERLAP, batch_size=1)
  audio = (0.1 * np.random.default_rng(0).standard_normal((2, int(seconds * 44100))))
  audio = audio.astype(np.float32)
  start = time.perf_counter()
  separator.separate(audio[:, :separator.segment_samples], 44100)  # compile
  compile_s = time.perf_counter() - start
  last = {}

  def separate():
    last["stems"] = separator.separate(audio, 44100)
    return last["stems"]

  row = common.timed(f"separate {preset} {precision}", separate, repeats=repeats, warmup=0,
                     preset=preset, precision=precision, dtype=separator.dtype,
                     measured_audio_s=seconds)
  if outputs is not None:
    outputs[precision] = np.asarray(last["stems"]["vocals"], np.float64)
  wall_60 = row["median_s"] * _chunks(SECONDS) / _chunks(seconds)
  row.update(audio_s=SECONDS, wall_s_for_60s=wall_60, realtime_factor=SECONDS / wall_60,
             wall_per_audio=wall_60 / SECONDS, compile_s=compile_s,
             extrapolated=seconds != SECONDS)
  return row


def compare(row: dict, estimate: np.ndarray, reference: np.ndarray) -> dict:
  """`row` with the relative error and SDR of `estimate` against `reference`, and finiteness."""
  error = float(np.linalg.norm(estimate - reference) / np.linalg.norm(reference))
  row.update(rel_err_vs_fp32=error, sdr_vs_fp32_db=float(-20 * np.log10(error)) if error else None,
             finite=bool(np.isfinite(estimate).all()))
  return row


def run(mode: str = "default") -> tuple[list[dict], str]:
  import jax

  if mode not in MODES:
    raise ValueError(f"separate: unknown mode {mode!r}; choose from {MODES}")
  cpu = jax.default_backend() == "cpu"
  seconds, repeats = (PAPER_SECONDS, 1) if cpu else (SECONDS, 3)
  outputs = {}
  rows = [_row("tiny", SECONDS, repeats=repeats),
          _row("paper", seconds, repeats=repeats, outputs=outputs),
          _row("paper", seconds, "auto", repeats=repeats, outputs=outputs)]
  if rows[2]["dtype"] != "float32":
    common.progress(compare(rows[2], outputs["auto"], outputs["float32"]))
  text = common.format_table(rows, ["name", "dtype", "measured_audio_s", "wall_s_for_60s",
                                    "realtime_factor", "wall_per_audio", "compile_s",
                                    "extrapolated", "sdr_vs_fp32_db", "finite"])
  text += (f"\n\nrealtime_factor = audio seconds / wall seconds (> 1 is faster than real "
           f"time); median of {len(rows[0]['repeats'])}; {SEGMENT:g}-s chunks, overlap {OVERLAP}, "
           f"batch 1, stereo 44.1 kHz. "
           f"`paper` measured on {rows[1]['measured_audio_s']:g} s"
           + (f" and scaled to {SECONDS:g} s." if rows[1]["extrapolated"] else ".")
           + " `auto` is `Separator.from_model(precision=\"auto\")`, its dtype what it chose "
           "here; sdr_vs_fp32_db: its vocals against the float32 ones (same input and random "
           "weights, so a near-constant mask: the quality test is tests/test_separation.py).")
  return rows, text
