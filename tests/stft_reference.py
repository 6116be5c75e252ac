"""float64 NumPy torch.stft / torch.istft (center=True, reflect), for tests."""

import numpy as np


def periodic_hann(n):
  return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)


def padded_window(n_fft, win_length):
  win = np.zeros(n_fft)
  left = (n_fft - win_length) // 2
  win[left:left + win_length] = periodic_hann(win_length)
  return win


def numpy_stft(x, n_fft, hop, win_length):
  """float64 torch.stft(center=True, reflect) written out directly."""
  half = n_fft // 2
  xp = np.pad(x.astype(np.float64), [(0, 0)] * (x.ndim - 1) + [(half, half)],
              mode="reflect")
  n_frames = 1 + (xp.shape[-1] - n_fft) // hop
  idx = np.arange(n_frames)[:, None] * hop + np.arange(n_fft)[None, :]
  frames = xp[..., idx] * padded_window(n_fft, win_length)
  return np.swapaxes(np.fft.rfft(frames, axis=-1), -1, -2)


def numpy_istft(spec, n_fft, hop, length, win_length):
  """float64 torch.istft(center=True, length=length) written out directly."""
  win = padded_window(n_fft, win_length)
  frames = np.fft.irfft(np.swapaxes(spec, -1, -2), n=n_fft, axis=-1) * win
  n_frames = frames.shape[-2]
  full = n_fft + hop * (n_frames - 1)
  y = np.zeros(frames.shape[:-2] + (full,))
  env = np.zeros(full)
  for t in range(n_frames):
    y[..., t * hop:t * hop + n_fft] += frames[..., t, :]
    env[t * hop:t * hop + n_fft] += win ** 2
  half = n_fft // 2
  end = min(half + length, full)
  y = y[..., half:end] / env[half:end]
  return np.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, length - (end - half))])
