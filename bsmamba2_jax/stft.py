"""STFT / iSTFT with the semantics of torch.stft / torch.istft (docs/model.md §1).

Periodic Hann window, `center=True` with reflect padding of n_fft // 2 on each
side, unnormalised, onesided. A window shorter than n_fft (`win_length`) is
zero-padded to n_fft, centred, as torch does.

Framing gathers whole frames (vmapped dynamic slices, one start per frame);
overlap-add is its linear transpose, a scatter-add of whole frames. On XLA:CPU
this beats both element-index gathers and reshape/pad framing, forward and
backward. The transforms always run in float32 / complex64, whatever the input
dtype, so a bf16 model still sees an fp32 front end.

Shapes: waveforms (..., samples); spectra (..., n_fft // 2 + 1, frames) with
frames = 1 + (samples + 2 · (n_fft // 2) - n_fft) // hop_length, which is
1 + samples // hop_length for an even n_fft (odd n_fft frame one sample less).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def _window_np(n_fft: int, win_length: int) -> np.ndarray:
  """Periodic Hann of `win_length`, zero-padded centred to (n_fft,) float32."""
  k = np.arange(win_length, dtype=np.float64)
  window = 0.5 - 0.5 * np.cos(2.0 * np.pi * k / win_length)
  left = (n_fft - win_length) // 2
  padded = np.zeros(n_fft, np.float64)
  padded[left:left + win_length] = window
  padded = padded.astype(np.float32)
  padded.setflags(write=False)
  return padded


def hann_window(n: int) -> jnp.ndarray:
  """Periodic Hann window, torch.hann_window(n): (n,) float32."""
  if n < 1:
    raise ValueError(f"hann_window: length must be >= 1, got {n}.")
  return jnp.asarray(_window_np(n, n))


def _check_params(fn: str, n_fft: int, hop_length: int, win_length):
  if n_fft < 2 or hop_length < 1:
    raise ValueError(f"{fn}: need n_fft >= 2 and hop_length >= 1, got "
                     f"n_fft={n_fft}, hop_length={hop_length}.")
  win_length = n_fft if win_length is None else win_length
  if not 1 <= win_length <= n_fft:
    raise ValueError(f"{fn}: win_length must lie in [1, n_fft={n_fft}], got "
                     f"{win_length}.")
  return win_length


def _frame(x: jnp.ndarray, n_fft: int, hop: int) -> jnp.ndarray:
  """Frames of a padded signal: (..., P) -> (..., 1 + (P - n_fft) // hop, n_fft)."""
  starts = jnp.arange(1 + (x.shape[-1] - n_fft) // hop) * hop
  take = lambda start: jax.lax.dynamic_slice_in_dim(x, start, n_fft, axis=-1)
  return jax.vmap(take, out_axes=-2)(starts)


def _overlap_add(frames: jnp.ndarray, hop: int) -> jnp.ndarray:
  """Overlap-add (..., T, n_fft) -> (..., n_fft + hop * (T - 1)).

  The transpose of `_frame`: a scatter-add of whole frames.
  """
  *lead, n_frames, n_fft = frames.shape
  signal = jax.ShapeDtypeStruct((*lead, n_fft + hop * (n_frames - 1)),
                                frames.dtype)
  frame = functools.partial(_frame, n_fft=n_fft, hop=hop)
  return jax.linear_transpose(frame, signal)(frames)[0]


def stft(x, n_fft: int = 2048, hop_length: int = 441, win_length=None):
  """torch.stft(center=True, pad_mode='reflect', onesided, unnormalised).

  Args:
    x: (..., samples) real waveform; computed in float32.
    n_fft, hop_length, win_length: static ints (win_length defaults to n_fft).

  Returns:
    (..., n_fft // 2 + 1, frames) complex64, frames = 1 + samples // hop_length
    for an even n_fft (the module docstring gives the general count).
  """
  win_length = _check_params("stft", n_fft, hop_length, win_length)
  x = jnp.asarray(x)
  if jnp.iscomplexobj(x):
    raise ValueError(f"stft: expects a real waveform, got dtype {x.dtype}.")
  if x.ndim < 1:
    raise ValueError("stft: expects an array (..., samples), got a scalar.")
  n = x.shape[-1]
  half = n_fft // 2
  if n <= half:
    raise ValueError(f"stft: reflect padding of n_fft // 2 = {half} needs more "
                     f"than {half} samples, got {n} (shape {x.shape}).")
  x = x.astype(jnp.float32)
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(half, half)], mode="reflect")
  frames = _frame(x, n_fft, hop_length)
  frames = frames * _window_np(n_fft, win_length)
  spec = jnp.fft.rfft(frames, n=n_fft, axis=-1)  # (..., frames, freq)
  return jnp.swapaxes(spec, -1, -2).astype(jnp.complex64)


@functools.lru_cache(maxsize=None)
def _envelope_np(n_fft: int, hop: int, win_length: int, n_frames: int):
  """Summed squared window of the overlap-add, (samples,) float64."""
  w2 = _window_np(n_fft, win_length).astype(np.float64) ** 2
  env = np.zeros(n_fft + hop * (n_frames - 1))
  for t in range(n_frames):
    env[t * hop:t * hop + n_fft] += w2
  env.setflags(write=False)
  return env


def istft(spec, n_fft: int = 2048, hop_length: int = 441, length=None,
          win_length=None):
  """torch.istft(center=True, onesided, unnormalised, length=length).

  Windowed overlap-add divided by the summed squared window, the n_fft // 2
  centre padding removed, then cropped (or zero-padded) to `length`.

  Args:
    spec: (..., n_fft // 2 + 1, frames) complex.
    n_fft, hop_length, win_length: static ints (win_length defaults to n_fft).
    length: static int, output samples; default n_fft // 2 removed from both
      ends, i.e. hop_length * (frames - 1) (+1 for an odd n_fft), as torch.

  Returns:
    (..., length) float32.
  """
  win_length = _check_params("istft", n_fft, hop_length, win_length)
  spec = jnp.asarray(spec)
  n_freq = n_fft // 2 + 1
  if spec.ndim < 2 or spec.shape[-2] != n_freq:
    raise ValueError(f"istft: expects (..., n_fft // 2 + 1 = {n_freq}, frames), "
                     f"got shape {spec.shape}.")
  n_frames = spec.shape[-1]
  half = n_fft // 2
  full = n_fft + hop_length * (n_frames - 1)
  if length is None:
    length = full - 2 * half
  if length < 0:
    raise ValueError(f"istft: length must be >= 0, got {length}.")
  end = min(half + length, full)
  env = _envelope_np(n_fft, hop_length, win_length, n_frames)[half:end]
  if env.size and env.min() < 1e-11:
    raise ValueError(
        f"istft: window overlap-add is ~0 inside the output (NOLA fails) for "
        f"n_fft={n_fft}, hop_length={hop_length}, win_length={win_length}.")
  spec = jnp.swapaxes(spec.astype(jnp.complex64), -1, -2)
  frames = jnp.fft.irfft(spec, n=n_fft, axis=-1)
  frames = frames * _window_np(n_fft, win_length)
  y = _overlap_add(frames, hop_length)[..., half:end]
  y = y * (1.0 / env).astype(np.float32)
  if end - half < length:
    y = jnp.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, length - (end - half))])
  return y.astype(jnp.float32)
