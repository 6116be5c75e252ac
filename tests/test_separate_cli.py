"""`bsmamba2-separate` as people type it, and the output formats and inputs it handles."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from bsmamba2_jax.model import random_params
from bsmamba2_jax.separate import separate_files
from bsmamba2_jax.separator import Separator
from tests.random_models import tiny_export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = 44100
# What a codec may add or drop at the ends (encoder delay, frame padding), in samples.
PADDING = {"wav": 0, "flac": 0, "mp3": 2 * 1152, "ogg": 1024, "opus": 960}
LOG_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")


def noise(channels, n, seed=0, scale=0.1):
  return (scale * np.random.default_rng(seed).standard_normal((channels, n))).astype(np.float32)


def write_m4a(path, x, rate=RATE):
  """An AAC file in an MP4 container, made with PyAV (FFmpeg)."""
  import av  # pylint: disable=g-import-not-at-top
  with av.open(path, "w") as out:
    stream = out.add_stream("aac", rate=rate, layout="stereo" if len(x) == 2 else "mono")
    for i in range(0, x.shape[1], 1024):
      frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, i:i + 1024]), format="fltp",
                                         layout=stream.layout.name)
      frame.sample_rate = rate
      for packet in stream.encode(frame):
        out.mux(packet)
    for packet in stream.encode(None):
      out.mux(packet)
  return path


def _cli(*args, env=None, timeout=300):
  return subprocess.run([sys.executable, "-m", "experiments.separate", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})


@pytest.mark.parametrize("fmt", list(PADDING))
def test_every_output_format_reads_back(tmp_path, fmt):
  """An identity model: the vocals are the input, the accompaniment silence."""
  x = noise(2, 30000, seed=1)
  path = str(tmp_path / "in.wav")
  sf.write(path, x.T, RATE, subtype="FLOAT")
  [result] = separate_files([path], separator=Separator(lambda c: c, segment=0.1),
                            output_dir=str(tmp_path / "out"), fmt=fmt,
                            bit_depth="16" if fmt != "wav" else "32f", progress=False)
  assert result.error is None, result.error
  vocals, rate = sf.read(result.outputs["vocals"], dtype="float32", always_2d=True)
  assert result.outputs["vocals"].endswith(f"in/vocals.{fmt}") and vocals.shape[1] == 2
  seconds = vocals.shape[0] / rate
  assert abs(seconds - x.shape[1] / RATE) <= PADDING[fmt] / rate, (fmt, rate, vocals.shape)
  if fmt in ("wav", "flac"):
    np.testing.assert_allclose(vocals.T, x, atol=1e-4)


def test_an_m4a_is_read_in_blocks_without_a_system_ffmpeg(tmp_path):
  from bsmamba2_jax.audio_io.reader import AudioReader
  x = noise(2, 50000, seed=2)
  path = write_m4a(str(tmp_path / "song.m4a"), x)
  reader = AudioReader(path)
  blocks = list(reader.blocks(8192))
  reader.close()
  assert reader.sample_rate == RATE and reader.channels == 2
  assert max(b.shape[1] for b in blocks) == 8192
  decoded = sum(b.shape[1] for b in blocks)
  assert abs(decoded - x.shape[1]) <= 3 * 1024  # AAC's priming and frame padding
  garbage = tmp_path / "broken.m4a"
  garbage.write_bytes(b"\0\0\0\x20ftypM4A " + bytes(range(256)) * 8)
  with pytest.raises(ValueError, match=r"broken.m4a: cannot read audio \(soundfile: .*FFmpeg: "):
    AudioReader(str(garbage))


@pytest.mark.parametrize("bf16_dots", [False, True])
def test_precision_auto_on_a_cpu_ignores_what_the_model_was_trained_in(monkeypatch, bf16_dots):
  """A bf16-trained model separates in float32 on a CPU without bf16 dot units and in "mixed"
  (bf16 operands, float32 results) on one with them; None keeps the model's bf16."""
  import dataclasses

  from bsmamba2_jax import runtime
  from bsmamba2_jax.config import ModelConfig
  from bsmamba2_jax.model import BSMamba2
  monkeypatch.setattr(runtime, "cpu_has_bf16_dots", lambda: bf16_dots)
  config = ModelConfig.preset("tiny", depth=1, dtype="bfloat16")
  params = random_params(config, seed=3)
  x = noise(2, 8000, seed=4)
  resolved = "mixed" if bf16_dots else "float32"
  direct = BSMamba2(dataclasses.replace(config, dtype=resolved))
  expected = Separator.from_model(direct, params, segment=0.1, device="cpu").separate(x, RATE)
  auto = Separator.from_model(BSMamba2(config), params, segment=0.1, precision="auto",
                              device="cpu")
  assert auto.dtype == resolved
  np.testing.assert_array_equal(auto.separate(x, RATE)["vocals"], expected["vocals"])
  kept = Separator.from_model(BSMamba2(config), params, segment=0.1, device="cpu")
  assert kept.dtype == "bfloat16"
  assert not np.array_equal(kept.separate(x, RATE)["vocals"], expected["vocals"])


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  return tiny_export(str(tmp_path_factory.mktemp("model") / "export"), seed=7)


@pytest.mark.integration
def test_positional_inputs_short_flags_one_stem_and_plain_messages(tmp_path, export):
  x = noise(2, 20000, seed=5)
  wav = str(tmp_path / "in" / "a.wav")
  os.makedirs(os.path.dirname(wav))
  sf.write(wav, x.T, RATE, subtype="PCM_16")
  m4a = write_m4a(str(tmp_path / "in" / "b.m4a"), x)
  out = tmp_path / "out"
  proc = _cli(wav, m4a, "-o", str(out), f"--checkpoint={export}", "--stem=vocals",
              "--format=mp3", "--segment=0.2", "--noprogress")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["a", "b"]
  for track in ("a", "b"):
    assert os.listdir(out / track) == ["vocals.mp3"]  # the one stem asked for
    info = sf.info(str(out / track / "vocals.mp3"))
    assert abs(info.frames - x.shape[1]) <= 4 * 1152
  assert "separated 2 of 2 input(s)" in proc.stdout
  assert not [line for line in proc.stderr.splitlines() if LOG_PREFIX.match(line)], proc.stderr
  assert f"{wav}: " in proc.stderr  # the per-file line, as a plain line


@pytest.mark.integration
def test_help_exits_0_and_a_missing_device_is_one_line(tmp_path):
  shown = _cli("--help")
  assert shown.returncode == 0
  for option in ("-o,--output_dir", "-n,--model", "--stem", "--format", "--device",
                 "--precision", "--[no]list_models", "--[no]verbose", "--quality"):
    assert option in shown.stdout, option
  song = str(tmp_path / "x.wav")
  sf.write(song, noise(2, 1000).T, RATE)
  missing = _cli(song, "--checkpoint=unused", "--device=gpu:3")
  assert missing.returncode == 2
  [line] = [l for l in missing.stderr.splitlines() if "--device" in l]
  assert line.startswith("error: --device gpu:3: no such device here (JAX sees cpu:0")
  assert "Traceback" not in missing.stderr


@pytest.mark.integration
def test_list_models_names_sizes_licences_and_the_cache(tmp_path):
  listed = _cli("--list_models", env={"BSMAMBA2_HOME": str(tmp_path)})
  assert listed.returncode == 0, listed.stderr
  lines = listed.stdout.splitlines()
  assert lines[0].split()[:4] == ["name", "size", "cached", "license"]
  vocals = next(l for l in lines if l.startswith("bsmamba2-vocals (default)"))
  assert "192.6 MB" in vocals and " no " in vocals and "not stated" in vocals
  assert any(l.startswith("bsmamba2-vocals-official ") and "770.6 MB" in l for l in lines)
