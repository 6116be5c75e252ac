"""Synthetic multitrack songs: a formant singer, drums, bass and pads, one key and tempo per song.

Every song has a key, tempo and a one-chord-per-bar progression shared by all stems:
  vocals  a source-filter singing voice: a band-limited sawtooth glottal source following a
          melody (portamento, delayed vibrato, pitch drift) through time-varying vowel formants
          (a, e, i, o, u), consonant noise bursts before notes, phrases separated by rests;
          `vocal_density` is the fraction of bars sung, so sparse-vocal songs exist;
  drums   kick, snare and (open) hi-hats on 16-step patterns with fills;
  bass    low notes on the chord roots (and fifths/octaves) in eighth-note patterns;
  other   a chord pad and/or arpeggiated plucks.
Each stem is panned in stereo (vocals and other get a short noise reverb). Vocals sit between
-3 and +3 dB relative to the accompaniment where they sing; the mixture peaks below 0.95.
Everything is a function of (seed, split code, track index): same seed, same samples.
`synthetic` writes these songs as a dataset.
"""
from __future__ import annotations

import numpy as np
import scipy.signal

SAMPLE_RATE = 44100
SOURCES = ("vocals", "drums", "bass", "other")

_SCALES = (np.array([0, 2, 4, 5, 7, 9, 11]), np.array([0, 2, 3, 5, 7, 8, 10]))  # major, minor
_PROGRESSIONS = ((0, 4, 5, 3), (5, 3, 0, 4), (0, 5, 3, 4), (0, 3, 4, 4), (0, 3, 0, 4),
                 (5, 4, 3, 4), (0, 6, 5, 4))
# Soprano vowel formants (Csound manual, "Formant values" appendix): frequencies (Hz) and
# bandwidths (Hz) of F1..F4 for a, e, i, o, u. The levels (dB) are ours: the table's F3/F4 sit
# 20-40 dB below F1, a dull voice that the accompaniment buries above 1.2 kHz; these keep its
# shape but raise F2-F4 to 6-20 dB below F1, like a close-miked pop vocal with its presence
# region (2-4 kHz) level with the accompaniment (format version 3).
_VOWEL_FREQ = np.array([[800, 1150, 2900, 3900], [350, 2000, 2800, 3600], [270, 2140, 2950, 3900],
                        [450, 800, 2830, 3800], [325, 700, 2700, 3800]], np.float64)
_VOWEL_BW = np.array([[80, 90, 120, 130], [60, 100, 120, 150], [60, 90, 100, 120],
                      [70, 80, 100, 130], [50, 60, 170, 180]], np.float64)
_VOWEL_DB = np.array([[0, -6, -14, -16], [0, -12, -10, -18], [0, -8, -12, -16],
                      [0, -8, -14, -16], [0, -12, -16, -20]], np.float64)
_KICKS = ((0, 8), (0, 6, 8), (0, 10), (0, 3, 8, 11), (0, 8, 10), (0, 7, 10))


class _Song:
  """The shared musical plan of one track: key, scale, tempo, chords, bar grid."""

  def __init__(self, rng: np.random.Generator, seconds: float):
    self.num_samples = int(round(seconds * SAMPLE_RATE))
    self.key = int(rng.integers(0, 12))
    self.scale = _SCALES[int(rng.integers(0, 2))]
    self.bpm = float(rng.uniform(80, 140))
    self.step_s = 60.0 / self.bpm / 4  # one sixteenth
    self.bar_s = 16 * self.step_s
    self.num_bars = int(np.ceil(seconds / self.bar_s)) + 1
    progression = _PROGRESSIONS[int(rng.integers(0, len(_PROGRESSIONS)))]
    self.chords = np.array([progression[b % len(progression)] for b in range(self.num_bars)])

  def pitch(self, degree, octave_midi: int):
    """MIDI pitch of scale `degree` (any integer, wraps into octaves) above `octave_midi`."""
    degree = np.asarray(degree)
    return octave_midi + self.key + 12 * (degree // 7) + self.scale[degree % 7]

  def chord_tones(self, bar: int) -> np.ndarray:
    """Scale degrees of the triad of `bar`: (3,)."""
    return self.chords[bar] + np.array([0, 2, 4])


def _midi_hz(midi):
  return 440.0 * 2.0 ** ((np.asarray(midi, np.float64) - 69.0) / 12.0)


def _pan(x: np.ndarray, position: float) -> np.ndarray:
  """Constant-power pan of mono (N,) to stereo (2, N); position in [-1 (left), 1 (right)]."""
  angle = (position + 1.0) * np.pi / 4
  return np.stack([np.cos(angle) * x, np.sin(angle) * x])


def _timeline(onsets: np.ndarray, durations: np.ndarray, n: int):
  """Per-sample note index (clamped to 0), seconds since its onset, and "note sounding" mask.

  onsets, durations: (notes,) seconds, onsets sorted. Returns three (n,) arrays.
  """
  t = np.arange(n) / SAMPLE_RATE
  index = np.searchsorted(onsets, t, side="right") - 1
  started = index >= 0
  index = np.maximum(index, 0)
  tau = t - onsets[index]
  return index, tau, started & (tau < durations[index])


def _saw(freq: np.ndarray) -> np.ndarray:
  """Band-limited (PolyBLEP) sawtooth in [-1, 1] following per-sample `freq` (N,) Hz."""
  dt = freq / SAMPLE_RATE
  phase = np.cumsum(dt) % 1.0
  y = 2.0 * phase - 1.0
  low = phase < dt
  u = phase[low] / dt[low]
  y[low] -= 2 * u - u * u - 1
  high = phase > 1.0 - dt
  u = (phase[high] - 1.0) / dt[high]
  y[high] -= u * u + 2 * u + 1
  return y


def _lowpass(x: np.ndarray, cutoff_hz: float) -> np.ndarray:
  """Two cascaded one-pole low-pass filters (12 dB/octave)."""
  a = np.exp(-2 * np.pi * cutoff_hz / SAMPLE_RATE)
  for _ in range(2):
    x = scipy.signal.lfilter([1 - a], [1, -a], x)
  return x


def _band_noise(rng: np.random.Generator, n: int, low_hz: float, high_hz: float) -> np.ndarray:
  """White noise band-limited to [low_hz, high_hz] by an FFT mask, unit RMS: (n,)."""
  spectrum = np.fft.rfft(rng.standard_normal(n))
  freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
  spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0
  y = np.fft.irfft(spectrum, n)
  return y / (np.sqrt(np.mean(y**2)) + 1e-12)


def _envelope(tau: np.ndarray, sounding: np.ndarray, durations: np.ndarray, index: np.ndarray,
              attack: float, release: float) -> np.ndarray:
  """Linear attack/release gate of each note: (N,) in [0, 1]."""
  rise = np.clip(tau / attack, 0, 1)
  fall = np.clip((durations[index] - tau) / release, 0, 1)
  return np.where(sounding, rise * fall, 0.0)


def _reverb(rng: np.random.Generator, x: np.ndarray, seconds: float, wet: float) -> np.ndarray:
  """Stereo (2, N) → (2, N) plus a decaying-noise reverb tail, decorrelated per channel."""
  t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
  ir = rng.standard_normal((2, t.size)) * np.exp(-6.9 * t / seconds)  # -60 dB at `seconds`
  ir /= np.sqrt(np.sum(ir**2, axis=1, keepdims=True))
  tail = scipy.signal.oaconvolve(x, ir, axes=1)[:, :x.shape[1]]
  # The tail of silence is silence: zero wherever the dry signal was silent for the whole IR
  # (FFT round-off leaves ~1e-17 there, which cSDR's silent-frame rule would count as sound).
  sounded = np.cumsum(np.any(x != 0, axis=0))  # sounding samples up to each one
  before = np.concatenate([np.zeros(t.size, sounded.dtype), sounded])[:sounded.size]
  return x + wet * tail * (sounded - before > 0)


def _drums(rng: np.random.Generator, song: _Song) -> np.ndarray:
  """Kick, snare and hats on 16-step patterns with a fill every fourth bar: (2, N)."""
  n = song.num_samples
  t = np.arange(int(0.5 * SAMPLE_RATE)) / SAMPLE_RATE
  f_kick = rng.uniform(40, 55) + rng.uniform(80, 140) * np.exp(-t / 0.035)
  kick = np.sin(2 * np.pi * np.cumsum(f_kick) / SAMPLE_RATE) * np.exp(-t / rng.uniform(0.1, 0.2))
  snare = (_band_noise(rng, t.size, 800, 9000) * 0.5 * np.exp(-t / rng.uniform(0.06, 0.14))
           + np.sin(2 * np.pi * rng.uniform(170, 230) * t) * np.exp(-t / 0.05))
  hat = _band_noise(rng, t.size, 6500, 16000) * 0.25 * np.exp(-t / rng.uniform(0.015, 0.035))
  open_hat = _band_noise(rng, t.size, 6000, 16000) * 0.2 * np.exp(-t / rng.uniform(0.1, 0.2))

  kick_steps = _KICKS[int(rng.integers(0, len(_KICKS)))]
  hat_every = int(rng.choice([1, 2, 2]))
  hits = {name: np.zeros(n) for name in ("kick", "snare", "hat", "open_hat")}

  def hit(name, bar, step, velocity):
    i = int(round((bar * 16 + step) * song.step_s * SAMPLE_RATE))
    if i < n:
      hits[name][i] += velocity

  for bar in range(song.num_bars):
    for step in kick_steps:
      hit("kick", bar, step, rng.uniform(0.85, 1.0))
    for step in (4, 12):
      hit("snare", bar, step, rng.uniform(0.85, 1.0))
    if bar % 4 == 3:  # fill
      for step in (13, 14, 15):
        hit("snare", bar, step, rng.uniform(0.4, 0.8))
    for step in range(0, 16, hat_every):
      name = "open_hat" if step == 14 and rng.random() < 0.5 else "hat"
      hit(name, bar, step, (1.0 if step % 4 == 0 else 0.6) * rng.uniform(0.7, 1.0))
    if rng.random() < 0.3:  # ghost snare
      hit("snare", bar, int(rng.choice([7, 9, 15])), rng.uniform(0.15, 0.3))

  parts = {"kick": (kick, 0.0), "snare": (snare, rng.uniform(-0.1, 0.1)),
           "hat": (hat, rng.uniform(-0.4, 0.4)), "open_hat": (open_hat, rng.uniform(-0.4, 0.4))}
  out = np.zeros((2, n))
  for name, (sample, position) in parts.items():
    out += _pan(scipy.signal.oaconvolve(hits[name], sample)[:n], position)
  return out


def _bass(rng: np.random.Generator, song: _Song) -> np.ndarray:
  """Chord roots (with fifths/octaves) in eighth notes, a filtered saw plus sub sine: (2, N)."""
  # Semitones above the chord root per eighth note (None: rest).
  patterns = ((0, 0, 0, 0, 0, 0, 0, 0), (0, None, 0, 12, 0, None, 0, 12), (0, 0, 7, 0, 0, 0, 7, 12),
              (0, None, None, 0, None, None, 0, None))
  pattern = patterns[int(rng.integers(0, len(patterns)))]
  onsets, durations, midis = [], [], []
  for bar in range(song.num_bars):
    root = song.pitch(song.chords[bar], 28)
    for k, offset in enumerate(pattern):
      if offset is None:
        continue
      onsets.append((bar * 16 + 2 * k) * song.step_s)
      durations.append(2 * song.step_s * rng.uniform(0.6, 0.95))
      midis.append(root + offset)
  onsets, durations = np.array(onsets), np.array(durations)
  index, tau, sounding = _timeline(onsets, durations, song.num_samples)
  freq = _midi_hz(np.array(midis))[index]
  tone = _lowpass(_saw(freq), rng.uniform(250, 700)) + 0.6 * np.sin(
      2 * np.pi * np.cumsum(freq) / SAMPLE_RATE)
  env = _envelope(tau, sounding, durations, index, 0.005, 0.03) * (0.6 + 0.4 * np.exp(-tau / 0.2))
  return _pan(tone * env, rng.uniform(-0.1, 0.1))


def _other(rng: np.random.Generator, song: _Song) -> np.ndarray:
  """A chord pad (three panned voices) and/or arpeggiated plucks: (2, N)."""
  n = song.num_samples
  kind = rng.choice(["pad", "pluck", "both"])
  out = np.zeros((2, n))
  if kind in ("pad", "both"):
    onsets = np.arange(song.num_bars) * song.bar_s
    durations = np.full(song.num_bars, song.bar_s)
    index, tau, sounding = _timeline(onsets, durations, n)
    env = _envelope(tau, sounding, durations, index, 0.2, 0.2)
    cutoff = rng.uniform(1200, 3000)
    for voice, position in enumerate((-0.6, 0.0, 0.6)):
      midis = np.array([song.pitch(song.chord_tones(b)[voice], 52) for b in range(song.num_bars)])
      freq = _midi_hz(midis)[index] * (1 + 0.002 * (voice - 1))
      out += _pan(_lowpass(_saw(freq), cutoff) * env * 0.5, position)
  if kind in ("pluck", "both"):
    step = int(rng.choice([1, 2]))
    order = rng.permutation(np.array([0, 1, 2, 3]))
    onsets, durations, midis = [], [], []
    for bar in range(song.num_bars):
      tones = np.append(song.chord_tones(bar), song.chord_tones(bar)[0] + 7)
      for k, s in enumerate(range(0, 16, step)):
        onsets.append((bar * 16 + s) * song.step_s)
        durations.append(step * song.step_s)
        midis.append(song.pitch(tones[order[k % 4]], 64))
    onsets, durations = np.array(onsets), np.array(durations)
    index, tau, sounding = _timeline(onsets, durations, n)
    tone = _lowpass(_saw(_midi_hz(np.array(midis))[index]), rng.uniform(1500, 4000))
    env = _envelope(tau, sounding, durations, index, 0.002, 0.01) * np.exp(-tau / 0.15)
    out += _pan(tone * env, rng.uniform(-0.5, 0.5))
  return _reverb(rng, out, rng.uniform(0.2, 0.5), rng.uniform(0.1, 0.3))


def _phrases(rng: np.random.Generator, song: _Song, density: float) -> list[tuple[int, int]]:
  """(first bar, bars) of each sung phrase; about `density` of the bars are sung."""
  phrases, bar = [], int(rng.integers(0, 2))
  while bar < song.num_bars:
    length = int(rng.integers(2, 5))
    phrases.append((bar, length))
    mean_rest = length * (1 - density) / max(density, 1e-3)
    bar += length + int(round(rng.uniform(0.5, 1.5) * mean_rest))
  return phrases


def _formant_filter(x: np.ndarray, freq: np.ndarray, bw: np.ndarray, level: np.ndarray,
                    frame: int = 1024) -> np.ndarray:
  """Filters (N,) by a time-varying sum of formant resonances, windowed overlap-add.

  freq, bw, level: (frames, 4) formant frequencies (Hz), bandwidths (Hz), linear levels for the
  frames starting at multiples of frame/2. A periodic Hann at 50 % overlap sums to one, so a
  flat response returns x unchanged.
  """
  hop, n = frame // 2, x.size
  num_frames = freq.shape[0]
  padded = np.zeros((num_frames + 2) * hop + 2 * frame)
  padded[frame:frame + n] = x
  starts = frame - hop + np.arange(num_frames) * hop  # frame f covers x[(f-1)*hop, (f+1)*hop)
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame) / frame)
  frames = padded[starts[:, None] + np.arange(frame)] * window
  spectrum = np.fft.rfft(frames, 2 * frame, axis=1)  # zero padding: no circular wrap
  f = np.fft.rfftfreq(2 * frame, 1 / SAMPLE_RATE)
  response = np.zeros(spectrum.shape, np.float32)
  for k in range(freq.shape[1]):
    distance = (f[None, :] - freq[:, k:k + 1]) / (0.5 * bw[:, k:k + 1])
    response += (level[:, k:k + 1] / (1 + distance**2)).astype(np.float32)
  filtered = np.fft.irfft(spectrum * response, 2 * frame, axis=1)
  filtered = np.roll(filtered, hop, axis=1)  # zero-phase response: move t<0 in front
  # Frame f lands on hop blocks f..f+3 of the padded signal.
  out = np.zeros((padded.size // hop, hop))
  for k, block in enumerate(filtered.reshape(num_frames, 4, hop).transpose(1, 0, 2)):
    out[k:k + num_frames] += block
  return out.reshape(-1)[frame:frame + n]


def _vocals(rng: np.random.Generator, song: _Song, density: float) -> tuple[np.ndarray, np.ndarray]:
  """A sung melody: ((2, N) stereo vocals, (N,) bool mask of sung samples)."""
  n = song.num_samples
  low = int(rng.integers(55, 64))  # register: lowest MIDI note
  onsets, durations, midis, vowels, velocities = [], [], [], [], []
  degree = 7
  for first, bars in _phrases(rng, song, density):
    s, end = first * 16, (first + bars) * 16 - int(rng.integers(1, 4))
    while s < end:
      length = int(min(rng.choice([2, 2, 3, 4, 4, 6, 8]), end - s))
      bar = s // 16
      if s % 4 == 0 and rng.random() < 0.6:  # strong beat: a chord tone near the last note
        tones = song.chord_tones(min(bar, song.num_bars - 1)) + 7 * np.arange(-1, 3)[:, None]
        tones = tones.ravel()
        degree = int(tones[np.argmin(np.abs(tones - degree))])
      else:
        degree += int(rng.choice([-2, -1, -1, 0, 1, 1, 2]))
      pitch = song.pitch(degree, 0)
      while pitch < low:
        degree, pitch = degree + 7, pitch + 12
      while pitch > low + 19:
        degree, pitch = degree - 7, pitch - 12
      onsets.append(s * song.step_s)
      durations.append(length * song.step_s * (0.75 if rng.random() < 0.15 else 1.0))
      midis.append(pitch)
      vowels.append(int(rng.integers(0, 5)))
      velocities.append(rng.uniform(0.7, 1.0))
      s += length
  onsets, durations = np.array(onsets), np.array(durations)
  if onsets.size == 0:
    return np.zeros((2, n)), np.zeros(n, bool)
  index, tau, sounding = _timeline(onsets, durations, n)
  t = np.arange(n) / SAMPLE_RATE

  # Pitch: portamento (one-pole glide on the MIDI curve), delayed vibrato, slow drift.
  glide = np.exp(-1 / (rng.uniform(0.02, 0.05) * SAMPLE_RATE))
  pitch = np.array(midis, np.float64)[index]
  pitch = scipy.signal.lfilter([1 - glide], [1, -glide], pitch, zi=[glide * pitch[0]])[0]
  vibrato_depth = rng.uniform(0.2, 0.6) * np.clip((tau - 0.15) / 0.3, 0, 1)
  vibrato = vibrato_depth * np.sin(2 * np.pi * rng.uniform(4.8, 6.5) * t + rng.uniform(0, 6.3))
  drift = _lowpass(rng.standard_normal(n), 3.0)
  drift *= 0.1 / (np.std(drift) + 1e-12)
  source = _saw(_midi_hz(pitch + vibrato + drift))
  source += 0.05 * rng.standard_normal(n)  # breathiness

  # Vowels: formants of the sounding note per 512-sample frame, smoothed over ~30 ms.
  hop = 512
  frame_index = index[np.minimum(np.arange(0, n + hop, hop), n - 1)]
  vowel = np.array(vowels)[frame_index]
  shift = rng.uniform(0.9, 1.1)
  smooth = np.exp(-hop / (0.03 * SAMPLE_RATE))
  freq = scipy.signal.lfilter([1 - smooth], [1, -smooth], _VOWEL_FREQ[vowel] * shift, axis=0,
                              zi=smooth * _VOWEL_FREQ[vowel[:1]] * shift)[0]
  bw = _VOWEL_BW[vowel] * 1.5
  voiced = _formant_filter(source, freq, bw, 10 ** (_VOWEL_DB[vowel] / 20))

  env = _envelope(tau, sounding, durations, index, 0.03, 0.05)
  env *= np.array(velocities)[index] * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * t))
  voice = voiced * env

  # Consonants: noise bursts ending at the onsets of about a third of the notes.
  bands = {"s": (4500, 11000, 0.08, 0.5), "sh": (1800, 6000, 0.1, 0.4),
           "t": (2500, 9000, 0.015, 0.8), "h": (500, 5000, 0.06, 0.15)}
  voice_rms = np.sqrt(np.mean(voice[sounding]**2)) if sounding.any() else 1.0
  for lo, hi, length, level in bands.values():
    size = int(length * SAMPLE_RATE)
    burst = _band_noise(rng, 8 * size, lo, hi).reshape(8, size)  # eight distinct bursts
    burst *= level * voice_rms * np.sin(np.pi * np.arange(size) / size)**2
    chosen = (rng.random(onsets.size) < 0.1) & (onsets * SAMPLE_RATE < n)
    for k, onset in enumerate(onsets[chosen]):
      stop = int(onset * SAMPLE_RATE)
      start = max(0, stop - size)
      voice[start:stop] += burst[k % 8, size - (stop - start):]

  stereo = _reverb(rng, _pan(voice, rng.uniform(-0.15, 0.15)), rng.uniform(0.2, 0.6),
                   rng.uniform(0.05, 0.2))
  return stereo, sounding


def _rms(x: np.ndarray, mask: np.ndarray | None = None) -> float:
  x = x[:, mask] if mask is not None else x
  return float(np.sqrt(np.mean(x**2))) if x.size else 0.0


def synthesize_track(seed: int, split_code: int, index: int, seconds: float,
                     vocal_density: float) -> dict[str, np.ndarray]:
  """One song: {stem: float32 (2, N)} for the four sources and their sum "mixture"."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, split_code, index]))
  song = _Song(rng, seconds)
  vocals, sung = _vocals(rng, song, vocal_density)
  stems = {"drums": _drums(rng, song), "bass": _bass(rng, song), "other": _other(rng, song)}
  for name, level_db in (("drums", 0.0), ("bass", -2.0), ("other", -1.0)):
    stems[name] *= 10 ** ((level_db + rng.uniform(-2, 2)) / 20) / max(_rms(stems[name]), 1e-9)
  accompaniment = stems["drums"] + stems["bass"] + stems["other"]
  if sung.any():
    ratio = 10 ** (rng.uniform(-3, 3) / 20)
    vocals *= ratio * _rms(accompaniment, sung) / max(_rms(vocals, sung), 1e-9)
  stems["vocals"] = vocals
  stems = {name: stems[name] for name in SOURCES}
  peak = max(np.max(np.abs(vocals + accompaniment)), *(np.max(np.abs(s)) for s in stems.values()))
  scale = rng.uniform(0.6, 0.95) / max(peak, 1e-9)
  out = {name: (s * scale).astype(np.float32) for name, s in stems.items()}
  out["mixture"] = out["vocals"] + out["drums"] + out["bass"] + out["other"]
  return out
