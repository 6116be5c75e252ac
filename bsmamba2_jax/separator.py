"""The array path of separation: chunking, crossfade overlap-add and resampling, streamed.

The model sees fixed-shape chunks `(batch_size, channels, segment_samples)` at 44.1 kHz.
Everything around it streams, so memory does not grow with a signal's length:

  input blocks (input rate) -> soxr resample to 44.1 kHz -> `OverlapAdd` (chunks, batched
  model calls, crossfade) -> soxr resample back -> blocks of every stem aligned with the
  mixture -> for a one-stem model, accompaniment = mixture - stem.

Chunking (docs/separation.md): chunk k covers `[k·hop, k·hop + segment)` with `hop = segment -
overlap_samples`; the tail chunk is zero-padded. Every chunk is weighted by a trapezoid window
(linear ramps of `overlap_samples`, strictly positive) and the sum is divided by the accumulated
weights, so the weights of overlapping chunks sum to one everywhere, edges included. With
`overlap=0` the window is all ones: exactly the official mode (chunks, zero-padded tail,
concatenated, cropped).

Channels: a stereo model given mono input sees the channel duplicated and its two output
channels are averaged back to mono; a mono model given stereo input separates each channel as
its own batch item. More than two channels is an error. Files are read and written by
`bsmamba2_jax.separate` (and `audio_io`), around `Separator.stream`.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import soxr

MODEL_RATE = 44100
# What a one-stem vocals model writes: its stem, and the residual mixture - vocals.
STEMS = ("vocals", "accompaniment")
RESIDUAL = "accompaniment"
# Longest accepted segment: the model's memory grows with the chunk (it trained on 8 s).
MAX_SEGMENT_SECONDS = 600.0

ChunkFn = Callable[[np.ndarray], np.ndarray]


def crossfade_window(segment_samples: int, overlap_samples: int) -> np.ndarray:
  """Chunk weights (segment_samples,) float64: ones with linear ramps of `overlap_samples`.

  The ramps `(i + 0.5) / overlap` are strictly positive and complementary (up + down = 1), so
  consecutive chunks cross-fade; `overlap_samples = 0` gives all ones.
  """
  i = np.arange(segment_samples, dtype=np.float64)
  if overlap_samples == 0:
    return np.ones(segment_samples)
  up = (i + 0.5) / overlap_samples
  down = (segment_samples - i - 0.5) / overlap_samples
  return np.minimum(1.0, np.minimum(up, down))


class OverlapAdd:
  """Streaming chunked separation at the model rate.

  `push(block)` takes (C, n) float32 audio and returns the (O, m) outputs that are final so far
  (no later chunk touches them); `finish()` processes the zero-padded tail and returns the rest,
  so that the concatenated outputs have exactly the pushed length. O = `out_channels`, e.g. the
  channels of every stem one after another.
  """

  def __init__(self, separate_chunks: ChunkFn, channels: int, segment_samples: int,
               overlap_samples: int, batch_chunks: int, out_channels: int | None = None):
    """`separate_chunks` maps (k, C, segment_samples) chunks, k <= batch_chunks, to outputs
    (k, O, segment_samples); O = `out_channels` (default C)."""
    if not 0 <= overlap_samples < segment_samples:
      raise ValueError(f"overlap must be in [0, segment): got {overlap_samples} of "
                       f"{segment_samples} samples")
    self._fn = separate_chunks
    self._segment = segment_samples
    self._hop = segment_samples - overlap_samples
    self._batch = batch_chunks
    self._window = crossfade_window(segment_samples, overlap_samples)
    self._input = np.zeros((channels, 0), np.float32)  # starts at sample self._input_start
    self._input_start = 0
    self._pushed = 0
    self._next = 0  # index of the next chunk to cut
    self._pending: list[tuple[int, np.ndarray]] = []  # (chunk index, (C, S)) awaiting a batch
    self._acc = np.zeros((out_channels or channels, 0))  # weighted sum from self._emitted
    self._wsum = np.zeros(0)
    self._emitted = 0

  def push(self, block: np.ndarray) -> np.ndarray:
    """Adds (C, n) samples; returns the (O, m) outputs now final."""
    self._input = np.concatenate([self._input, block], axis=1)
    self._pushed += block.shape[1]
    while self._next * self._hop + self._segment <= self._pushed:
      self._cut()
    while len(self._pending) >= self._batch:
      self._run()
    return self._emit()

  def finish(self) -> np.ndarray:
    """Cuts the remaining (zero-padded) chunks, runs them and returns the last outputs."""
    while self._next == 0 or (self._next - 1) * self._hop + self._segment < self._pushed:
      self._cut()
    while self._pending:
      self._run()
    return self._emit(until=self._pushed)

  def _cut(self):
    start = self._next * self._hop - self._input_start
    chunk = self._input[:, start:start + self._segment]
    if chunk.shape[1] < self._segment:
      chunk = np.pad(chunk, ((0, 0), (0, self._segment - chunk.shape[1])))
    self._pending.append((self._next, chunk))
    self._next += 1
    drop = min(self._next * self._hop - self._input_start, self._input.shape[1])
    self._input = self._input[:, drop:]
    self._input_start += drop

  def _run(self):
    batch, self._pending = self._pending[:self._batch], self._pending[self._batch:]
    outputs = np.asarray(self._fn(np.stack([c for _, c in batch])), np.float64)
    end = (batch[-1][0] * self._hop + self._segment) - self._emitted
    if end > self._wsum.shape[0]:
      grow = end - self._wsum.shape[0]
      self._acc = np.pad(self._acc, ((0, 0), (0, grow)))
      self._wsum = np.pad(self._wsum, (0, grow))
    for (k, _), v in zip(batch, outputs):
      start = k * self._hop - self._emitted
      self._acc[:, start:start + self._segment] += v * self._window
      self._wsum[start:start + self._segment] += self._window

  def _emit(self, until: int | None = None) -> np.ndarray:
    if until is None:  # samples before the first unprocessed chunk are final
      until = (self._pending[0][0] if self._pending else self._next) * self._hop
    n = max(0, min(until - self._emitted, self._wsum.shape[0]))
    out = (self._acc[:, :n] / self._wsum[:n]).astype(np.float32)
    self._acc, self._wsum = self._acc[:, n:], self._wsum[n:]
    self._emitted += n
    return out


class Resampler:
  """Streaming soxr resampler on (C, n) float32 blocks; the identity when rates match."""

  def __init__(self, in_rate: int, out_rate: int, channels: int):
    self._stream = (None if in_rate == out_rate else
                    soxr.ResampleStream(in_rate, out_rate, channels, dtype="float32",
                                        quality="HQ"))

  def __call__(self, block: np.ndarray, last: bool = False) -> np.ndarray:
    if self._stream is None:
      return block
    out = self._stream.resample_chunk(np.ascontiguousarray(block.T), last=last)
    return np.ascontiguousarray(out.reshape(-1, block.shape[0]).T)


def jax_device(spec: str | None):
  """The JAX device `spec` names ("cpu", "gpu", "gpu:1", "tpu:0"; None: the default one);
  ValueError in one line naming what there is when it is not there."""
  import jax  # pylint: disable=g-import-not-at-top
  if spec is None:
    return jax.devices()[0]
  platform, _, index = spec.lower().partition(":")
  platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
  try:
    found = jax.devices(platform)
  except RuntimeError:
    found = []
  try:
    number = int(index) if index else 0
  except ValueError:
    number = -1
  if not 0 <= number < len(found):
    available = ", ".join(f"{d.platform}:{d.id}" for d in jax.devices())
    raise ValueError(f"--device {spec}: no such device here (JAX sees {available}; a GPU needs "
                     "JAX's CUDA build, see README)")
  return found[number]


class Separator:
  """Source separation of arrays and streams with a fixed-shape batched model function.

  `model_fn` maps (batch_size, channels, segment_samples) float32 mixtures at `sample_rate`
  (44.1 kHz) to the model's stems, named by `stems`: (batch_size, channels, segment_samples)
  for one stem, (batch_size, n, channels, segment_samples) for n. It is always called with
  exactly that shape (the last batch is zero-padded), so a jitted model compiles once. `stems`
  (the attribute) names what it gives: the model's stems, and for a one-stem model also the
  residual "accompaniment" = mixture − stem. With
  `fixed_batch=False` a last batch of k < batch_size chunks is padded only to the next power of
  two: a short file then costs what it holds, not a whole batch, for at most log2(batch_size)
  more compiled shapes (`from_model` does this). `shortest_segment`: the shortest chunk in
  seconds it accepts (a model's: one STFT window). `dtype`: the compute mode of a model's
  separator (`from_model`: "float32", "mixed" or "bfloat16"), None for a bare `model_fn`.
  """

  def __init__(self, model_fn: ChunkFn, *, sample_rate: int = MODEL_RATE,
               channels: int = 2, segment: float = 8.0, overlap: float = 0.25,
               batch_size: int = 1, shortest_segment: float = 0.0, fixed_batch: bool = True,
               stems: Sequence[str] = ("vocals",)):
    if sample_rate != MODEL_RATE:
      raise ValueError(f"the model must run at {MODEL_RATE} Hz, got sample_rate={sample_rate}")
    if channels not in (1, 2):
      raise ValueError(f"the model must have 1 or 2 channels, got {channels}")
    if not (0 < segment <= MAX_SEGMENT_SECONDS and segment >= shortest_segment):
      raise ValueError(f"segment must be positive seconds, at least {shortest_segment:.3f} "
                       f"(one STFT window of the model) and at most {MAX_SEGMENT_SECONDS:g}, "
                       f"got {segment}")
    if not 0 <= overlap < 1:
      raise ValueError(f"overlap must be a fraction in [0, 1), got {overlap}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.model_fn = model_fn
    self.model_stems = tuple(stems)
    self.stems = self.model_stems + ((RESIDUAL,) if len(self.model_stems) == 1 else ())
    self.sample_rate = sample_rate
    self.channels = channels
    self.segment = segment
    self.overlap = overlap
    self.batch_size = batch_size
    self.fixed_batch = fixed_batch
    self.dtype: str | None = None
    self.segment_samples = int(round(segment * sample_rate))
    self.overlap_samples = int(round(overlap * self.segment_samples))
    if self.overlap_samples >= self.segment_samples:
      raise ValueError(f"overlap {overlap} leaves no hop for a {segment}-s segment")

  @classmethod
  def from_model(cls, model, params, *, precision: str | None = None, device: str | None = None,
                 **kwargs) -> "Separator":
    """A separator around a `BSMamba2` module and its params, jitted per batch shape.

    precision: None keeps the model's dtype; "auto", "float32", "bfloat16" or "mixed" as
    `config.inference_dtype` resolves them on the device that runs it ("auto": bf16 operands
    with float32 accumulation on accelerators and on CPUs with bf16 dot units, else float32;
    the separator's `dtype` says which). device: "cpu", "gpu", "gpu:N" (or any JAX platform
    name), None for JAX's default device. On a CPU the blocks run over groups of sequences
    (`ModelConfig.block_tokens`) unless the model sets its own.
    """
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from bsmamba2_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    from bsmamba2_jax import runtime  # pylint: disable=g-import-not-at-top

    target = jax_device(device)
    compute = {}
    if precision is not None:
      cpu_bf16_dots = target.platform == "cpu" and runtime.cpu_has_bf16_dots()
      compute["dtype"] = config_lib.inference_dtype(precision, target.platform, cpu_bf16_dots)
    if target.platform == "cpu" and not model.config.block_tokens:
      compute["block_tokens"] = config_lib.CPU_BLOCK_TOKENS  # same numbers, faster on a CPU
    model = model.clone(config=model.config.with_compute(**compute))
    config = model.config
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    params = jax.device_put(params, target)

    def model_fn(chunks: np.ndarray) -> np.ndarray:
      return np.asarray(apply(params, jax.device_put(jnp.asarray(chunks, jnp.float32), target)))

    kwargs.setdefault("fixed_batch", False)  # jit compiles each batch shape on first use
    separator = cls(model_fn, sample_rate=config.sample_rate, channels=config.audio_channels,
                    shortest_segment=config.n_fft / config.sample_rate, stems=config.stems,
                    **kwargs)
    separator.dtype = config.dtype
    return separator

  @classmethod
  def from_checkpoint(cls, path: str, *, precision: str = "auto", **kwargs) -> "Separator":
    """A separator from an export directory or an official PyTorch checkpoint; `precision`
    (see `from_model`) applies whatever dtype the model was trained in."""
    from bsmamba2_jax import exports  # pylint: disable=g-import-not-at-top

    jax_device(kwargs.get("device"))  # a missing device is said before the model loads
    model, params = exports.load_model(path)
    return cls.from_model(model, params, precision=precision, **kwargs)

  @classmethod
  def from_pretrained(cls, name: str = "bsmamba2-vocals", *, progress: bool = True,
                      **kwargs) -> "Separator":
    """A separator of a registered pretrained model (`registry`), downloaded and converted on
    first use, then read from the cache (`BSMAMBA2_HOME`) without any request."""
    from bsmamba2_jax import registry  # pylint: disable=g-import-not-at-top

    jax_device(kwargs.get("device"))  # before any download
    return cls.from_checkpoint(registry.pretrained(name, progress=progress), **kwargs)

  def _run_chunks(self, chunks: np.ndarray) -> np.ndarray:
    """(k, Ci, S) mixtures -> (k, n·Ci, S): the n model stems one after another, adapting
    channels and padding the batch."""
    k, ci, s = chunks.shape
    if ci == self.channels:
      items = chunks
    elif self.channels == 2:  # mono input, stereo model: duplicate the channel
      items = np.repeat(chunks, 2, axis=1)
    else:  # stereo input, mono model: one batch item per channel
      items = chunks.reshape(k * ci, 1, s)
    out = np.concatenate([self._run_batch(items[i:i + self.batch_size])
                          for i in range(0, items.shape[0], self.batch_size)])
    n = out.shape[1]                                    # out: (items, n, C, S)
    if ci == self.channels:
      return out.reshape(k, n * ci, s)
    if self.channels == 2:
      return out.mean(axis=2)
    return out.reshape(k, ci, n, s).transpose(0, 2, 1, 3).reshape(k, n * ci, s)

  def _run_batch(self, items: np.ndarray) -> np.ndarray:
    """(k, C, S) items, k <= batch_size -> their (k, n, C, S) stems, zero-padded to the batch
    shape `model_fn` takes (batch_size, or with fixed_batch False the next power of two)."""
    k = items.shape[0]
    size = self.batch_size if self.fixed_batch else min(self.batch_size, 1 << (k - 1).bit_length())
    padded = np.concatenate([items, np.zeros((size - k,) + items.shape[1:], np.float32)])
    out = np.asarray(self.model_fn(padded), np.float32)[:k]
    return out[:, None] if out.ndim == items.ndim else out

  def stream(self, blocks: Iterable[np.ndarray], sample_rate: int,
             channels: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Separates a stream of (channels, n) float32 blocks at `sample_rate`.

    Yields aligned `(mixture, stems)` blocks at `sample_rate`: the mixture (channels, m) and
    {name: (channels, m)} for every name of `stems`; their total length equals the input's.
    Raises ValueError on non-finite samples.
    """
    chunks_per_batch = max(1, self.batch_size // (channels if self.channels == 1 else 1))
    outputs = len(self.model_stems) * channels
    engine = OverlapAdd(self._run_chunks, channels, self.segment_samples,
                        self.overlap_samples, chunks_per_batch, out_channels=outputs)
    down = Resampler(sample_rate, self.sample_rate, channels)
    up = Resampler(self.sample_rate, sample_rate, outputs)
    mixture = np.zeros((channels, 0), np.float32)  # input awaiting its stems
    total = 0
    emitted = 0

    def aligned(separated):
      """(n·channels, m) stems at the input rate -> (mixture, {name: (channels, m')})."""
      nonlocal mixture, emitted
      n = min(separated.shape[1], total - emitted)
      mix, mixture = mixture[:, :n], mixture[:, n:]
      emitted += n
      return mix, self._named(mix, separated[:, :n])

    for block in blocks:
      block = np.asarray(block, np.float32)
      if not np.isfinite(block).all():
        bad = total + int(np.argmax(~np.isfinite(block).all(axis=0)))
        raise ValueError(f"non-finite sample (NaN or Inf) at frame {bad}")
      mixture = np.concatenate([mixture, block], axis=1)
      total += block.shape[1]
      separated = up(engine.push(down(block)))
      if separated.shape[1]:
        yield aligned(separated)
    tail = engine.push(down(np.zeros((channels, 0), np.float32), last=True))
    separated = up(np.concatenate([tail, engine.finish()], axis=1), last=True)
    short = total - emitted - separated.shape[1]
    if short > 0:  # resampling there and back may come out a sample short
      separated = np.pad(separated, ((0, 0), (0, short)))
    yield aligned(separated)

  def _named(self, mixture: np.ndarray, separated: np.ndarray) -> dict[str, np.ndarray]:
    """(n·C, m) stems one after another -> {name: (C, m)}, with the residual for one stem."""
    parts = np.split(separated, len(self.model_stems), axis=0)
    named = dict(zip(self.model_stems, parts))
    if len(self.model_stems) == 1:
      named[RESIDUAL] = mixture - parts[0]
    return named

  def separate(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
    """Separates `audio` (samples,) or (channels, samples) at `sample_rate`.

    Float audio is taken as is (full scale ±1); integer PCM (int16, int32, or offset uint8 as
    `scipy.io.wavfile` reads them) is scaled to ±1 as soundfile reads it. Returns {name: array}
    for every name of `stems` (e.g. "vocals" and "accompaniment" = mixture - vocals), float32
    arrays of the input's shape and rate.
    """
    audio = np.asarray(audio)
    if audio.ndim not in (1, 2):
      raise ValueError(f"audio must be (samples,) or (channels, samples), got {audio.shape}")
    if np.issubdtype(audio.dtype, np.integer):
      half_scale = 2.0 ** (np.iinfo(audio.dtype).bits - 1)
      offset = half_scale if np.issubdtype(audio.dtype, np.unsignedinteger) else 0.0
      audio = (audio - offset) / half_scale
    elif not np.issubdtype(audio.dtype, np.floating):
      raise ValueError(f"audio must be float or integer PCM samples, got dtype {audio.dtype}")
    elif audio.size and np.isfinite(audio).all() and np.abs(audio).max() > np.finfo(np.float32).max:
      raise ValueError(f"audio exceeds the float32 range (largest |sample| "
                       f"{np.abs(audio).max():.3g}); full scale is ±1")
    is_number = (isinstance(sample_rate, (int, float, np.number))
                 and not isinstance(sample_rate, (bool, np.bool_)))
    if not (is_number and np.isfinite(sample_rate) and sample_rate > 0
            and sample_rate == int(sample_rate)):
      raise ValueError(f"sample_rate must be a positive whole number of Hz, got {sample_rate!r}")
    x = np.asarray(audio if audio.ndim == 2 else audio[None], np.float32)
    if x.shape[0] not in (1, 2):
      raise ValueError(f"audio has {x.shape[0]} channels; only mono and stereo are supported "
                       "(pass (channels, samples))")
    if x.shape[1] == 0:
      raise ValueError("audio is empty")
    block = self.segment_samples
    parts = list(self.stream((x[:, i:i + block] for i in range(0, x.shape[1], block)),
                             int(sample_rate), x.shape[0]))
    return {name: np.concatenate([stems[name] for _, stems in parts], axis=1).reshape(audio.shape)
            for name in self.stems}
