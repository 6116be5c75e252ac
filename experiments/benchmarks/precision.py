"""Benchmark section `precision`: how far bf16 (and default-precision fp32) land from fp32.

The reference is fp32 under `jax.default_matmul_precision("highest")` (on GPUs the default
lets fp32 matmuls run as TF32). For the chunked scan at the paper's time-path shape and for
the model (official loss, value and gradient w.r.t. every parameter) the rows give

  rel_err  = ‖out − ref‖ / ‖ref‖ over the whole output (gradients: over every leaf together),
  sdr_db   = 20·log10(‖ref‖ / ‖out − ref‖) of the separated waveform (the model only),
  finite   = no NaN or inf in the output, the loss or any gradient.

Inputs are random (normal, scaled like the mixer's and the model's inputs); parameters are the
model's initialisation. These are numbers, not times: the rows carry no median.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bsmamba2_jax.losses import get_loss
from bsmamba2_jax.config import ModelConfig
from bsmamba2_jax.model import BSMamba2, init_params
from bsmamba2_jax.ssd import ssd_scan
from experiments.benchmarks import common, scan

# Per mode: (sequences, steps) of the scan check and (preset, audio seconds) of the model check.
SETTINGS = {
    "smoke": dict(scan=(2, 40), model=("tiny", 0.1)),
    "default": dict(scan=(62, 801), model=("paper", 1.0)),
    "full": dict(scan=(62, 801), model=("paper", 8.0)),
    # --mode=gpu: the scan only. The model check compiles three paper-size programs, minutes on
    # an accelerator (docs/performance.md), which the mode's ~10 minutes cannot hold; `separate`
    # gives the paper model's bf16-vs-fp32 SDR there. `--only=precision` (default) runs it.
    "gpu": dict(scan=(62, 801), model=None),
}
MODES = tuple(SETTINGS)
VARIANTS = (("fp32 default", jnp.float32, "default"), ("bf16", jnp.bfloat16, "default"))


def relative_error(out, ref) -> float:
  """‖out − ref‖ / ‖ref‖ over every leaf of two pytrees of the same structure, in float64."""
  pairs = zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref))
  err = sum(float(np.sum((np.asarray(o, np.float64) - np.asarray(r, np.float64)) ** 2))
            for o, r in pairs)
  norm = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in jax.tree_util.tree_leaves(ref))
  if norm == 0:
    return 0.0 if err == 0 else float("inf")
  return float(np.sqrt(err / norm))


def all_finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(leaf, np.float32))))
             for leaf in jax.tree_util.tree_leaves(tree))


def _with_precision(fn, precision: str):
  """`fn` jitted under the given default matmul precision (part of the trace)."""
  jitted = jax.jit(fn)

  def call(*args):
    with jax.default_matmul_precision(precision):
      return common.block(jitted(*args))
  return call


def scan_rows(batch: int, steps: int) -> list[dict]:
  """y and the gradients w.r.t. (x, dt, A, B, C, D) of the chunked scan, against fp32 highest."""
  args = scan.inputs(batch, steps)

  def value_and_grads(*a):
    def objective(*b):
      y = ssd_scan(*b)
      return jnp.sum(y.astype(jnp.float32) ** 2), y
    (_, y), grads = jax.value_and_grad(objective, argnums=tuple(range(6)), has_aux=True)(*a)
    return y, grads

  ref_y, ref_grads = _with_precision(value_and_grads, "highest")(*args)
  rows = []
  for name, dtype, precision in VARIANTS:
    cast = [a.astype(dtype) for a in args]
    y, grads = _with_precision(value_and_grads, precision)(*cast)
    rows.append(common.progress(dict(
        name=f"ssd chunked {name}", check="ssd", variant=name, shape=f"{batch}x{steps}",
        y_rel_err=relative_error(y, ref_y), grad_rel_err=relative_error(grads, ref_grads),
        finite=all_finite((y, grads)))))
  return rows


def model_rows(preset: str, seconds: float) -> list[dict]:
  """Separated waveform, official loss and parameter gradients, against fp32 highest."""
  base = ModelConfig.preset(preset)
  params = init_params(base, jax.random.PRNGKey(0))
  samples = int(round(seconds * base.sample_rate))
  rng = np.random.default_rng(0)
  audio = jnp.asarray(0.1 * rng.standard_normal((1, base.audio_channels, samples)), jnp.float32)
  target = 0.5 * audio
  loss_fn = get_loss("official")

  def run(dtype_name: str, precision: str):
    model = BSMamba2(ModelConfig.from_dict(dict(base.to_dict(), dtype=dtype_name)))

    def loss_and_output(p):
      estimate = model.apply({"params": p}, audio)
      return loss_fn(estimate, target), estimate

    fn = jax.value_and_grad(loss_and_output, has_aux=True)
    (loss, estimate), grads = _with_precision(fn, precision)(params)
    return float(loss), np.asarray(estimate, np.float32), grads

  ref_loss, ref_out, ref_grads = run("float32", "highest")
  rows = [common.progress(dict(name=f"{preset} highest", check="model", variant="fp32 highest",
                               shape=f"{seconds:g} s", loss=ref_loss,
                               finite=all_finite((ref_out, ref_grads))))]
  for name, dtype, precision in VARIANTS:
    loss, out, grads = run(jnp.dtype(dtype).name, precision)
    err = relative_error(out, ref_out)
    rows.append(common.progress(dict(
        name=f"{preset} {name}", check="model", variant=name, shape=f"{seconds:g} s", loss=loss,
        y_rel_err=err, sdr_db=float(-20 * np.log10(err)) if err > 0 else None,
        loss_rel_err=abs(loss - ref_loss) / abs(ref_loss),
        grad_rel_err=relative_error(grads, ref_grads), finite=all_finite((out, grads, loss)))))
  return rows


def run(mode: str = "default") -> tuple[list[dict], str]:
  if mode not in SETTINGS:
    raise ValueError(f"precision: unknown mode {mode!r}; choose from {MODES}")
  settings = SETTINGS[mode]
  rows = scan_rows(*settings["scan"])
  if settings["model"]:
    rows += model_rows(*settings["model"])
  text = (common.format_table(rows, ["check", "variant", "shape", "loss", "y_rel_err",
                                     "sdr_db", "loss_rel_err", "grad_rel_err", "finite"])
          + f"\n\nReference: fp32 with matmul precision \"highest\" on {jax.default_backend()}. "
          "rel_err = ‖out − ref‖ / ‖ref‖ (gradients: every parameter together); sdr_db = "
          "20·log10(‖ref‖/‖out − ref‖) of the separated waveform; model: initial parameters, "
          "random stereo noise, official loss against half the input."
          + ("" if settings["model"] else " Mode gpu: the scan only (the model check's compiles "
             "do not fit the mode's time)."))
  return rows, text
