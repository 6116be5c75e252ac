"""The Mamba2 SSD scan in PyTorch, as peers for the JAX `ssd_scan` (benchmark extra: torch).

Same arguments and layout as `bsmamba2_jax.ssd.ssd_scan` (torch tensors):
x (b, l, h, p), dt (b, l, h) already softplus'ed, A (h,), B and C (b, l, g, n), D (h,) or None.

- `ssd_loop`: a Python loop over time steps, one state update per step, the way the seed port
  computed it (and why its training step took over a minute).
- `ssd_chunked`: the chunked SSD written with `torch.einsum` (intra-chunk masked matmul, chunk-end
  states, a recurrence across chunks, state-to-output term), with the same numerics rules as the
  JAX version: dt·A, cumulative sums and exponentials in float32, segment sums as cumulative sums
  of a masked repeat (no cs[i] - cs[j]), the -inf mask applied before `exp`.

torch is imported inside the functions: the package works without it.
Axis letters: b batch, l / s time in a chunk, c / z chunk, g group, h head in group, p headdim,
n d_state.
"""
from __future__ import annotations


def ssd_loop(x, dt, A, B, C, D=None):
  """Per-step recurrence S_t = exp(dt_t A)·S_{t-1} + dt_t x_t B_tᵀ, y_t = S_t C_t + D x_t.

  Returns y (b, l, h, p) float32.
  """
  import torch

  batch, seqlen, nheads, headdim = x.shape
  ngroups, d_state = B.shape[2:]
  heads = nheads // ngroups
  x = x.float().reshape(batch, seqlen, ngroups, heads, headdim)
  dt = dt.float().reshape(batch, seqlen, ngroups, heads)
  decay = torch.exp(dt * A.float().reshape(ngroups, heads))
  state = x.new_zeros(batch, ngroups, heads, headdim, d_state)
  outputs = []
  for t in range(seqlen):
    update = torch.einsum("bgh,bghp,bgn->bghpn", dt[:, t], x[:, t], B[:, t].float())
    state = decay[:, t, :, :, None, None] * state + update
    outputs.append(torch.einsum("bghpn,bgn->bghp", state, C[:, t].float()))
  y = torch.stack(outputs, dim=1).reshape(batch, seqlen, nheads, headdim)
  if D is not None:
    y = y + D.float()[:, None] * x.reshape(batch, seqlen, nheads, headdim)
  return y


def _segment_sums(a):
  """a (..., q) -> (..., q, q): out[..., i, j] = Σ_{k=j+1..i} a_k for i >= j, -inf above."""
  import torch

  q = a.shape[-1]
  keep = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=-1)
  repeated = a[..., None, :].expand(*a.shape[:-1], q, q).transpose(-1, -2)  # [.., k, j] = a_k
  sums = torch.cumsum(repeated.masked_fill(~keep, 0.0), dim=-2)              # Σ_{j<k<=i} a_k
  lower = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device))
  return sums.masked_fill(~lower, float("-inf"))


def ssd_chunked(x, dt, A, B, C, D=None, chunk_size=64):
  """Chunked SSD (Mamba2 paper, "minimal" form). Returns y (b, l, h, p) float32."""
  import torch
  import torch.nn.functional as F

  batch, seqlen, nheads, headdim = x.shape
  ngroups, d_state = B.shape[2:]
  heads = nheads // ngroups
  q = min(chunk_size, seqlen)
  pad = -seqlen % q
  x32 = x.float()
  xdt = (x32 * dt.float()[..., None]).reshape(batch, seqlen, ngroups, heads, headdim)
  a = (dt.float() * A.float()).reshape(batch, seqlen, ngroups, heads)
  B, C = B.float(), C.float()
  if pad:  # dt = x = 0 at the padded steps: they leave the state unchanged
    xdt = F.pad(xdt, (0, 0, 0, 0, 0, 0, 0, pad))
    a = F.pad(a, (0, 0, 0, 0, 0, pad))
    B = F.pad(B, (0, 0, 0, 0, 0, pad))
    C = F.pad(C, (0, 0, 0, 0, 0, pad))
  nchunks = (seqlen + pad) // q
  xdt = xdt.reshape(batch, nchunks, q, ngroups, heads, headdim)
  a = a.reshape(batch, nchunks, q, ngroups, heads).permute(0, 1, 3, 4, 2)  # (b, c, g, h, l)
  B = B.reshape(batch, nchunks, q, ngroups, d_state)
  C = C.reshape(batch, nchunks, q, ngroups, d_state)
  a_cumsum = torch.cumsum(a, dim=-1)
  decay = torch.exp(_segment_sums(a))                                        # (b, c, g, h, l, s)

  scores = torch.einsum("bclgn,bcsgn->bcgls", C, B)
  y = torch.einsum("bcgls,bcghls,bcsghp->bclghp", scores, decay, xdt)

  chunk_states = torch.einsum("bcghs,bcsghp,bcsgn->bcghpn", decay[..., -1, :], xdt, B)
  # Across chunks: state entering chunk z = Σ_{c<z} exp(Σ_{c<k<z} chunk_decay_k)·chunk_states_c.
  chunk_decay = F.pad(a_cumsum[..., -1].permute(0, 2, 3, 1), (1, 0))        # (b, g, h, 1+c)
  carry = torch.exp(_segment_sums(chunk_decay))                             # (b, g, h, z, c)
  states = torch.cat([torch.zeros_like(chunk_states[:, :1]), chunk_states], dim=1)
  prev_states = torch.einsum("bghzc,bcghpn->bzghpn", carry, states)[:, :-1]

  y = y + torch.einsum("bclgn,bcghpn,bcghl->bclghp", C, prev_states, torch.exp(a_cumsum))
  y = y.reshape(batch, nchunks * q, nheads, headdim)[:, :seqlen]
  if D is not None:
    y = y + D.float()[:, None] * x32
  return y
