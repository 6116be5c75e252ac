"""The Mamba2 SSD recurrence in its two plain forms: one step at a time, and as an associative scan.

Per head h with state S of shape (headdim, d_state), for t = 0 .. seqlen-1:

  S_t = exp(a_t) · S_{t-1} + dt_t · x_t B_tᵀ,      y_t = S_t C_t,      a_t = dt_t · A_h,

(docs/model.md §5). `sequential` is the reference the fast chunked form (`ssd_chunked`) is tested
against; `associative` composes the affine maps S -> exp(a)·S + u pairwise, which is exact too but
holds every step's state at once. Both run in float32 on grouped arrays: x (b, l, g, h, p);
a, dt (b, l, g, h); B, C (b, l, g, n); state (b, g, h, p, n) or None (zeros).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def combine(left, right):
  """Composes two affine state maps S -> exp(a)·S + u, `left` applied first.

  a: log-decays shaped to broadcast against the updates u (any leading axes, aligned).
  """
  a_left, u_left = left
  a_right, u_right = right
  return a_left + a_right, jnp.exp(a_right) * u_left + u_right


def sequential(x, a, dt, B, C, state):
  """One step per time step (`lax.scan`). Returns y (b, l, g, h, p) and the final state
  (b, g, h, p, n)."""
  if state is None:
    state = jnp.zeros(x.shape[:1] + x.shape[2:] + B.shape[-1:], jnp.float32)

  def step(state, inputs):
    x_t, a_t, dt_t, b_t, c_t = inputs
    state = (jnp.exp(a_t)[..., None, None] * state
             + jnp.einsum("bgh,bghp,bgn->bghpn", dt_t, x_t, b_t))
    return state, jnp.einsum("bghpn,bgn->bghp", state, c_t)

  time_major = [jnp.moveaxis(v, 1, 0) for v in (x, a, dt, B, C)]
  state, y = lax.scan(step, state, time_major)
  return jnp.moveaxis(y, 0, 1), state


def associative(x, a, dt, B, C, state):
  """Whole-sequence `lax.associative_scan` of (decay, update) pairs; returns as `sequential`."""
  u = jnp.einsum("blgh,blghp,blgn->blghpn", dt, x, B)
  if state is not None:
    u = u.at[:, 0].add(jnp.exp(a[:, 0])[..., None, None] * state)
  _, states = lax.associative_scan(combine, (a[..., None, None], u), axis=1)
  y = jnp.einsum("blghpn,blgn->blghp", states, C)
  return y, states[:, -1]
