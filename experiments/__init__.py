"""The programs of bsmamba2-jax: thin absl launchers, ml_collections configs and benchmarks.

Each launcher's `main` makes the process-wide settings first (`bsmamba2_jax.runtime.configure`),
then calls one library function; flag helpers shared by the launchers are in `experiments.cli`.
Importing this package does nothing.
"""
