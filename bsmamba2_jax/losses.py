"""Training objectives on waveforms (docs/training.md §4).

Both losses are `10 · mean|ŷ − y|` on waveforms plus a sum over resolutions of
a mean STFT L1, each resolution using a periodic Hann window of `win` samples
centred in n_fft = max(win, 2048), hop 147, center + reflect:

* `official_loss`: windows {4096, 2048, 1024, 512, 256}, complex-modulus L1
  `mean|STFT(ŷ) − STFT(y)|`.
* `fast_loss` (the seed's variant, an option only): windows {2048, 1024, 512},
  magnitude L1 `mean| |STFT(ŷ)| − |STFT(y)| |`.

The target first passes through the model's STFT→iSTFT (n_fft 2048, hop 441)
so that the loss ignores what the front end cannot represent. Windows are
NumPy constants built once per trace (`stft` caches them). Everything runs in
float32. Moduli use a safe square root and real L1 terms torch's subgradient,
so gradients are finite, and zero, where estimate == target.
"""

import functools

import jax
import jax.numpy as jnp

from bsmamba2_jax import stft

OFFICIAL_WINDOWS = (4096, 2048, 1024, 512, 256)
FAST_WINDOWS = (2048, 1024, 512)
MIN_N_FFT = 2048
HOP = 147
TIME_WEIGHT = 10.0


def _safe_abs(z: jnp.ndarray) -> jnp.ndarray:
  """|z| with gradient 0 (not NaN) at z == 0."""
  sq = jnp.real(z) ** 2 + jnp.imag(z) ** 2
  nonzero = sq > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def _mean_abs(x: jnp.ndarray) -> jnp.ndarray:
  """mean|x| for real x with torch's subgradient sign(x) (0 at 0, not JAX's 1)."""
  return jnp.mean(x * jax.lax.stop_gradient(jnp.sign(x)))


def roundtrip(y: jnp.ndarray, n_fft: int = 2048,
              hop_length: int = 441) -> jnp.ndarray:
  """istft(stft(y)) with the model's front end: (..., N) -> (..., N)."""
  spec = stft.stft(y, n_fft, hop_length)
  return stft.istft(spec, n_fft, hop_length, length=y.shape[-1])


def _check_pair(name, estimate, target):
  estimate = jnp.asarray(estimate)
  target = jnp.asarray(target)
  if estimate.shape != target.shape or estimate.ndim < 1:
    raise ValueError(f"losses.{name}: estimate and target must be waveforms of "
                     f"the same shape (..., samples), got {estimate.shape} and "
                     f"{target.shape}.")
  for what, x in (("estimate", estimate), ("target", target)):
    if jnp.iscomplexobj(x):
      raise ValueError(f"losses.{name}: the {what} must be a real waveform, got dtype {x.dtype}.")
  return estimate.astype(jnp.float32), target.astype(jnp.float32)


def multi_resolution_loss(estimate, target, *, windows, magnitude: bool,
                          target_roundtrip: bool = True,
                          frontend_n_fft: int = 2048,
                          frontend_hop: int = 441,
                          name: str = "multi_resolution_loss"):
  """10·mean|ŷ−y| + Σ_win mean STFT L1 (complex or magnitude).

  Args:
    estimate, target: (..., samples) waveforms, e.g. (B, C, N).
    windows: Hann window lengths; n_fft = max(win, 2048), hop 147.
    magnitude: compare |STFT| (True) or the complex STFT (False).
    target_roundtrip: pass the target through the front end's STFT→iSTFT.
    frontend_n_fft, frontend_hop: that front end.
    name: used in error messages.

  Returns:
    () float32.
  """
  estimate, target = _check_pair(name, estimate, target)
  if target_roundtrip:
    target = roundtrip(target, frontend_n_fft, frontend_hop)
  loss = TIME_WEIGHT * _mean_abs(estimate - target)
  for win in windows:
    transform = functools.partial(stft.stft, n_fft=max(win, MIN_N_FFT), hop_length=HOP,
                                  win_length=win)
    if magnitude:
      diff = _safe_abs(transform(estimate)) - _safe_abs(transform(target))
      loss = loss + _mean_abs(diff)
    else:
      # The STFT is linear: one transform of the difference, not two.
      loss = loss + jnp.mean(_safe_abs(transform(estimate - target)))
  return loss


def official_loss(estimate, target, *, target_roundtrip: bool = True,
                  frontend_n_fft: int = 2048, frontend_hop: int = 441):
  """The official loss (docs/training.md §4), 5 complex resolutions: (B, C, N) x2 -> () float32."""
  return multi_resolution_loss(
      estimate, target, windows=OFFICIAL_WINDOWS, magnitude=False,
      target_roundtrip=target_roundtrip, frontend_n_fft=frontend_n_fft,
      frontend_hop=frontend_hop, name="official_loss")


def fast_loss(estimate, target, *, target_roundtrip: bool = True,
              frontend_n_fft: int = 2048, frontend_hop: int = 441):
  """Seed's variant, 3 magnitude resolutions: (B, C, N) x2 -> () float32."""
  return multi_resolution_loss(
      estimate, target, windows=FAST_WINDOWS, magnitude=True,
      target_roundtrip=target_roundtrip, frontend_n_fft=frontend_n_fft,
      frontend_hop=frontend_hop, name="fast_loss")


LOSSES = {"official": official_loss, "fast": fast_loss}


def get_loss(name: str):
  """The loss called `name` ("official" or "fast")."""
  if name not in LOSSES:
    raise ValueError(f"Unknown loss {name!r}; choose one of {sorted(LOSSES)}.")
  return LOSSES[name]
