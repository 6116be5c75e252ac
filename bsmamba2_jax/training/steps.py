"""Train state, optimiser, EMA and the pure training / evaluation steps (docs/training.md §5).

`train_step` is written once for `jax.pmap(..., axis_name="batch")`: gradients and the loss are
averaged over the axis with `lax.pmean`, so every device applies the same update. With one
device, pmap over one device runs the same code. Mixed precision is the model's business
(`ModelConfig.dtype`); parameters, optimiser state, EMA and the loss stay fp32.

A step whose loss or gradients are not finite changes nothing but `step` (the data position),
`rng` and the `skipped` counter.

The model runs in training mode (`train=True`: the Transformers' dropout, where the model has
any) with a "dropout" key drawn from `state.rng` (and the device's index under pmap), so a step
stays a pure function of (state, batch). Its targets are the batch's stems in the order of the
model's `config.stems`: `batch[stem]` (b, C, N) for one stem, the stems stacked on axis 1
(b, n, C, N) for n > 1, as the model's output.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

NO_DECAY_PARAMS = ("A_log", "D", "dt_bias")


@flax.struct.dataclass
class TrainState:
  """Everything a training run needs to continue, as one pytree.

  step:       () int32, batches consumed so far (the data-pipeline position).
  params:     the Flax params tree (fp32).
  ema_params: exponential moving average of `params` (per optimiser update).
  opt_state:  the Optax state of `make_optimizer`.
  rng:        (2,) uint32 PRNG key, advanced every step.
  skipped:    () int32, steps dropped for a non-finite loss or gradient.
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  skipped: jax.Array

  @classmethod
  def create(cls, params: Any, optimizer: optax.GradientTransformation,
             rng: jax.Array) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               ema_params=jax.tree_util.tree_map(jnp.array, params),
               opt_state=optimizer.init(params), rng=rng, skipped=jnp.zeros((), jnp.int32))


def weight_decay_mask(params: Any) -> Any:
  """True for every parameter except the Mamba2 `A_log`, `D`, `dt_bias` (mamba_ssm's no-decay)."""
  def decays(path, _):
    name = getattr(path[-1], "key", getattr(path[-1], "name", None))
    return name not in NO_DECAY_PARAMS
  return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate(config: Any, num_updates: int) -> optax.Schedule:
  """The LR per optimiser update: `config.schedule` "constant" (paper) or "cosine" (to 0),
  both after `config.warmup_steps` linear warm-up updates."""
  warmup = int(config.warmup_steps)
  if config.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(config.lr)
    return optax.warmup_constant_schedule(0.0, config.lr, warmup)
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup,
                                              decay_steps=max(num_updates, warmup + 1))
  raise ValueError(f"optimizer.schedule must be 'constant' or 'cosine', got {config.schedule!r}")


def make_optimizer(config: Any, *, num_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW, optionally accumulated over `config.accumulate` batches.

  `config` has lr, b1, b2, eps, weight_decay, clip, warmup_steps, schedule, no_decay_mask
  (bool) and accumulate (int ≥ 1); `num_steps` counts batches (the schedule counts updates).
  """
  accumulate = int(config.accumulate)
  if accumulate < 1:
    raise ValueError(f"optimizer.accumulate must be >= 1, got {accumulate}")
  chain = optax.chain(
      optax.clip_by_global_norm(config.clip),
      optax.adamw(learning_rate(config, num_steps // accumulate), b1=config.b1, b2=config.b2,
                  eps=config.eps, weight_decay=config.weight_decay,
                  mask=weight_decay_mask if config.no_decay_mask else None))
  if accumulate == 1:
    return chain
  return optax.MultiSteps(chain, every_k_schedule=accumulate).gradient_transformation()


def _applied_update(opt_state: Any) -> jax.Array:
  """Whether the update just computed changed the parameters (False while accumulating)."""
  if isinstance(opt_state, optax.MultiStepsState):
    return opt_state.mini_step == 0
  return jnp.array(True)


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def model_stems(model: Any) -> tuple[str, ...]:
  """The stems a model separates, in the order of its outputs: `model.config.stems` (a
  `BSMamba2`), ("vocals",) for a model without them."""
  stems = getattr(getattr(model, "config", None), "stems", None)
  return ("vocals",) if stems is None else ((stems,) if isinstance(stems, str) else tuple(stems))


def stack_targets(batch: dict, stems: tuple[str, ...]) -> jax.Array:
  """The targets of `batch` for a model of `stems`: batch[stem] (b, C, N) for one stem, else the
  stems stacked on axis 1, (b, n, C, N)."""
  if len(stems) == 1:
    return batch[stems[0]]
  return jnp.stack([batch[stem] for stem in stems], axis=1)


def train_step(state: TrainState, batch: dict, *, model: Any,
               optimizer: optax.GradientTransformation,
               loss_fn: Callable[[jax.Array, jax.Array], jax.Array], ema_decay: float,
               axis_name: str | None = "batch") -> tuple[TrainState, dict]:
  """One optimiser micro-step on `batch` {"mixture", *stems}: (b, C, N) float32 per device, the
  stems those of `model.config.stems` ("vocals" for a model without a config).

  `model.apply(variables, mixture, train=True, rngs={"dropout": key})` gives the estimate of the
  targets (`stack_targets`), `loss_fn(estimate, target)` its loss. Returns the new state and
  metrics {"loss", "grad_norm", "finite", "skipped"} (scalars, identical on every device).
  `axis_name=None` runs without collectives (plain `jax.jit`).
  """
  rng, dropout_rng = jax.random.split(state.rng)
  if axis_name is not None:  # each device its own dropout masks
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
  target = stack_targets(batch, model_stems(model))

  def objective(params):
    estimate = model.apply({"params": params}, batch["mixture"], train=True,
                           rngs={"dropout": dropout_rng})
    return loss_fn(estimate.astype(jnp.float32), target)

  loss, grads = jax.value_and_grad(objective)(state.params)
  if axis_name is not None:
    loss, grads = jax.lax.pmean((loss, grads), axis_name)
  finite = jnp.isfinite(loss) & _all_finite(grads)

  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  update_ema = _applied_update(opt_state)
  ema_params = jax.tree_util.tree_map(
      lambda e, p: jnp.where(update_ema, ema_decay * e + (1.0 - ema_decay) * p, e),
      state.ema_params, params)

  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1, params=keep(params, state.params),
      ema_params=keep(ema_params, state.ema_params),
      opt_state=keep(opt_state, state.opt_state), rng=rng,
      skipped=state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32))
  metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), finite=finite,
                 skipped=new_state.skipped)
  return new_state, metrics


def train_steps(state: TrainState, batches: dict, **step_kwargs: Any) -> tuple[TrainState, dict]:
  """`train_step` on K batches in turn, as one program: `batches` {"mixture", *stems} are
  (K, b, C, N) float32 per device; `step_kwargs` are `train_step`'s.

  Returns the state after the K steps and each step's metrics stacked, (K,) per name: the same as
  K calls of `train_step`. Fewer, longer calls cost less per step where a call itself costs: a
  dispatch per step on an accelerator, and on XLA:CPU the kernel's page faults on the buffers it
  maps afresh for every call (docs/performance.md).
  """
  return jax.lax.scan(lambda s, batch: train_step(s, batch, **step_kwargs), state, batches)


def eval_step(params: Any, mixture: jax.Array, *, model: Any) -> jax.Array:
  """The estimated stem (b, C, N) float32, or the stems (b, n, C, N) of a model of n > 1 stems
  (in `model.config.stems` order), for `mixture` (b, C, N) with `params` (e.g. the EMA);
  inference mode (no dropout)."""
  return model.apply({"params": params}, mixture).astype(jnp.float32)
