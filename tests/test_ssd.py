"""ssd_scan against an independent float64 NumPy recurrence (docs/model.md §5)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsmamba2_jax import ssd_chunked
from bsmamba2_jax.ssd import METHODS, ssd_scan

CHUNK = 16
BATCH, NHEADS, HEADDIM, D_STATE = 2, 4, 3, 5


def reference(x, dt, A, B, C, D, initial_state):
  """float64 sequential recurrence, one time step at a time.

  x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n), D (h,), initial_state (b, h, p, n).
  Returns y (b, l, h, p) and the final state (b, h, p, n).
  """
  x, dt, A, B, C, D, state = (np.asarray(v, np.float64)
                              for v in (x, dt, A, B, C, D, initial_state))
  heads_per_group = x.shape[2] // B.shape[2]
  B = np.repeat(B, heads_per_group, axis=2)  # head h reads group h // heads_per_group
  C = np.repeat(C, heads_per_group, axis=2)
  y = np.zeros_like(x)
  for t in range(x.shape[1]):
    decay = np.exp(dt[:, t] * A)[:, :, None, None]
    update = dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None, :]
    state = decay * state + update
    y[:, t] = (state * C[:, t, :, None, :]).sum(-1) + D[:, None] * x[:, t]
  return y, state


def make_inputs(seqlen, ngroups, seed=0, dt_scale=1.0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(BATCH, seqlen, NHEADS, HEADDIM))
  dt = dt_scale * np.log1p(np.exp(rng.normal(-1.0, 1.0, size=(BATCH, seqlen, NHEADS))))
  A = -rng.uniform(1.0, 16.0, size=NHEADS) / 8
  B = rng.normal(size=(BATCH, seqlen, ngroups, D_STATE))
  C = rng.normal(size=(BATCH, seqlen, ngroups, D_STATE))
  D = rng.normal(size=NHEADS)
  state = rng.normal(size=(BATCH, NHEADS, HEADDIM, D_STATE))
  return x, dt, A, B, C, D, state


def assert_close(actual, expected, rtol, what):
  """|actual - expected| <= rtol · max|expected| elementwise (relative to the array's scale)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  error = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
  assert error <= rtol, f"{what}: relative error {error:.2e} > {rtol:.0e}"


def f32(*arrays):
  return [jnp.asarray(a, jnp.float32) for a in arrays]


@pytest.mark.parametrize("seqlen", [1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 801])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_every_method_equals_float64_reference(seqlen, ngroups):
  x, dt, A, B, C, D, state = make_inputs(seqlen, ngroups)
  for initial_state in (None, state):
    start = np.zeros_like(state) if initial_state is None else initial_state
    y_ref, final_ref = reference(x, dt, A, B, C, D, start)
    for method in METHODS:
      y, final = ssd_scan(*f32(x, dt, A, B, C, D), method=method, chunk_size=CHUNK,
                          initial_state=None if initial_state is None else f32(state)[0],
                          return_final_state=True)
      what = f"{method} seqlen={seqlen} ngroups={ngroups} init={initial_state is not None}"
      assert y.dtype == jnp.float32 and final.dtype == jnp.float32
      assert_close(y, y_ref, 1e-5, what + " y")
      assert_close(final, final_ref, 1e-5, what + " final state")


def test_chunks_are_balanced_to_keep_padding_small():
  assert ssd_chunked._chunk_length(101, 64) == 56   # 2 chunks, 11 padded steps instead of 27
  assert ssd_chunked._chunk_length(801, 64) == 64   # 13 chunks either way
  assert ssd_chunked._chunk_length(62, 64) == 62    # one chunk, no padding
  assert ssd_chunked._chunk_length(37, 30) == 24    # 2 chunks of at most 30
  assert ssd_chunked._chunk_length(1, 16) == 1


@pytest.mark.parametrize("chunk_size", [1, 5, 30, 64])
def test_chunk_size_does_not_change_the_result(chunk_size):
  x, dt, A, B, C, D, state = make_inputs(37, 2, seed=1)
  y_ref, final_ref = reference(x, dt, A, B, C, D, state)
  y, final = ssd_scan(*f32(x, dt, A, B, C, D), chunk_size=chunk_size,
                      initial_state=f32(state)[0], return_final_state=True)
  assert_close(y, y_ref, 1e-5, f"chunk_size={chunk_size} y")
  assert_close(final, final_ref, 1e-5, f"chunk_size={chunk_size} final state")


def test_without_D_there_is_no_skip_term():
  x, dt, A, B, C, D, state = make_inputs(9, 1, seed=2)
  y_ref, _ = reference(x, dt, A, B, C, np.zeros_like(D), np.zeros_like(state))
  assert_close(ssd_scan(*f32(x, dt, A, B, C)), y_ref, 1e-5, "D=None")


def _objective(method, cotangents, with_state=True, with_final=True):
  """Σ y·gy + Σ final·gs as a function of (x, dt, A, B, C, D, initial_state); y is the aux.
  Without state the scan starts from zeros (initial_state ignored); without final the Σ final·gs
  term is left out and the final state is not asked for."""
  gy, gs = cotangents

  def objective(x, dt, A, B, C, D, state):
    out = ssd_scan(x, dt, A, B, C, D, method=method, chunk_size=CHUNK,
                   initial_state=state if with_state else None, return_final_state=with_final)
    y, final = out if with_final else (out, None)
    return jnp.sum(y * gy) + (jnp.sum(final * gs) if with_final else 0.0), y
  return objective


def test_gradients_agree_across_methods_and_with_finite_differences():
  seqlen = CHUNK + 3
  inputs = make_inputs(seqlen, 2, seed=3)
  rng = np.random.default_rng(4)
  gy = rng.normal(size=(BATCH, seqlen, NHEADS, HEADDIM))
  gs = rng.normal(size=(BATCH, NHEADS, HEADDIM, D_STATE))
  names = ("x", "dt", "A", "B", "C", "D", "initial_state")

  # Directional derivative of the float64 reference by central differences.
  direction = [rng.normal(size=np.shape(v)) for v in inputs]
  def ref_objective(eps):
    y, final = reference(*[v + eps * d for v, d in zip(inputs, direction)])
    return np.sum(y * gy) + np.sum(final * gs)
  eps = 1e-5
  fd = (ref_objective(eps) - ref_objective(-eps)) / (2 * eps)

  grads = {}
  for method in METHODS:
    grads[method] = jax.grad(_objective(method, f32(gy, gs)), argnums=tuple(range(7)),
                             has_aux=True)(*f32(*inputs))[0]
    for name, g in zip(names, grads[method]):
      assert np.all(np.isfinite(g)), f"{method}: non-finite gradient w.r.t. {name}"
    directional = sum(np.sum(np.asarray(g, np.float64) * d)
                      for g, d in zip(grads[method], direction))
    assert abs(directional - fd) <= 1e-4 * abs(fd), f"{method}: {directional} vs {fd}"
  for method in ("chunked", "associative"):
    for name, g, g_ref in zip(names, grads[method], grads["sequential"]):
      assert_close(g, g_ref, 1e-4, f"{method} d/d{name}")


@pytest.mark.parametrize("seqlen", [1, CHUNK, 3 * CHUNK + 1])
@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_final", [False, True])
def test_hand_written_chunked_backward_equals_the_sequential_gradients(seqlen, ngroups, with_state,
                                                                      with_final):
  """The chunked method's custom VJP, with and without initial state (chunk 0 skipped) and final
  state (the last chunk's end state not computed), one and several chunks."""
  x, dt, A, B, C, D, state = make_inputs(seqlen, ngroups, seed=11)
  rng = np.random.default_rng(12)
  cotangents = f32(rng.normal(size=x.shape), rng.normal(size=state.shape))
  grads = [jax.grad(_objective(method, cotangents, with_state, with_final),
                    argnums=tuple(range(7)), has_aux=True)(*f32(x, dt, A, B, C, D, state))[0]
           for method in ("chunked", "sequential")]

  names = "x dt A B C D initial_state".split()[:7 if with_state else 6]
  for name, g, g_ref in zip(names, *grads):
    if np.all(np.asarray(g_ref) == 0):  # A without a state to decay: one step, no initial state
      assert np.all(np.asarray(g) == 0), f"d/d{name} should be zero"
    else:
      assert_close(g, g_ref, 1e-4, f"d/d{name}")


def test_long_batches_go_through_in_blocks_with_the_same_values_and_gradients(monkeypatch):
  """Batch 5 of 300 steps: the chunked method maps over blocks of 3 sequences, the last one
  padded with a zero sequence."""
  state_size = NHEADS * HEADDIM * D_STATE
  monkeypatch.setattr(ssd_chunked, "UNBLOCKED_STATE_BYTES", 4 * 19 * state_size * 4)  # 19 chunks
  monkeypatch.setattr(ssd_chunked, "BLOCK_STATE_BYTES", 3 * 19 * state_size * 4)
  assert ssd_chunked.sequences_per_block(4, 300, CHUNK, state_size, "cpu") == 4
  assert ssd_chunked.sequences_per_block(5, 300, CHUNK, state_size, "cpu") == 3
  assert ssd_chunked.sequences_per_block(5, CHUNK, CHUNK, state_size, "cpu") == 5
  # Blocks fit a CPU's cache; an accelerator runs the whole batch at once.
  for platform in ("gpu", "cuda", "tpu"):
    assert ssd_chunked.sequences_per_block(5, 300, CHUNK, state_size, platform) == 5
  jax.clear_caches()
  rng = np.random.default_rng(5)
  x, dt, A, B, C, D, state = (np.concatenate([v, v, v[:1]]) if v.ndim > 1 else v
                              for v in make_inputs(300, 2, seed=5))
  y_ref, final_ref = reference(x, dt, A, B, C, D, state)
  y, final = ssd_scan(*f32(x, dt, A, B, C, D), chunk_size=CHUNK, initial_state=f32(state)[0],
                      return_final_state=True)
  assert_close(y, y_ref, 1e-5, "blocked y")
  assert_close(final, final_ref, 1e-5, "blocked final state")
  cotangents = f32(rng.normal(size=y.shape), rng.normal(size=final.shape))
  grads = {method: jax.grad(_objective(method, cotangents), argnums=tuple(range(7)),
                            has_aux=True)(*f32(x, dt, A, B, C, D, state))[0]
           for method in ("chunked", "sequential")}
  for name, g, g_ref in zip("x dt A B C D initial_state".split(), *grads.values()):
    assert_close(g, g_ref, 1e-4, f"blocked d/d{name}")


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_inputs_compute_in_float32(method):
  x, dt, A, B, C, D, state = make_inputs(CHUNK + 5, 2, seed=5)
  bf16 = [jnp.asarray(v, jnp.bfloat16) for v in (x, dt, A, B, C, D, state)]
  # Reference on the bf16-rounded inputs: what remains is the rounding of y to bf16 (2^-8
  # relative to an element, 2^-7 of the scale leaves room), not bf16 arithmetic inside.
  y_ref, final_ref = reference(*[np.asarray(v, np.float64) for v in bf16])
  y, final = ssd_scan(*bf16[:6], method=method, chunk_size=CHUNK, initial_state=bf16[6],
                      return_final_state=True)
  assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32
  assert_close(y, y_ref, 2.0**-7, f"{method} bf16 y")
  assert_close(final, final_ref, 1e-5, f"{method} bf16 final state (float32)")


@pytest.mark.parametrize("method", METHODS)
def test_long_sequence_with_large_dt_stays_finite(method):
  seqlen = 801
  x, dt, A, B, C, D, state = make_inputs(seqlen, 1, seed=6, dt_scale=40.0)
  A = A * 8  # A in [-16, -1], dt up to ~100: dt·A reaches -700, exp(dt·A) underflows to 0
  dt[:, 100:300] = 0.0  # and long stretches of no decay at all
  y_ref, _ = reference(x, dt, A, B, C, D, state)
  objective = _objective(method, f32(np.ones_like(x), np.ones_like(state)))
  (_, y), grads = jax.jit(jax.value_and_grad(objective, argnums=tuple(range(7)), has_aux=True))(
      *f32(x, dt, A, B, C, D, state))
  assert_close(y, y_ref, 1e-5, f"{method} large dt")
  for name, g in zip(("x", "dt", "A", "B", "C", "D", "initial_state"), grads):
    assert np.all(np.isfinite(g)), f"{method}: non-finite gradient w.r.t. {name}"


def test_static_options_under_an_outer_jit():
  x, dt, A, B, C, D, _ = make_inputs(20, 1, seed=7)
  y_ref, _ = reference(x, dt, A, B, C, D, np.zeros((BATCH, NHEADS, HEADDIM, D_STATE)))
  fn = jax.jit(lambda *args: ssd_scan(*args, method="chunked", chunk_size=8))
  assert_close(fn(*f32(x, dt, A, B, C, D)), y_ref, 1e-5, "outer jit")


@pytest.mark.parametrize("change, message", [
    (dict(x=np.zeros((2, 5, 4))), "x must be"),
    (dict(dt=np.zeros((2, 5, 3))), "dt must be"),
    (dict(A=np.zeros(3)), "A must be"),
    (dict(B=np.zeros((2, 6, 1, 5))), "B must be"),
    (dict(C=np.zeros((2, 5, 1, 4))), "C must have"),
    (dict(B=np.zeros((2, 5, 3, 5)), C=np.zeros((2, 5, 3, 5))), "multiple of ngroups"),
    (dict(D=np.zeros(2)), "D must be"),
    (dict(initial_state=np.zeros((2, 4, 3, 4))), "initial_state must be"),
    (dict(method="parallel"), "unknown method"),
    (dict(chunk_size=0), "chunk_size must be"),
    (dict(x=np.zeros((2, 0, 4, 3)), dt=np.zeros((2, 0, 4)), B=np.zeros((2, 0, 1, 5)),
          C=np.zeros((2, 0, 1, 5))), "no time steps"),
])
def test_bad_input_names_the_problem(change, message):
  args = dict(x=np.zeros((2, 5, 4, 3)), dt=np.zeros((2, 5, 4)), A=np.zeros(4),
              B=np.zeros((2, 5, 1, 5)), C=np.zeros((2, 5, 1, 5)), D=np.zeros(4))
  args.update(change)
  with pytest.raises(ValueError, match=message):
    ssd_scan(**args)
