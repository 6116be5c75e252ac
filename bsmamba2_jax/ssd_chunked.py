"""The chunked SSD (the Mamba2 paper's matmul form): exact, fast, with a hand-written backward.

Within a chunk of Q steps the output is a masked matmul (C Bᵀ ∘ L) X with
L[i, j] = exp(Σ_{k=j+1..i} a_k); each chunk's end state is carried to the next chunk by an
associative scan over chunks; the state entering a chunk then reaches its outputs
(docs/model.md §5; cf. mamba_ssm's `ssd_minimal`). Equal to `ssd_reference.sequential` up to
rounding, which the tests check, gradients included.

The backward pass is written out (`jax.custom_vjp`, so reverse mode only) with every contraction
in XLA's canonical batched-matmul form [batch, m, k] x [batch, k, n]: autodiff's transposed
operands made XLA:CPU transpose big arrays inside fused ops, which is slow where rows are
h·p = 1024 floats (they alias in the cache). Keep the last axis of big arrays in place when
editing this file. On CPU, large batches of long sequences go through `lax.map` a few sequences
at a time (`sequences_per_block`), so their chunk states stay in cache; accelerators take the
whole batch.

Numerics: a, cumulative sums, exponentials and states are float32; segment sums are built without
cancellation (a contraction of a masked repeat, never cs[i] - cs[j]), the -inf mask is applied
before `exp` (so gradients stay finite), and exp(a_i - a_j) is never factored as
exp(a_i)·exp(-a_j). The end of a sequence is padded with dt = 0 and x = 0, which leaves every
state unchanged, so padding never leaks into real positions.

Axis letters in the einsums: b batch, l / s time (position in a chunk), c chunk, g group,
h head within its group, p headdim, n d_state.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from bsmamba2_jax.ssd_reference import combine

# On CPU, once a batch's chunk states exceed UNBLOCKED_STATE_BYTES, "chunked" maps over blocks
# of sequences holding about BLOCK_STATE_BYTES each (see sequences_per_block).
UNBLOCKED_STATE_BYTES = 64 * 2**20
BLOCK_STATE_BYTES = 8 * 2**20


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
  source across rows, and rows of 4 KiB (h·p = 1024 floats) alias in the CPU cache, which makes
  such a fused transpose several times slower than a copy."""
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
    _, end_states = lax.associative_scan(combine, (log_decay[:, :ends], chunk_states), axis=1)

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
    _, d_end = lax.associative_scan(combine, (next_decay, direct), axis=1, reverse=True)
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
  to a multiple of 8), so padding stays small: 101 steps -> 2 chunks of 56, not 64 + 37."""
  nchunks = -(-seqlen // chunk_size)
  return min(chunk_size, seqlen, 8 * -(-seqlen // (8 * nchunks)))


def chunked(x, a, dt, B, C, state, chunk_size, with_final):
  """The chunked SSD on the grouped arrays of `ssd_reference` (x (b, l, g, h, p); a, dt
  (b, l, g, h); B, C (b, l, g, n); state (b, g, h, p, n) or None); returns y and the final
  state, None unless `with_final`. seqlen is padded to a multiple of the chunk length."""
  batch, seqlen, ngroups, heads, headdim = x.shape
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


def sequences_per_block(batch, seqlen, chunk_size, state_size, platform):
  """How many sequences the chunked method processes at a time (state_size = nheads·headdim·
  d_state) on `platform` (a JAX backend name: "cpu", "gpu", ...).

  Sequences longer than a chunk carry float32 (chunks, heads, headdim, d_state) states between
  chunks, 6.8 MB per sequence at the paper's 801 steps. Once a batch holds more than
  UNBLOCKED_STATE_BYTES of them, every pass over them, forward and backward, is a trip to main
  memory, so the batch goes through `lax.map` in blocks of about BLOCK_STATE_BYTES, each block
  recomputed in the backward pass (`blockwise`), which keeps a block's intermediates in cache.
  Small batches gain nothing from the loop and are taken whole.

  Only a CPU has such a cache to fit: on an accelerator the blocks would be many loop iterations
  of small kernels, so it takes the whole batch at once (docs/performance.md has both effects).
  """
  if platform != "cpu":
    return batch
  per_sequence = -(-seqlen // chunk_size) * state_size * 4
  if seqlen <= chunk_size or batch * per_sequence <= UNBLOCKED_STATE_BYTES:
    return batch
  return max(1, BLOCK_STATE_BYTES // per_sequence)


def split_batch(v: jax.Array, block: int) -> jax.Array:
  """(batch, ...) -> (ceil(batch / block), block, ...), zero sequences padding the last block."""
  nblocks = -(-v.shape[0] // block)
  v = jnp.pad(v, [(0, nblocks * block - v.shape[0])] + [(0, 0)] * (v.ndim - 1))
  return v.reshape((nblocks, block) + v.shape[1:])


def merge_batch(v: jax.Array, batch: int) -> jax.Array:
  """The inverse of `split_batch`: (nblocks, block, ...) -> (batch, ...), padding dropped."""
  return v.reshape((v.shape[0] * v.shape[1],) + v.shape[2:])[:batch]


def blockwise(fn, block, *arrays):
  """fn(*arrays) computed `block` sequences at a time by `lax.map` (arrays may hold None).

  Every array has the batch as leading axis and so has every output of fn. The batch is padded
  with zero sequences to a multiple of `block` (dt = 0: they stay zero and finite). Under
  autodiff each block's forward is recomputed (`jax.checkpoint`) right before its backward, so
  its intermediates stay in cache instead of being stacked for the whole batch.
  """
  batch = arrays[0].shape[0]
  if block >= batch:
    return fn(*arrays)
  present = [i for i, v in enumerate(arrays) if v is not None]

  def one_block(blocks):
    args = list(arrays)
    for i, v in zip(present, blocks):
      args[i] = v
    return fn(*args)

  outputs = lax.map(jax.checkpoint(one_block), [split_batch(arrays[i], block) for i in present])
  return jax.tree.map(lambda v: merge_batch(v, batch), outputs)
