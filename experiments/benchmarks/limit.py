"""Benchmark section `limit`: model FLOPs / measured time, as a fraction of the matmul rate.

Analytic FLOPs (one multiply-add = 2 FLOPs; elementwise ops, norms, softplus, exp not counted),
for batch b, C audio channels, F = n_fft/2 + 1 bins, T = frames, K bands, model width D,
d_inner E = expand·D, H heads of headdim P, G groups, d_state N, chunk Q:

  band split      2 · b·T · Σ_k (2C·w_k)·D                = 4·b·T·C·F·D
  mask estimator  2 · b·T · Σ_k (D·4D + 4D·2·2C·w_k)      = b·T·(8·K·D² + 32·C·F·D)
  per layer (×depth), two paths (time: b·K sequences of T; bands: b·T sequences of K), each a
  bidirectional block = 2 Mamba2 mixers + merge Dense(2D -> D) on every one of the b·K·T tokens:
    merge          2 · 2D·D                                per token
    in_proj        2 · D·(2E + 2GN + H)                    per token
    conv1d         2 · d_conv·(E + 2GN)                    per token
    out_proj       2 · E·D                                 per token
    chunked SSD    per sequence of length L in n = ceil(L/q) chunks of q = min(Q, L):
                   n·q·(2qNG (C Bᵀ) + 2qHP (masked matmul with X) + 2q²H (segment sums,
                   one GEMM per chunk)) + (n - 1)·q·(2HPN (chunk states) + 2HPN (states
                   to outputs)); the first chunk enters with the zero state and the last
                   chunk's end state feeds nothing
  Transformer     (module_type "transformer" / "mamba2-roformer", H heads of width E, length L)
                   per token: 2·D·3HE + 2·D·H + 2·HE·D (projections, gates) + 16·D² (feed-forward)
                   + 4·L·HE (q·kᵀ and weights·v)
  STFT / iSTFT    ~5·n_fft·log2(n_fft) per frame and channel: < 0.01 % of the total, not counted.

The paper preset on 8 s stereo gives 2.88 TFLOP; the `bsroformer` preset 1.53 TFLOP. A training step is
counted as 3 × forward (the backward of a matmul costs two matmuls); the loss (5 STFT pairs)
and the AdamW update are small and not counted. Each analytic figure is reported next to XLA's
own count, `jax.jit(f).lower(...).compile().cost_analysis()["flops"]`, which includes
elementwise work and every STFT. achieved GFLOP/s = analytic FLOPs / median seconds;
`of_matmul` divides it by `common.matmul_gflops()` measured in the same run.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bsmamba2_jax.losses import get_loss
from bsmamba2_jax.config import ModelConfig
from bsmamba2_jax.model import BSMamba2, init_params
from experiments.benchmarks import common, scaling

# Mode -> (preset, audio seconds, what, remat, steps per call) cases and the caps of
# `scaling.timed_compiled`. A train step's analytic count is 3 × forward (model FLOPs, not any
# recomputation); the default mode runs the paper step without remat, which XLA:CPU of jaxlib
# 0.10 plans no smaller (see ModelConfig.remat). Steps per call > 1: that many training steps on
# as many batches in one program (`lax.scan`, as `training.train_steps` with
# `config.train.steps_per_execution`). memory_budget_gb None: 80 % of the memory available when
# the case runs; matmul_n None: `common.matmul_gflops`'s size for the backend.
SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": dict(cases=(("tiny", 0.1, "forward", False, 1), ("tiny", 0.1, "train step", True, 1),
                         ("tiny", 0.1, "train step", True, 2)),
                  repeats=2, time_budget_s=1.0, memory_budget_gb=1.0, matmul_n=256),
    "default": dict(cases=(("tiny", 8, "forward", False, 1), ("paper", 2, "forward", False, 1),
                           ("paper", 1, "train step", False, 1)),
                    repeats=3, time_budget_s=10.0, memory_budget_gb=None, matmul_n=None),
    "full": dict(cases=(("tiny", 8, "forward", False, 1), ("tiny", 8, "train step", True, 1),
                        ("small", 8, "forward", False, 1), ("small", 8, "train step", True, 1),
                        ("paper", 8, "forward", False, 1), ("paper", 8, "train step", True, 1),
                        ("paper", 8, "train step", True, 2)),
                 repeats=3, time_budget_s=60.0, memory_budget_gb=48.0, matmul_n=None),
}


def ssd_flops_per_token(cfg: ModelConfig, length: int) -> float:
  """Chunked-SSD FLOPs per real token of one sequence of `length` (padding counted).

  The last chunk's end state and the first chunk's (zero) entering state feed nothing, so the
  chunk-state and state-to-output terms count for nchunks - 1 chunks.
  """
  q = min(cfg.chunk_size, length)
  nchunks = math.ceil(length / q)
  heads = cfg.expand * cfg.dim // cfg.headdim
  per_padded_token = (2 * q * cfg.d_state * cfg.ngroups + 2 * q * heads * cfg.headdim
                      + 2 * q * q * heads)
  states = 4 * heads * cfg.headdim * cfg.d_state * q * (nchunks - 1)
  return (per_padded_token * nchunks * q + states) / length


def transformer_flops_per_token(cfg: ModelConfig, length: int) -> float:
  """One Transformer block (`roformer.TransformerBlock`) per token of a sequence of `length`:
  q/k/v, gates and output projections, the feed-forward (D -> 4D -> D), and the attention's two
  products (q·kᵀ and weights·v, each 2·length·H·E per token)."""
  d, inner = cfg.dim, cfg.heads * cfg.dim_head
  return 2 * d * 3 * inner + 2 * d * cfg.heads + 2 * inner * d + 2 * 2 * d * 4 * d + (
      2 * 2 * length * inner)


def model_flops(cfg: ModelConfig, batch: int, samples: int) -> dict[str, float]:
  """Analytic forward FLOPs of the model of `cfg` (BSMamba2, or with `module_type`'s
  Transformers; Mamba1 is not counted) on (batch, C, samples) audio, by component."""
  from bsmamba2_jax.model import LAYER_KINDS  # pylint: disable=g-import-not-at-top
  frames = 1 + samples // cfg.hop_length
  bins, bands, d = cfg.n_fft // 2 + 1, len(cfg.band_widths), cfg.dim
  inner = cfg.expand * d
  heads = inner // cfg.headdim
  bc = 2 * cfg.ngroups * cfg.d_state
  tokens = batch * bands * frames
  mixer_dense = 2 * d * (2 * inner + bc + heads) + 2 * cfg.d_conv * (inner + bc) + 2 * inner * d
  merge = 2 * 2 * d * d
  flops = dict(band_split=4.0 * batch * frames * cfg.audio_channels * bins * d,
               mamba_dense=0.0, merge=0.0, ssd=0.0, transformer=0.0)
  for kind, length in zip(LAYER_KINDS[cfg.module_type], (frames, bands)):  # time, band paths
    if kind == "mamba2":
      flops["mamba_dense"] += cfg.depth * 2 * mixer_dense * tokens  # 2 directions
      flops["merge"] += cfg.depth * merge * tokens
      flops["ssd"] += cfg.depth * 2 * ssd_flops_per_token(cfg, length) * tokens
    elif kind == "transformer":
      flops["transformer"] += cfg.depth * transformer_flops_per_token(cfg, length) * tokens
    else:
      raise ValueError(f"no FLOP count for {kind!r} modules")
  flops["mask_estimator"] = cfg.num_stems * batch * frames * (
      8.0 * bands * d * d + 32.0 * cfg.audio_channels * bins * d)
  flops["total"] = sum(flops.values())
  return flops


def _functions(cfg: ModelConfig):
  """(forward(params, audio), train_step(params, opt_state, audio, target), optimizer) for
  `cfg`."""
  model = BSMamba2(cfg)
  loss_fn = get_loss("official")
  optimizer = optax.chain(optax.clip_by_global_norm(3.0),
                          optax.adamw(5e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01))

  def forward(params, audio):
    return model.apply({"params": params}, audio)

  def train_step(params, opt_state, audio, target):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(forward(p, audio), target))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return forward, train_step, optimizer


def steps_in_one_call(train_step):
  """`train_step` run on each of K (audio, target) pairs, (K, 1, C, N) each, in one program."""
  def train_steps(params, opt_state, audios, targets):
    def step(carry, batch):
      params, opt_state, loss = train_step(*carry, *batch)
      return (params, opt_state), loss
    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (audios, targets))
    return params, opt_state, losses
  return train_steps


def case_row(preset: str, seconds: float, what: str, remat: bool, steps: int, settings: dict,
             matmul: float) -> dict:
  """Times a forward or `steps` training steps of `preset` on (1, C, seconds·44.1 kHz) audio in
  one call; `s_per_step` = median_s / steps."""
  cfg = ModelConfig.preset(preset, remat=remat)
  samples = int(round(seconds * cfg.sample_rate))
  params = init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  audio = jnp.asarray(0.1 * rng.standard_normal((steps, 1, cfg.audio_channels, samples)),
                      jnp.float32)
  target = 0.5 * audio
  forward, train_step, optimizer = _functions(cfg)
  flops = model_flops(cfg, 1, samples)
  if what == "forward":
    fn, args, analytic = forward, (params, audio[0]), flops["total"]
  elif steps == 1:
    fn, args = train_step, (params, optimizer.init(params), audio[0], target[0])
    analytic = 3 * flops["total"]
  else:
    fn, args = steps_in_one_call(train_step), (params, optimizer.init(params), audio, target)
    analytic = steps * 3 * flops["total"]
  budget_gb = settings["memory_budget_gb"] or common.memory_budget_gb()
  name = (f"{preset} {what} {seconds:g} s{' remat' if remat else ''}"
          f"{f', {steps} per call' if steps > 1 else ''}")
  row = scaling.timed_compiled(
      name, fn, args, repeats=settings["repeats"],
      time_budget_s=settings["time_budget_s"], memory_budget_gb=budget_gb,
      preset=preset, what=what, audio_s=seconds, batch=1, remat=remat, steps_per_call=steps,
      analytic_flops=analytic, analytic_parts=flops)
  row["analytic_gflop"] = analytic / 1e9
  row["xla_gflop"] = None if row["xla_flops"] is None else row["xla_flops"] / 1e9
  row["peak_gb"] = None if row["peak_bytes"] is None else row["peak_bytes"] / 1e9
  if row.get("median_s"):
    row["s_per_step"] = row["median_s"] / steps
    row["achieved_gflops"] = analytic / row["median_s"] / 1e9
    row["of_matmul"] = row["achieved_gflops"] / matmul
  return row


def run(mode: str = "default") -> tuple[list[dict], str]:
  settings = SETTINGS[mode]
  reference = common.matmul_gflops(settings["matmul_n"])
  rows = [reference]
  for case in settings["cases"]:
    rows.append(case_row(*case, settings, reference["gflops"]))
  columns = ["name", "analytic_gflop", "xla_gflop", "median_s", "min_s", "max_s", "user_s",
             "sys_s", "s_per_step", "achieved_gflops", "of_matmul", "peak_gb", "compile_s",
             "skipped"]
  text = (common.format_table(rows[1:], columns)
          + f"\n\nReference: jitted fp32 {reference['n']}² matmul "
          f"{reference['gflops']:.1f} GFLOP/s (median of {len(reference['repeats'])}), same run. "
          "Batch 1, fp32, random audio; train step = value_and_grad of the official loss + "
          "clip + AdamW (remat per the row name); 'K per call': K steps on K batches in one "
          "call, whose times and CPU seconds the row gives (s_per_step = median / K). "
          "analytic: the formula in `experiments/benchmarks/limit.py` (train step = 3 × "
          "forward); xla: XLA cost_analysis of the compiled program; of_matmul = (analytic / "
          "median) / matmul rate; user_s / sys_s: the process's CPU seconds per call in user "
          "space and in the kernel (`common.timed`).")
  return rows, text
