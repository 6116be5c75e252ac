"""Training: optimiser and EMA against a float64 NumPy AdamW, skipped non-finite steps, gradient
accumulation, pmap over 2 devices vs 1, SIGTERM + resume, multi-host, export."""
import functools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bsmamba2_jax import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ToyModel:
  """estimate = mixture · gain[c] + mixer.A_log[c]: gradients have a closed form."""

  @staticmethod
  def apply(variables, mixture):
    p = variables["params"]
    return mixture * p["gain"][:, None] + p["mixer"]["A_log"][:, None]


def mse(estimate, target):
  return jnp.mean((estimate - target) ** 2)


def optimizer_config(**overrides):
  fields = dict(lr=0.05, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, clip=0.5, warmup_steps=0,
                schedule="constant", no_decay_mask=True, accumulate=1)
  return ml_collections.ConfigDict(dict(fields, **overrides))


def toy_state(optimizer):
  params = {"gain": jnp.array([0.3, -0.2]), "mixer": {"A_log": jnp.array([0.1, 0.4])}}
  return training.TrainState.create(params, optimizer, jax.random.PRNGKey(0))


def toy_batch(seed, batch=3, samples=16):
  rng = np.random.default_rng(seed)
  mixture = rng.standard_normal((batch, 2, samples)).astype(np.float32)
  vocals = (0.7 * mixture + 0.05 * rng.standard_normal(mixture.shape)).astype(np.float32)
  return dict(mixture=mixture, vocals=vocals)


def numpy_adamw_run(batches, cfg, ema_decay):
  """Float64 reference: clip-by-global-norm, AdamW (decay off for A_log), EMA per update."""
  gain, bias = np.array([0.3, -0.2]), np.array([0.1, 0.4])
  ema = [gain.copy(), bias.copy()]
  m = [np.zeros(2), np.zeros(2)]
  v = [np.zeros(2), np.zeros(2)]
  for t, batch in enumerate(batches, start=1):
    x, y = batch["mixture"].astype(np.float64), batch["vocals"].astype(np.float64)
    residual = x * gain[:, None] + bias[:, None] - y
    channels = x.shape[1]  # d/dθ of the mean over (b, c, n) of residual².
    grads = [2 * np.mean(residual * x, axis=(0, 2)) / channels,
             2 * np.mean(residual, axis=(0, 2)) / channels]
    norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
    grads = [g * min(1.0, cfg.clip / norm) for g in grads]
    params = [gain, bias]
    for i, decays in enumerate((True, False)):
      m[i] = cfg.b1 * m[i] + (1 - cfg.b1) * grads[i]
      v[i] = cfg.b2 * v[i] + (1 - cfg.b2) * grads[i] ** 2
      m_hat, v_hat = m[i] / (1 - cfg.b1 ** t), v[i] / (1 - cfg.b2 ** t)
      step = m_hat / (np.sqrt(v_hat) + cfg.eps) + (cfg.weight_decay * params[i] if decays else 0)
      params[i] = params[i] - cfg.lr * step
    gain, bias = params
    ema = [ema_decay * e + (1 - ema_decay) * p for e, p in zip(ema, params)]
  return (gain, bias), ema


def jit_step(optimizer, ema_decay=0.9):
  return jax.jit(functools.partial(training.train_step, model=ToyModel, optimizer=optimizer,
                                   loss_fn=mse, ema_decay=ema_decay, axis_name=None))


def test_train_step_matches_numpy_adamw_with_clipping_mask_and_ema():
  cfg = optimizer_config()
  optimizer = training.make_optimizer(cfg, num_steps=10)
  step = jit_step(optimizer)
  state = toy_state(optimizer)
  batches = [toy_batch(seed) for seed in range(4)]
  for batch in batches:
    state, metrics = step(state, batch)
    assert bool(metrics["finite"])
  (gain, bias), (ema_gain, ema_bias) = numpy_adamw_run(batches, cfg, ema_decay=0.9)
  np.testing.assert_allclose(state.params["gain"], gain, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state.params["mixer"]["A_log"], bias, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state.ema_params["gain"], ema_gain, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state.ema_params["mixer"]["A_log"], ema_bias, rtol=1e-5, atol=1e-5)
  assert int(state.step) == 4 and int(state.skipped) == 0


def test_non_finite_step_is_skipped_and_counted():
  optimizer = training.make_optimizer(optimizer_config(), num_steps=10)
  step = jit_step(optimizer)
  state = toy_state(optimizer)
  bad = toy_batch(0)
  bad["mixture"][0, 0, 3] = np.nan
  new, metrics = step(state, bad)
  assert not bool(metrics["finite"]) and int(new.skipped) == 1 and int(new.step) == 1
  for name in ("params", "ema_params", "opt_state"):
    for a, b in zip(jax.tree_util.tree_leaves(getattr(state, name)),
                    jax.tree_util.tree_leaves(getattr(new, name))):
      np.testing.assert_array_equal(a, b)
  assert not np.array_equal(new.rng, state.rng)
  after, metrics = step(new, toy_batch(1))
  assert bool(metrics["finite"]) and int(after.skipped) == 1
  assert np.all(np.isfinite(after.params["gain"]))
  assert not np.array_equal(after.params["gain"], state.params["gain"])


def test_k_steps_in_one_call_equal_k_single_steps():
  optimizer = training.make_optimizer(optimizer_config(), num_steps=10)
  step = jit_step(optimizer)
  batches = [toy_batch(seed) for seed in range(4)]
  batches[1]["vocals"][2, 1, 5] = np.inf  # a skipped step inside the call
  state = toy_state(optimizer)
  single = []
  for batch in batches:
    state, metrics = step(state, batch)
    single.append(metrics)
  stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
  steps = jax.jit(functools.partial(training.train_steps, model=ToyModel, optimizer=optimizer,
                                    loss_fn=mse, ema_decay=0.9, axis_name=None))
  together, metrics = steps(toy_state(optimizer), stacked)
  assert int(together.step) == 4 and int(together.skipped) == 1
  np.testing.assert_array_equal(metrics["finite"], [True, False, True, True])
  for name in ("loss", "grad_norm", "skipped"):
    np.testing.assert_allclose(metrics[name], [m[name] for m in single], rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(together)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("step, k, expected", [
    (0, 4, 4),   # 0 -> 4, the first log step
    (4, 4, 4),   # 4 -> 8
    (8, 4, 1),   # 8 + 4 passes the checkpoint at 10
    (9, 4, 1),
    (10, 4, 1),  # 10 + 4 passes the log step at 12
    (12, 4, 4),  # 12 -> 16
    (16, 4, 1),  # the run ends at 18
    (0, 1, 1),
])
def test_a_call_never_runs_past_a_log_checkpoint_or_the_end(step, k, expected):
  from experiments import train
  config = ml_collections.ConfigDict(dict(
      train=dict(num_steps=18, steps_per_execution=k), log_every=4, eval_every=20,
      ckpt_every=10))
  assert train.steps_this_call(step, config) == expected


def test_accumulation_equals_one_step_on_the_joined_batch():
  first, second = toy_batch(0), toy_batch(1)
  joined = {k: np.concatenate([first[k], second[k]]) for k in first}
  single = training.make_optimizer(optimizer_config(), num_steps=10)
  reference, _ = jit_step(single)(toy_state(single), joined)
  accumulated = training.make_optimizer(optimizer_config(accumulate=2), num_steps=20)
  step = jit_step(accumulated)
  state = toy_state(accumulated)
  half, _ = step(state, first)
  np.testing.assert_array_equal(half.params["gain"], state.params["gain"])  # Not applied yet.
  np.testing.assert_array_equal(half.ema_params["gain"], state.ema_params["gain"])
  full, _ = step(half, second)
  for a, b in zip(jax.tree_util.tree_leaves((reference.params, reference.ema_params)),
                  jax.tree_util.tree_leaves((full.params, full.ema_params))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_learning_rate_schedules():
  constant = training.learning_rate(optimizer_config(warmup_steps=4), 100)
  np.testing.assert_allclose([constant(i) for i in (0, 2, 4, 50)], [0, 0.025, 0.05, 0.05])
  cosine = training.learning_rate(optimizer_config(warmup_steps=10, schedule="cosine"), 110)
  for i in (20, 60, 110):
    expected = 0.05 * 0.5 * (1 + np.cos(np.pi * (i - 10) / 100))
    np.testing.assert_allclose(cosine(i), expected, rtol=1e-5, atol=1e-8)
  with pytest.raises(ValueError, match="schedule"):
    training.learning_rate(optimizer_config(schedule="linear"), 10)


def test_weight_decay_mask_spares_mamba_scalars():
  params = {"layer": {"mixer": {"A_log": 1, "D": 1, "dt_bias": 1, "in_proj": {"kernel": 1}}}}
  mask = training.weight_decay_mask(params)
  assert mask == {"layer": {"mixer": {"A_log": False, "D": False, "dt_bias": False,
                                      "in_proj": {"kernel": True}}}}


# ---- The real (microscopic) model, in subprocesses. -------------------------------------------

MICRO = textwrap.dedent("""
    import sys
    from experiments.configs import tiny

    def micro_config(data_dir, num_steps):
      c = tiny.get_config()
      c.model.overrides.update(dict(dim=16, depth=1, d_state=16, expand=2, headdim=16, n_fft=256,
                                    hop_length=64, band_widths=(32, 32, 65)))
      c.data.dir = data_dir
      c.data.synthetic.generate = False
      c.data.segment_seconds = 0.5
      c.train.num_steps = num_steps
      c.train.per_device_batch_size = 2
      c.optimizer.warmup_steps = 0
      c.eval.segment_seconds = 0.5
      c.eval.batch_size = 2
      c.eval.max_examples = 2
      c.log_every = 1
      c.eval_every = c.ckpt_every = 1000
      return c
    """)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Environment for subprocesses: repo on the path, a shared persistent compilation cache."""
  cache = tmp_path_factory.mktemp("jax_cache")
  return dict(os.environ, PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu",
              TF_CPP_MIN_LOG_LEVEL="3")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from data_pipeline import synthetic
  return synthetic.generate_dataset(str(tmp_path_factory.mktemp("data")), num_train=3,
                                    num_test=1, num_valid=1, seconds=3.0, seed=0)


def run_python(code, env, timeout=300):
  result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_pmap_two_devices_equals_one_device(env):
  code = MICRO + textwrap.dedent("""
      import functools, jax, numpy as np
      from bsmamba2_jax import training
      from experiments import train
      config = micro_config("unused", 4)
      config.precision = "float32"
      exp = train.Experiment(config)
      state = exp.init_state()
      rng = np.random.default_rng(0)
      mixture = rng.standard_normal((4, 1, 22050)).astype(np.float32) * 0.1
      batch = dict(mixture=mixture, vocals=0.5 * mixture)
      step = functools.partial(training.train_step, model=exp.model, optimizer=exp.optimizer,
                               loss_fn=exp.loss_fn, ema_decay=0.9)
      results = []
      for devices in (jax.devices()[:2], jax.devices()[:1]):
        n = len(devices)
        p_step = jax.pmap(step, axis_name="batch", devices=devices)
        shard = {k: v.reshape((n, 4 // n) + v.shape[1:]) for k, v in batch.items()}
        new, metrics = p_step(train.replicate(state, n), shard)
        results.append((train.unreplicate(new), train.unreplicate(metrics)))
      (two, m2), (one, m1) = results
      assert len(jax.devices()) == 2
      np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
      for a, b, init in zip(jax.tree_util.tree_leaves(two.params),
                            jax.tree_util.tree_leaves(one.params),
                            jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
      changed = max(float(np.max(np.abs(a - i))) for a, i in zip(
          jax.tree_util.tree_leaves(two.params), jax.tree_util.tree_leaves(state.params)))
      assert changed > 1e-4, changed
      print("OK")
      """)
  result = run_python(code, dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert "OK" in result.stdout


@pytest.mark.slow  # Several subprocess compiles: ~1-1.5 min of CPU.
def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path, env, data_dir):
  import csv
  steps = 6
  train_code = MICRO + textwrap.dedent(f"""
      from experiments import train
      train.train_and_evaluate(micro_config({data_dir!r}, {steps}), sys.argv[1], progress=False)
      """)
  reference = tmp_path / "reference"
  run_python(train_code.replace("sys.argv[1]", repr(str(reference))), env)

  interrupted = tmp_path / "interrupted"
  code = train_code.replace("sys.argv[1]", repr(str(interrupted)))
  # The interrupted run spends 20 s more before its first step than the resumed one will.
  slow_start = code.replace("from experiments import train\n", textwrap.dedent("""\
      from experiments import train
      import time
      prepare = train._prepare_workdir
      train._prepare_workdir = lambda *args: (prepare(*args), time.sleep(20))
      """))
  process = subprocess.Popen([sys.executable, "-c", slow_start], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  csv_path = interrupted / "metrics.csv"
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if csv_path.exists() and len(csv_path.read_text().splitlines()) >= 3:  # header + 2 steps
      break
    time.sleep(0.05)
  assert process.poll() is None, process.communicate()[1][-3000:]
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  from bsmamba2_jax import checkpoints
  manager = checkpoints.TrainingCheckpoints(interrupted / "checkpoints")
  stopped_at = manager.latest_step()
  manager.close()
  assert 2 <= stopped_at < steps, stopped_at

  run_python(code, env)  # Resumes from `stopped_at` and finishes.
  with open(csv_path) as f:  # elapsed_s goes on from the checkpoint, not from zero
    elapsed = {int(r["step"]): float(r["elapsed_s"]) for r in csv.DictReader(f)
               if r["elapsed_s"]}
  assert sorted(elapsed) == list(range(1, steps + 1))
  assert elapsed[stopped_at + 1] > elapsed[stopped_at], elapsed
  from experiments import export
  resumed = export.restore_state(str(interrupted))
  expected = export.restore_state(str(reference))
  assert int(resumed.step) == int(expected.step) == steps
  for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

  # Export the EMA weights and load them back as a model.
  output = tmp_path / "export"
  export.export(str(reference), str(output))
  model, params = checkpoints.load_model(str(output))
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected.ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(FileExistsError):
    export.export(str(reference), str(output))


def test_launcher_with_steps_per_call_equals_single_steps(tmp_path, env, data_dir):
  """5 steps, 2 per call (two 2-step calls, then a single step before the end), against the same
  5 pipeline batches one call each."""
  code = MICRO + textwrap.dedent(f"""
      import csv, jax, numpy as np
      from data_pipeline import pipeline
      from experiments import train
      config = micro_config({data_dir!r}, 5)
      config.train.steps_per_execution = 2
      config.log_every = 2
      run = train.train_and_evaluate(config, {str(tmp_path)!r}, progress=False)
      with open({str(tmp_path / "metrics.csv")!r}) as f:
        logged = {{int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}}
      assert run["step"] == 5 and sorted(logged) == [2, 4, 5], (run, logged)

      experiment = train.Experiment(config)
      batches = pipeline.train_iterator(config.data.dir, per_device_batch=2, mono=True,
                                        segment_seconds=config.data.segment_seconds,
                                        seed=config.seed)
      state, losses = train.replicate(experiment.init_state(), 1), {{}}
      for step in range(1, 6):
        state, metrics = experiment.train_step(state, next(batches))
        losses[step] = float(metrics["loss"][0])
      np.testing.assert_allclose([logged[s] for s in (2, 4, 5)], [losses[s] for s in (2, 4, 5)],
                                 rtol=1e-5)
      for a, b in zip(jax.tree_util.tree_leaves(run["state"]),
                      jax.tree_util.tree_leaves(train.unreplicate(state))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
      print("OK")
      """)
  assert "OK" in run_python(code, env).stdout


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # Several subprocess compiles: ~1-1.5 min of CPU.
def test_multi_host_processes_agree(tmp_path, env, data_dir):
  port = _free_port()
  code = MICRO + textwrap.dedent(f"""
      import jax, numpy as np
      from experiments import train
      config = micro_config({data_dir!r}, 2)
      config.distributed.update(dict(enabled=True, coordinator_address="127.0.0.1:{port}",
                                     num_processes=2, process_id=int(sys.argv[1])))
      summary = train.train_and_evaluate(config, {str(tmp_path / 'run')!r}, progress=False)
      assert jax.process_count() == 2 and jax.device_count() == 2
      leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(summary["state"].params)]
      np.savez({str(tmp_path)!r} + f"/params_{{sys.argv[1]}}.npz", *leaves)
      """)
  processes = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
  for p in processes:
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
  zero, one = (np.load(tmp_path / f"params_{i}.npz") for i in range(2))
  assert len(zero.files) == len(one.files) > 0
  for name in zero.files:
    np.testing.assert_array_equal(zero[name], one[name])


@pytest.mark.slow
def test_tiny_learns_on_synthetic_data(tmp_path):
  """The `tiny` config for 300 steps: loss falls, validation uSDR beats the mixture's."""
  import csv
  from experiments import train
  from experiments.configs import tiny
  config = tiny.get_config()
  config.data.dir = str(tmp_path / "data")
  config.eval_every = config.ckpt_every = 1000
  summary = train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert summary["step"] == config.train.num_steps and summary["skipped"] == 0
  with open(tmp_path / "run" / "metrics.csv") as f:
    losses = [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
  assert summary["valid_usdr"] > summary["valid_input_usdr"] + 1.0, summary


@pytest.mark.parametrize("split", ["train", "valid"])
def test_bad_data_fails_before_the_model_is_built(tmp_path, data_dir, monkeypatch, split):
  import shutil

  from data_pipeline import musdb
  from experiments import train
  from experiments.configs import tiny
  copy = shutil.copytree(data_dir, tmp_path / "data")
  name = [t.name for t in musdb.MusdbDataset(str(copy)).tracks(split)][0]
  os.remove(copy / "train" / name / "vocals.wav")

  def not_yet(*args, **kwargs):
    raise AssertionError("the model was built before the data was checked")
  monkeypatch.setattr(train, "Experiment", not_yet)
  config = tiny.get_config()
  config.data.dir = str(copy)
  config.data.synthetic.generate = False
  with pytest.raises(musdb.MusdbError, match=f"{name}/vocals.wav: missing stem 'vocals'"):
    train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_data_dir_under_the_home_folder_is_expanded(tmp_path, monkeypatch):
  from data_pipeline import musdb
  from experiments import train
  from experiments.configs import tiny
  monkeypatch.setenv("HOME", str(tmp_path))
  config = tiny.get_config()
  config.data.dir = "~/nowhere"
  config.data.synthetic.generate = False
  with pytest.raises(musdb.MusdbError, match=f"^{tmp_path / 'nowhere'}: not a directory"):
    train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert config.data.dir == "~/nowhere"  # the caller's config is left alone


def test_generating_into_a_real_dataset_is_refused_with_a_hint(tmp_path):
  from experiments import train
  from experiments.configs import tiny
  (tmp_path / "musdb18hq" / "train").mkdir(parents=True)
  config = tiny.get_config()
  config.data.dir = str(tmp_path / "musdb18hq")
  with pytest.raises(FileExistsError, match="pass --config.data.synthetic.generate=false"):
    train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)


def test_a_second_run_on_a_busy_workdir_fails_before_touching_it(tmp_path, env):
  """A run holding the workdir (here a process that is then SIGKILLed) locks out a second run;
  the lock dies with its holder."""
  import signal as signals

  from experiments import train
  from experiments.configs import tiny
  run = tmp_path / "run"
  run.mkdir()
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom experiments import train\n"
       f"with train.workdir_lock({str(run)!r}):\n  print('held', flush=True)\n  time.sleep(300)"],
      env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    config = tiny.get_config()
    config.data.dir = str(tmp_path / "data")
    with pytest.raises(OSError, match=rf"{run}: another training run \(pid {holder.pid} on "
                                      r".*\) is using this workdir"):
      train.train_and_evaluate(config, str(run), progress=False)
    assert sorted(os.listdir(run)) == [train.LOCK_FILE]  # no config.json, no data generated
    assert not (tmp_path / "data").exists()
  finally:
    holder.send_signal(signals.SIGKILL)
    holder.wait()
  with train.workdir_lock(str(run)):  # free again
    pass


def test_data_error_mid_run_is_one_line_and_keeps_the_steps(tmp_path, env, data_dir):
  """An example of step 4 that fails to read ends the run with that error, after the 3 finished
  steps were saved. The failure is tied to the example's step, not to a count of calls: two
  examples are made in parallel, so the 7th call can belong to step 3."""
  code = MICRO + textwrap.dedent(f"""
      from data_pipeline import musdb, pipeline
      from experiments import train
      real = pipeline.example_rng
      def failing(seed, process_index, step, example):
        if step == 3:  # 0-based: the fourth step's batch
          raise musdb.MusdbError("/data/train/t/vocals.wav: unreadable audio file (truncated)")
        return real(seed, process_index, step, example)
      pipeline.example_rng = failing
      train.train_and_evaluate(micro_config({data_dir!r}, 10), {str(tmp_path / "run")!r},
                               progress=False)
      """)
  result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.rstrip().endswith(
      "MusdbError: /data/train/t/vocals.wav: unreadable audio file (truncated)")
  from bsmamba2_jax import checkpoints
  manager = checkpoints.TrainingCheckpoints(tmp_path / "run" / "checkpoints")
  assert manager.latest_step() == 3
  manager.close()


def test_step_out_of_device_memory_is_one_line_naming_the_remedies(tmp_path, data_dir,
                                                                    monkeypatch):
  import jax

  from experiments import train
  namespace = {}
  exec(MICRO, namespace)  # pylint: disable=exec-used
  config = namespace["micro_config"](data_dir, 3)

  class OutOfMemory(train.Experiment):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)

      def train_step(state, batch):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 61.45GiB.\nmore detail")
      self.train_step = train_step

  monkeypatch.setattr(train, "Experiment", OutOfMemory)
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  message = str(error.value)
  assert message.startswith("the training step does not fit in device memory (RESOURCE_EXHAUSTED:"
                            " Out of memory while trying to allocate 61.45GiB.)")
  assert "\n" not in message and "per_device_batch_size" in message
  assert "overrides.remat=True" in message
  config.model.overrides.remat = True  # already on: not suggested again
  assert "remat" not in train.out_of_memory_message(RuntimeError("RESOURCE_EXHAUSTED"), config)


def test_validation_leaves_out_tracks_with_silent_vocals(monkeypatch, caplog):
  import types

  from bsmamba2_jax import metrics
  from experiments import train
  rng = np.random.default_rng(0)
  vocals = (0.1 * rng.standard_normal((2, 2, 44100))).astype(np.float32)
  vocals[1] = 0.0  # an instrumental
  mixture = vocals + (0.1 * rng.standard_normal(vocals.shape)).astype(np.float32)
  monkeypatch.setattr(train, "validation_batches", lambda config, warn: iter([dict(
      mixture=mixture, vocals=vocals, track=np.array(["Singer - Song", "Band - Instrumental"]))]))
  experiment = types.SimpleNamespace(
      config=types.SimpleNamespace(eval=types.SimpleNamespace(batch_size=2)),
      model_config=types.SimpleNamespace(sample_rate=44100),
      eval_step=lambda params, x: 0.5 * x)
  scores = train.validate(experiment, params=None)
  assert scores["valid_usdr"] == pytest.approx(float(metrics.usdr(vocals[0], 0.5 * mixture[0])))
  assert scores["valid_input_usdr"] == pytest.approx(float(metrics.usdr(vocals[0], mixture[0])))
  assert "1 track(s) with silent vocals left out of the scores: Band - Instrumental" in caplog.text
  caplog.clear()  # the launcher's later validations leave them out without a word
  assert train.validate(experiment, params=None, warn=False) == pytest.approx(scores, nan_ok=True)
  assert "silent vocals" not in caplog.text


def test_precision_auto_is_float32_on_cpu_and_bfloat16_on_accelerators():
  from experiments import train
  from experiments.configs import paper, small
  assert train.compute_dtype("auto", "cpu") == "float32"
  assert train.compute_dtype("auto", "gpu") == "bfloat16"
  assert train.compute_dtype("bfloat16", "cpu") == "bfloat16"
  with pytest.raises(ValueError, match=r"config.precision must be one of .*'fp16'"):
    train.compute_dtype("fp16")
  assert train.model_config(small.get_config()).dtype == train.compute_dtype("auto")
  assert train.model_config(paper.get_config()).dtype == "bfloat16"  # the recipe, on any backend


def test_bfloat16_on_cpu_is_warned_about_before_any_data_is_read(tmp_path, caplog):
  from data_pipeline import musdb
  from experiments import train
  from experiments.configs import tiny
  config = tiny.get_config()
  config.precision = "bfloat16"
  config.data.dir = str(tmp_path / "missing")
  config.data.synthetic.generate = False
  with pytest.raises(musdb.MusdbError):
    train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  warned = [r.getMessage() for r in caplog.records if "bfloat16 on CPU" in r.getMessage()]
  assert len(warned) == (1 if jax.default_backend() == "cpu" else 0), caplog.text
  if warned:
    assert "--config.precision=auto" in warned[0]


def test_export_best_without_any_validation_score_is_refused(tmp_path):
  """A run stopped before its first validation has no best step: --best says so instead of
  quietly exporting the latest."""
  import json

  from bsmamba2_jax import checkpoints
  from experiments import export
  from experiments.configs import tiny
  (tmp_path / "config.json").write_text(json.dumps(tiny.get_config().to_dict()))
  manager = checkpoints.TrainingCheckpoints(str(tmp_path / "checkpoints"))
  for step in (1, 2):
    manager.save(step, {"w": np.full(3, step, np.float32)}, meta={"data_position": step})
  manager.close()
  with pytest.raises(ValueError, match=r"no checkpoint has a validation score yet \(steps \[1, 2\]\)"):
    export.restore_state(str(tmp_path), best=True)


def test_export_names_what_a_workdir_is_not(tmp_path):
  """An export, a foreign JSON or a run without checkpoints is named in one error, and nothing is
  created in the folder."""
  import json

  from bsmamba2_jax import checkpoints
  from experiments import export
  from experiments.configs import tiny
  an_export = tmp_path / "an_export"
  an_export.mkdir()
  (an_export / "config.json").write_text(json.dumps({"format": checkpoints.EXPORT_FORMAT}))
  with pytest.raises(ValueError, match="an inference export, not a training workdir"):
    export.restore_state(str(an_export))
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "config.json").write_text('{"model": {}}')
  with pytest.raises(ValueError, match=r"not a training run's config \(no data, train, optimizer\)"):
    export.restore_state(str(foreign))
  fresh = tmp_path / "fresh"
  fresh.mkdir()
  (fresh / "config.json").write_text(json.dumps(tiny.get_config().to_dict()))
  with pytest.raises(FileNotFoundError, match="no training checkpoint"):
    export.restore_state(str(fresh))
  assert os.listdir(fresh) == ["config.json"]


def test_workdir_inside_the_dataset_is_refused_before_anything_is_written(tmp_path, data_dir):
  from experiments import train
  from experiments.configs import tiny
  config = tiny.get_config()
  config.data.dir = str(data_dir)
  config.data.synthetic.generate = False
  workdir = os.path.join(str(data_dir), "train", "run")
  with pytest.raises(ValueError, match="lies inside the dataset's .*train"):
    train.train_and_evaluate(config, workdir, progress=False)
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("change, message", [
    (dict(num_steps=0), "train.num_steps must be >= 1"),
    (dict(num_steps=5, accumulate=2), r"must be a multiple of optimizer.accumulate \(2\)"),
    (dict(lr=-1.0), "optimizer.lr must be > 0"),
    (dict(warmup_steps=-5), "optimizer.warmup_steps must be >= 0"),
    (dict(ema_decay=1.5), r"ema_decay must be in \[0, 1\)"),
    (dict(log_every=0), "log_every must be >= 1"),
    (dict(eval_every=0), "eval_every must be >= 1"),
    (dict(ckpt_every=0), "ckpt_every must be >= 1"),
    (dict(max_minutes=float("nan")), "--max_minutes must be > 0"),
    (dict(max_minutes=-1.0), "--max_minutes must be > 0"),
])
def test_settings_that_cannot_make_a_run_are_named(change, message):
  from experiments import train
  from experiments.configs import tiny
  config = tiny.get_config()
  change = dict(change)
  max_minutes = change.pop("max_minutes", None)
  for key, value in change.items():
    section = {"num_steps": config.train, "accumulate": config.optimizer, "lr": config.optimizer,
               "warmup_steps": config.optimizer}.get(key, config)
    section[key] = value
  with pytest.raises(ValueError, match=message):
    train.check_config(config, max_minutes)
  train.check_config(tiny.get_config(), None)


def test_resume_refuses_other_shapes_and_metrics_keep_each_step_once(tmp_path):
  import csv

  from experiments import train
  from experiments.configs import tiny
  config = tiny.get_config()
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  train._prepare_workdir(config, workdir)
  for section, key, value in (("data", "mono", not config.data.mono),
                              ("optimizer", "accumulate", 3)):
    other = tiny.get_config()
    other[section][key] = value
    with pytest.raises(ValueError, match=f"different {section}.{key} config"):
      train._prepare_workdir(other, workdir)
  wider = tiny.get_config()
  wider.model.overrides.dim = 64
  with pytest.raises(ValueError, match="different model config"):
    train._prepare_workdir(wider, workdir)
  for key, value in (("remat", True), ("chunk_size", 32)):  # same weights, other computation
    other = tiny.get_config()
    other.model.overrides[key] = value
    train._prepare_workdir(other, workdir)
  longer = tiny.get_config()
  longer.train.num_steps = 2 * config.train.num_steps
  train._prepare_workdir(longer, workdir)  # extending a run records its new length
  from experiments import export
  assert export.read_config(workdir).train.num_steps == longer.train.num_steps
  # A run that died after logging steps 4-5 past its checkpoint at 3 resumes from 3.
  logger = train.Logger(workdir, enabled=True)
  for step in range(1, 6):
    logger.write(step, dict(loss=0.5))
  logger.close()
  train.Logger(workdir, enabled=True, start_step=3).close()
  with open(os.path.join(workdir, "metrics.csv")) as f:
    assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3"]
  import tensorflow as tf
  events = sorted((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 2  # the dead run's file and the resumed run's
  logged = [(e.step, v.tag) for path in events for e in tf.compat.v1.train.summary_iterator(
      str(path)) for v in e.summary.value]
  assert logged == [(1, "loss"), (2, "loss"), (3, "loss")]


@pytest.mark.parametrize("name", ["paper", "small", "tiny", "quickstart"])
def test_shipped_configs_pass_the_settings_check(name):
  import importlib

  from experiments import train
  train.check_config(importlib.import_module(f"experiments.configs.{name}").get_config(), None)
