"""Training steps: optimiser and EMA against a float64 NumPy AdamW, skipped non-finite steps,
K steps per call, gradient accumulation, schedules, the weight-decay mask."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bsmamba2_jax.training import loop, steps as training

class ToyModel:
  """estimate = mixture · gain[c] + mixer.A_log[c]: gradients have a closed form."""

  @staticmethod
  def apply(variables, mixture, train=False, rngs=None):
    del train, rngs  # no dropout
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
  config = ml_collections.ConfigDict(dict(
      train=dict(num_steps=18, steps_per_execution=k), log_every=4, eval_every=20,
      ckpt_every=10))
  assert loop.steps_this_call(step, config) == expected


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


# ---- The real model: n stems and dropout. ------------------------------------------------------

STEMS4 = ("drums", "bass", "other", "vocals")
# A small front end keeps these compiles short (the model's shapes do not depend on it).
SMALL_FFT = dict(n_fft=256, hop_length=64, band_widths=(32, 32, 65), audio_channels=1)


def model_step(config, ema_decay=0.9):
  """(jitted train_step of BSMamba2(config) with the fast loss, the model, its optimizer)."""
  from bsmamba2_jax import losses
  from bsmamba2_jax.model import BSMamba2
  model = BSMamba2(config)
  optimizer = training.make_optimizer(optimizer_config(lr=3e-3, weight_decay=0.0, clip=3.0),
                                      num_steps=10)
  loss_fn = functools.partial(losses.fast_loss, frontend_n_fft=config.n_fft,
                              frontend_hop=config.hop_length)
  step = jax.jit(functools.partial(training.train_step, model=model, optimizer=optimizer,
                                   loss_fn=loss_fn, ema_decay=ema_decay, axis_name=None))
  return step, model, optimizer


def stems_batch(stems, seed=0, batch=2, samples=2048):
  rng = np.random.default_rng(seed)
  parts = {s: (0.1 * rng.standard_normal((batch, 1, samples))).astype(np.float32) for s in stems}
  return dict(mixture=sum(parts.values()).astype(np.float32), **parts)


def test_stack_targets_and_model_stems():
  batch = stems_batch(STEMS4, samples=8)
  np.testing.assert_array_equal(training.stack_targets(batch, ("bass",)), batch["bass"])
  stacked = training.stack_targets(batch, ("other", "drums"))
  assert stacked.shape == (2, 2, 1, 8)
  np.testing.assert_array_equal(stacked[:, 0], batch["other"])
  np.testing.assert_array_equal(stacked[:, 1], batch["drums"])
  assert training.model_stems(ToyModel) == ("vocals",)
  from bsmamba2_jax.config import ModelConfig
  from bsmamba2_jax.model import BSMamba2
  assert training.model_stems(BSMamba2(ModelConfig.preset("tiny", stems=STEMS4))) == STEMS4


class ToyStems:
  """A model of 2 stems: estimate[:, i] = mixture · gain[i]; it records the train flag and rng."""
  config = type("Config", (), dict(stems=("other", "drums")))()
  seen = {}

  @classmethod
  def apply(cls, variables, mixture, train=False, rngs=None):
    cls.seen.update(train=train, rngs=rngs)
    return mixture[:, None] * variables["params"]["gain"][None, :, None, None]


def test_targets_are_the_stems_in_the_model_order():
  optimizer = training.make_optimizer(optimizer_config(), num_steps=10)
  step = jax.jit(functools.partial(training.train_step, model=ToyStems, optimizer=optimizer,
                                   loss_fn=mse, ema_decay=0.9, axis_name=None))
  state = training.TrainState.create({"gain": jnp.array([0.2, 0.7])}, optimizer,
                                     jax.random.PRNGKey(3))
  batch = stems_batch(STEMS4, samples=16)
  _, metrics = step(state, batch)
  x = batch["mixture"].astype(np.float64)
  want = np.mean([(0.2 * x - batch["other"]) ** 2, (0.7 * x - batch["drums"]) ** 2])
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
  assert ToyStems.seen["train"] is True and set(ToyStems.seen["rngs"]) == {"dropout"}
  with pytest.raises(KeyError, match="drums"):
    step(state, stems_batch(("vocals", "other"), samples=16))


def test_four_stem_model_trains_on_the_stacked_stems():
  from bsmamba2_jax.config import ModelConfig
  from bsmamba2_jax.model import random_params
  config = ModelConfig.preset("tiny", depth=1, stems=STEMS4, **SMALL_FFT)
  step, model, optimizer = model_step(config)
  state = training.TrainState.create(random_params(config, scale=0.05), optimizer,
                                     jax.random.PRNGKey(0))
  batch = stems_batch(STEMS4)
  estimate = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), state.params,
                            batch["mixture"])
  assert estimate.shape == (2, 4, 1, 2048)
  losses_seen = []
  for _ in range(4):
    state, metrics = step(state, batch)
    assert bool(metrics["finite"])
    losses_seen.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses_seen)) and int(state.step) == 4 and int(state.skipped) == 0
  assert losses_seen[-1] < losses_seen[0], losses_seen  # the same batch: the loss falls


def test_dropout_follows_the_state_rng():
  """A Transformer with dropout: in training a step's loss depends on state.rng (the same key,
  the same loss: the step is a pure function)."""
  from bsmamba2_jax.config import ModelConfig
  from bsmamba2_jax.model import random_params
  config = ModelConfig.preset("tiny", depth=1, module_type="transformer", attn_dropout=0.1,
                              ff_dropout=0.1, **SMALL_FFT)
  step, _, optimizer = model_step(config)
  params = random_params(config, scale=0.2)
  batch = stems_batch(("vocals",))
  loss = lambda seed: float(step(training.TrainState.create(
      params, optimizer, jax.random.PRNGKey(seed)), batch)[1]["loss"])
  first, again, other = loss(0), loss(0), loss(1)
  assert np.isfinite(first) and first == again
  assert other != first, (first, other)
  # The next step draws new masks: the rng advanced.
  state = training.TrainState.create(params, optimizer, jax.random.PRNGKey(0))
  new, _ = step(state, batch)
  assert not np.array_equal(new.rng, state.rng)
