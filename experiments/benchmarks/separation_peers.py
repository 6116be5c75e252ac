"""Other separators on the same machine, same audio, for the `separate` section: PyTorch peers.

- htdemucs: demucs's `HTDemucs` (the class's defaults, 4 sources) with random weights, through
  demucs's own `apply_model` (shifts 1, overlap 0.25, its 7.8-s segments).
- BS-RoFormer of the popular vocals size (bs-roformer's `BSRoformer`, dim 512, depth 12, one
  time and one band Transformer per layer, 8 heads of 64, hop 441, plain residuals), random
  weights, its forward on our chunking (`Separator`, 8-s chunks, overlap 0.25, batch 1).

Both need the optional extra `peers` (torch, demucs, bs-roformer); without it the rows are
skipped with a note. Timing does not depend on the weights. torch runs on every core.
"""
from __future__ import annotations

import importlib.util
import os
import time
from typing import Any

import numpy as np

from experiments.benchmarks import common

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": dict(htdemucs={},  # smaller HTDemucs shapes make its attention span explode
                  bsroformer=dict(dim=16, depth=1, dim_head=8, heads=2)),
    "default": dict(htdemucs={}, bsroformer=dict(dim=512, depth=12, dim_head=64, heads=8)),
}
BSROFORMER_FIXED = dict(stereo=True, num_stems=1, time_transformer_depth=1,
                        freq_transformer_depth=1, flash_attn=True, num_residual_streams=1,
                        stft_hop_length=441)


def missing() -> list[str]:
  """The peer packages that are not installed."""
  return [p for p in ("torch", "demucs", "bs_roformer") if importlib.util.find_spec(p) is None]


def _version(package: str) -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  return metadata.version(package)


def htdemucs_row(audio: np.ndarray, sizes: dict, repeats: int) -> dict:
  """demucs `apply_model` on (2, n) `audio` at 44.1 kHz."""
  import torch  # pylint: disable=g-import-not-at-top
  from demucs.apply import apply_model  # pylint: disable=g-import-not-at-top
  from demucs.htdemucs import HTDemucs  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  model = HTDemucs(sources=["drums", "bass", "other", "vocals"], **sizes).eval()
  mix = torch.from_numpy(audio)[None]
  start = time.perf_counter()
  with torch.no_grad():
    apply_model(model, mix[..., :44100], shifts=1, overlap=0.25)  # first call: allocations
  warmup_s = time.perf_counter() - start

  def separate():
    with torch.no_grad():
      return apply_model(model, mix, shifts=1, overlap=0.25)

  return common.timed("peer htdemucs (demucs apply_model)", separate, repeats=repeats, warmup=0,
                      package=f"demucs {_version('demucs')}", measured_audio_s=audio.shape[1] / 44100,
                      compile_s=warmup_s, **sizes)


def bsroformer_row(audio: np.ndarray, sizes: dict, repeats: int, segment: float,
                   overlap: float) -> dict:
  """bs-roformer's forward on our chunking of (2, n) `audio` at 44.1 kHz."""
  import torch  # pylint: disable=g-import-not-at-top
  from bs_roformer import BSRoformer  # pylint: disable=g-import-not-at-top

  from bsmamba2_jax.separator import Separator  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  model = BSRoformer(**sizes, **BSROFORMER_FIXED).eval()

  def model_fn(chunks: np.ndarray) -> np.ndarray:
    with torch.no_grad():
      return model(torch.from_numpy(chunks)).numpy()

  separator = Separator(model_fn, channels=2, segment=segment, overlap=overlap, batch_size=1)
  start = time.perf_counter()
  model_fn(audio[None, :, :44100])  # first call: allocations (a whole chunk takes minutes)
  warmup_s = time.perf_counter() - start
  return common.timed("peer BS-RoFormer (bs-roformer)", lambda: separator.separate(audio, 44100),
                      repeats=repeats, warmup=0,
                      package=f"bs-roformer {_version('bs-roformer')}",
                      measured_audio_s=audio.shape[1] / 44100, compile_s=warmup_s, **sizes)


def rows(mode: str, audio: dict[str, np.ndarray], repeats: int, segment: float,
         overlap: float) -> tuple[list[dict], str]:
  """The peer rows on `audio` {"htdemucs": (2, n), "bsroformer": (2, m)}, and a note."""
  absent = missing()
  if absent:
    return [], (f"Peers skipped: {', '.join(absent)} not installed (pip install -e "
                "\".[peers]\").")
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  sizes = SIZES["smoke" if mode == "smoke" else "default"]
  out = [htdemucs_row(audio["htdemucs"], sizes["htdemucs"], repeats),
         bsroformer_row(audio["bsroformer"], sizes["bsroformer"], repeats, segment, overlap)]
  return out, f"Peers: torch {torch.__version__} on {torch.get_num_threads()} threads."
