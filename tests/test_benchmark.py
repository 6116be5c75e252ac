"""Benchmark report machinery on microscopic shapes: torch peers, FLOP formula, report files."""
import json
import math
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsmamba2_jax.config import ModelConfig
from bsmamba2_jax.model import BSMamba2
from experiments.benchmarks import limit, report, scaling


def _reference_scan(x, dt, A, B, C, D):
  """float64 NumPy recurrence of docs/model.md §5, head h reading group h // (H / G)."""
  x, dt, A, B, C, D = (np.asarray(v, np.float64) for v in (x, dt, A, B, C, D))
  batch, seqlen, heads, headdim = x.shape
  group = np.arange(heads) // (heads // B.shape[2])
  state = np.zeros((batch, heads, headdim, B.shape[3]))
  y = np.zeros_like(x)
  for t in range(seqlen):
    Bt, Ct = B[:, t, group], C[:, t, group]                     # (b, h, n)
    state = (np.exp(dt[:, t] * A)[..., None, None] * state
             + dt[:, t, :, None, None] * x[:, t, :, :, None] * Bt[:, :, None, :])
    y[:, t] = np.einsum("bhpn,bhn->bhp", state, Ct) + D[:, None] * x[:, t]
  return y


def _small_inputs(seed=0, batch=2, seqlen=37, heads=4, headdim=8, ngroups=2, d_state=16):
  rng = np.random.default_rng(seed)
  f32 = lambda a: np.asarray(a, np.float32)
  return (f32(rng.standard_normal((batch, seqlen, heads, headdim))),
          f32(np.log1p(np.exp(rng.standard_normal((batch, seqlen, heads))))),
          f32(-rng.uniform(0.5, 4.0, heads)),
          f32(rng.standard_normal((batch, seqlen, ngroups, d_state))),
          f32(rng.standard_normal((batch, seqlen, ngroups, d_state))),
          f32(rng.standard_normal(heads)))


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 64])
def test_torch_peers_match_float64_recurrence(chunk_size):
  torch = pytest.importorskip("torch")
  from experiments.benchmarks import torch_ssd
  arrays = _small_inputs()
  expected = _reference_scan(*arrays)
  tensors = [torch.from_numpy(a) for a in arrays]
  chunked = torch_ssd.ssd_chunked(*tensors, chunk_size=chunk_size).numpy()
  np.testing.assert_allclose(chunked, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  if chunk_size == 1:
    loop = torch_ssd.ssd_loop(*tensors).numpy()
    np.testing.assert_allclose(loop, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_torch_chunked_gradients_finite_with_padding():
  torch = pytest.importorskip("torch")
  from experiments.benchmarks import torch_ssd
  tensors = [torch.from_numpy(a).requires_grad_(True) for a in _small_inputs(seqlen=21)]
  torch_ssd.ssd_chunked(*tensors, chunk_size=16).square().sum().backward()
  assert all(torch.isfinite(t.grad).all() for t in tensors)


def test_dense_flops_equal_twice_the_weights_per_use():
  """Every matmul weight is used once per (band, frame) token in the dual path and once per
  frame in band split / mask estimator, so dense FLOPs = 2 · Σ weights · uses."""
  cfg = ModelConfig.preset("small", depth=2)
  samples = 44100
  frames, bands = 1 + samples // cfg.hop_length, len(cfg.band_widths)
  params = jax.eval_shape(lambda: BSMamba2(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, cfg.audio_channels, cfg.n_fft)))["params"])
  weights = {"layers": 0, "edges": 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      weights["layers" if "layers_" in name else "edges"] += math.prod(leaf.shape)
  flops = limit.model_flops(cfg, 1, samples)
  dense = flops["mamba_dense"] + flops["merge"] + flops["band_split"] + flops["mask_estimator"]
  assert dense == 2 * frames * (bands * weights["layers"] + weights["edges"])


def test_paper_forward_flops_near_spec_estimate():
  total = limit.model_flops(ModelConfig.preset("paper"), 1, 8 * 44100)["total"]
  assert 2.6e12 < total < 3.4e12  # docs/model.md §7: ~3.1 TFLOP per 8-s stereo example


def test_ssd_flops_match_xla_count_at_time_path_shape():
  cfg = ModelConfig.preset("paper")
  length = 801
  args = [jax.ShapeDtypeStruct(a.shape, jnp.float32)
          for a in scaling.scan_inputs(1, length, 16, 64, 128)]
  compiled = jax.jit(scaling.scan_functions("chunked", 64)["fwd"]).lower(*args).compile()
  xla = scaling.compile_stats(compiled)["xla_flops"]
  if xla is None:
    pytest.skip("this backend has no cost analysis")
  analytic = limit.ssd_flops_per_token(cfg, length) * length
  assert analytic <= xla < 1.3 * analytic  # XLA also counts exps, masks and the D skip


def _fake_section(name, rows, fail=False, monkeypatch=None):
  module = types.ModuleType(f"experiments.benchmarks.{name}")

  def run(mode="default"):
    if fail:
      raise RuntimeError("section exploded")
    return [dict(r, mode=mode) for r in rows], f"text of {name}"

  module.run = run
  monkeypatch.setitem(sys.modules, module.__name__, module)


def test_report_records_failures_targets_and_never_overwrites(tmp_path, monkeypatch):
  peers = [dict(name="c", peer="jax", method="chunked", direction="fwd+bwd", median_s=0.5,
                sequences=2, repeats=[0.5]),
           dict(name="s", peer="jax", method="sequential", direction="fwd+bwd", median_s=6.0),
           dict(name="l", peer="torch loop", direction="fwd+bwd", median_s=20.0,
                repeats=[19.0, 20.0, 21.0])]
  _fake_section("fake_peers", peers, monkeypatch=monkeypatch)
  _fake_section("fake_broken", [], fail=True, monkeypatch=monkeypatch)
  first = report.build(["fake_peers", "fake_broken"], "smoke", str(tmp_path), verbose=False)
  second = report.build(["fake_peers"], "smoke", str(tmp_path), verbose=False)
  assert second["stem"] == first["stem"] + "-2"
  saved = json.loads((tmp_path / (first["stem"].split("/")[-1] + ".json")).read_text())
  assert saved["complete"] and saved["sections"]["fake_peers"][2]["repeats"] == [19.0, 20.0, 21.0]
  assert saved["sections"]["fake_peers"][0]["mode"] == "smoke"
  assert "section exploded" in saved["section_info"]["fake_broken"]["error"]["message"]
  assert "failed" in open(first["stem"] + ".md").read()
  found = report.targets({"peers": peers})
  assert found[0]["measured"] == pytest.approx(12.0) and found[0]["holds"]
  assert found[1]["measured"] == pytest.approx(40.0) and not found[1]["holds"]
  assert found[2]["measured"] is None and found[2]["holds"] is None
  scan = [dict(path="time 62x801", method=m, direction="fwd+bwd", batch=b, median_s=t, full_s=f)
          for m, b, t, f in (("sequential", 3, 1.5, 31.0), ("chunked", 62, 3.1, 3.1))]
  at_full_shape = report.targets({"scan": scan, "peers": peers})[0]
  assert at_full_shape["measured"] == pytest.approx(10.0) and at_full_shape["holds"]
  assert at_full_shape["setting"] == "62 × 801 (sequential on 3, scaled)"
  skipped = dict(preset="paper", what="train step", audio_s=1, skipped="needs 20 GB")
  assert "needs 20 GB" in report.targets({"limit": [skipped]})[2]["setting"]
  # The paper step is read where it ran with the most steps per call, the single step beside it.
  paper = [dict(preset="paper", what="train step", audio_s=8, steps_per_call=k, median_s=k * t,
                of_matmul=o) for k, t, o in ((1, 160.0, 0.38), (2, 150.0, 0.41))]
  found = report.targets({"limit": [skipped] + paper})[2]
  assert found["measured"] == 0.41 and found["holds"]
  assert found["setting"] == "8 s stereo, batch 1, 2 steps per call (1 per call: 0.380)"


def test_unknown_mode_and_section_are_clear_errors(tmp_path):
  from experiments import benchmark
  with pytest.raises(ValueError, match="unknown mode 'huge'"):
    report.build([], "huge", str(tmp_path))
  with pytest.raises(ValueError, match=r"unknown benchmark section\(s\) \['nope'\]"):
    benchmark.run_benchmarks(["nope"], str(tmp_path))


def test_peers_smoke_section_agrees_and_reports_ratios():
  pytest.importorskip("torch")
  from experiments.benchmarks import peers
  rows, text = peers.run("smoke")
  assert rows[0]["torch_chunked_rel_err"] < 1e-5 and rows[0]["torch_loop_rel_err"] < 1e-5
  jax_rows = [r for r in rows if r["peer"] == "jax"]
  assert all(r["vs_torch_loop"] > 0 and r["vs_torch_chunked"] > 0 for r in jax_rows)
  assert "vs_torch_loop" in text


def test_precision_section_measures_bf16_against_highest_fp32():
  from experiments.benchmarks import precision
  tree = dict(a=np.array([3.0, 0.0]), b=np.array([4.0]))
  off = dict(a=np.array([3.0, 1.0]), b=np.array([4.0]))
  assert precision.relative_error(off, tree) == pytest.approx(0.2)  # ‖(0, 1, 0)‖ / ‖(3, 0, 4)‖
  assert precision.relative_error(np.zeros(2), np.zeros(2)) == 0.0
  assert precision.relative_error(np.ones(2), np.zeros(2)) == float("inf")
  assert not precision.all_finite(dict(a=np.array([1.0, np.nan])))
  rows = {r["variant"]: r for r in precision.scan_rows(2, 40)}
  assert rows["fp32 default"]["y_rel_err"] < 1e-5 and rows["fp32 default"]["finite"]
  assert 1e-4 < rows["bf16"]["y_rel_err"] < 3e-2 and rows["bf16"]["grad_rel_err"] < 3e-2
  model = {r["variant"]: r for r in precision.model_rows("tiny", 0.05)}
  assert model["fp32 highest"]["finite"] and model["bf16"]["finite"]
  assert 15 < model["bf16"]["sdr_db"] < 80 and model["bf16"]["grad_rel_err"] < 0.1


def test_memory_budget_reads_an_accelerators_allocator(monkeypatch):
  from experiments.benchmarks import common

  class Accelerator:
    platform = "gpu"

    def __init__(self, stats):
      self.stats = stats

    def memory_stats(self):
      return self.stats

  monkeypatch.setattr(common.jax, "devices",
                      lambda: [Accelerator(dict(bytes_limit=100e9, bytes_in_use=20e9))])
  assert common.memory_budget_gb(0.5) == pytest.approx(40.0)  # half of the 80 GB still free
  monkeypatch.setattr(common.jax, "devices", lambda: [Accelerator(None)])
  assert common.memory_budget_gb(0.5, unknown_gb=3.0) == 3.0


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse2 avx fma avx2", "AMD EPYC 7B13, avx2 fma"),
    ("fpu avx2 fma avx512f avx512bw avx512_bf16", "AMD EPYC 7B13, avx512f avx512_bf16"),
])
def test_reports_name_the_cpu_and_its_vector_extensions(flags, expected):
  from experiments.benchmarks import report
  cpuinfo = f"processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
  assert report.cpu_description(cpuinfo) == expected


def test_timed_rows_carry_the_cpu_seconds_of_each_call():
  from experiments.benchmarks import common
  busy = lambda: sum(i * i for i in range(300_000))  # one thread, no system calls
  row = common.timed("busy", busy, repeats=3, warmup=1)
  cpu = row["user_s"] + row["sys_s"]
  # The CPU seconds of one call by another clock (wall time is no reference on a busy machine:
  # the call may get less than half a core while other tests run).
  start = time.process_time()
  for _ in range(3):
    busy()
  per_call = (time.process_time() - start) / 3
  assert 0.5 * per_call <= cpu <= 2 * per_call, (row, per_call)  # per call, not summed
  assert row["user_s"] > 4 * row["sys_s"] >= 0, row


def test_recipe_smoke_section_times_the_launchers_step_at_both_batches():
  """`--mode=gpu`'s `recipe` section on a microscopic model: env, matmuls, both step cases."""
  from experiments.benchmarks import recipe
  rows, text = recipe.run("smoke")
  env = rows[0]
  assert env["name"].startswith("env: ") and env["jax"] == jax.__version__
  assert env["device_count"] == len(jax.devices()) and env["optax"]
  matmuls = {r["dtype"]: r for r in rows if r["name"].startswith("matmul")}
  assert set(matmuls) == {"float32", "bfloat16"}
  for r in matmuls.values():
    assert r["n"] == 128 and np.isfinite(r["median_s"]) and r["tflops"] > 0
  steps = {(r["per_device_batch"], r["remat"]): r for r in rows if "per_device_batch" in r}
  assert set(steps) == {(5, True), (1, False)}  # the recipe's batch with remat, one without
  devices = jax.local_device_count()
  for (batch, _), r in steps.items():
    assert not r.get("skipped") and not r.get("error"), r
    assert r["batch"] == batch * devices and len(r["repeats"]) == 2
    assert all(np.isfinite([r["median_s"], r["min_s"], r["max_s"], r["lower_s"],
                            r["compile_s"]])) and r["min_s"] <= r["median_s"] <= r["max_s"]
    assert r["examples_per_s"] == pytest.approx(r["batch"] / r["median_s"])
    assert r["tflops"] == pytest.approx(r["analytic_gflop"] * devices / r["median_s"] / 1e3)
    assert np.isfinite(r["loss_after"]) and r["grad_norm_after"] > 0 and r["finite_after"]
    assert r["peak_gb"] > 0 and r["precision"] == "float32"  # fp32 on CPU
  assert "| paper step batch 5 remat | float32 | 5 | " in text and " examples_per_s " in text
  # The report's targets read `limit`, `scan` and `peers` only: a gpu run has none of them.
  found = report.targets({"recipe": rows})
  assert [t["measured"] for t in found] == [None, None, None]
  assert found[2]["setting"] == "limit not measured"


def test_gpu_mode_runs_its_sections_and_the_rest_in_default(tmp_path, monkeypatch):
  from experiments import benchmark
  assert benchmark.default_sections("gpu") == ("recipe", "separate", "precision")
  assert "recipe" not in benchmark.default_sections("default")
  assert set(benchmark.GPU_SECTIONS) <= set(benchmark.SECTIONS)
  for name in benchmark.GPU_SECTIONS:  # each takes mode "gpu" itself
    module = __import__(f"experiments.benchmarks.{name}", fromlist=["run"])
    assert report.section_mode(module, "gpu") == "gpu"
  _fake_section("fake_cpu_only", [dict(name="a", median_s=1.0)], monkeypatch=monkeypatch)
  _fake_section("fake_gpu", [dict(name="b", median_s=1.0)], monkeypatch=monkeypatch)
  sys.modules["experiments.benchmarks.fake_gpu"].MODES = ("smoke", "default", "full", "gpu")
  built = report.build(["fake_cpu_only", "fake_gpu"], "gpu", str(tmp_path), verbose=False)
  assert built["mode"] == "gpu"
  assert built["sections"]["fake_cpu_only"][0]["mode"] == "default"
  assert built["sections"]["fake_gpu"][0]["mode"] == "gpu"
  assert "## fake_cpu_only (0 s, mode `default`)" in open(built["stem"] + ".md").read()


def test_separate_smoke_section_reports_limits_and_names_missing_peers(monkeypatch):
  from experiments.benchmarks import separate, separation_peers
  monkeypatch.setattr(separation_peers, "missing", lambda: ["demucs"])
  rows, text = separate.run("smoke")
  names = [r["name"] for r in rows]
  assert names == ["separate tiny float32", "limit tiny at the float32 matmul rate",
                   "limit tiny at the mixed matmul rate"]
  assert all(r["wall_per_audio"] > 0 for r in rows)
  assert "Peers skipped: demucs not installed" in text and "GFLOP/s" in text
