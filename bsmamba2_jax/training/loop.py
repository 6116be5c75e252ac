"""The training loop: `train_and_evaluate(config, workdir)`, run by `python -m experiments.train`.

It checks the settings and the data before it builds anything, resumes from the newest
checkpoint of the workdir that restores, runs `steps.train_step` pmapped over every local
device (K steps per call with `train.steps_per_execution`), validates the EMA weights every
`eval_every` steps, checkpoints, logs, and stops at `train.num_steps`, after `max_minutes`, or on
SIGTERM/SIGINT, saving the last state in every case (and before a data or validation error
propagates). Multi-host runs (`config.distributed.enabled`) agree on stopping at log steps.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bsmamba2_jax import losses
from bsmamba2_jax.config import resolve_dtype
from bsmamba2_jax.model import BSMamba2, init_params
from bsmamba2_jax.training import logs, steps, validation, workdir as workdir_lib
from bsmamba2_jax.training.checkpoints import TrainingCheckpoints


class Experiment:
  """The model, optimiser, loss and pmapped steps of one experiment config."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model_config = workdir_lib.model_config(config)
    self.model = BSMamba2(self.model_config)
    self.optimizer = steps.make_optimizer(config.optimizer, num_steps=config.train.num_steps)
    self.loss_fn = functools.partial(losses.get_loss(config.train.loss),
                                     frontend_n_fft=self.model_config.n_fft,
                                     frontend_hop=self.model_config.hop_length)
    step_kwargs = dict(model=self.model, optimizer=self.optimizer, loss_fn=self.loss_fn,
                       ema_decay=config.ema_decay, axis_name="batch")
    # (state, batch of (devices, b, C, N)) and (state, batches of (devices, K, b, C, N)).
    self.train_step, self.train_steps = (
        jax.pmap(functools.partial(fn, **step_kwargs), axis_name="batch", donate_argnums=(0,))
        for fn in (steps.train_step, steps.train_steps))
    self.eval_step = jax.jit(functools.partial(steps.eval_step, model=self.model))

  def init_state(self) -> steps.TrainState:
    """The step-0 state (host arrays) for `config.seed`: fresh parameters, or those of
    `config.init_from` (a registered model name, a PyTorch .ckpt or an export) with a fresh
    optimiser state and the EMA starting from them."""
    rng, init_rng = jax.random.split(jax.random.PRNGKey(self.config.seed))
    source = self.config.get("init_from")
    params = (pretrained_params(source, self.model_config) if source
              else init_params(self.model_config, init_rng))
    return jax.device_get(steps.TrainState.create(params, self.optimizer, rng))

  def abstract_state(self) -> Any:
    """`init_state` as ShapeDtypeStructs, computed without running the model."""
    rng, init_rng = jax.random.split(jax.random.PRNGKey(self.config.seed))
    audio = jnp.zeros((1, self.model_config.audio_channels, self.model_config.n_fft), jnp.float32)
    return jax.eval_shape(lambda r, x: steps.TrainState.create(
        self.model.init(r, x)["params"], self.optimizer, rng), init_rng, audio)

  def validate(self, params: Any, warn: bool = True) -> dict[str, float]:
    """`validation.validate` of this experiment's model with `params` (host arrays)."""
    return validation.validate(self.config, self.eval_step, params,
                               self.model_config.sample_rate, warn=warn)


def pretrained_params(source: str, config) -> Any:
  """The parameters of `source` (a registered model name, a PyTorch .ckpt or an export) for a
  model of `config`; CheckpointError in one line naming the keys or shapes that differ."""
  from bsmamba2_jax import exports, registry  # pylint: disable=g-import-not-at-top
  path = source if os.path.exists(os.path.expanduser(source)) else None
  if path is None and source in registry.models():
    path = registry.pretrained(source)
  if path is None:
    raise ValueError(f"config.init_from={source}: neither a file or folder nor a registered "
                     f"model ({', '.join(sorted(registry.models()))})")
  _, params = exports.load_model(os.path.expanduser(path))
  exports.check_params(f"config.init_from={source}", config, params)
  logging.info("starting from the weights of %s", source)
  return jax.tree_util.tree_map(np.asarray, params)


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
  from data_pipeline import mixing  # pylint: disable=g-import-not-at-top  (training data)
  try:
    mixing.check_stems(workdir_lib.model_config(config).stems)  # the targets of the MUSDB mix
  except ValueError as e:
    raise ValueError(f"config.model: {e}") from None


def out_of_memory_message(error: Exception, config: ml_collections.ConfigDict) -> str:
  """One line for a training step that did not fit in device memory, with what to change."""
  remedies = ["lower --config.train.per_device_batch_size (raise --config.optimizer.accumulate "
              "to keep the segments per update)"]
  if not workdir_lib.model_config(config).remat:
    remedies.append("set --config.model.remat=true (recompute activations)")
  remedies.append("shorten --config.data.segment_seconds")
  first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return (f"the training step does not fit in device memory ({first_line}); "
          + ", or ".join(remedies))


def _initialize_distributed(config: ml_collections.ConfigDict) -> None:
  dist = config.distributed
  if not dist.enabled or jax.distributed.is_initialized():
    return
  if dist.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
  jax.distributed.initialize(coordinator_address=dist.coordinator_address,
                             num_processes=dist.num_processes, process_id=dist.process_id)


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
  the last validation metrics and `state` (the final host TrainState). Bad settings, data or
  workdirs raise ValueError / OSError with one line naming them.
  """
  from data_pipeline import musdb  # pylint: disable=g-import-not-at-top
  start_time = time.time()
  _initialize_distributed(config)
  if not config.data.dir:
    raise ValueError("config.data.dir is not set (--config.data.dir=/path/to/musdb18hq)")
  config = config.copy_and_resolve_references()  # the caller's config stays as it was
  config.data.dir = os.path.expanduser(config.data.dir)  # the shell leaves --config.data.dir=~/x
  check_config(config, max_minutes)
  dtype = workdir_lib.model_config(config).dtype
  if resolve_dtype(dtype) == "bfloat16" and jax.default_backend() == "cpu":
    logging.warning("config.model.dtype=%s computes in bfloat16 on CPU, where XLA:CPU runs this "
                    "model's training step slower than in float32; --config.model.dtype=auto "
                    "(or float32) trains faster here", dtype)
  workdir = os.path.abspath(workdir)
  inside = musdb.split_folder_holding(config.data.dir, workdir)
  if inside:
    raise ValueError(f"{workdir}: the workdir lies inside the dataset's {inside}, where it would "
                     "be listed as a track; choose a --workdir outside it")
  os.makedirs(workdir, exist_ok=True)
  with (workdir_lib.workdir_lock(workdir) if jax.process_index() == 0
        else contextlib.nullcontext()):
    workdir_lib.prepare(config, workdir, write=jax.process_index() == 0)
    return _train(config, workdir, start_time=start_time, max_minutes=max_minutes,
                  progress=progress)


def _train(config: ml_collections.ConfigDict, workdir: str, *, start_time: float,
           max_minutes: float | None, progress: bool) -> dict:
  """`train_and_evaluate` once the settings are checked and `workdir` is prepared."""
  from data_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  _maybe_generate_data(config)
  # Bad data fails now, before the model is built, not at the first step or after training.
  training_set = pipeline.training_tracks(config.data.dir, config.data.segment_seconds)
  validation.validation_batches(config)

  experiment = Experiment(config)
  devices = jax.local_device_count()
  global_batch = config.train.per_device_batch_size * jax.device_count()
  manager = TrainingCheckpoints(os.path.join(workdir, workdir_lib.CHECKPOINTS),
                                keep_last=config.keep_last, keep_best=config.keep_best)
  elapsed_before = 0.0  # wall-clock seconds of the runs this one resumes
  resumed = manager.restore_newest(experiment.abstract_state())
  if resumed is not None:
    state, meta = resumed
    elapsed_before = float(meta.get("elapsed_s", 0.0))
    logging.info("resumed from %s at step %d", manager.directory, meta["data_position"])
  else:
    state = experiment.init_state()
  step = int(state.step)
  lr_schedule = steps.learning_rate(config.optimizer,
                                    config.train.num_steps // config.optimizer.accumulate)
  batches = pipeline.train_iterator(
      config.data.dir, segment_seconds=config.data.segment_seconds, local_devices=devices,
      per_device_batch=config.train.per_device_batch_size,
      mono=experiment.model_config.audio_channels == 1, seed=config.seed, start_step=step,
      process_index=jax.process_index(), process_count=jax.process_count(),
      training_set=training_set, stems=experiment.model_config.stems,
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
      metrics_row = experiment.validate(unreplicate(state_r.ema_params), warn=not validated)
      validated = True
    except BaseException:
      save_before_failing(state_r)
      raise
    log.write(step, metrics_row)
    return save(state_r, metrics_row), metrics_row

  received = []
  handlers = {}
  try:
    for signum in (signal.SIGTERM, signal.SIGINT):
      handlers[signum] = signal.signal(signum, lambda s, _: received.append(s))
  except ValueError:  # Not the main thread: the caller handles signals.
    pass

  log = logs.MetricsLog(workdir, enabled=jax.process_index() == 0, start_step=step,
                        fields=logs.csv_fields(experiment.model_config.stems))
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
        log.write(step, last)
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
    log.close()
    manager.close()
  logging.info("stopped at step %d (%s): %s", step, stop_reason, valid)
  return {**last, **valid, "step": step, "stop_reason": stop_reason, "workdir": workdir,
          "skipped": int(host.skipped), "global_batch": global_batch, "state": host}
