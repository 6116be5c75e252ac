"""Trains BSMamba2: `python -m experiments.train --config=experiments/configs/tiny.py --workdir=W`.

Any config field can be overridden, e.g. `--config.train.num_steps=1000 --config.optimizer.lr=1e-3
--config.data.dir=/data/musdb18hq`. A run resumes from the latest checkpoint in `W/checkpoints`
automatically; SIGTERM/SIGINT save a checkpoint and stop. Logs: `W/metrics.csv`, TensorBoard
events in `W/tensorboard`, a progress bar. Multi-host: run the same command on every host with
`--config.distributed.enabled=true` (plus coordinator_address, num_processes, process_id where
the cluster does not provide them).
"""
from __future__ import annotations

import contextlib
import csv
import functools
import glob
import json
import os
import signal
import socket
import time
from typing import Any, Iterator

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_flags

from bsmamba2_jax import checkpoints, losses, metrics, training
from bsmamba2_jax.model import BSMamba2, ModelConfig, init_params
from experiments import DEFINE_path, parse_flags

CSV_FIELDS = ("step", "loss", "grad_norm", "skipped", "lr", "steps_per_s", "examples_per_s",
              "valid_usdr", "valid_csdr", "valid_input_usdr", "elapsed_s")


PRECISIONS = ("float32", "bfloat16", "auto")


def compute_dtype(precision: str, backend: str | None = None) -> str:
  """`config.precision` as a ModelConfig dtype on `backend` (default: JAX's backend).

  "auto" is float32 on CPU, where XLA:CPU runs this model's bf16 training step slower than fp32
  (`python -m experiments.benchmark --only=train`, the two `small` rows), and bfloat16 elsewhere.
  """
  if precision not in PRECISIONS:
    raise ValueError(f"config.precision must be one of {PRECISIONS}, got {precision!r}")
  if precision != "auto":
    return precision
  return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The ModelConfig of an experiment: preset + set overrides, channels from data.mono, dtype."""
  overrides = {k: v for k, v in config.model.overrides.items() if v is not None}
  return ModelConfig.preset(config.model.preset, **overrides,
                            audio_channels=1 if config.data.mono else 2,
                            dtype=compute_dtype(config.precision))


def segment_samples(seconds: float, sample_rate: int) -> int:
  return int(round(seconds * sample_rate))


class Experiment:
  """The model, optimiser, loss and pmapped steps of one experiment config."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model_config = model_config(config)
    self.model = BSMamba2(self.model_config)
    self.optimizer = training.make_optimizer(config.optimizer, num_steps=config.train.num_steps)
    self.loss_fn = functools.partial(losses.get_loss(config.train.loss),
                                     frontend_n_fft=self.model_config.n_fft,
                                     frontend_hop=self.model_config.hop_length)
    step_kwargs = dict(model=self.model, optimizer=self.optimizer, loss_fn=self.loss_fn,
                       ema_decay=config.ema_decay, axis_name="batch")
    # (state, batch of (devices, b, C, N)) and (state, batches of (devices, K, b, C, N)).
    self.train_step, self.train_steps = (
        jax.pmap(functools.partial(fn, **step_kwargs), axis_name="batch", donate_argnums=(0,))
        for fn in (training.train_step, training.train_steps))
    self.eval_step = jax.jit(functools.partial(training.eval_step, model=self.model))

  def init_state(self) -> training.TrainState:
    """The step-0 state (host arrays) for `config.seed`."""
    rng, init_rng = jax.random.split(jax.random.PRNGKey(self.config.seed))
    params = init_params(self.model_config, init_rng)
    return jax.device_get(training.TrainState.create(params, self.optimizer, rng))

  def abstract_state(self) -> Any:
    """`init_state` as ShapeDtypeStructs, computed without running the model."""
    rng, init_rng = jax.random.split(jax.random.PRNGKey(self.config.seed))
    audio = jnp.zeros((1, self.model_config.audio_channels, self.model_config.n_fft), jnp.float32)
    return jax.eval_shape(lambda r, x: training.TrainState.create(
        self.model.init(r, x)["params"], self.optimizer, rng), init_rng, audio)


def replicate(tree: Any, devices: int) -> Any:
  """Host pytree -> one copy per local device, laid out exactly as pmap outputs are (so the
  first train step does not compile for a different input layout than the later ones)."""
  stacked = jax.tree_util.tree_map(
      lambda x: np.broadcast_to(np.asarray(x), (devices,) + np.shape(x)), tree)
  return jax.pmap(lambda x: x, axis_name="batch", devices=jax.local_devices()[:devices])(stacked)


def unreplicate(tree: Any) -> Any:
  """First device's copy of a pmapped pytree, on the host."""
  return jax.device_get(jax.tree_util.tree_map(lambda x: x[0], tree))


def steps_this_call(step: int, config: ml_collections.ConfigDict) -> int:
  """How many training steps the next call runs from `step`: `train.steps_per_execution` when
  that many fit before the next step that logs, validates, checkpoints or ends the run, else 1
  (so at most two programs compile, and every such step ends a call)."""
  every = (config.log_every, config.eval_every, config.ckpt_every)
  boundary = min([config.train.num_steps] + [(step // e + 1) * e for e in every])
  k = config.train.steps_per_execution
  return k if step + k <= boundary else 1


def stack_steps(batches: list[dict]) -> dict:
  """K pipeline batches of (devices, b, ...) -> one of (devices, K, b, ...) for `train_steps`."""
  return {k: np.stack([b[k] for b in batches], axis=1) for k in batches[0]}


def validation_batches(config: ml_collections.ConfigDict, warn: bool = True) -> Iterator[dict]:
  """The validation split's windows; its tracks are checked when this is called (`warn`: name
  the tracks too short for a window)."""
  from data_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.validation_iterator(
      config.data.dir, segment_seconds=config.eval.segment_seconds,
      batch_size=config.eval.batch_size, mono=config.data.mono, split="valid",
      max_examples=config.eval.max_examples, warn=warn)


def validate(experiment: Experiment, params: Any, warn: bool = True) -> dict[str, float]:
  """Vocals uSDR and cSDR of the EMA model on the validation split, scored per track (SPEC §7).

  Each track's windows are joined end to end and scored as one signal: uSDR averaged over tracks,
  cSDR (vocals with accompaniment = mixture − vocals, 1-s frames) as the median over tracks.
  Scoring windows one by one would let windows with silent vocals (uSDR ≈ −40 dB or lower)
  swamp the mean; a track whose vocals are digital silence (an instrumental) has no vocals to
  score and is left out, with a warning (its uSDR would be -80 dB or lower whatever the model
  does). `valid_input_usdr` scores the mixture itself (the do-nothing baseline). `warn`: name
  the tracks left out (the launcher does at its first validation only, not every eval_every).
  """
  config = experiment.config
  batch_size = config.eval.batch_size
  windows = {}  # track -> list of (mixture, vocals, estimate), each (C, N)
  for batch in validation_batches(config, warn):
    mixture, vocals = batch["mixture"], batch["vocals"]
    count = len(mixture)
    padded = np.pad(mixture, ((0, batch_size - count), (0, 0), (0, 0)))  # One compiled shape.
    estimate = np.asarray(experiment.eval_step(params, padded))[:count]
    for track, m, v, e in zip(batch["track"], mixture, vocals, estimate):
      windows.setdefault(track, []).append((m, v, e))
  usdr, csdr, input_usdr, silent = [], [], [], []
  for track, parts in windows.items():
    m, v, e = (np.concatenate(x, axis=-1) for x in zip(*parts))
    if not np.any(v):
      silent.append(track)
      continue
    usdr.append(metrics.usdr(v, e))
    input_usdr.append(metrics.usdr(v, m))
    csdr.append(metrics.csdr(np.stack([v, m - v]), np.stack([e, m - e]),
                             sample_rate=experiment.model_config.sample_rate)[0])
  if silent and warn:
    logging.warning("validation: %d track(s) with silent vocals left out of the scores: %s",
                    len(silent), ", ".join(map(str, silent)))
  csdr = np.asarray(csdr)
  mean = lambda scores: float(np.mean(scores)) if scores else float("nan")
  return dict(valid_usdr=mean(usdr),
              valid_csdr=float(np.nanmedian(csdr)) if np.isfinite(csdr).any() else float("nan"),
              valid_input_usdr=mean(input_usdr))


class Logger:
  """Appends rows to `workdir/metrics.csv` and TensorBoard; only process 0 writes."""

  def __init__(self, workdir: str, enabled: bool, start_step: int = 0):
    """Rows of metrics.csv and TensorBoard summaries past `start_step` (logged after the
    checkpoint a run resumes from, by a run that then died) are dropped, so each step is logged
    once."""
    self.enabled = enabled
    if not enabled:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._tf = tf
    path = os.path.join(workdir, "metrics.csv")
    new = not os.path.exists(path)
    if not new:
      with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
      kept = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= start_step]
      if len(kept) < len(rows):
        with open(path + ".tmp", "w", newline="") as f:
          writer = csv.DictWriter(f, CSV_FIELDS)
          writer.writeheader()
          writer.writerows(kept)
        os.replace(path + ".tmp", path)
    self._csv_file = open(path, "a", newline="")
    self._csv = csv.DictWriter(self._csv_file, CSV_FIELDS)
    if new:
      self._csv.writeheader()
    tensorboard = os.path.join(workdir, "tensorboard")
    for events in sorted(glob.glob(os.path.join(tensorboard, "events.out.tfevents.*"))):
      self._drop_summaries_after(events, start_step)
    self._tb = tf.summary.create_file_writer(tensorboard)

  def _drop_summaries_after(self, path: str, last_step: int) -> None:
    """Rewrites the event file `path` without the summaries of steps after `last_step` (and
    without a record a killed writer left truncated)."""
    tf = self._tf
    events, complete = [], True
    try:
      for record in tf.data.TFRecordDataset(path):
        events.append(tf.compat.v1.Event.FromString(record.numpy()))
    except tf.errors.DataLossError:
      complete = False
    kept = [e for e in events if not (e.HasField("summary") and e.step > last_step)]
    if complete and len(kept) == len(events):
      return
    with tf.io.TFRecordWriter(path + ".tmp") as writer:
      for event in kept:
        writer.write(event.SerializeToString())
    os.replace(path + ".tmp", path)

  def write(self, step: int, row: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._csv.writerow(dict(step=step, **row))
    self._csv_file.flush()
    with self._tb.as_default(step=step):
      for name, value in row.items():
        self._tf.summary.scalar(name, value)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._csv_file.close()
      self._tb.close()


def _initialize_distributed(config: ml_collections.ConfigDict) -> None:
  dist = config.distributed
  if not dist.enabled or jax.distributed.is_initialized():
    return
  if dist.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
  jax.distributed.initialize(coordinator_address=dist.coordinator_address,
                             num_processes=dist.num_processes, process_id=dist.process_id)


def check_config(config: ml_collections.ConfigDict, max_minutes: float | None) -> None:
  """Raises ValueError naming the first setting that cannot make a run (before anything is
  written or compiled)."""
  train, opt = config.train, config.optimizer
  checks = [
      (train.num_steps >= 1, f"train.num_steps must be >= 1, got {train.num_steps}"),
      (train.steps_per_execution >= 1,
       f"train.steps_per_execution must be >= 1, got {train.steps_per_execution}"),
      (opt.accumulate >= 1, f"optimizer.accumulate must be >= 1, got {opt.accumulate}"),
      (opt.accumulate < 1 or train.num_steps % opt.accumulate == 0,
       f"train.num_steps ({train.num_steps}) must be a multiple of optimizer.accumulate "
       f"({opt.accumulate}); the last micro-batches would make no update"),
      (opt.lr > 0, f"optimizer.lr must be > 0, got {opt.lr}"),
      (opt.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {opt.warmup_steps}"),
      (0 <= config.ema_decay < 1, f"ema_decay must be in [0, 1), got {config.ema_decay}"),
      (max_minutes is None or max_minutes > 0,  # NaN fails too
       f"--max_minutes must be > 0, got {max_minutes}"),
  ] + [(config[name] >= 1, f"{name} must be >= 1 (steps), got {config[name]}")
       for name in ("log_every", "eval_every", "ckpt_every")]
  for ok, problem in checks:
    if not ok:
      raise ValueError(problem)


# Settings a resumed run must share with the run that wrote the workdir: the parameter and
# optimiser-state shapes depend on them.
RESUME_KEYS = (("model",), ("precision",), ("data", "mono"), ("optimizer", "accumulate"))
# Model settings that change how the step computes, not the weights: a run may resume with them
# changed (e.g. remat switched on after running out of memory).
COMPUTE_ONLY_OVERRIDES = ("chunk_size", "scan_method", "remat")


LOCK_FILE = "train.lock"


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive lock on `workdir/train.lock` while the body runs.

  A second run on the same workdir (a resume started twice, two launches with one --workdir)
  would interleave checkpoints and logs; it fails at once with an OSError naming the run that
  holds the lock. The lock is the kernel's (flock), so a run that dies, even by SIGKILL, leaves
  none behind. Without fcntl (Windows) nothing is locked.
  """
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
  except ImportError:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  with open(path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      raise OSError(f"{workdir}: another training run ({holder}) is using this workdir; wait "
                    "for it to end or choose another --workdir") from None
    try:
      f.seek(0)
      f.truncate()
      f.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
      f.flush()
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Records the config in `workdir` (a resumed run's, e.g. with more steps, replaces the
  earlier one); refuses a workdir whose run differs in a `RESUME_KEYS` setting."""
  path = os.path.join(workdir, "config.json")
  current, previous = json.loads(config.to_json_best_effort()), None
  if os.path.exists(path):
    with open(path) as f:
      try:
        previous = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupted config of a previous run ({e})") from None

    def weights_view(run: dict) -> dict:
      """`run` without the compute-only model overrides."""
      run = dict(run)
      if isinstance(run.get("model"), dict) and isinstance(run["model"].get("overrides"), dict):
        overrides = {k: v for k, v in run["model"]["overrides"].items()
                     if k not in COMPUTE_ONLY_OVERRIDES}
        run["model"] = dict(run["model"], overrides=overrides)
      return run

    for keys in RESUME_KEYS:
      before, now = weights_view(previous), weights_view(current)
      for key in keys:
        before = before.get(key) if isinstance(before, dict) else None
        now = now.get(key) if isinstance(now, dict) else None
      if before != now:
        raise ValueError(f"{workdir}: holds a run with a different {'.'.join(keys)} config "
                         f"({before} != {now}); use a new --workdir")
  if jax.process_index() == 0 and current != previous:
    with open(path + ".tmp", "w") as f:
      f.write(config.to_json_best_effort(indent=1))
    os.replace(path + ".tmp", path)


def _maybe_generate_data(config: ml_collections.ConfigDict) -> None:
  synthetic = config.data.synthetic
  if not synthetic.generate:
    return
  if jax.process_index() == 0:
    from data_pipeline import synthetic as synthetic_data  # pylint: disable=g-import-not-at-top
    try:
      synthetic_data.generate_dataset(config.data.dir, num_train=synthetic.num_train,
                                      num_test=synthetic.num_test, seconds=synthetic.seconds,
                                      seed=synthetic.seed)
    except FileExistsError as e:
      raise FileExistsError(f"{e}; to train on the data already there, pass "
                            "--config.data.synthetic.generate=false") from None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("synthetic data ready")


def _stop_requested(local_stop: bool) -> bool:
  """True on every process as soon as one process wants to stop."""
  if jax.process_count() == 1:
    return local_stop
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.array(local_stop))))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       max_minutes: float | None = None, progress: bool = True) -> dict:
  """Trains (resuming from `workdir`), validates periodically, and returns a summary dict.

  Stops at `config.train.num_steps`, after `max_minutes` of wall-clock time, or on
  SIGTERM/SIGINT; in every case the last state is checkpointed. Unless stopped by a signal, a
  final validation runs. The summary holds step, stop reason, last loss, skipped steps, speed,
  the last validation metrics and `state` (the final host TrainState).
  """
  from data_pipeline import musdb  # pylint: disable=g-import-not-at-top
  start_time = time.time()
  _initialize_distributed(config)
  if not config.data.dir:
    raise ValueError("config.data.dir is not set (--config.data.dir=/path/to/musdb18hq)")
  config = config.copy_and_resolve_references()  # the caller's config stays as it was
  config.data.dir = os.path.expanduser(config.data.dir)  # the shell leaves --config.data.dir=~/x
  check_config(config, max_minutes)
  if model_config(config).dtype == "bfloat16" and jax.default_backend() == "cpu":
    logging.warning("config.precision=%s computes in bfloat16 on CPU, where XLA:CPU runs this "
                    "model's training step slower than in float32; --config.precision=auto "
                    "(or float32) trains faster here", config.precision)
  workdir = os.path.abspath(workdir)
  inside = musdb.split_folder_holding(config.data.dir, workdir)
  if inside:
    raise ValueError(f"{workdir}: the workdir lies inside the dataset's {inside}, where it would "
                     "be listed as a track; choose a --workdir outside it")
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    _prepare_workdir(config, workdir)
    return _train(config, workdir, start_time=start_time, max_minutes=max_minutes,
                  progress=progress)


def out_of_memory_message(error: Exception, config: ml_collections.ConfigDict) -> str:
  """One line for a training step that did not fit in device memory, with what to change."""
  remedies = ["lower --config.train.per_device_batch_size (raise --config.optimizer.accumulate "
              "to keep the segments per update)"]
  if not config.model.overrides.get("remat"):
    remedies.append("set --config.model.overrides.remat=True (recompute activations)")
  remedies.append("shorten --config.data.segment_seconds")
  first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return (f"the training step does not fit in device memory ({first_line}); "
          + ", or ".join(remedies))


def _train(config: ml_collections.ConfigDict, workdir: str, *, start_time: float,
           max_minutes: float | None, progress: bool) -> dict:
  """`train_and_evaluate` once the settings are checked and `workdir` is prepared."""
  from data_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  _maybe_generate_data(config)
  # Bad data fails now, before the model is built, not at the first step or after training.
  training_set = pipeline.training_tracks(config.data.dir, config.data.segment_seconds)
  validation_batches(config)

  experiment = Experiment(config)
  devices = jax.local_device_count()
  global_batch = config.train.per_device_batch_size * jax.device_count()
  manager = checkpoints.TrainingCheckpoints(os.path.join(workdir, "checkpoints"),
                                            keep_last=config.keep_last,
                                            keep_best=config.keep_best)
  state = experiment.init_state()
  elapsed_before = 0.0  # wall-clock seconds of the runs this one resumes
  if manager.latest_step() is not None:
    state, meta = manager.restore(state)
    elapsed_before = float(meta.get("elapsed_s", 0.0))
    logging.info("resumed from %s at step %d", manager.directory, meta["data_position"])
  step = int(state.step)
  lr_schedule = training.learning_rate(config.optimizer,
                                       config.train.num_steps // config.optimizer.accumulate)
  batches = pipeline.train_iterator(
      config.data.dir, segment_seconds=config.data.segment_seconds, local_devices=devices,
      per_device_batch=config.train.per_device_batch_size, mono=config.data.mono,
      seed=config.seed, start_step=step, process_index=jax.process_index(),
      process_count=jax.process_count(), training_set=training_set,
      prefetch=max(2, config.train.steps_per_execution))  # the next call's batches ready

  def save(state_r, metrics_row=None):
    host = unreplicate(state_r)
    manager.save(int(host.step), host,
                 meta=dict(data_position=int(host.step),
                           elapsed_s=elapsed_before + time.time() - start_time),
                 metrics=None if metrics_row is None else dict(usdr=metrics_row["valid_usdr"]))
    return host

  def save_before_failing(state_r):
    """Keeps the steps since the last checkpoint before an error propagates; single-process
    only (a multi-host save waits for every process, and the others are not failing)."""
    if jax.process_count() == 1:
      save(state_r)

  validated = False  # warnings about the validation tracks come with the first validation

  def validate_and_save(state_r):
    """Validation metrics, logged and saved with the state."""
    nonlocal validated
    try:
      metrics_row = validate(experiment, unreplicate(state_r.ema_params), warn=not validated)
      validated = True
    except BaseException:
      save_before_failing(state_r)
      raise
    logger.write(step, metrics_row)
    return save(state_r, metrics_row), metrics_row

  received = []
  handlers = {}
  try:
    for signum in (signal.SIGTERM, signal.SIGINT):
      handlers[signum] = signal.signal(signum, lambda s, _: received.append(s))
  except ValueError:  # Not the main thread: the caller handles signals.
    pass

  logger = Logger(workdir, enabled=jax.process_index() == 0, start_step=step)
  bar = None
  if progress and jax.process_index() == 0:
    import tqdm  # pylint: disable=g-import-not-at-top
    # Under a wall-clock budget the step count is not what ends the run: no step-based ETA.
    bar = tqdm.tqdm(total=None if max_minutes is not None else config.train.num_steps,
                    initial=step, desc="train", dynamic_ncols=True)
  state_r = replicate(state, devices)
  last = dict(loss=float("nan"))
  valid = {}
  stop_reason = "done"
  tick, tick_step = time.time(), step
  first_step = step
  try:
    while step < config.train.num_steps:
      count = steps_this_call(step, config)
      try:
        group = [next(batches) for _ in range(count)]
      except Exception:  # a data error
        save_before_failing(state_r)
        raise
      try:
        if count == 1:
          state_r, step_metrics = experiment.train_step(state_r, group[0])
        else:  # metrics of the call's last step, as a single step gives them
          state_r, step_metrics = experiment.train_steps(state_r, stack_steps(group))
          step_metrics = jax.tree_util.tree_map(lambda x: x[:, -1], step_metrics)
      except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        raise ValueError(out_of_memory_message(e, config)) from None
      step += count
      if bar is not None:
        bar.update(count)
      if step % config.log_every == 0 or step == config.train.num_steps:
        step_metrics = unreplicate(step_metrics)
        now = time.time()
        speed = (step - tick_step) / max(now - tick, 1e-9)
        tick, tick_step = now, step
        last = dict(loss=float(step_metrics["loss"]), grad_norm=float(step_metrics["grad_norm"]),
                    skipped=int(step_metrics["skipped"]),
                    # the rate of the update this micro-step belongs to (optax counts from 0)
                    lr=float(lr_schedule((step - 1) // config.optimizer.accumulate)),
                    steps_per_s=speed, examples_per_s=speed * global_batch,
                    elapsed_s=elapsed_before + now - start_time)
        logger.write(step, last)
        if bar is not None:
          budget = {} if max_minutes is None else dict(
              min_left=f"{max(0.0, max_minutes - (now - start_time) / 60):.1f}")
          bar.set_postfix(loss=f"{last['loss']:.4g}", steps_s=f"{speed:.3g}",
                          ex_s=f"{speed * global_batch:.3g}", **budget)
      out_of_time = max_minutes is not None and time.time() - start_time > 60 * max_minutes
      # Multi-host: processes agree on stopping at log steps (one small all-gather there).
      agree_now = jax.process_count() == 1 or step % config.log_every == 0
      if agree_now and _stop_requested(bool(received) or out_of_time):
        stop_reason = "signal" if received else "time"
        break
      if step == config.train.num_steps:
        break
      if step % config.eval_every == 0:
        _, valid = validate_and_save(state_r)
      elif step % config.ckpt_every == 0:
        save(state_r)
    if stop_reason == "signal":
      host = save(state_r)  # unvalidated: an earlier step's score would mislead the best-k
    elif step == first_step:  # nothing to train (a finished run started again)
      host = unreplicate(state_r)
    else:
      host, valid = validate_and_save(state_r)
  finally:
    for signum, handler in handlers.items():
      signal.signal(signum, handler)
    if bar is not None:
      bar.close()
    logger.close()
    manager.close()
  logging.info("stopped at step %d (%s): %s", step, stop_reason, valid)
  return {**last, **valid, "step": step, "stop_reason": stop_reason, "workdir": workdir,
          "skipped": int(host.skipped), "global_batch": global_batch, "state": host}


def define_flags() -> None:
  """The launcher's flags; defined only when run as a program, so importing is side-effect free."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  DEFINE_path("workdir", None, "Run directory (checkpoints, logs).")
  flags.DEFINE_float("max_minutes", None, "Wall-clock budget; stop, save, validate.")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  try:
    summary = train_and_evaluate(f.config, f.workdir, max_minutes=f.max_minutes,
                                 progress=f.progress)
  except (OSError, ValueError) as e:  # Bad data dir, workdir or config: one line.
    raise SystemExit(f"train: {e}") from None
  summary.pop("state")
  print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
