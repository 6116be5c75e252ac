"""Writes `official_micro.ckpt` with real torch: a Lightning-style checkpoint of a microscopic
BSMamba2 under the official state_dict names (docs/model.md §8), plus `official_micro.npz` with the same
tensors as NumPy (`sd/<key>` and `ema/<key>`), so the torch-free reader is tested against a file
that torch itself wrote. Run once with torch installed: python tests/data/make_official_micro.py
"""
import collections
import os

import numpy as np
import torch

torch.manual_seed(0)

HERE = os.path.dirname(os.path.abspath(__file__))
CHANNELS, DIM, D_INNER, HEADS, D_STATE, D_CONV, HIDDEN = 2, 8, 16, 2, 4, 4, 32
WIDTHS = [1] * 8 + [2] * 4 + [4] * 4 + [8] * 4 + [16] * 2 + [33]  # n_fft 256: 129 bins


class Hyperparameters:  # stands in for the omegaconf objects of a real Lightning file
  def __init__(self, **kw):
    self.__dict__.update(kw)


def main():
  assert sum(WIDTHS) == 129
  rng = np.random.default_rng(0)
  shapes = collections.OrderedDict()
  for k, w in enumerate(WIDTHS):
    shapes[f"band_split.to_features.{k}.0.gamma"] = (2 * CHANNELS * w,)
    shapes[f"band_split.to_features.{k}.1.weight"] = (DIM, 2 * CHANNELS * w)
    shapes[f"band_split.to_features.{k}.1.bias"] = (DIM,)
  for j in (0, 1):
    for direction in ("forward", "backward"):
      p = f"layers.0.{j}.{direction}_blocks.0"
      shapes[f"{p}.norm.weight"] = (DIM,)
      shapes[f"{p}.mixer.in_proj.weight"] = (2 * D_INNER + 2 * D_STATE + HEADS, DIM)
      shapes[f"{p}.mixer.conv1d.weight"] = (D_INNER + 2 * D_STATE, 1, D_CONV)
      shapes[f"{p}.mixer.conv1d.bias"] = (D_INNER + 2 * D_STATE,)
      for name in ("dt_bias", "A_log", "D"):
        shapes[f"{p}.mixer.{name}"] = (HEADS,)
      shapes[f"{p}.mixer.norm.weight"] = (D_INNER,)
      shapes[f"{p}.mixer.out_proj.weight"] = (DIM, D_INNER)
    shapes[f"layers.0.{j}.linear.weight"] = (2 * DIM, DIM, 1)
    shapes[f"layers.0.{j}.linear.bias"] = (DIM,)
  shapes["final_norm.gamma"] = (DIM,)
  for k, w in enumerate(WIDTHS):
    p = f"mask_estimators.0.to_freqs.{k}.0"
    shapes[f"{p}.0.weight"] = (HIDDEN, DIM)
    shapes[f"{p}.0.bias"] = (HIDDEN,)
    shapes[f"{p}.2.weight"] = (2 * 2 * CHANNELS * w, HIDDEN)
    shapes[f"{p}.2.bias"] = (2 * 2 * CHANNELS * w,)

  def draw(key, shape):
    scale = 1.0 / np.sqrt(shape[-1] if len(shape) > 1 else 4)
    if key.endswith("A_log"):
      return np.log(rng.uniform(1, 16, shape))
    if key.endswith(("gamma", "norm.weight", ".D")):
      return 1 + 0.1 * rng.normal(size=shape)
    return rng.uniform(-scale, scale, shape)

  # The featurizer (registered before the model) holds a window buffer, not a parameter.
  state_dict = collections.OrderedDict([("featurizer.window", torch.hann_window(256))])
  for k, s in shapes.items():
    state_dict[f"model.{k}"] = torch.tensor(draw(k, s), dtype=torch.float32)
  ema = [t + 0.01 * torch.randn_like(t) for k, t in state_dict.items() if k.startswith("model.")]
  checkpoint = {
      "epoch": 3, "global_step": 1234, "pytorch-lightning_version": "2.1.3",
      "state_dict": state_dict,
      "optimizer_states": [{"opt": {"state": {}, "param_groups": [{"lr": 5e-4}]},
                            "ema": tuple(ema), "current_step": 1234, "decay": 0.999}],
      "hyper_parameters": Hyperparameters(dim=DIM, stereo=True, module_type="mamba2"),
      "bf16_probe": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3).t(),  # strided bf16
  }
  torch.save(checkpoint, os.path.join(HERE, "official_micro.ckpt"))
  arrays = {f"sd/{k}": v.numpy() for k, v in state_dict.items()}
  arrays.update({f"ema/{k}": e.numpy() for k, e in zip(list(state_dict)[1:], ema)})
  arrays["bf16_probe"] = checkpoint["bf16_probe"].float().numpy()
  np.savez_compressed(os.path.join(HERE, "official_micro.npz"), **arrays)


if __name__ == "__main__":
  main()
