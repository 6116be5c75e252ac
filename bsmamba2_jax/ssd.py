"""`ssd_scan`: the Mamba2 selective state-space recurrence ("SSD"), computed exactly three ways.

Per head h with state S of shape (headdim, d_state), for t = 0 .. seqlen-1:

  S_t = exp(dt_t · A_h) · S_{t-1} + dt_t · x_t B_tᵀ,      y_t = S_t C_t + D_h · x_t,

where head h reads group h // (nheads // ngroups) of B and C (docs/model.md §5). The methods give
the same numbers up to rounding on finite inputs (a NaN spreads through its whole chunk in
"chunked", only forward in time in the others):

- "sequential":  `lax.scan` over time, the reference (`ssd_reference`).
- "associative": `lax.associative_scan` over time; memory grows with seqlen × headdim × d_state.
- "chunked":     the SSD matmul form with a hand-written backward (`ssd_chunked`), the default.

dt·A, cumulative sums, exponentials and states are float32 whatever the input dtype; the output
has the dtype of `x`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bsmamba2_jax import ssd_chunked, ssd_reference

METHODS = ("chunked", "associative", "sequential")


def _check_inputs(x, dt, A, B, C, D, initial_state, method, chunk_size):
  """Raises ValueError naming the offending argument when shapes or options are inconsistent."""
  if method not in METHODS:
    raise ValueError(f"ssd_scan: unknown method {method!r}; choose from {METHODS}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"ssd_scan: chunk_size must be a positive int, got {chunk_size!r}")
  if x.ndim != 4:
    raise ValueError(f"ssd_scan: x must be (batch, seqlen, nheads, headdim), got shape {x.shape}")
  batch, seqlen, nheads, headdim = x.shape
  if seqlen < 1:
    raise ValueError(f"ssd_scan: x has no time steps (shape {x.shape}); seqlen must be >= 1")
  if dt.shape != (batch, seqlen, nheads):
    raise ValueError(f"ssd_scan: dt must be (batch, seqlen, nheads) = {(batch, seqlen, nheads)}, "
                     f"got {dt.shape}")
  if A.shape != (nheads,):
    raise ValueError(f"ssd_scan: A must be (nheads,) = {(nheads,)}, got {A.shape}")
  if B.ndim != 4 or B.shape[:2] != (batch, seqlen):
    raise ValueError(f"ssd_scan: B must be (batch, seqlen, ngroups, d_state) with batch, seqlen "
                     f"= {(batch, seqlen)}, got {B.shape}")
  if C.shape != B.shape:
    raise ValueError(f"ssd_scan: C must have the shape of B {B.shape}, got {C.shape}")
  ngroups, d_state = B.shape[2:]
  if ngroups < 1 or nheads % ngroups:
    raise ValueError(f"ssd_scan: nheads ({nheads}) must be a multiple of ngroups ({ngroups})")
  if D is not None and D.shape != (nheads,):
    raise ValueError(f"ssd_scan: D must be (nheads,) = {(nheads,)}, got {D.shape}")
  state_shape = (batch, nheads, headdim, d_state)
  if initial_state is not None and initial_state.shape != state_shape:
    raise ValueError(f"ssd_scan: initial_state must be (batch, nheads, headdim, d_state) = "
                     f"{state_shape}, got {initial_state.shape}")


def ssd_scan(x, dt, A, B, C, D=None, *, method="chunked", chunk_size=64, initial_state=None,
             return_final_state=False):
  """Runs the Mamba2 SSD recurrence.

  Args:
    x: (batch, seqlen, nheads, headdim) inputs.
    dt: (batch, seqlen, nheads) step sizes, already softplus'ed (>= 0).
    A: (nheads,) negative decay rates.
    B: (batch, seqlen, ngroups, d_state) input projections; nheads % ngroups == 0.
    C: (batch, seqlen, ngroups, d_state) output projections.
    D: optional (nheads,) skip weights (y += D_h · x).
    method: "chunked" (default), "associative" or "sequential"; all exact (static under jit).
    chunk_size: longest chunk Q of the "chunked" method (static); any seqlen >= 1 works.
    initial_state: optional (batch, nheads, headdim, d_state) state before step 0 (zeros if None).
    return_final_state: also return the state after the last step.

  Returns:
    y (batch, seqlen, nheads, headdim) in the dtype of x, and, if return_final_state, the
    float32 final state (batch, nheads, headdim, d_state).
  """
  x, dt, A, B, C = map(jnp.asarray, (x, dt, A, B, C))
  D = None if D is None else jnp.asarray(D)
  initial_state = None if initial_state is None else jnp.asarray(initial_state)
  _check_inputs(x, dt, A, B, C, D, initial_state, method, chunk_size)
  if D is None:
    D = jnp.zeros((x.shape[2],), jnp.float32)
  y, final = _ssd_scan(x, dt, A, B, C, D, initial_state, method=method, chunk_size=chunk_size,
                       with_final=bool(return_final_state))
  return (y, final) if return_final_state else y


@functools.partial(jax.jit, static_argnames=("method", "chunk_size", "with_final"))
def _ssd_scan(x, dt, A, B, C, D, initial_state, *, method, chunk_size, with_final):
  """`ssd_scan` on checked inputs with D filled in (one compilation with or without D);
  initial_state may be None (zeros, whose terms are skipped). Returns (y, final_state), the
  final state None unless `with_final`."""
  batch, seqlen, nheads, headdim = x.shape
  ngroups, d_state = B.shape[2:]
  heads = nheads // ngroups
  f32 = jnp.float32
  xg = x.astype(f32).reshape(batch, seqlen, ngroups, heads, headdim)
  dtg = dt.astype(f32).reshape(batch, seqlen, ngroups, heads)
  a = dtg * A.astype(f32).reshape(ngroups, heads)
  Bf, Cf = B.astype(f32), C.astype(f32)
  state = (None if initial_state is None
           else initial_state.astype(f32).reshape(batch, ngroups, heads, headdim, d_state))

  skip = D.astype(f32).reshape(ngroups, heads, 1)

  def with_skip(scan):
    """`scan` plus the D skip; for "chunked" inside each block, where x is still in cache."""
    def run(x, a, dt, B, C, state):
      y, final = scan(x, a, dt, B, C, state)
      return y + skip * x, final
    return run

  if method == "sequential":
    y, final = with_skip(ssd_reference.sequential)(xg, a, dtg, Bf, Cf, state)
  elif method == "associative":
    y, final = with_skip(ssd_reference.associative)(xg, a, dtg, Bf, Cf, state)
  else:
    chunked = functools.partial(ssd_chunked.chunked, chunk_size=chunk_size, with_final=with_final)
    block = ssd_chunked.sequences_per_block(batch, seqlen, chunk_size,
                                            nheads * headdim * d_state, jax.default_backend())
    y, final = ssd_chunked.blockwise(with_skip(chunked), block, xg, a, dtg, Bf, Cf, state)

  y = y.reshape(batch, seqlen, nheads, headdim)
  final = final.reshape(batch, nheads, headdim, d_state) if with_final else None
  return y.astype(x.dtype), final
