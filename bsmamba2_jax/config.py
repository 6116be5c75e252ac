"""The one model configuration: `ModelConfig`, its named presets and the band layout.

Every hyperparameter of BSMamba2 is a field here; experiment configs hold the same fields
(`model_settings`), so a new field is added in this file only. Fields split in two kinds:
those that shape the weights, which an export or a resumed run must keep, and
`COMPUTE_FIELDS`, which change how the model computes but not its weights (a run may resume,
and an export may load, with them changed). See docs/model.md for the graph they describe.
"""
from __future__ import annotations

import dataclasses
from typing import Any

# Band widths (in STFT bins) of the official model for n_fft 2048 (1025 bins, docs/model.md §2):
# 2×24, 4×12, 12×8, 24×8, 48×8, 128, 129.
PAPER_BAND_WIDTHS: tuple[int, ...] = (
    (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129))

# "float32": everything in float32. "bfloat16": matmuls and the conv in bfloat16, their results
# too (the accelerator training mode). "mixed": matmuls take bfloat16 operands and accumulate and
# return float32, everything else float32 (inference on CPUs with bf16 dot units, and anywhere
# exactness matters more than activation memory). "auto" for training: float32 on CPU, where
# XLA:CPU runs this model's bf16 step slower than fp32, bfloat16 on accelerators
# (docs/performance.md); inference resolves its own "auto" (`inference_dtype`).
DTYPES = ("float32", "bfloat16", "mixed", "auto")
SCAN_METHODS = ("chunked", "associative", "sequential")
# The official BSModel's sequence modules (docs/model.md §9): the time path and the band path of
# every layer are bidirectional Mamba2 blocks ("mamba2", BSMamba2), Transformers ("transformer",
# BS-RoFormer), a Mamba2 block along time and a Transformer along bands ("mamba2-roformer"), or
# bidirectional Mamba1 blocks ("mamba").
MODULE_TYPES = ("mamba2", "transformer", "mamba2-roformer", "mamba")
# The stems a model of 1 or 4 stems separates when a checkpoint does not say: the 4 in the order
# of the musdb package and of demucs (its sources list) and MSST's 4-stem configs.
DEFAULT_STEMS = {1: ("vocals",), 4: ("drums", "bass", "other", "vocals")}


def default_stems(count: int) -> tuple[str, ...]:
  """Stem names for a model of `count` stems whose names are not given (`DEFAULT_STEMS`, else
  stem1, stem2, ...)."""
  return DEFAULT_STEMS.get(count, tuple(f"stem{n + 1}" for n in range(count)))
# Tokens per group of `block_tokens` for separation on a CPU (docs/performance.md §7).
CPU_BLOCK_TOKENS = 2048
# Fields that change the computation, not the weights.
COMPUTE_FIELDS = ("dtype", "scan_method", "chunk_size", "remat", "block_tokens", "attn_dropout",
                  "ff_dropout")
# Weight fields that only some module types use: a config's `weights_view` leaves out those its
# module type does not have.
_MAMBA2_FIELDS = ("d_state", "expand", "headdim", "ngroups", "d_conv")
_MAMBA_FIELDS = ("d_state", "expand", "d_conv", "dt_rank")
_TRANSFORMER_FIELDS = ("heads", "dim_head")
_FIELDS_OF_TYPE = {
    "mamba2": _MAMBA2_FIELDS,
    "transformer": _TRANSFORMER_FIELDS,
    "mamba2-roformer": _MAMBA2_FIELDS + _TRANSFORMER_FIELDS,
    "mamba": _MAMBA_FIELDS,
}
_TYPED_FIELDS = frozenset(_MAMBA2_FIELDS + _MAMBA_FIELDS + _TRANSFORMER_FIELDS)


def default_band_widths(n_fft: int) -> tuple[int, ...]:
  """The paper's band layout scaled to `n_fft`; widths sum to n_fft // 2 + 1.

  Widths scale with n_fft / 2048 (at least one bin); the last band takes the remainder, so
  n_fft = 2048 gives exactly `PAPER_BAND_WIDTHS`.
  """
  bins = n_fft // 2 + 1
  scale = n_fft / 2048
  widths = [max(1, round(w * scale)) for w in PAPER_BAND_WIDTHS[:-1]]
  while widths and sum(widths) >= bins:  # very small n_fft: drop the highest bands
    widths.pop()
  return tuple(widths) + (bins - sum(widths),)


def resolve_dtype(dtype: str, backend: str | None = None) -> str:
  """`dtype` (one of DTYPES) as the mode computed in on `backend` (a JAX backend name; default:
  JAX's default backend); "auto" is the training choice."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  if dtype != "auto":
    return dtype
  if backend is None:
    import jax  # pylint: disable=g-import-not-at-top  (the backend is known only at run time)
    backend = jax.default_backend()
  return "float32" if backend == "cpu" else "bfloat16"


def inference_dtype(precision: str, platform: str, cpu_bf16_dots: bool) -> str:
  """The compute mode for separating with `precision` ("auto", "float32", "bfloat16" or
  "mixed") on a device of `platform` ("cpu", "gpu", ...).

  "bfloat16" means bf16 operands with float32 accumulation ("mixed") for inference: activation
  memory is small there, and on XLA:CPU a dot that returns bf16 runs slower than one that
  returns float32. "auto" is "mixed" on accelerators and on CPUs with native bf16 dot
  instructions (`cpu_bf16_dots`, as `runtime.cpu_has_bf16_dots()` tells), else "float32".
  """
  if precision not in DTYPES:
    raise ValueError(f"precision must be one of {DTYPES}, got {precision!r}")
  if precision in ("bfloat16", "mixed"):
    return "mixed"
  if precision == "float32":
    return "float32"
  if platform != "cpu":
    return "mixed"
  return "mixed" if cpu_bf16_dots else "float32"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every hyperparameter of BSMamba2. `ModelConfig.preset(name, **fields)` gives named sizes.

  dtype: how matmuls and the conv compute (one of DTYPES: "float32", "bfloat16", "mixed" or
  "auto", see `resolve_dtype`); parameters, the residual stream, norms, the STFT and the scan's
  decay math and states stay float32 in every case.
  remat: recompute each bidirectional block in the backward pass (`jax.checkpoint`) instead of
  storing its activations, except what `model.REMAT_POLICY` keeps; what it saves and costs is
  in docs/performance.md.
  block_tokens: > 0 runs each sequence module over groups of about this many tokens, one
  group after another (`model.in_blocks`; same result); 0 in one call. Separation on a CPU uses
  CPU_BLOCK_TOKENS, where the smaller buffers make the forward faster.
  module_type: the sequence modules of the dual path (one of MODULE_TYPES).
  stems: the names of the separated sources, one mask estimator each, in the order of the
  model's outputs; a one-stem model's residual (mixture − stem) is its "accompaniment".
  heads, dim_head: the Transformers' attention heads and their width ("transformer",
  "mamba2-roformer"); attn_dropout, ff_dropout: their dropout rates, applied in training only.
  dt_rank: Mamba1's rank of the dt projection ("mamba"); 0 is mamba_ssm's "auto", ceil(dim / 16).
  d_state, expand, d_conv serve Mamba1 as they serve Mamba2.
  """
  audio_channels: int = 2
  sample_rate: int = 44100
  n_fft: int = 2048
  hop_length: int = 441
  band_widths: tuple[int, ...] = PAPER_BAND_WIDTHS
  dim: int = 256
  depth: int = 6
  d_state: int = 128
  expand: int = 4
  headdim: int = 64
  ngroups: int = 1
  d_conv: int = 4
  mask_hidden_mult: int = 4
  scan_method: str = "chunked"
  chunk_size: int = 64
  dtype: str = "float32"
  remat: bool = False
  block_tokens: int = 0
  module_type: str = "mamba2"
  stems: tuple[str, ...] = ("vocals",)
  heads: int = 8
  dim_head: int = 64
  attn_dropout: float = 0.0
  ff_dropout: float = 0.0
  dt_rank: int = 0

  def __post_init__(self):
    object.__setattr__(self, "band_widths", tuple(int(w) for w in self.band_widths))
    stems = (self.stems,) if isinstance(self.stems, str) else tuple(self.stems)
    object.__setattr__(self, "stems", stems)
    problems = []
    if self.module_type not in MODULE_TYPES:
      problems.append(f"unknown module_type {self.module_type!r}; choose from {MODULE_TYPES}")
    if not stems or len(set(stems)) != len(stems) or not all(
        isinstance(n, str) and n and n not in ("mixture", "accompaniment") for n in stems):
      problems.append(f"stems must be distinct non-empty names other than 'mixture' and "
                      f"'accompaniment', got {self.stems!r}")
    if self.uses_transformer and (self.heads < 1 or self.dim_head < 2 or self.dim_head % 2):
      problems.append(f"heads must be >= 1 and dim_head even (rotary pairs), got heads="
                      f"{self.heads}, dim_head={self.dim_head}")
    for name in ("attn_dropout", "ff_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
    if self.dt_rank < 0:
      problems.append(f"dt_rank must be >= 0 (0: ceil(dim / 16)), got {self.dt_rank}")
    if sum(self.band_widths) != self.n_fft // 2 + 1:
      problems.append(f"band_widths sum to {sum(self.band_widths)}, expected n_fft//2+1 = "
                      f"{self.n_fft // 2 + 1}")
    if not 0 < self.hop_length <= self.n_fft // 2:
      # The last frame, centred at a multiple of hop_length within hop_length of the end,
      # reaches n_fft // 2 samples on: a longer hop leaves the end of the output uncovered
      # (zeros), and the windows of frames further apart overlap too little to invert.
      problems.append(f"hop_length must be in [1, n_fft // 2] so that frames cover every sample, "
                      f"got hop_length={self.hop_length} with n_fft={self.n_fft}")
    if self.module_type not in ("mamba2", "mamba2-roformer"):
      pass
    elif (self.expand * self.dim) % self.headdim:
      problems.append(f"expand*dim = {self.expand * self.dim} is not a multiple of headdim "
                      f"{self.headdim}")
    elif (self.expand * self.dim // self.headdim) % self.ngroups:
      problems.append(f"the {self.expand * self.dim // self.headdim} heads do not split into "
                      f"ngroups={self.ngroups}")
    if self.audio_channels not in (1, 2):
      problems.append(f"audio_channels must be 1 or 2, got {self.audio_channels}")
    if self.dtype not in DTYPES:
      problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    if self.scan_method not in SCAN_METHODS:
      problems.append(f"unknown scan_method {self.scan_method!r}; choose from {SCAN_METHODS}")
    if isinstance(self.block_tokens, bool) or not isinstance(self.block_tokens, int) or (
        self.block_tokens < 0):
      problems.append(f"block_tokens must be an int >= 0, got {self.block_tokens!r}")
    if problems:
      raise ValueError("invalid ModelConfig: " + "; ".join(problems))

  @classmethod
  def preset(cls, preset: str = "paper", **fields: Any) -> "ModelConfig":
    """The preset 'paper' (48,098,188 parameters), 'bsroformer' (the official BS-RoFormer
    baseline, 36,847,516 parameters as torch counts them), 'small' or 'tiny' (trains on 2 CPU
    cores in minutes) with `fields` replaced; a field given as None keeps the preset's value, so an
    experiment's `config.model` (see `model_settings`) passes straight in:
    `ModelConfig.preset(**config.model)`. A new n_fft without band_widths scales the bands."""
    if preset not in PRESETS:
      raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    fields = {k: v for k, v in fields.items() if v is not None}
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"unknown ModelConfig field(s) {unknown}")
    values = dict(PRESETS[preset], **fields)
    if "n_fft" in fields and "band_widths" not in fields:
      values["band_widths"] = default_band_widths(values["n_fft"])
    return cls(**values)

  def to_dict(self) -> dict:
    """JSON-able dict; `ModelConfig.from_dict` inverts it."""
    d = dataclasses.asdict(self)
    d["band_widths"] = list(self.band_widths)
    d["stems"] = list(self.stems)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown ModelConfig fields {unknown}")
    return cls(**d)

  def weights_view(self) -> dict:
    """The fields that shape the weights, as `to_dict` gives them: all but `COMPUTE_FIELDS` and
    the fields of sequence modules that this module type does not have."""
    own = set(_FIELDS_OF_TYPE[self.module_type])
    return {k: v for k, v in self.to_dict().items()
            if k not in COMPUTE_FIELDS and (k not in _TYPED_FIELDS or k in own)}

  @property
  def num_stems(self) -> int:
    return len(self.stems)

  @property
  def uses_transformer(self) -> bool:
    """Whether some sequence module is a Transformer."""
    return self.module_type in ("transformer", "mamba2-roformer")

  @property
  def mamba_dt_rank(self) -> int:
    """Mamba1's dt rank (`dt_rank`, or mamba_ssm's "auto" ceil(dim / 16) for 0)."""
    return self.dt_rank or -(-self.dim // 16)

  def with_compute(self, **fields: Any) -> "ModelConfig":
    """This config with `COMPUTE_FIELDS` replaced (the weights stay valid); others refused."""
    other = sorted(set(fields) - set(COMPUTE_FIELDS))
    if other:
      raise ValueError(f"only {', '.join(COMPUTE_FIELDS)} can change for given weights, not "
                       f"{', '.join(other)}")
    return dataclasses.replace(self, **fields)

  @property
  def operand_dtype(self):
    """The jnp dtype of the projections' operands (resolving "auto" on JAX's backend)."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    return jnp.float32 if resolve_dtype(self.dtype) == "float32" else jnp.bfloat16

  @property
  def activation_dtype(self):
    """The jnp dtype of the projections' results, the conv and the per-band matmuls (batched
    dots, which XLA:CPU cannot run bf16 x bf16 -> float32): bfloat16 only for "bfloat16"."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    return jnp.bfloat16 if resolve_dtype(self.dtype) == "bfloat16" else jnp.float32

  @property
  def mixer(self) -> dict:
    """Keyword arguments of `mamba2.Mamba2` (besides d_model)."""
    return dict(d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
                headdim=self.headdim, ngroups=self.ngroups, scan_method=self.scan_method,
                chunk_size=self.chunk_size, dtype=self.operand_dtype,
                result_dtype=self.activation_dtype)

  @property
  def mamba1_mixer(self) -> dict:
    """Keyword arguments of `mamba1.Mamba1` (besides d_model)."""
    return dict(d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
                dt_rank=self.mamba_dt_rank, dtype=self.operand_dtype,
                result_dtype=self.activation_dtype)

  @property
  def attention(self) -> dict:
    """Keyword arguments of `roformer.TransformerBlock`."""
    return dict(heads=self.heads, dim_head=self.dim_head, attn_dropout=self.attn_dropout,
                ff_dropout=self.ff_dropout, dtype=self.operand_dtype,
                result_dtype=self.activation_dtype)


PRESETS: dict[str, dict] = {
    "paper": {},
    # The paper's baseline as the official code configures it (36,847,516 parameters).
    "bsroformer": dict(module_type="transformer", heads=8, dim_head=48, attn_dropout=0.1,
                       ff_dropout=0.1),
    # small and tiny also size the Transformer fields, so that `module_type=...` gives a model of
    # the same width and depth of another type (experiments.compare_models).
    "small": dict(dim=128, depth=4, d_state=64, expand=2, headdim=32, heads=4, dim_head=32),
    "tiny": dict(dim=32, depth=2, d_state=16, expand=2, headdim=16, heads=2, dim_head=16),
}


def model_settings(preset: str = "paper", **fields: Any):
  """An experiment's `config.model`: a ConfigDict with `preset` and every ModelConfig field
  (None: the preset's value), so `--config.model.<field>=...` overrides any of them and
  `ModelConfig.preset(**config.model)` builds the model's config. `fields` set some now."""
  import ml_collections  # pylint: disable=g-import-not-at-top  (experiments only)
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  settings = ml_collections.ConfigDict({"preset": preset})
  for field in dataclasses.fields(ModelConfig):
    settings[field.name] = config_dict.placeholder(type(field.default))
  settings.update(fields)
  return settings
