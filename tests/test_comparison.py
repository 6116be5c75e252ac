"""The miniature model comparison: its arms differ only where they should, and its report."""
import dataclasses
import os

import pytest

from bsmamba2_jax import comparison, evaluation, plots
from bsmamba2_jax.training.workdir import model_config
from experiments.configs import compare_models


def test_the_arms_share_everything_but_the_sequence_modules():
  config = compare_models.get_config()
  mamba, roformer = (model_config(comparison.arm_config(config, arm)) for arm in comparison.ARMS)
  assert (mamba.module_type, roformer.module_type) == ("mamba2", "transformer")
  same = ("dim", "depth", "band_widths", "audio_channels", "n_fft", "hop_length",
          "mask_hidden_mult", "stems")
  assert all(getattr(mamba, f) == getattr(roformer, f) for f in same)
  assert roformer.attn_dropout == roformer.ff_dropout == 0.1  # the official BS-RoFormer's
  for arm in comparison.ARMS:  # the rest of the experiment is untouched
    other = comparison.arm_config(config, arm)
    assert other.train.to_dict() == config.train.to_dict() and other.seed == config.seed
  assert max(comparison.SEGMENTS) <= config.data.synthetic.seconds


def _arm(name, shift):
  study = [dict(segment=s, vocals_csdr_median=1.0 + shift + s / 100, vocals_usdr_mean=2.0 + shift)
           for s in comparison.SEGMENTS]
  sparse = evaluation.sparse_breakdown(
      [dict(vocal_activity=0.3, vocals_csdr=3.0 + shift, vocals_usdr=4.0 + shift,
            accompaniment_csdr=0.0, accompaniment_usdr=0.0)])
  return comparison.ArmResult(name=name, module_type=name.lower(), parameters=1234, steps=7,
                              training_minutes=1.5, scores=dict(csdr=5.0 + shift, usdr=6.0 + shift,
                                                                mix_csdr=0.5, mix_usdr=1.0),
                              segment_study=study, sparse=sparse)


def test_the_report_holds_every_measured_number(tmp_path):
  arms = [_arm("A", 0.0), _arm("B", 1.0)]
  text = comparison.markdown(arms, "python -m experiments.compare_models --steps=7")
  assert "| A | a | 1,234 | 7 | 1.5 | 5.00 | 6.00 | +5.00 |" in text
  assert "| B | b | 1,234 | 7 | 1.5 | 6.00 | 7.00 | +6.00 |" in text
  assert "| 16 | 1.16 / 2.00 | 2.16 / 3.00 |" in text
  assert "| [0.25, 0.50) | 1 | 3.00 / 4.00 | 4.00 / 5.00 |" in text
  assert "| [0.00, 0.25) | 0 | – | – |" in text
  assert text.endswith("Made by `python -m experiments.compare_models --steps=7`.")
  plots.model_comparison(str(tmp_path / "f.png"), [dataclasses.asdict(a) for a in arms])
  assert os.path.getsize(tmp_path / "f.png") > 10_000


@pytest.mark.slow
def test_the_whole_comparison_runs_on_a_few_steps(tmp_path):
  """Both arms trained 3 steps on 2 short tracks, evaluated and reported (a few minutes)."""
  config = compare_models.get_config()
  config.train.num_steps = 3
  config.eval_every = config.ckpt_every = 3
  config.data.synthetic.update(num_train=2, num_test=2, seconds=4.0)
  arms = comparison.run(config, str(tmp_path / "w"), str(tmp_path / "docs"), command="test",
                        segments=(1.0, 2.0), progress=False)
  assert [a.steps for a in arms] == [3, 3]
  assert sorted(os.listdir(tmp_path / "docs")) == sorted(
      [comparison.TABLE_FILE, comparison.FIGURE_FILE, comparison.RESULTS_FILE])
