"""Official PyTorch checkpoint (any module_type, any number of stems) -> bsmamba2-jax export,
and back.

  python -m experiments.convert_torch --torch_ckpt=bs_mamba2_vocals.ckpt --output_dir=exports/official
  python -m experiments.convert_torch --to_torch --export_dir=exports/official --output=model.ckpt
"""
from absl import app, flags

from bsmamba2_jax import exports, runtime
from bsmamba2_jax.errors import CheckpointError
from experiments import cli

_CKPT = cli.DEFINE_path("torch_ckpt", None, "Official Lightning .ckpt or bare state_dict file.")
_OUT_DIR = cli.DEFINE_path("output_dir", None, "Where the inference export is written.")
_EMA = flags.DEFINE_bool("use_ema", False, "Take the EMA weights kept in the optimizer state.")
_HOP = flags.DEFINE_integer("hop_length", 441, "STFT hop (not stored in the weights).")
_CHANNELS = flags.DEFINE_enum(
    "audio_channels", None, ["1", "2"],
    "Audio channels of the model, where the band shapes leave it open (default: inferred).")
_STEMS = flags.DEFINE_list(
    "stems", None, "Names of the model's stems in order, e.g. drums,bass,other,vocals (not stored "
    "in the weights; default: vocals for one stem, drums,bass,other,vocals for four).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing export / file.")
_TO_TORCH = flags.DEFINE_bool("to_torch", False, "Convert an export back to a PyTorch .ckpt.")
_EXPORT_DIR = cli.DEFINE_path("export_dir", None, "With --to_torch: the export to convert.")
_OUTPUT = cli.DEFINE_path("output", None, "With --to_torch: the .ckpt file to write.")


def main(argv):
  runtime.configure(compilation_cache=True, verbose=cli.verbose())  # see runtime.py
  del argv
  try:
    if _TO_TORCH.value:
      if not (_EXPORT_DIR.value and _OUTPUT.value):
        raise app.UsageError("--to_torch needs --export_dir and --output")
      path = exports.export_torch_checkpoint(_EXPORT_DIR.value, _OUTPUT.value,
                                             overwrite=_OVERWRITE.value)
    else:
      if not (_CKPT.value and _OUT_DIR.value):
        raise app.UsageError("needs --torch_ckpt and --output_dir")
      given = {} if _CHANNELS.value is None else dict(audio_channels=int(_CHANNELS.value))
      if _STEMS.value:
        given["stems"] = tuple(_STEMS.value)
      path = exports.convert_checkpoint(_CKPT.value, _OUT_DIR.value, use_ema=_EMA.value,
                                        overwrite=_OVERWRITE.value, hop_length=_HOP.value,
                                        **given)
  except (CheckpointError, OSError) as e:  # bad files or folders: one line naming them
    raise SystemExit(f"convert_torch: {e}")
  print(f"wrote {path}")


if __name__ == "__main__":
  cli.run(main)
