"""bsmamba2-jax: BSMamba2 vocal separation in JAX/Flax, exact to the official PyTorch graph.

  from bsmamba2_jax import Separator
  stems = Separator.from_checkpoint("exports/official").separate(audio, sample_rate)

Public names are imported on first use, so `import bsmamba2_jax` is instant and
`import bsmamba2_jax.ssd` stays light. Importing changes nothing in the process (no environment
variable, JAX setting or stdout); programs make their process-wide settings with
`bsmamba2_jax.runtime.configure()`. WORKSPACE.md maps the modules.
"""
import importlib

_EXPORTS = {
    "ModelConfig": "bsmamba2_jax.config",
    "BSMamba2": "bsmamba2_jax.model",
    "init_params": "bsmamba2_jax.model",
    "ssd_scan": "bsmamba2_jax.ssd",
    "load_model": "bsmamba2_jax.exports",
    "save_inference": "bsmamba2_jax.exports",
    "Separator": "bsmamba2_jax.separator",
    "separate_files": "bsmamba2_jax.separate",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'bsmamba2_jax' has no attribute {name!r}")
