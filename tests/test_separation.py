"""Chunking, crossfade, resampling (`separator`) and file handling (`separate`, `audio_io`).

References are written here in float64 NumPy (official non-overlapping chunking, a direct
overlap-add with the documented window) or come from soxr's one-shot resampler.
"""
import glob
import os
import re

import numpy as np
import pytest
import soundfile as sf
import soxr

from bsmamba2_jax import separate, separator
from bsmamba2_jax.audio_io import paths, reader as audio_reader
from bsmamba2_jax.errors import InputError
from bsmamba2_jax.model import random_params
from bsmamba2_jax.separator import Separator

RATE = 44100


def noise(channels, n, seed=0, scale=0.3):
  return (scale * np.random.default_rng(seed).standard_normal((channels, n))).astype(np.float32)


def boundary_revealing(chunks):
  """A chunk function whose output depends on the position inside the chunk (B, C, S)."""
  s = chunks.shape[-1]
  return (chunks * np.linspace(0.5, 1.5, s, dtype=np.float32)
          + 0.01 * np.cumsum(chunks, axis=-1) / s).astype(np.float32)


def official_chunking(fn, x, segment):
  """The official mode: segment chunks, zero-padded tail, concatenated, cropped."""
  c, n = x.shape
  k = -(-n // segment)
  padded = np.zeros((c, k * segment), np.float32)
  padded[:, :n] = x
  chunks = padded.reshape(c, k, segment).transpose(1, 0, 2)
  return np.concatenate(list(fn(chunks)), axis=1)[:, :n]


def overlap_add_reference(fn, x, segment, overlap):
  """Direct float64 overlap-add with trapezoid weights normalised by their sum."""
  c, n = x.shape
  hop = segment - overlap
  i = np.arange(segment) + 0.5
  w = np.minimum(1.0, np.minimum(i / overlap, (segment - i) / overlap))
  starts = [0]
  while starts[-1] + segment < n:
    starts.append(starts[-1] + hop)
  total = starts[-1] + segment
  acc, wsum = np.zeros((c, total)), np.zeros(total)
  padded = np.zeros((c, total), np.float32)
  padded[:, :n] = x
  for s in starts:
    out = fn(padded[None, :, s:s + segment])[0].astype(np.float64)
    acc[:, s:s + segment] += w * out
    wsum[s:s + segment] += w
  return acc[:, :n] / wsum[:n]


class Recorder:
  """An identity (or `fn`) batch function that records the shapes it was called with."""

  def __init__(self, fn=lambda x: x):
    self.fn, self.shapes = fn, []

  def __call__(self, chunks):
    self.shapes.append(chunks.shape)
    return self.fn(chunks)


def test_crossfade_weights_sum_to_one():
  segment, overlap = 1000, 250
  w = separator.crossfade_window(segment, overlap)
  hop = segment - overlap
  total = np.zeros(hop * 5 + segment)
  for k in range(6):
    total[k * hop:k * hop + segment] += w
  np.testing.assert_allclose(total[overlap:-overlap], 1.0, atol=1e-12)
  assert w.min() > 0 and w.max() == 1.0
  np.testing.assert_array_equal(separator.crossfade_window(segment, 0), np.ones(segment))


@pytest.mark.parametrize("n", [1, 4410, 8820, 8821, 30001])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_overlap_zero_is_the_official_mode_exactly(n, batch_size):
  x = noise(2, n)
  rec = Recorder(boundary_revealing)
  sep = Separator(rec, segment=0.2, overlap=0.0, batch_size=batch_size)
  out = sep.separate(x, RATE)
  np.testing.assert_array_equal(out["vocals"], official_chunking(boundary_revealing, x, 8820))
  np.testing.assert_array_equal(out["accompaniment"], x - out["vocals"])
  assert set(rec.shapes) == {(batch_size, 2, 8820)}  # one fixed shape: compiled once


@pytest.mark.parametrize("chunks,in_channels,model_channels,batch_size,calls", [
    (1, 2, 2, 8, [1]), (3, 2, 2, 8, [4]), (8, 2, 2, 8, [8]), (11, 2, 2, 8, [8, 4]),
    (5, 2, 2, 6, [6]), (2, 2, 1, 8, [4]), (3, 1, 2, 4, [4])])
def test_last_batch_is_padded_to_a_power_of_two_unless_fixed(chunks, in_channels, model_channels,
                                                              batch_size, calls):
  x = noise(in_channels, chunks * 8820, seed=3)
  expected = official_chunking(boundary_revealing, x, 8820)
  for fixed, sizes in ((True, [batch_size] * len(calls)), (False, calls)):
    rec = Recorder(boundary_revealing)
    sep = Separator(rec, channels=model_channels, segment=0.2, overlap=0.0,
                    batch_size=batch_size, fixed_batch=fixed)
    out = sep.separate(x, RATE)["vocals"]
    assert [shape[0] for shape in rec.shapes] == sizes
    if model_channels == in_channels:
      np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("n", [3000, 8821, 30001])
@pytest.mark.parametrize("overlap", [0.25, 0.6])
def test_crossfade_matches_direct_overlap_add(n, overlap):
  x = noise(2, n, seed=1)
  sep = Separator(boundary_revealing, segment=0.2, overlap=overlap, batch_size=2)
  ref = overlap_add_reference(boundary_revealing, x, 8820, int(round(overlap * 8820)))
  np.testing.assert_allclose(sep.separate(x, RATE)["vocals"], ref, atol=2e-6)


@pytest.mark.parametrize("rate", [22050, 44100, 48000])
@pytest.mark.parametrize("overlap", [0.0, 0.25])
@pytest.mark.parametrize("in_channels,model_channels", [(1, 1), (1, 2), (2, 1), (2, 2)])
@pytest.mark.parametrize("seconds", [0.137, 0.7311])  # shorter than a segment; odd length
def test_identity_reproduces_input(rate, overlap, in_channels, model_channels, seconds):
  n = int(seconds * rate) | 1
  x = noise(in_channels, n, seed=2)
  sep = Separator(Recorder(), channels=model_channels, segment=0.2, overlap=overlap,
                  batch_size=2)
  audio = x[0] if in_channels == 1 else x
  out = sep.separate(audio, rate)
  assert out["vocals"].shape == audio.shape and out["vocals"].dtype == np.float32
  np.testing.assert_allclose(out["vocals"] + out["accompaniment"], audio, atol=1e-6)
  if rate == RATE:
    np.testing.assert_allclose(out["vocals"], audio, atol=1e-6)
  else:  # chunking adds nothing to soxr's one-shot round trip (no clicks, no level change)
    there = soxr.resample(x.T, rate, RATE, "HQ")
    back = soxr.resample(there, RATE, rate, "HQ").T[:, :n]
    back = np.pad(back, ((0, 0), (0, n - back.shape[1])))
    np.testing.assert_allclose(out["vocals"].reshape(x.shape), back, atol=1e-5)
    # Band-limited content survives the round trip at the same level.
    low = np.fft.irfft(np.fft.rfft(x) * (np.fft.rfftfreq(n, 1 / rate) < 0.4 * rate), n)
    low_out = sep.separate(low.astype(np.float32).reshape(audio.shape), rate)["vocals"]
    core = slice(n // 10, -n // 10)
    np.testing.assert_allclose(low_out.reshape(x.shape)[:, core], low[:, core], atol=3e-3)


def test_channel_adaptation():
  # Stereo model, mono input: the channel is duplicated and the outputs averaged.
  rec = Recorder(lambda c: c * np.array([[1.0], [3.0]], np.float32))
  x = noise(1, 5000)[0]
  out = Separator(rec, channels=2, segment=0.1, overlap=0.0).separate(x, RATE)
  np.testing.assert_allclose(out["vocals"], 2 * x, rtol=1e-6)
  assert set(rec.shapes) == {(1, 2, 4410)}
  # Mono model, stereo input: each channel is its own batch item.
  rec = Recorder(lambda c: c * 2)
  x = noise(2, 5000)
  out = Separator(rec, channels=1, segment=0.1, overlap=0.0, batch_size=4).separate(x, RATE)
  np.testing.assert_allclose(out["vocals"], 2 * x, rtol=1e-6)
  assert set(rec.shapes) == {(4, 1, 4410)}


@pytest.mark.parametrize("audio,message", [
    (np.zeros((3, 1000), np.float32), "3 channels"),
    (np.zeros((2, 0), np.float32), "empty"),
    (np.zeros((1, 2, 100), np.float32), "(samples,) or (channels, samples)"),
    (np.full((2, 100), 1e39), "exceeds the float32 range"),  # finite, not "non-finite"
])
def test_separate_rejects_bad_arrays(audio, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    Separator(Recorder()).separate(audio, RATE)


@pytest.mark.parametrize("rate", [44100.5, 0, float("nan"), "44100", None, True])
def test_separate_rejects_bad_rates(rate):
  with pytest.raises(ValueError, match="positive whole number of Hz"):
    Separator(Recorder()).separate(noise(2, 1000), rate)


def test_separate_scales_integer_pcm_and_refuses_other_types():
  x = np.clip(noise(2, 5000, scale=0.1), -0.99, 0.99)
  sep = Separator(Recorder(), segment=0.1, overlap=0.0)
  pcm16 = np.round(x * 32768).astype(np.int16)
  pcm8 = (np.round(x * 128) + 128).astype(np.uint8)  # 8-bit WAV is offset binary
  for pcm, step in ((pcm16, 2.0**-15), (pcm8, 2.0**-7)):
    out = sep.separate(pcm, RATE)
    assert out["vocals"].dtype == np.float32
    np.testing.assert_allclose(out["vocals"], x, atol=step)
  with pytest.raises(ValueError, match="float or integer PCM"):
    sep.separate(x.astype(np.complex64), RATE)


@pytest.mark.parametrize("kwargs", [dict(overlap=1.0), dict(overlap=-0.1), dict(segment=0.0),
                                    dict(segment=float("inf")), dict(segment=float("nan")),
                                    dict(segment=0.01, shortest_segment=0.05),
                                    dict(batch_size=0), dict(channels=3)])
def test_separator_rejects_bad_settings(kwargs):
  with pytest.raises(ValueError):
    Separator(Recorder(), **kwargs)


# ----------------------------------------------------------------------------- files


def write(path, x, rate, subtype="FLOAT"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  sf.write(path, np.asarray(x).T, rate, subtype=subtype)
  return path


def run_files(tmp_path, inputs, separator=None, **kwargs):
  separator = separator or Separator(Recorder(), segment=0.2, overlap=0.25, batch_size=2)
  return separate.separate_files(inputs, separator=separator,
                                   output_dir=str(tmp_path / "out"), progress=False, **kwargs)


@pytest.mark.parametrize("rate,channels", [(48000, 2), (22050, 1), (44100, 2)])
def test_file_roundtrip_keeps_rate_channels_and_length(tmp_path, rate, channels):
  n = int(0.9 * rate) + 1
  x = noise(channels, n, seed=3)
  path = write(str(tmp_path / "in" / "song.wav"), x, rate)
  [result] = run_files(tmp_path, [path], bit_depth="32f")
  assert result.error is None
  expected = Separator(Recorder(), segment=0.2, overlap=0.25).separate(x, rate)
  for stem in ("vocals", "accompaniment"):
    out_path = str(tmp_path / "out" / "song" / f"{stem}.wav")
    assert result.outputs[stem] == out_path
    info = sf.info(out_path)
    assert (info.samplerate, info.channels, info.frames) == (rate, channels, n)
    np.testing.assert_array_equal(sf.read(out_path, dtype="float32", always_2d=True)[0].T,
                                  expected[stem])
  assert not glob.glob(str(tmp_path / "out" / "**" / ".*partial*"), recursive=True)


def test_relative_output_folder_that_does_not_exist_yet(tmp_path, monkeypatch):
  """`--output_dir=separated` from the current folder (README's example): the folders are made.
  An alarm turns a regression (the parent walk once looped forever on "") into a failure."""
  import signal

  def hung(*args):
    raise TimeoutError("separate_files did not return")
  monkeypatch.chdir(tmp_path)
  write(str(tmp_path / "in" / "song.wav"), noise(2, 4410, seed=4), RATE)
  previous = signal.signal(signal.SIGALRM, hung)
  signal.alarm(120)
  try:
    [result] = separate.separate_files(
        [os.path.join("in", "song.wav")], separator=Separator(Recorder(), segment=0.05),
        output_dir=os.path.join("separated", "run1"), progress=False)
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
  assert result.error is None
  assert sf.info(str(tmp_path / "separated" / "run1" / "song" / "vocals.wav")).frames == 4410


def test_inputs_folders_globs_formats_and_template(tmp_path):
  x = noise(2, 9000)
  write(str(tmp_path / "in" / "a.wav"), x, RATE)
  write(str(tmp_path / "in" / "deep" / "b.flac"), x, RATE, subtype="PCM_24")
  sf.write(str(tmp_path / "c.mp3"), x.T, RATE)
  open(tmp_path / "in" / "notes.txt", "w").close()
  results = run_files(tmp_path, [str(tmp_path / "in"), str(tmp_path / "*.mp3")],
                      template="{stem}/{track}.{ext}", fmt="flac", bit_depth="16")
  assert [r.error for r in results] == [None] * 3
  names = sorted(os.path.relpath(p, tmp_path / "out") for r in results
                 for p in r.outputs.values())
  assert names == sorted(f"{s}/{t}.flac" for s in ("vocals", "accompaniment")
                         for t in "abc")
  assert sf.info(str(tmp_path / "out" / "vocals" / "a.flac")).subtype == "PCM_16"


@pytest.mark.parametrize("kwargs,message", [
    (dict(fmt="flac", bit_depth="32f"), "FLAC has no 32-bit float"),
    (dict(template="{track}.{ext}"), "must contain {stem}"),
    (dict(template="{song}/{stem}.{ext}"), "unknown field"),
    (dict(template="/elsewhere/{stem}.{ext}"), "must stay inside the output folder"),
    (dict(template="../{track}/{stem}.{ext}"), "must stay inside the output folder"),
    (dict(template="{track}/{stem:d}.{ext}"), "bad output template"),
    (dict(template="{track}/{stem}.{ext}/"), "must end in a file name"),
])
def test_bad_options_are_rejected_up_front(tmp_path, kwargs, message):
  with pytest.raises(ValueError, match=message):
    run_files(tmp_path, [str(tmp_path)], **kwargs)


def test_bad_inputs_are_reported_and_skipped(tmp_path):
  good = write(str(tmp_path / "in" / "good.wav"), noise(2, 9000), RATE)
  bad = {}
  bad["garbage"] = str(tmp_path / "in" / "garbage.wav")
  with open(bad["garbage"], "wb") as f:
    f.write(b"this is not audio" * 10)
  bad["empty"] = write(str(tmp_path / "in" / "empty.wav"), np.zeros((2, 0)), RATE)
  bad["zero_bytes"] = str(tmp_path / "in" / "zero_bytes.flac")
  open(bad["zero_bytes"], "wb").close()
  short = write(str(tmp_path / "in" / "short.wav"), noise(2, 100), RATE)  # under one STFT
  nan = noise(2, 20000)
  nan[1, 15000] = np.nan
  bad["nan"] = write(str(tmp_path / "in" / "nan.wav"), nan, RATE)
  bad["surround"] = write(str(tmp_path / "in" / "surround.wav"), noise(6, 9000), RATE)
  missing = str(tmp_path / "nothing*.wav")
  results = run_files(tmp_path, [str(tmp_path / "in"), missing])
  errors = {r.path: r.error for r in results}
  assert errors.pop(good) is None and errors.pop(short) is None
  assert os.path.exists(tmp_path / "out" / "good" / "vocals.wav")
  assert sf.info(str(tmp_path / "out" / "short" / "vocals.wav")).frames == 100
  expected = dict(garbage="cannot read audio", empty="empty (no samples)",
                  zero_bytes="empty file (0 bytes)",
                  nan="non-finite sample (NaN or Inf) at frame 15000", surround="6 channels")
  for key, message in expected.items():
    assert message in errors[bad[key]] and bad[key] in errors[bad[key]]
    assert not os.path.exists(tmp_path / "out" / key)
  assert "no such file" in errors[missing]
  assert not glob.glob(str(tmp_path / "out" / "**" / ".*partial*"), recursive=True)


def test_truncated_wav_is_separated_with_a_warning(tmp_path, caplog):
  path = write(str(tmp_path / "in" / "cut.wav"), noise(2, 9000), RATE, subtype="PCM_16")
  assert audio_reader.wav_header_frames(path) == 9000
  data = open(path, "rb").read()
  with open(path, "wb") as f:  # a download that stopped half way
    f.write(data[:len(data) // 2])
  [result] = run_files(tmp_path, [path])
  present = sf.info(path).frames
  assert result.error is None and sf.info(result.outputs["vocals"]).frames == present < 9000
  assert f"{path}: truncated file? its header promises 9000 frames, {present} are there" in (
      caplog.text)
  flac = write(str(tmp_path / "in" / "song.flac"), noise(2, 100), RATE, subtype="PCM_16")
  assert audio_reader.wav_header_frames(flac) is None


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
def test_wav_whose_streaming_writer_left_the_data_size_at_zero_is_read_whole(
    tmp_path, caplog, subtype):
  samples = noise(2, 9001)
  path = write(str(tmp_path / "in" / "live.wav"), samples, RATE, subtype=subtype)
  data = bytearray(open(path, "rb").read())
  size_at = data.find(b"data") + 4
  data[4:8] = data[size_at:size_at + 4] = bytes(4)  # RIFF and data sizes never filled in
  with open(path, "wb") as f:
    f.write(data)
  assert sf.info(path).frames == 0  # what libsndfile makes of it
  reader = audio_reader.AudioReader(path)
  read = np.concatenate(list(reader.blocks(4000)), axis=1)
  reader.close()
  assert reader._raw.closed  # the file under the SoundFile too
  expected = sf.read(write(str(tmp_path / "ref.wav"), samples, RATE, subtype=subtype),
                     dtype="float32", always_2d=True)[0].T
  np.testing.assert_array_equal(read, expected)
  assert f"{path}: the WAV header gives a data size of 0" in caplog.text
  [result] = run_files(tmp_path, [path])
  assert result.error is None and sf.info(result.outputs["vocals"]).frames == 9001
  header_only = str(tmp_path / "in" / "nothing.wav")
  with open(header_only, "wb") as f:  # the same header with no samples after it
    f.write(data[:size_at + 4])
  with pytest.raises(InputError, match="empty \\(no samples\\)"):
    audio_reader.AudioReader(header_only)


@pytest.mark.parametrize("fmt,message", [
    ("FLAC", "decoding stopped after {n} of the 220500 frames its header promises"),
    ("MP3", "truncated file? its header promises 220500 frames, {n} decoded")])
def test_truncated_compressed_file_is_separated_as_far_as_it_decodes(tmp_path, caplog, fmt,
                                                                     message):
  if fmt not in sf.available_formats():
    pytest.skip(f"this libsndfile cannot write {fmt}")
  path = str(tmp_path / f"cut.{fmt.lower()}")
  sf.write(path, noise(2, 5 * RATE, seed=7).T, RATE, format=fmt)
  data = open(path, "rb").read()
  with open(path, "wb") as f:  # a download that stopped half way
    f.write(data[:len(data) // 2])
  [result] = run_files(tmp_path, [path])
  assert result.error is None
  n = sf.info(result.outputs["vocals"]).frames
  assert RATE < n < 4 * RATE and result.seconds == n / RATE
  assert f"{path}: " + message.format(n=n) in caplog.text


@pytest.mark.parametrize("error", [
    MemoryError(), RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                "12.5GiB.\nBuffer assignment details...")])
def test_out_of_memory_is_one_line_with_the_remedy(tmp_path, error):
  def model_fn(chunks):
    raise error
  path = write(str(tmp_path / "in" / "song.wav"), noise(2, 9000), RATE)
  [result] = run_files(tmp_path, [path], separator=Separator(model_fn, segment=0.1))
  assert result.error == f"{path}: out of memory (lower --batch_size or --segment)"
  assert not os.path.exists(tmp_path / "out" / "song")


def test_existing_outputs_need_overwrite(tmp_path):
  path = write(str(tmp_path / "song.wav"), noise(2, 9000), RATE)
  out = tmp_path / "out" / "song" / "vocals.wav"
  os.makedirs(out.parent)
  out.write_bytes(b"keep me")
  [result] = run_files(tmp_path, [path])
  assert "exists; pass --overwrite" in result.error and out.read_bytes() == b"keep me"
  [result] = run_files(tmp_path, [path], overwrite=True)
  assert result.error is None and sf.info(str(out)).frames == 9000


def test_an_input_is_never_an_output(tmp_path):
  # The song sits where its own vocals would go: refused even with overwrite.
  path = write(str(tmp_path / "out" / "vocals" / "vocals.wav"), noise(2, 9000), RATE)
  before = open(path, "rb").read()
  [result] = run_files(tmp_path, [path], overwrite=True)
  assert "is an input of this run" in result.error and open(path, "rb").read() == before
  assert not os.path.exists(tmp_path / "out" / "vocals" / "accompaniment.wav")


def test_second_run_skips_the_output_folder(tmp_path):
  write(str(tmp_path / "music" / "song.wav"), noise(2, 9000), RATE)
  out = str(tmp_path / "music" / "separated")
  separator = Separator(Recorder(), segment=0.2)
  [first] = separate.separate_files([str(tmp_path / "music")], separator=separator,
                                      output_dir=out, progress=False)
  assert first.error is None
  results = separate.separate_files([str(tmp_path / "music"), str(tmp_path / "music" / "*")],
                                      separator=separator, output_dir=out, progress=False)
  assert [r.path for r in results] == [str(tmp_path / "music" / "song.wav")]
  assert "exists; pass --overwrite" in results[0].error
  assert sorted(os.listdir(out)) == ["song"]


def test_same_names_clash_until_the_template_tells_them_apart(tmp_path):
  a = write(str(tmp_path / "a" / "song.wav"), noise(2, 9000, seed=1), RATE)
  b = write(str(tmp_path / "b" / "song.flac"), noise(2, 9000, seed=2), RATE, subtype="PCM_24")
  first, second = run_files(tmp_path, [a, b])
  assert first.error is None and "{folder} or {trackext} in --template" in second.error
  results = run_files(tmp_path, [a, b], template="{folder}/{track}.{trackext}/{stem}.{ext}")
  assert [r.error for r in results] == [None, None]
  assert results[1].outputs["vocals"] == str(tmp_path / "out" / "b" / "song.flac" / "vocals.wav")


def test_one_path_is_one_input(tmp_path):
  """A single str (or bytes) path is one input, not a sequence of one-character paths (`/`
  searched the whole disk)."""
  path = write(str(tmp_path / "in" / "song.wav"), noise(2, 9000), RATE)
  [result] = run_files(tmp_path, path)
  assert result.error is None
  assert result.outputs["vocals"] == str(tmp_path / "out" / "song" / "vocals.wav")
  [result] = run_files(tmp_path, os.fsencode(path), overwrite=True)
  assert result.error is None


def test_an_empty_template_field_never_writes_outside_the_output_folder(tmp_path):
  os.rename(write(str(tmp_path / "in" / "take.wav"), noise(2, 9000), RATE),
            tmp_path / "in" / "recording")  # no extension: {trackext} is empty
  [result] = run_files(tmp_path, [str(tmp_path / "in" / "recording")],
                       template=f"{{trackext}}{tmp_path}/escaped/{{stem}}.{{ext}}")
  assert "is not a file inside the output folder" in result.error
  assert not os.path.exists(tmp_path / "escaped") and not os.path.exists(tmp_path / "out")


def test_output_names_near_the_length_limit_are_written(tmp_path):
  """255 bytes is the usual limit of a file name; the temporary name must not exceed it when
  the final one does not (248 bytes here)."""
  name = "\u6b4c" * 76 + "ab"
  path = write(str(tmp_path / "in" / f"{name}.wav"), noise(2, 9000), RATE)
  [result] = run_files(tmp_path, [path], template="{track}_{stem}.{ext}")
  assert result.error is None
  assert len(os.fsencode(os.path.basename(result.outputs["accompaniment"]))) == 248


def test_a_failed_input_does_not_claim_its_outputs(tmp_path):
  bad = str(tmp_path / "a" / "song.wav")
  os.makedirs(os.path.dirname(bad))
  with open(bad, "wb") as f:
    f.write(b"not audio")
  good = write(str(tmp_path / "b" / "song.wav"), noise(2, 9000), RATE)
  errors = {r.path: r.error for r in run_files(tmp_path, [str(tmp_path)])}
  assert "cannot read audio" in errors[bad] and errors[good] is None


def test_inputs_are_found_once_and_globs_search_folders(tmp_path):
  path = write(str(tmp_path / "in" / "one" / "song.wav"), noise(2, 9000), RATE)
  write(str(tmp_path / "in" / "two" / "other.flac"), noise(2, 9000), RATE, subtype="PCM_16")
  open(tmp_path / "in" / "cover.jpg", "w").close()
  spelled = os.path.join(str(tmp_path), "in", "one", "..", "one", "song.wav")
  os.symlink(path, tmp_path / "link.wav")
  found, missing = paths.find_inputs(
      [path, spelled, str(tmp_path / "link.wav"), str(tmp_path / "in" / "*")])
  assert sorted(os.path.basename(p) for p in found) == ["other.flac", "song.wav"] and not missing
  _, missing = paths.find_inputs([str(tmp_path / "in" / "*.jpg")])
  [failure] = missing.values()
  assert "matches no audio files" in failure


def test_folder_search_follows_symlinked_folders_once_and_names_nesting(tmp_path):
  write(str(tmp_path / "elsewhere" / "x" / "b.wav"), noise(2, 9000), RATE)
  write(str(tmp_path / "albums" / "a.wav"), noise(2, 9000), RATE)
  os.symlink(tmp_path / "elsewhere" / "x", tmp_path / "albums" / "linked")
  os.symlink(tmp_path / "albums", tmp_path / "albums" / "loop")  # a cycle is entered once
  found, missing = paths.find_inputs([str(tmp_path / "albums")])
  assert sorted(os.path.basename(p) for p in found) == ["a.wav", "b.wav"] and not missing
  write(str(tmp_path / "io" / "out" / "c.wav"), noise(2, 9000), RATE)
  _, missing = paths.find_inputs([str(tmp_path / "io" / "out")], exclude=str(tmp_path / "io"))
  [failure] = missing.values()
  assert "lies inside the output folder" in failure


def test_names_that_are_not_utf8_are_read_and_written(tmp_path):
  folder = os.fsencode(str(tmp_path / "in"))
  os.makedirs(folder)
  name = os.fsdecode(os.path.join(folder, b"caf\xe9.wav"))
  # Quiet enough not to clip: a warning naming the file would carry its surrogates into the
  # test report, which pytest-xdist cannot send between processes.
  sf.write(os.fsencode(name), noise(2, 9000, scale=0.1).T, RATE, subtype="FLOAT")
  [result] = run_files(tmp_path, [name])
  assert result.error is None, result.error
  assert sf.info(os.fsencode(result.outputs["vocals"])).frames == 9000


def test_write_errors_name_the_output(tmp_path, monkeypatch):
  path = write(str(tmp_path / "song.wav"), noise(2, 9000), RATE)

  def full_disk(self, data):
    raise RuntimeError("System error.")
  monkeypatch.setattr(sf.SoundFile, "write", full_disk)
  [result] = run_files(tmp_path, [path])
  vocals = str(tmp_path / "out" / "song" / "vocals.wav")
  assert f"cannot write {vocals} (System error.; " in result.error and "MB free" in result.error
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.integration
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])  # SIGHUP: the terminal closed
def test_cli_cleans_up_on_sigterm(tmp_path, signame):
  import subprocess
  import sys

  path = write(str(tmp_path / "song.wav"), noise(2, 40000), RATE)
  child = f"""
import os, signal, sys
from bsmamba2_jax import separator
from experiments import separate
calls = []
def terminated_on_second_call(chunks):
  calls.append(1)
  if len(calls) == 2:
    os.kill(os.getpid(), signal.{signame})
  return chunks
separator.Separator.from_checkpoint = classmethod(
    lambda cls, path, precision, device, **kw: cls(terminated_on_second_call, **kw))
signal.signal(signal.{signame}, signal.SIG_DFL)  # as in a terminal, even under nohup
sys.argv = ["separate", "--checkpoint=unused", "--input={path}", "--output_dir={tmp_path}/out",
            "--segment=0.1", "--overlap=0", "--noprogress"]
separate.run()
"""
  proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                        timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 130, proc.stderr[-2000:]
  assert f"interrupted ({signame})" in proc.stderr and "Traceback" not in proc.stderr
  assert not [f for _, _, files in os.walk(tmp_path / "out") for f in files]


def test_interrupted_run_leaves_no_file(tmp_path):
  path = write(str(tmp_path / "song.wav"), noise(2, 40000), RATE)

  def interrupted(chunks):
    if interrupted.calls:
      raise KeyboardInterrupt
    interrupted.calls += 1
    return chunks
  interrupted.calls = 0
  with pytest.raises(KeyboardInterrupt):
    run_files(tmp_path, [path], separator=Separator(interrupted, segment=0.1, overlap=0.0))
  assert not [f for _, _, files in os.walk(tmp_path / "out") for f in files]


def test_clipping_is_reported_not_rescaled(tmp_path):
  x = noise(2, 9000, scale=0.1)
  x[0, 100:110] = 1.5
  path = write(str(tmp_path / "loud.wav"), x, RATE)
  [result] = run_files(tmp_path, [path], bit_depth="16")
  assert result.clipped == {"vocals": 10}
  vocals = sf.read(result.outputs["vocals"], always_2d=True)[0].T
  np.testing.assert_allclose(vocals[:, 200:], x[:, 200:], atol=1 / 2**15)  # no rescaling
  np.testing.assert_allclose(vocals[0, 100:110], 32767 / 32768)
  [result] = run_files(tmp_path, [path], bit_depth="32f", overwrite=True)
  assert result.clipped == {}


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def tiny_model():
  """A one-layer tiny model with random parameters."""
  from bsmamba2_jax.config import ModelConfig
  from bsmamba2_jax.model import BSMamba2
  config = ModelConfig.preset("tiny", depth=1)
  return BSMamba2(config), random_params(config, seed=7)


@pytest.mark.parametrize("rate,channels,overlap", [(44100, 2, 0.25), (48000, 1, 0.0),
                                                   (22050, 2, 0.0)])
def test_model_with_all_ones_mask_reproduces_input(rate, channels, overlap):
  import jax
  import jax.numpy as jnp

  from bsmamba2_jax.model import BSMamba2, ModelConfig
  model = BSMamba2(ModelConfig.preset("tiny"))
  frames = 8820 // model.config.hop_length + 1
  ones = jnp.ones((2, 2, model.config.n_fft // 2 + 1, frames), jnp.complex64)
  apply = jax.jit(lambda x: model.apply({}, x, ones, method=BSMamba2.apply_mask))
  sep = Separator(lambda c: np.asarray(apply(c)), segment=0.2, overlap=overlap, batch_size=2)
  ident = Separator(Recorder(), segment=0.2, overlap=overlap, batch_size=2)
  n = int(0.5 * rate) | 1
  x = noise(channels, n, seed=4)
  out = sep.separate(x, rate)["vocals"]
  np.testing.assert_allclose(out, ident.separate(x, rate)["vocals"], atol=2e-5)
  if rate == RATE:
    np.testing.assert_allclose(out, x, atol=2e-5)


def _sdr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
  return float(20 * np.log10(np.linalg.norm(reference) / np.linalg.norm(reference - estimate)))


def test_mixed_precision_stays_within_40_db_of_float32_on_a_song():
  """The official micro checkpoint (converted) on a synthesized song: "mixed" (bf16 operands,
  float32 accumulation) against float32, and its projections really take bf16 operands."""
  import jax
  import jax.numpy as jnp

  from bsmamba2_jax.exports import load_torch_checkpoint
  from bsmamba2_jax.model import BSMamba2
  from data_pipeline.songs import synthesize_track
  config, params = load_torch_checkpoint(
      os.path.join(os.path.dirname(__file__), "data", "official_micro.ckpt"), hop_length=64)
  song = synthesize_track(3, 1, 0, 6.0, 1.0)["mixture"]
  out = {}
  for precision in ("float32", "mixed"):
    sep = Separator.from_model(BSMamba2(config), params, precision=precision, segment=2.0)
    assert sep.dtype == precision
    out[precision] = sep.separate(song, RATE)
  for stem, reference in out["float32"].items():
    assert 40 < _sdr_db(reference, out["mixed"][stem]) < 120, stem  # close, and not float32
  mixed = BSMamba2(config.with_compute(dtype="mixed"))
  hlo = jax.jit(lambda p, x: mixed.apply({"params": p}, x)).lower(
      params, jnp.zeros((1, 2, 4096), jnp.float32)).as_text()
  bf16_dots = re.findall(r"stablehlo.dot_general.*\(tensor<[^>]*bf16>, tensor<[^>]*bf16>\) -> "
                         r"tensor<[^>]*f32>", hlo)
  # Per layer, two paths of two mixers (in_proj, out_proj) and a merge linear.
  assert len(bf16_dots) == 2 * (2 * 2 + 1) * config.depth


def test_model_segment_must_hold_one_stft_window(tiny_model):
  model, params = tiny_model
  shortest = model.config.n_fft / model.config.sample_rate
  with pytest.raises(ValueError, match=f"at least {shortest:.3f} \\(one STFT window"):
    Separator.from_model(model, params, segment=0.5 * shortest)
  assert not Separator.from_model(model, params, segment=shortest).fixed_batch  # jit: any batch


@pytest.mark.integration
def test_cli_separates_good_files_and_fails_on_bad_ones(tmp_path, tiny_model):
  import subprocess
  import sys

  from bsmamba2_jax import exports
  model, params = tiny_model
  export = exports.save_inference(str(tmp_path / "export"), model.config, params)
  x = noise(2, 6000, seed=6)
  good = write(str(tmp_path / "in" / "good.wav"), x, RATE)
  bad = str(tmp_path / "in" / "bad.wav")
  with open(bad, "wb") as f:
    f.write(b"not audio")
  out_dir = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.separate", f"--checkpoint={export}",
       f"--input={tmp_path / 'in'}", f"--output_dir={out_dir}", "--segment=0.1",
       "--overlap=0", "--bit_depth=32f", "--precision=float32", "--noprogress"],
      capture_output=True, text=True, timeout=300,
      env={**os.environ, "BSMAMBA2_COMPILATION_CACHE": str(tmp_path / "xla"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"},
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 1, proc.stderr
  assert any(name.endswith("-cache") for name in os.listdir(tmp_path / "xla"))  # kept programs
  assert f"{bad}: cannot read audio" in proc.stdout + proc.stderr
  # --overlap=0: the official chunking of a direct model call on the zero-padded chunks.
  padded = np.pad(x, ((0, 0), (0, 2 * 4410 - 6000))).reshape(2, 2, 4410).transpose(1, 0, 2)
  vocals = np.concatenate(list(np.asarray(model.apply({"params": params}, padded))), axis=1)
  expected = {"vocals": vocals[:, :6000], "accompaniment": x - vocals[:, :6000]}
  for stem in ("vocals", "accompaniment"):
    written = sf.read(str(out_dir / "good" / f"{stem}.wav"), dtype="float32")[0].T
    assert np.isfinite(written).all() and np.abs(written).max() > 0
    np.testing.assert_allclose(written, expected[stem], atol=1e-5)


# ----------------------------------------------------------------------------- peak memory

_RSS_CHILD = """
import resource, sys
import numpy as np, soundfile as sf
from bsmamba2_jax.separate import separate_files
from bsmamba2_jax.separator import Separator
path, out_dir, model = sys.argv[1:4]
if model == "identity":
  separator = Separator(lambda c: c, segment=8.0, overlap=0.25, batch_size=2)
else:
  import jax
  from bsmamba2_jax.model import abstract_params
  from bsmamba2_jax.model import BSMamba2, ModelConfig
  config = ModelConfig.preset("tiny")
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), abstract_params(config))
  separator = Separator.from_model(BSMamba2(config), params, segment=8.0, overlap=0.25,
                                   batch_size=2)
[result] = separate_files([path], separator=separator, output_dir=out_dir, progress=False)
assert result.error is None, result.error
assert sf.info(result.outputs["vocals"]).frames == sf.info(path).frames
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_mib(tmp_path, seconds, rate, model):
  """Peak RSS (MiB) of a fresh process separating a generated `seconds` stereo file."""
  import subprocess
  import sys

  path = str(tmp_path / f"long{seconds}.wav")
  rng = np.random.default_rng(0)
  with sf.SoundFile(path, "w", samplerate=rate, channels=2, subtype="PCM_16") as f:
    for _ in range(int(seconds)):  # written in 1-s blocks: the test never holds the file
      f.write(0.1 * rng.standard_normal((rate, 2)))
  proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, path, str(tmp_path / "out"), model],
                        capture_output=True, text=True, timeout=1800,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-2000:]
  return int(proc.stdout.split()[-1]) / 1024


@pytest.mark.integration
def test_peak_memory_does_not_grow_with_length(tmp_path):
  # 600 s of 48 kHz stereo is 220 MiB as float32 samples; streaming keeps only a few chunks.
  short = _peak_rss_mib(tmp_path, 60, 48000, "identity")
  long = _peak_rss_mib(tmp_path, 600, 48000, "identity")
  print(f"peak RSS identity separator: 60 s {short:.1f} MiB, 600 s {long:.1f} MiB")
  assert long - short < 20


@pytest.mark.integration
@pytest.mark.slow
def test_peak_memory_tiny_model_long_file(tmp_path):
  short = _peak_rss_mib(tmp_path, 60, 44100, "tiny")
  long = _peak_rss_mib(tmp_path, 600, 44100, "tiny")
  print(f"peak RSS tiny model: 60 s {short:.1f} MiB, 600 s {long:.1f} MiB")
  # Measured 1685 vs 1749 MiB (XLA allocator noise); holding the 600-s file would add 202 MiB
  # of float32 input alone.
  assert long - short < 100
