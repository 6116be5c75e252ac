"""The Mamba2 selective state-space recurrence ("SSD"), computed exactly three ways.

Per head h with state S of shape (headdim, d_state), for t = 0 .. seqlen-1:

  S_t = exp(dt_t · A_h) · S_{t-1} + dt_t · x_t B_tᵀ,      y_t = S_t C_t + D_h · x_t,

where head h reads group h // (nheads // ngroups) of B and C. The three methods give the same
numbers up to rounding on finite inputs (a NaN spreads through its whole chunk in "chunked",
only forward in time in the others):

- "sequential":  `lax.scan` over time, the reference.
- "associative": `lax.associative_scan` over time on (decay, update) pairs; memory grows with
  seqlen × headdim × d_state per head.
- "chunked":     the SSD matmul form of the Mamba2 paper (cf. mamba_ssm's `ssd_minimal`): within a
  chunk of Q steps the output is a masked matmul (C Bᵀ ∘ L) X with
  L[i, j] = exp(Σ_{k=j+1..i} dt_k A); chunk-end states are carried across chunks by
  `lax.associative_scan`; states then reach the outputs of the next chunk. Its backward pass is
  written out (`jax.custom_vjp`, so reverse mode only) with every contraction in XLA's canonical
  batched-matmul form: autodiff's transposed operands made XLA:CPU transpose big arrays inside
  fused ops, which is slow for rows of h·p = 1024 floats (1.24x faster fwd+bwd at the paper's
  62 x 801). On CPU, large batches of long
  sequences go through `lax.map` a few sequences at a time, so their states stay in cache.

dt·A, cumulative sums, exponentials and states are float32 whatever the input dtype; the output
has the dtype of `x`. Segment sums are built without cancellation (a cumulative sum of a masked
repeat, never cs[i] - cs[j]), the -inf mask is applied before `exp` (so gradients stay finite),
and exp(a_i - a_j) is never factored as exp(a_i)·exp(-a_j). The end of a sequence is padded with
dt = 0 and x = 0, which leaves every state unchanged, so padding never leaks into real positions.

Axis letters in the einsums: b batch, l / s time (position in a chunk), c chunk, g group,
h head within its group, p headdim, n d_state.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

METHODS = ("chunked", "associative", "sequential")
# On CPU, once a batch's chunk states exceed UNBLOCKED_STATE_BYTES, "chunked" maps over blocks
# of sequences holding about BLOCK_STATE_BYTES each (see _sequences_per_block).
UNBLOCKED_STATE_BYTES = 64 * 2**20
BLOCK_STATE_BYTES = 8 * 2**20


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


def _combine(left, right):
  """Composes two affine state maps S -> exp(a)·S + u, `left` applied first.

  a: log-decays shaped to broadcast against the updates u (any leading axes, aligned).
  """
  a_left, u_left = left
  a_right, u_right = right
  return a_left + a_right, jnp.exp(a_right) * u_left + u_right


def _sequential(x, a, dt, B, C, state):
  """Reference: one step per time step. x (b, l, g, h, p); a, dt (b, l, g, h); B, C (b, l, g, n);
  state (b, g, h, p, n) or None (zeros). Returns y (b, l, g, h, p) and the final state
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


def _associative(x, a, dt, B, C, state):
  """Whole-sequence associative scan. Shapes as in `_sequential`."""
  u = jnp.einsum("blgh,blghp,blgn->blghpn", dt, x, B)
  if state is not None:
    u = u.at[:, 0].add(jnp.exp(a[:, 0])[..., None, None] * state)
  _, states = lax.associative_scan(_combine, (a[..., None, None], u), axis=1)
  y = jnp.einsum("blghpn,blgn->blghp", states, C)
  return y, states[:, -1]


def _window(q):
  """(q, q, q) float32 mask, window[i, j, k] = [j < k <= i]: the a_k that segment (i, j) sums."""
  k = jnp.arange(q)
  return ((k[None, None, :] <= k[:, None, None])
          & (k[None, None, :] > k[None, :, None])).astype(jnp.float32)


def _decay(a, transposed=False):
  """L = exp(segment sums) without cancellation. a (..., q) -> (..., q, q) with
  L[..., i, j] = exp(Σ_{k=j+1..i} a_k) for i >= j and 0 above the diagonal (Lᵀ if transposed,
  built directly: transposing a minor axis costs XLA:CPU more than this GEMM and exp).

  The masked repeat `_window` is summed by one contraction (a single GEMM over all heads and
  chunks; XLA:CPU lowers a cumulative sum to an O(q) reduce-window per element). Every term of a
  sum has the sign of dt·A, so no cancellation occurs; HIGHEST precision keeps accelerators from
  rounding a to bf16/tf32 inside the contraction. The mask is applied before `exp`.
  """
  q = a.shape[-1]
  k = jnp.arange(q)
  window, lower = _window(q), k[:, None] >= k[None, :]
  if transposed:
    window, lower = jnp.swapaxes(window, 0, 1), lower.T
  sums = jnp.einsum("...k,ijk->...ij", a, window, precision=lax.Precision.HIGHEST)
  return jnp.exp(jnp.where(lower, sums, -jnp.inf))


def _entering_states(state, end_states, nchunks):
  """States entering chunks `first`.. : (first, (b, nchunks - first, g, n, h, p)). Without an
  initial state chunk 0 enters with zeros and is skipped (first = 1)."""
  if state is None:
    return 1, end_states[:, :nchunks - 1]
  return 0, jnp.concatenate([state[:, None], end_states[:, :nchunks - 1]], axis=1)


def _pad_chunks(v, front, back=0):
  """Pads v (b, chunks, ...) with `front` and `back` zero chunks."""
  return jnp.pad(v, [(0, 0), (front, back)] + [(0, 0)] * (v.ndim - 2)) if front or back else v


def _minor_swap(v):
  """Swaps the last two axes. Costly on big arrays: a transpose fused into another op reads its
  source across rows, and rows of 4 KiB (h·p = 1024 floats) alias in the CPU cache ((12, 64, 1024)
  took 1.16 ms fused with a multiply, (12, 64, 1040) 0.17 ms)."""
  return jnp.swapaxes(v, -1, -2)


def _chunk_scan_forward(X, a, B, C, state, with_final):
  """The chunked SSD on chunk-major arrays. Returns (y, final state or None) and the residuals of
  `_chunk_scan_backward`.

  X (b, c, g, l, h, p) = x·dt; a (b, c, g, h, l) = dt·A; B, C (b, c, g, l, n); state
  (b, g, n, h, p) or None. Every contraction is a batched matmul in XLA's canonical form
  [batch, m, k] x [batch, k, n] (operands permuted only in major axes), so XLA:CPU never
  transposes a big operand: states are laid out (n, h·p), and each state contraction is one
  matmul per chunk over all heads, (n × l)·(l × h·p) or (l × n)·(n × h·p). The last chunk's end
  state is computed only `with_final` (one-chunk sequences then need no states at all).
  """
  nchunks = X.shape[1]
  ends = nchunks if with_final else nchunks - 1        # end states needed
  a_cumsum = jnp.cumsum(a, axis=-1)                          # (b, c, g, h, l): Σ_{k<=l} a_k
  decay = _decay(a)                                          # (b, c, g, h, l, s): L

  # Outputs from inputs of the same chunk: (C Bᵀ ∘ L) X, one matmul per head.
  scores = jnp.einsum("bcgln,bcgns->bcgls", C, _minor_swap(B))
  mixer = scores[:, :, :, None] * decay                      # (b, c, g, h, l, s)
  y = jnp.einsum("bcghls,bcghsp->bcghlp", mixer, jnp.einsum("bcgshp->bcghsp", X))
  y = jnp.einsum("bcghlp->bcglhp", y)

  # Each chunk's contribution to the state at its end: decay from step s to the chunk end.
  to_end = _minor_swap(decay[:, :ends, ..., -1, :])[..., None]  # (b, ends, g, s, h, 1)
  chunk_states = jnp.einsum("bcgns,bcgshp->bcgnhp", _minor_swap(B[:, :ends]),
                            X[:, :ends] * to_end)

  # State at each chunk end, carried across chunks by an associative scan.
  log_decay = a_cumsum[..., -1][:, :, :, None, :, None]     # (b, c, g, 1, h, 1)
  if state is not None and ends:
    chunk_states = chunk_states.at[:, 0].add(jnp.exp(log_decay[:, 0]) * state)
  end_states = chunk_states
  if ends:
    _, end_states = lax.associative_scan(_combine, (log_decay[:, :ends], chunk_states), axis=1)

  # Outputs from the state entering each chunk, decayed to each step.
  first, entering = _entering_states(state, end_states, nchunks)
  if first < nchunks:
    growth = jnp.exp(_minor_swap(a_cumsum[:, first:]))[..., None]  # (b, c, g, l, h, 1)
    y = y + _pad_chunks(jnp.einsum("bcgln,bcgnhp->bcglhp", C[:, first:], entering) * growth,
                        first)
  residuals = (X, a, B, C, state, a_cumsum, to_end, scores, entering)
  return (y, end_states[:, -1] if with_final else None), residuals


def _chunk_scan_backward(with_final, residuals, cotangents):
  """Gradients of `_chunk_scan_forward` w.r.t. (X, a, B, C, state), written out (autodiff
  transposes each matmul's operands into non-canonical order, which XLA:CPU pays for with
  transposing copies, see `_minor_swap`). Two big arrays change their minor axis: X and the
  output gradient."""
  X, a, B, C, state, a_cumsum, to_end, scores, entering = residuals
  d_y, d_final = cotangents
  nchunks = X.shape[1]
  ends = nchunks if with_final else nchunks - 1
  first = nchunks - entering.shape[1]
  log_decay = a_cumsum[..., -1][:, :, :, None, :, None]     # (b, c, g, 1, h, 1)
  growth = jnp.exp(a_cumsum)                                 # (b, c, g, h, l)
  d_y_t = jnp.einsum("bcglhp->bcghpl", d_y)                  # minor axis moved (1 of 2)

  # Through the outputs of the entering states.
  d_X, d_B, d_C = jnp.zeros_like(X), jnp.zeros_like(B), jnp.zeros_like(C)
  d_a_cumsum, d_state = jnp.zeros_like(a_cumsum), None
  if first < nchunks:
    d_y_state = d_y[:, first:] * _minor_swap(growth[:, first:])[..., None]
    d_entering = jnp.einsum("bcgnl,bcglhp->bcgnhp", _minor_swap(C[:, first:]), d_y_state)
    d_C = _pad_chunks(_minor_swap(jnp.einsum(
        "bcgnhp,bcghpl->bcgnl", entering, d_y_t[:, first:] * growth[:, first:, :, :, None])),
                      first)
    y_state = jnp.einsum("bcgln,bcgnhp->bcglhp", C[:, first:], entering)
    d_a_cumsum = _pad_chunks(_minor_swap(jnp.sum(d_y_state * y_state, axis=-1)), first)
    if state is not None:
      d_state = d_entering[:, 0]

  if ends:
    # Gradient reaching each end state, directly (it enters the next chunk or is the final
    # state) and through the next end state: G_c = direct_c + exp(log_decay_{c+1})·G_{c+1}, a
    # reverse associative scan.
    direct = ([d_entering[:, 1 - first:]] if nchunks > 1 else []) + (
        [d_final[:, None]] if with_final else [])
    direct = jnp.concatenate(direct, axis=1)
    next_decay = _pad_chunks(log_decay[:, 1:ends], 0, 1)
    _, d_end = lax.associative_scan(_combine, (next_decay, direct), axis=1, reverse=True)
    d_log_decay = _pad_chunks(jnp.sum(d_end[:, first:] * entering[:, :ends - first], axis=(3, 5)),
                              first, nchunks - ends)
    d_a_cumsum = d_a_cumsum.at[..., -1].add(d_log_decay * jnp.exp(a_cumsum[..., -1]))
    if state is not None:
      d_state = d_state + jnp.exp(log_decay[:, 0]) * d_end[:, 0]

    # Through the chunk states (d_end is their gradient).
    d_X_to_end = jnp.einsum("bcgsn,bcgnhp->bcgshp", B[:, :ends], d_end)
    X_t = jnp.einsum("bcgshp->bcghps", X[:, :ends])         # minor axis moved (2 of 2)
    to_end_t = _minor_swap(to_end[..., 0])[..., None, :]    # (b, ends, g, h, 1, s)
    d_B = _pad_chunks(_minor_swap(jnp.einsum("bcgnhp,bcghps->bcgns", d_end, X_t * to_end_t)),
                      0, nchunks - ends)
    d_X = _pad_chunks(d_X_to_end * to_end, 0, nchunks - ends)
    d_to_end = _pad_chunks(_minor_swap(jnp.sum(d_X_to_end * X[:, :ends], axis=-1)),
                           0, nchunks - ends)               # (b, c, g, h, s)

  # Through the outputs from the same chunk, with Lᵀ built directly.
  decay_t = _decay(a, transposed=True)                       # (b, c, g, h, s, l)
  scores_t = _minor_swap(scores)
  d_mixer_t = jnp.einsum("bcghsp,bcghpl->bcghsl", jnp.einsum("bcgshp->bcghsp", X), d_y_t)
  d_X = d_X + jnp.einsum("bcghsp->bcgshp", jnp.einsum(
      "bcghsl,bcghlp->bcghsp", scores_t[:, :, :, None] * decay_t,
      jnp.einsum("bcglhp->bcghlp", d_y)))
  d_scores_t = jnp.sum(d_mixer_t * decay_t, axis=3)          # (b, c, g, s, l)
  d_decay_t = d_mixer_t * scores_t[:, :, :, None]
  if ends:
    d_decay_t = d_decay_t.at[..., -1].add(d_to_end)
  d_C = d_C + jnp.einsum("bcgls,bcgsn->bcgln", _minor_swap(d_scores_t), B)
  d_B = d_B + jnp.einsum("bcgsl,bcgln->bcgsn", d_scores_t, C)

  # Into a: through the segment sums (L = exp(segment sums)) and the cumulative sum.
  d_a = jnp.einsum("...ji,ijk->...k", d_decay_t * decay_t, _window(decay_t.shape[-1]),
                   precision=lax.Precision.HIGHEST)
  d_a = d_a + lax.cumsum(d_a_cumsum, axis=d_a_cumsum.ndim - 1, reverse=True)
  return d_X, d_a, d_B, d_C, d_state


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunk_scan(X, a, B, C, state, with_final):
  """`_chunk_scan_forward` without residuals, with the hand-written backward."""
  return _chunk_scan_forward(X, a, B, C, state, with_final)[0]


_chunk_scan.defvjp(_chunk_scan_forward, _chunk_scan_backward)


def _chunk_length(seqlen, chunk_size):
  """Steps per chunk: as few chunks as chunk_size allows, each as short as they can be (rounded up
  to a multiple of 8), so padding stays small: 101 steps -> 2 chunks of 56, not 64 (1.2x faster
  fwd+bwd for the 62 x 101 time path of 1-s audio)."""
  nchunks = -(-seqlen // chunk_size)
  return min(chunk_size, seqlen, 8 * -(-seqlen // (8 * nchunks)))


def _chunked(x, a, dt, B, C, state, chunk_size, with_final):
  """Chunked SSD. Shapes as in `_sequential`, the final state None unless `with_final`; seqlen is
  padded to a multiple of the chunk length (`_chunk_length`)."""
  batch, seqlen, ngroups, heads, headdim = x.shape
  d_state = B.shape[-1]
  q = _chunk_length(seqlen, chunk_size)
  pad = -seqlen % q
  if pad:  # dt = x = 0 (so a = 0): the padded steps leave the state unchanged
    pad_time = lambda v: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
    x, a, dt, B, C = map(pad_time, (x, a, dt, B, C))
  nchunks = x.shape[1] // q
  chunk_major = lambda v, spec: jnp.einsum(spec, v.reshape((batch, nchunks, q) + v.shape[2:]))
  X = chunk_major(x * dt[..., None], "bclghp->bcglhp")  # a bitcast for one group
  a = chunk_major(a, "bclgh->bcghl")
  B, C = chunk_major(B, "bclgn->bcgln"), chunk_major(C, "bclgn->bcgln")
  if state is not None:
    state = jnp.einsum("bghpn->bgnhp", state)
  y, final = _chunk_scan(X, a, B, C, state, with_final)
  y = jnp.einsum("bcglhp->bclghp", y).reshape(batch, nchunks * q, ngroups, heads, headdim)
  return y[:, :seqlen], None if final is None else jnp.einsum("bgnhp->bghpn", final)


def _sequences_per_block(batch, seqlen, chunk_size, state_size, platform):
  """How many sequences the chunked method processes at a time (state_size = nheads·headdim·
  d_state) on `platform` (a JAX backend name: "cpu", "gpu", ...).

  Sequences longer than a chunk carry float32 (chunks, heads, headdim, d_state) states between
  chunks, 6.8 MB per sequence at the paper's 801 steps. Once a batch holds more than
  UNBLOCKED_STATE_BYTES of them, every pass over them, forward and backward, is a trip to main
  memory, so the batch goes through `lax.map` in blocks of about BLOCK_STATE_BYTES, each block
  recomputed in the backward pass (`_blockwise`). On the 2-core VM the paper's time path
  (62 × 801) fwd+bwd ran 1.3x faster one sequence at a time (4.36 -> 3.37 s) and 1.35x faster
  again with the recomputation (3.92 -> 2.89 s), while at 2 and 8 sequences the loop gained
  nothing (0.087 -> 0.098 s, 0.35 -> 0.36 s).

  Only a CPU has such a cache to fit: an accelerator takes the whole batch at once. On an H200
  the blocks made the paper's time path 62 loop iterations of small kernels, most of a training
  step's 69,000 kernel launches (benchmarks/results/2026-11-26-h200-3.md).
  """
  if platform != "cpu":
    return batch
  per_sequence = -(-seqlen // chunk_size) * state_size * 4
  if seqlen <= chunk_size or batch * per_sequence <= UNBLOCKED_STATE_BYTES:
    return batch
  return max(1, BLOCK_STATE_BYTES // per_sequence)


def _blockwise(fn, block, *arrays):
  """fn(*arrays) computed `block` sequences at a time by `lax.map` (arrays may hold None).

  Every array has the batch as leading axis and so has every output of fn. The batch is padded
  with zero sequences to a multiple of `block` (dt = 0: they stay zero and finite). Under
  autodiff each block's forward is recomputed (`jax.checkpoint`) right before its backward, so
  its intermediates stay in cache instead of being stacked for the whole batch.
  """
  batch = arrays[0].shape[0]
  if block >= batch:
    return fn(*arrays)
  nblocks = -(-batch // block)
  pad = nblocks * block - batch
  present = [i for i, v in enumerate(arrays) if v is not None]

  def split(v):
    v = jnp.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1))
    return v.reshape((nblocks, block) + v.shape[1:])

  def one_block(blocks):
    args = list(arrays)
    for i, v in zip(present, blocks):
      args[i] = v
    return fn(*args)

  outputs = lax.map(jax.checkpoint(one_block), [split(arrays[i]) for i in present])
  return jax.tree.map(lambda v: v.reshape((nblocks * block,) + v.shape[2:])[:batch], outputs)


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
    y, final = with_skip(_sequential)(xg, a, dtg, Bf, Cf, state)
  elif method == "associative":
    y, final = with_skip(_associative)(xg, a, dtg, Bf, Cf, state)
  else:
    chunked = functools.partial(_chunked, chunk_size=chunk_size, with_final=with_final)
    block = _sequences_per_block(batch, seqlen, chunk_size, nheads * headdim * d_state,
                                 jax.default_backend())
    y, final = _blockwise(with_skip(chunked), block, xg, a, dtg, Bf, Cf, state)

  y = y.reshape(batch, seqlen, nheads, headdim)
  final = final.reshape(batch, nheads, headdim, d_state) if with_final else None
  return y.astype(x.dtype), final
