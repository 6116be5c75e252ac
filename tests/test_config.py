"""ModelConfig: presets, the band layout, validation, and the one experiment-config path."""
import pytest

from bsmamba2_jax.config import (COMPUTE_FIELDS, PAPER_BAND_WIDTHS, ModelConfig,
                                 default_band_widths, inference_dtype, model_settings,
                                 resolve_dtype)


def test_band_widths():
  assert default_band_widths(2048) == PAPER_BAND_WIDTHS
  assert len(PAPER_BAND_WIDTHS) == 62 and sum(PAPER_BAND_WIDTHS) == 1025
  for n_fft in (256, 512, 1024, 4096):
    widths = default_band_widths(n_fft)
    assert sum(widths) == n_fft // 2 + 1 and min(widths) >= 1
  with pytest.raises(ValueError, match="band_widths sum"):
    ModelConfig(band_widths=(1, 2, 3))
  with pytest.raises(ValueError, match=r"hop_length must be in \[1, n_fft // 2\].* "
                                       "hop_length=441 with n_fft=256"):
    ModelConfig.preset("tiny", n_fft=256)  # hop 441 >= n_fft: the iSTFT would divide by ~0
  with pytest.raises(ValueError, match="hop_length=200 with n_fft=256"):
    ModelConfig(n_fft=256, hop_length=200, band_widths=(129,))  # the end would stay uncovered
  ModelConfig(n_fft=256, hop_length=128, band_widths=(129,))


def test_config_round_trip_and_presets():
  for name in ("paper", "small", "tiny"):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
  assert ModelConfig.preset("tiny", n_fft=1024).band_widths == default_band_widths(1024)
  with pytest.raises(ValueError, match="unknown preset"):
    ModelConfig.preset("huge")


def test_experiment_settings_hold_every_field_and_pass_straight_in():
  """config.model is a preset plus every ModelConfig field; None keeps the preset's value."""
  settings = model_settings("tiny", remat=True)
  assert set(settings) == {"preset"} | set(ModelConfig().to_dict())
  assert ModelConfig.preset(**settings) == ModelConfig.preset("tiny", remat=True)
  settings.dim, settings.preset = 64, "small"
  assert ModelConfig.preset(**settings) == ModelConfig.preset("small", dim=64, remat=True)
  settings.n_fft, settings.hop_length = 1024, 256  # bands follow a new n_fft
  assert ModelConfig.preset(**settings).band_widths == default_band_widths(1024)
  with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['dimm'\]"):
    ModelConfig.preset("tiny", dimm=3)


def test_compute_fields_change_and_nothing_else():
  paper = ModelConfig.preset("paper")
  changed = paper.with_compute(dtype="bfloat16", remat=True, chunk_size=32,
                               scan_method="sequential")
  assert changed.weights_view() == paper.weights_view()
  # A Mamba2 model has no Transformer and no Mamba1 sizes to keep.
  assert set(paper.to_dict()) - set(paper.weights_view()) == set(COMPUTE_FIELDS) | {
      "heads", "dim_head", "dt_rank"}
  roformer = ModelConfig.preset("bsroformer")
  assert {"heads", "dim_head"} <= set(roformer.weights_view())
  assert not {"d_state", "headdim", "expand"} & set(roformer.weights_view())
  assert roformer.with_compute(attn_dropout=0.0).weights_view() == roformer.weights_view()
  with pytest.raises(ValueError, match="not dim"):
    paper.with_compute(dim=128)
  assert ModelConfig.preset("paper", dim=128).weights_view() != paper.weights_view()


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_on_accelerators():
  assert resolve_dtype("auto", "cpu") == "float32"
  assert resolve_dtype("auto", "gpu") == "bfloat16"
  assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
  with pytest.raises(ValueError, match=r"dtype must be one of .*'fp16'"):
    resolve_dtype("fp16")
  with pytest.raises(ValueError, match="dtype must be one of"):
    ModelConfig(dtype="fp16")


@pytest.mark.parametrize("precision,platform,bf16_dots,expected", [
    ("auto", "cpu", True, "mixed"), ("auto", "cpu", False, "float32"),
    ("auto", "gpu", False, "mixed"), ("auto", "tpu", None, "mixed"),
    ("bfloat16", "cpu", False, "mixed"), ("mixed", "gpu", None, "mixed"),
    ("float32", "gpu", True, "float32"), ("float32", "cpu", True, "float32")])
def test_inference_precision_takes_bf16_operands_where_the_device_has_bf16_dots(
    precision, platform, bf16_dots, expected):
  assert inference_dtype(precision, platform, bf16_dots) == expected


def test_operand_and_result_dtypes_of_each_mode():
  import jax.numpy as jnp
  modes = {d: ModelConfig.preset("tiny", dtype=d) for d in ("float32", "mixed", "bfloat16")}
  assert modes["float32"].operand_dtype == jnp.float32
  assert modes["float32"].activation_dtype == jnp.float32
  assert modes["mixed"].operand_dtype == jnp.bfloat16
  assert modes["mixed"].activation_dtype == jnp.float32
  assert modes["bfloat16"].operand_dtype == jnp.bfloat16
  assert modes["bfloat16"].activation_dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="precision must be one of"):
    inference_dtype("half", "cpu", True)
