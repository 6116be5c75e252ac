"""absl launchers, configs and benchmarks of bsmamba2-jax.

Importing `bsmamba2_jax` first sets its XLA:CPU flags before any launcher starts JAX's backend.
"""
import bsmamba2_jax  # noqa: F401  pylint: disable=unused-import
