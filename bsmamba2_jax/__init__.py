"""bsmamba2-jax: BSMamba2 vocal separation in JAX/Flax, exact to the official PyTorch graph.

  from bsmamba2_jax import Separator
  stems = Separator.from_checkpoint("exports/official").separate(audio, sample_rate)

Public names are imported on first use, so `import bsmamba2_jax.ssd` stays light.

Importing the package turns off XLA:CPU's YNNPACK fusions under jaxlib 0.10 (see
`_tune_xla_cpu`), before JAX starts its backend; set the flag yourself in `XLA_FLAGS` to override.
"""
import importlib
import importlib.metadata
import os

_EXPORTS = {
    "ModelConfig": "bsmamba2_jax.model",
    "BSMamba2": "bsmamba2_jax.model",
    "init_params": "bsmamba2_jax.model",
    "ssd_scan": "bsmamba2_jax.ssd",
    "load_model": "bsmamba2_jax.checkpoints",
    "save_inference": "bsmamba2_jax.checkpoints",
    "Separator": "bsmamba2_jax.separation",
    "separate_files": "bsmamba2_jax.separation",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def _tune_xla_cpu() -> None:
  """Adds `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK fusions) to XLA_FLAGS.

  jaxlib 0.10 routes reductions, elementwise ops and small dots through YNNPACK fusions that run
  this model 1.4-2x slower on CPU: the chunked scan's fwd+bwd at 62x801 6.6 s -> 4.3 s, the tiny
  training step 4.0 s -> 2.0 s (2-core VM, benchmarks/results). jaxlib 0.12 does not need it.
  Only effective if JAX's CPU backend has not started yet; a flag the user set is kept.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if YNN_FLAG in flags:
    return
  try:
    jaxlib_version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return
  if jaxlib_version.startswith("0.10."):
    os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=".strip()


_tune_xla_cpu()


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'bsmamba2_jax' has no attribute {name!r}")
