"""The training loop end to end with a microscopic model: pmap over 2 devices vs 1, SIGTERM +
resume (also past a damaged checkpoint), K steps per call, multi-host, data and memory errors,
the workdir's lock and resume rules, validation, export."""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from bsmamba2_jax.training import loop, workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.integration


# ---- The real (microscopic) model, in subprocesses. -------------------------------------------

MICRO = textwrap.dedent("""
    import sys
    from experiments.configs import tiny

    def micro_config(data_dir, num_steps):
      c = tiny.get_config()
      c.model.update(dict(dim=16, depth=1, d_state=16, expand=2, headdim=16, n_fft=256,
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
      from bsmamba2_jax.training import loop, steps
      config = micro_config("unused", 4)
      config.model.dtype = "float32"
      exp = loop.Experiment(config)
      state = exp.init_state()
      rng = np.random.default_rng(0)
      mixture = rng.standard_normal((4, 1, 22050)).astype(np.float32) * 0.1
      batch = dict(mixture=mixture, vocals=0.5 * mixture)
      step = functools.partial(steps.train_step, model=exp.model, optimizer=exp.optimizer,
                               loss_fn=exp.loss_fn, ema_decay=0.9)
      results = []
      for devices in (jax.devices()[:2], jax.devices()[:1]):
        n = len(devices)
        p_step = jax.pmap(step, axis_name="batch", devices=devices)
        shard = {k: v.reshape((n, 4 // n) + v.shape[1:]) for k, v in batch.items()}
        new, metrics = p_step(loop.replicate(state, n), shard)
        results.append((loop.unreplicate(new), loop.unreplicate(metrics)))
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
      from bsmamba2_jax.training import loop
      loop.train_and_evaluate(micro_config({data_dir!r}, {steps}), sys.argv[1], progress=False)
      """)
  reference = tmp_path / "reference"
  run_python(train_code.replace("sys.argv[1]", repr(str(reference))), env)

  interrupted = tmp_path / "interrupted"
  code = train_code.replace("sys.argv[1]", repr(str(interrupted)))
  # The interrupted run spends 20 s more before its first step than the resumed one will.
  slow_start = code.replace("from bsmamba2_jax.training import loop\n", textwrap.dedent("""\
      from bsmamba2_jax.training import loop, workdir
      import time
      prepare = workdir.prepare
      workdir.prepare = lambda *args, **kwargs: (prepare(*args, **kwargs), time.sleep(20))
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
  from bsmamba2_jax.training.checkpoints import TrainingCheckpoints
  manager = TrainingCheckpoints(interrupted / "checkpoints")
  stopped_at = manager.latest_step()
  manager.close()
  assert 2 <= stopped_at < steps, stopped_at

  run_python(code, env)  # Resumes from `stopped_at` and finishes.
  with open(csv_path) as f:  # elapsed_s goes on from the checkpoint, not from zero
    elapsed = {int(r["step"]): float(r["elapsed_s"]) for r in csv.DictReader(f)
               if r["elapsed_s"]}
  assert sorted(elapsed) == list(range(1, steps + 1))
  assert elapsed[stopped_at + 1] > elapsed[stopped_at], elapsed
  from bsmamba2_jax.training import export
  resumed = export.restore_state(str(interrupted))
  expected = export.restore_state(str(reference))
  assert int(resumed.step) == int(expected.step) == steps
  for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

  # Export the EMA weights and load them back as a model.
  output = tmp_path / "export"
  export.export(str(reference), str(output))
  from bsmamba2_jax.exports import load_model
  model, params = load_model(str(output))
  for a, b in zip(jax.tree_util.tree_leaves(params),
                  jax.tree_util.tree_leaves(expected.ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(FileExistsError):
    export.export(str(reference), str(output))


def _damage_arrays(step_folder, every=None):
  """Flips a bit in every array file of a saved step (a restore raises nothing by itself): the
  middle byte, or every `every`-th byte (then the files' index nodes break as well, and most
  reads of the restore fail)."""
  for root, _, names in os.walk(os.path.join(step_folder, "state")):
    for name in names:
      if os.path.basename(root) == "d":
        path = os.path.join(root, name)
        data = bytearray(open(path, "rb").read())
        for i in range(0, len(data), every) if every else [len(data) // 2]:
          data[i] ^= 0x10
        open(path, "wb").write(bytes(data))


def test_resume_falls_back_past_a_damaged_checkpoint_or_stops_in_one_line(tmp_path, env,
                                                                           data_dir):
  """4 steps checkpointed at 2 and 4; step 4's arrays damaged: the resumed run names it, goes on
  from step 2 and logs every step once. With step 2 damaged too, the launcher stops in one line
  and starts nothing from scratch."""
  import csv
  config_file = tmp_path / "micro.py"
  config_file.write_text(MICRO + textwrap.dedent(f"""
      def get_config():
        c = micro_config({data_dir!r}, 4)
        c.ckpt_every = 2
        return c
      """))
  run = tmp_path / "run"
  launch = lambda *flags: subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--config={config_file}", f"--workdir={run}",
       "--noprogress", *flags], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  first = launch()
  assert first.returncode == 0, first.stderr[-3000:]
  checkpoints = run / "checkpoints"
  assert sorted(os.listdir(checkpoints)) == ["2", "4"]
  _damage_arrays(checkpoints / "4")
  resumed = launch("--config.train.num_steps=6")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  warned = [line for line in resumed.stderr.splitlines() if f"{checkpoints / '4'}: " in line]
  assert len(warned) == 1 and "; skipped and renamed to 4.damaged" in warned[0], warned
  assert f"resumed from {checkpoints} at step 2" in resumed.stderr
  with open(run / "metrics.csv") as f:
    assert [int(r["step"]) for r in csv.DictReader(f) if r["loss"]] == [1, 2, 3, 4, 5, 6]
  assert sorted(os.listdir(checkpoints)) == ["2", "4", "4.damaged", "6"]

  for step in ("2", "4", "6"):  # broken indices too: many failed reads, none may print after
    _damage_arrays(checkpoints / step, every=97)
  stopped = launch("--config.train.num_steps=8")
  assert stopped.returncode == 1
  last = stopped.stderr.strip().splitlines()[-1]
  assert last.startswith(f"train: {checkpoints}: none of its 3 checkpoint(s) restores"), (
      stopped.stderr[-5000:])
  assert "move the folder away or choose another --workdir" in last
  assert "Traceback" not in stopped.stderr
  assert sorted(os.listdir(checkpoints)) == ["2", "4", "4.damaged", "6"]


def test_launcher_with_steps_per_call_equals_single_steps(tmp_path, env, data_dir):
  """5 steps, 2 per call (two 2-step calls, then a single step before the end), against the same
  5 pipeline batches one call each."""
  code = MICRO + textwrap.dedent(f"""
      import csv, jax, numpy as np
      from data_pipeline import pipeline
      from bsmamba2_jax.training import loop
      config = micro_config({data_dir!r}, 5)
      config.train.steps_per_execution = 2
      config.log_every = 2
      run = loop.train_and_evaluate(config, {str(tmp_path)!r}, progress=False)
      with open({str(tmp_path / "metrics.csv")!r}) as f:
        logged = {{int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}}
      assert run["step"] == 5 and sorted(logged) == [2, 4, 5], (run, logged)

      experiment = loop.Experiment(config)
      batches = pipeline.train_iterator(config.data.dir, per_device_batch=2, mono=True,
                                        segment_seconds=config.data.segment_seconds,
                                        seed=config.seed)
      state, losses = loop.replicate(experiment.init_state(), 1), {{}}
      for step in range(1, 6):
        state, metrics = experiment.train_step(state, next(batches))
        losses[step] = float(metrics["loss"][0])
      np.testing.assert_allclose([logged[s] for s in (2, 4, 5)], [losses[s] for s in (2, 4, 5)],
                                 rtol=1e-5)
      for a, b in zip(jax.tree_util.tree_leaves(run["state"]),
                      jax.tree_util.tree_leaves(loop.unreplicate(state))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
      print("OK")
      """)
  assert "OK" in run_python(code, env).stdout


def test_launcher_trains_and_validates_a_four_stem_model(tmp_path, env, data_dir):
  """`--config.model.stems=(...)` from the command line: a 4-stem micro model trains on the
  4 targets of the random mix and validates every stem (summary, metrics.csv, config.json)."""
  import csv
  import json
  config_file = tmp_path / "micro.py"
  config_file.write_text(MICRO + textwrap.dedent(f"""
      def get_config():
        return micro_config({data_dir!r}, 3)
      """))
  run = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--config={config_file}", f"--workdir={run}",
       "--noprogress", "--config.model.stems=('drums','bass','other','vocals')"],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout[result.stdout.index("{"):])
  stems = ("drums", "bass", "other", "vocals")
  assert summary["step"] == 3 and summary["skipped"] == 0 and np.isfinite(summary["loss"])
  for stem in stems:
    assert np.isfinite(summary[f"valid_{stem}_usdr"]), summary
  assert summary["valid_usdr"] == pytest.approx(
      np.mean([summary[f"valid_{s}_usdr"] for s in stems]))
  with open(run / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["step"] for r in rows] == ["1", "2", "3", "3"]  # 3 losses, then the validation
  assert float(rows[-1]["valid_bass_csdr"]) == pytest.approx(summary["valid_bass_csdr"])
  assert tuple(workdir_lib.read_config(str(run)).model.stems) == stems
  assert workdir_lib.model_config(workdir_lib.read_config(str(run))).stems == stems


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # Several subprocess compiles: ~1-1.5 min of CPU.
def test_multi_host_processes_agree(tmp_path, env, data_dir):
  port = _free_port()
  code = MICRO + textwrap.dedent(f"""
      import jax, numpy as np
      from bsmamba2_jax.training import loop
      config = micro_config({data_dir!r}, 2)
      config.distributed.update(dict(enabled=True, coordinator_address="127.0.0.1:{port}",
                                     num_processes=2, process_id=int(sys.argv[1])))
      summary = loop.train_and_evaluate(config, {str(tmp_path / 'run')!r}, progress=False)
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
  from experiments.configs import tiny
  config = tiny.get_config()
  config.data.dir = str(tmp_path / "data")
  config.eval_every = config.ckpt_every = 1000
  summary = loop.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert summary["step"] == config.train.num_steps and summary["skipped"] == 0
  with open(tmp_path / "run" / "metrics.csv") as f:
    losses = [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
  assert summary["valid_usdr"] > summary["valid_input_usdr"] + 1.0, summary


@pytest.mark.parametrize("split", ["train", "valid"])
def test_bad_data_fails_before_the_model_is_built(tmp_path, data_dir, monkeypatch, split):
  import shutil

  from data_pipeline import musdb
  from experiments.configs import tiny
  copy = shutil.copytree(data_dir, tmp_path / "data")
  name = [t.name for t in musdb.MusdbDataset(str(copy)).tracks(split)][0]
  os.remove(copy / "train" / name / "vocals.wav")

  def not_yet(*args, **kwargs):
    raise AssertionError("the model was built before the data was checked")
  monkeypatch.setattr(loop, "Experiment", not_yet)
  config = tiny.get_config()
  config.data.dir = str(copy)
  config.data.synthetic.generate = False
  with pytest.raises(musdb.MusdbError, match=f"{name}/vocals.wav: missing stem 'vocals'"):
    loop.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_data_dir_under_the_home_folder_is_expanded(tmp_path, monkeypatch):
  from data_pipeline import musdb
  from experiments.configs import tiny
  monkeypatch.setenv("HOME", str(tmp_path))
  config = tiny.get_config()
  config.data.dir = "~/nowhere"
  config.data.synthetic.generate = False
  with pytest.raises(musdb.MusdbError, match=f"^{tmp_path / 'nowhere'}: not a directory"):
    loop.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert config.data.dir == "~/nowhere"  # the caller's config is left alone


def test_generating_into_a_real_dataset_is_refused_with_a_hint(tmp_path):
  from experiments.configs import tiny
  (tmp_path / "musdb18hq" / "train").mkdir(parents=True)
  config = tiny.get_config()
  config.data.dir = str(tmp_path / "musdb18hq")
  with pytest.raises(FileExistsError, match="pass --config.data.synthetic.generate=false"):
    loop.train_and_evaluate(config, str(tmp_path / "run"), progress=False)


def test_a_second_run_on_a_busy_workdir_fails_before_touching_it(tmp_path, env):
  """A run holding the workdir (here a process that is then SIGKILLed) locks out a second run;
  the lock dies with its holder."""
  import signal as signals

  from experiments.configs import tiny
  run = tmp_path / "run"
  run.mkdir()
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom bsmamba2_jax.training import workdir\n"
       f"with workdir.workdir_lock({str(run)!r}):\n  print('held', flush=True)\n  time.sleep(300)"],
      env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    config = tiny.get_config()
    config.data.dir = str(tmp_path / "data")
    with pytest.raises(OSError, match=rf"{run}: another training run \(pid {holder.pid} on "
                                      r".*\) is using this workdir"):
      loop.train_and_evaluate(config, str(run), progress=False)
    assert sorted(os.listdir(run)) == [workdir_lib.LOCK_FILE]  # no config.json, no data generated
    assert not (tmp_path / "data").exists()
  finally:
    holder.send_signal(signals.SIGKILL)
    holder.wait()
  with workdir_lib.workdir_lock(str(run)):  # free again
    pass


def test_data_error_mid_run_is_one_line_and_keeps_the_steps(tmp_path, env, data_dir):
  """An example of step 4 that fails to read ends the run with that error, after the 3 finished
  steps were saved. The failure is tied to the example's step, not to a count of calls: two
  examples are made in parallel, so the 7th call can belong to step 3."""
  code = MICRO + textwrap.dedent(f"""
      from data_pipeline import musdb, pipeline
      from bsmamba2_jax.training import loop
      real = pipeline.example_rng
      def failing(seed, process_index, step, example):
        if step == 3:  # 0-based: the fourth step's batch
          raise musdb.MusdbError("/data/train/t/vocals.wav: unreadable audio file (truncated)")
        return real(seed, process_index, step, example)
      pipeline.example_rng = failing
      loop.train_and_evaluate(micro_config({data_dir!r}, 10), {str(tmp_path / "run")!r},
                              progress=False)
      """)
  result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.rstrip().endswith(
      "MusdbError: /data/train/t/vocals.wav: unreadable audio file (truncated)")
  from bsmamba2_jax.training.checkpoints import TrainingCheckpoints
  manager = TrainingCheckpoints(tmp_path / "run" / "checkpoints")
  assert manager.latest_step() == 3
  manager.close()


def test_step_out_of_device_memory_is_one_line_naming_the_remedies(tmp_path, data_dir,
                                                                    monkeypatch):
  namespace = {}
  exec(MICRO, namespace)  # pylint: disable=exec-used
  config = namespace["micro_config"](data_dir, 3)

  class OutOfMemory(loop.Experiment):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)

      def train_step(state, batch):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 61.45GiB.\nmore detail")
      self.train_step = train_step

  monkeypatch.setattr(loop, "Experiment", OutOfMemory)
  with pytest.raises(ValueError) as error:
    loop.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  message = str(error.value)
  assert message.startswith("the training step does not fit in device memory (RESOURCE_EXHAUSTED:"
                            " Out of memory while trying to allocate 61.45GiB.)")
  assert "\n" not in message and "per_device_batch_size" in message
  assert "--config.model.remat=true" in message
  config.model.remat = True  # already on: not suggested again
  assert "remat" not in loop.out_of_memory_message(RuntimeError("RESOURCE_EXHAUSTED"), config)


def test_bfloat16_on_cpu_is_warned_about_before_any_data_is_read(tmp_path, caplog):
  from data_pipeline import musdb
  from experiments.configs import tiny
  config = tiny.get_config()
  config.model.dtype = "bfloat16"
  config.data.dir = str(tmp_path / "missing")
  config.data.synthetic.generate = False
  with pytest.raises(musdb.MusdbError):
    loop.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  warned = [r.getMessage() for r in caplog.records if "bfloat16 on CPU" in r.getMessage()]
  assert len(warned) == (1 if jax.default_backend() == "cpu" else 0), caplog.text
  if warned:
    assert "--config.model.dtype=auto" in warned[0]


def test_workdir_inside_the_dataset_is_refused_before_anything_is_written(tmp_path, data_dir):
  from experiments.configs import tiny
  config = tiny.get_config()
  config.data.dir = str(data_dir)
  config.data.synthetic.generate = False
  workdir = os.path.join(str(data_dir), "train", "run")
  with pytest.raises(ValueError, match="lies inside the dataset's .*train"):
    loop.train_and_evaluate(config, workdir, progress=False)
  assert not os.path.exists(workdir)
