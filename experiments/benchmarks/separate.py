"""Separation speed in seconds per audio second: ours, the compute limit, and PyTorch peers.

The whole `Separator.separate` path (8-s chunks, overlap 0.25, batch 1) on stereo noise at
44.1 kHz, with random weights (timing does not depend on them); one untimed call compiles first.
Models: `tiny`; `paper` (BSMamba2) and `bsroformer` (the paper's BS-RoFormer baseline in this
project), each at precision "float32" and "auto" (what a user gets by default: bf16 operands
with float32 accumulation where the device has bf16 dots, docs/separation.md; where auto is not
float32 its row gives how far its vocals land from float32's, `sdr_vs_fp32_db` =
20·log10(‖fp32‖ / ‖auto − fp32‖), same input and weights). Paper-size CPU runs are slow, so on
CPU they are measured on PAPER_SECONDS and scaled to 60 s by the number of chunks (the cost is
linear in it); the row says which duration was measured.

`limit` rows: the model's analytic FLOPs for 60 s of chunks (`limit.model_flops`) at the
matmul rates measured in the same run (fp32, and bf16 operands with fp32 accumulation): the
seconds per audio second a model made only of its matmuls would take. Peers
(`separation_peers`: htdemucs through demucs's `apply_model`, a BS-RoFormer of the popular
vocals size through the bs-roformer package) need the `peers` extra, else a note says they
were skipped. `smoke` runs tiny sizes of everything on a few seconds (tests).
"""

from __future__ import annotations

import time

import numpy as np

from experiments.benchmarks import common, limit, separation_peers

SECONDS = 60.0
PAPER_SECONDS = 8.0
SEGMENT, OVERLAP = 8.0, 0.25


def _chunks(seconds: float) -> int:
  hop = SEGMENT * (1 - OVERLAP)
  return 1 + int(np.ceil(max(0.0, seconds - SEGMENT) / hop))


MODES = ("smoke", "default", "full", "gpu")


def _per_audio_second(row: dict, seconds: float, chunked: bool = True) -> dict:
  """`row` (a timed separation of `seconds` of audio) with its time scaled to SECONDS: by the
  number of chunks (`chunked`) or the duration."""
  scale = _chunks(SECONDS) / _chunks(seconds) if chunked else SECONDS / seconds
  wall_60 = row["median_s"] * scale
  row.update(audio_s=SECONDS, wall_s_for_60s=wall_60, realtime_factor=SECONDS / wall_60,
             wall_per_audio=wall_60 / SECONDS, extrapolated=seconds != SECONDS)
  return row


def _row(preset: str, seconds: float, precision: str = "float32", repeats: int = 1,
         outputs: dict | None = None) -> dict:
  """One timed separation at `precision` (`Separator.from_model`'s); the vocals of the last call
  go to `outputs[(preset, precision)]` if given."""
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
                     measured_audio_s=seconds, compile_s=compile_s)
  if outputs is not None:
    outputs[preset, precision] = np.asarray(last["stems"]["vocals"], np.float64)
  return _per_audio_second(row, seconds)


def _limit_rows(presets: list[str], rates: dict[str, float]) -> list[dict]:
  """Seconds per audio second of each preset's matmul FLOPs at each measured rate."""
  from bsmamba2_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  rows = []
  for preset in presets:
    per_chunk = limit.model_flops(ModelConfig.preset(preset), 1, int(SEGMENT * 44100))["total"]
    for dtype, gflops in rates.items():
      wall_60 = per_chunk * _chunks(SECONDS) / (gflops * 1e9)
      rows.append(dict(name=f"limit {preset} at the {dtype} matmul rate", preset=preset,
                       dtype=dtype, analytic_tflop_per_chunk=per_chunk / 1e12,
                       matmul_gflops=gflops, audio_s=SECONDS, wall_s_for_60s=wall_60,
                       realtime_factor=SECONDS / wall_60, wall_per_audio=wall_60 / SECONDS))
  return rows


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
  big = [] if mode == "smoke" else ["paper", "bsroformer"]
  rates = {dtype: common.matmul_gflops(256 if mode == "smoke" else None, dtype=dtype)["gflops"]
           for dtype in ("float32", "mixed")}
  outputs = {}
  rows = [_row("tiny", 4.0 if mode == "smoke" else SECONDS, repeats=repeats)]
  for preset in big:
    rows.append(_row(preset, seconds, repeats=repeats, outputs=outputs))
    auto = _row(preset, seconds, "auto", repeats=repeats, outputs=outputs)
    if auto["dtype"] != "float32":
      compare(auto, outputs[preset, "auto"], outputs[preset, "float32"])
    rows.append(common.progress(auto))
  rows += _limit_rows(big or ["tiny"], rates)
  noise = lambda s: (0.1 * np.random.default_rng(1).standard_normal((2, int(s * 44100)))).astype(
      np.float32)
  peer_seconds = dict(htdemucs=2.0 if mode == "smoke" else 30.0,
                      bsroformer=2.0 if mode == "smoke" else seconds)
  peers, peer_note = separation_peers.rows(mode, {k: noise(v) for k, v in peer_seconds.items()},
                                           repeats, SEGMENT, OVERLAP)
  for row in peers:
    _per_audio_second(row, row["measured_audio_s"], chunked="BS-RoFormer" in row["name"])
  rows += peers
  text = common.format_table(rows, ["name", "dtype", "measured_audio_s", "wall_per_audio",
                                    "realtime_factor", "wall_s_for_60s", "compile_s",
                                    "extrapolated", "sdr_vs_fp32_db", "finite"])
  text += (f"\n\nwall_per_audio = wall seconds per audio second (lower is faster); "
           f"realtime_factor its inverse; median of {len(rows[0]['repeats'])}; {SEGMENT:g}-s "
           f"chunks, overlap {OVERLAP}, batch 1, stereo 44.1 kHz, random weights. Large models "
           f"measured on {seconds:g} s and scaled to {SECONDS:g} s by the chunk count. `auto` is "
           "`Separator.from_model(precision=\"auto\")`, its dtype what it chose here; "
           "sdr_vs_fp32_db: its vocals against the float32 ones (same input and random weights: "
           "the quality test is tests/test_separation.py). Matmul rates this run: "
           + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items())
           + f" (`limit` rows: analytic FLOPs / rate). {peer_note}")
  return rows, text
