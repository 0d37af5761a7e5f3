"""The chunked `linear_scan` in pure JAX (the CPU fast path and the fallback of the Pallas kernels).

Split the sequence into chunks of C tokens. Inside a chunk with start state S_0 (`[K, V]` per batch and head),
write G_t = sum_{m<=t} g_m (the cumulative log decay inside the chunk), gamma_t = exp(G_t) and
D[t, i] = exp(G_t - G_i) for i <= t (0 above the diagonal). Differences of cumulative sums inside one chunk
are sums of g over (i, t], so for g <= 0 every exponent is <= 0: strong decay underflows to 0, never overflows.

Hebbian write (beta=None): S_t = gamma_t S_0 + sum_{i<=t} D[t, i] k_i v_i^T.

Delta rule: S_t = exp(g_t) S_{t-1} + k_t u_t^T with u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t), i.e. a
Hebbian write of the "new values" u. Substituting S_{t-1} gives (I + A) U = diag(beta) V - diag(beta gamma) K S_0
with A[t, i] = beta_t D[t, i] (k_t . k_i) for i < t: strictly lower triangular, so I + A is unit lower
triangular and one triangular solve per chunk gives the WY/UT form (as in flash-linear-attention)

    w = (I + A)^{-1} diag(beta gamma) K,   u = (I + A)^{-1} diag(beta) V,   U = u - w S_0.

Everything then is affine in the chunk's start state:

    o     = Qeff S_0 + Ointra,   Qeff = scale (diag(gamma) Q - (QK^T * D) w),   Ointra = scale (QK^T * D) u
    S_C   = P S_0 + B,           P = gamma_C I - Kdec^T w,                     B = Kdec^T u

with Kdec = diag(exp(G_C - G)) K (for beta=None: w = 0, u = V, so P is the scalar gamma_C). `prep` computes
(Qeff, Ointra, P, B) for all chunks at once (parallel, no state); the only sequential work is the state pass
S_{n+1} = P_n S_n + B_n. The custom VJP keeps the inputs, the chunk-start states S_n and the per-chunk Qeff_n
and P_n (the size of q and of the chunk states); its backward runs the reverse pass
lambda_n = Qeff_n^T dO_n + P_n^T lambda_{n+1} (lambda = dLoss/dS_n), then recomputes `prep` under `jax.vjp`
group by group and pulls (dQeff, dOintra, dP, dB) = (dO_n S_n^T, dO_n, lambda_{n+1} S_n^T, lambda_{n+1}) back
through it. No state per token and no C x C matrix of the whole sequence is ever stored.

A sequence length that is not a multiple of C is padded with k = q = v = 0, g = 0, beta = 0: those tokens
leave the state unchanged (exp(0) = 1, zero write), so padding is exact.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

_F32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST


def to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
  """`[b, t, h, ...]` -> float32 `[b, h, n, C, ...]`, zero-padded to n * C tokens."""
  b, t, h = x.shape[:3]
  n = -(-t // chunk_size)
  pad = n * chunk_size - t
  x = x.astype(_F32)
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape((b, n, chunk_size, h) + x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def from_chunks(x: jax.Array, t: int) -> jax.Array:
  """float32 `[b, h, n, C, d]` -> `[b, t, h, d]` (drops the padding)."""
  b, h, n, c, d = x.shape
  return jnp.moveaxis(x, 1, 3).reshape(b, n * c, h, d)[:, :t]


def unit_lower_inverse(a: jax.Array) -> jax.Array:
  """(I + A)^{-1} for strictly lower triangular A `[..., n, n]`, by matmuls only.

  XLA's batched triangular_solve on CPU runs row by row and was ~10x slower than the rest of the chunk.
  Blocks: [[L11, 0], [L21, L22]]^{-1} = [[T11, 0], [-T22 L21 T11, T22]], with both diagonal halves inverted
  in one batched call; small blocks (n <= 16) use the exact product for nilpotent N = -A:
  (I + A)^{-1} = (I - N)^{-1} = (I + N)(I + N^2)(I + N^4)...(I + N^{2^m}) = sum_{j < 2^{m+1}} N^j with N^n = 0.
  """
  n = a.shape[-1]
  eye = jnp.eye(n, dtype=a.dtype)
  if n <= 16:
    nil = -a
    t = eye + nil
    p = 2
    while p < n:
      nil = jnp.matmul(nil, nil, precision=_HI)
      t = t + jnp.matmul(t, nil, precision=_HI)
      p *= 2
    return t
  h = n // 2
  if n % 2 == 0:
    diag = unit_lower_inverse(jnp.stack([a[..., :h, :h], a[..., h:, h:]]))
    t11, t22 = diag[0], diag[1]
  else:
    t11, t22 = unit_lower_inverse(a[..., :h, :h]), unit_lower_inverse(a[..., h:, h:])
  t21 = -jnp.matmul(jnp.matmul(t22, a[..., h:, :h], precision=_HI), t11, precision=_HI)
  top = jnp.concatenate([t11, jnp.zeros(t11.shape[:-1] + (n - h,), a.dtype)], axis=-1)
  bottom = jnp.concatenate([t21, t22], axis=-1)
  return jnp.concatenate([top, bottom], axis=-2)


def prep(q, k, v, g, beta, scale: float, delta: bool):
  """Per-chunk quantities of the affine chunk map (parallel over all chunks; no state involved).

  Args:
    q, k: float32 `[b, h, n, C, K]`; v: `[b, h, n, C, V]`; g, beta: `[b, h, n, C]` (beta ignored if not delta).

  Returns:
    (Qeff `[b, h, n, C, K]`, Ointra `[b, h, n, C, V]`, P, B `[b, h, n, K, V]`) with P `[b, h, n, K, K]` for
    the delta rule and the scalar gamma_C `[b, h, n]` otherwise; o = Qeff S + Ointra, S' = P S + B.
  """
  c = q.shape[-2]
  cum = jnp.cumsum(g, axis=-1)  # G_t, inside the chunk only
  gamma = jnp.exp(cum)
  gamma_c = gamma[..., -1]
  diff = cum[..., :, None] - cum[..., None, :]  # G_t - G_i
  row = jnp.arange(c)[:, None]
  col = jnp.arange(c)[None, :]
  # Mask before exp: above the diagonal G_t - G_i is a large positive for strong decay, and exp of it would
  # be inf (and 0 * inf = nan in the gradient).
  decay = jnp.exp(jnp.where(row >= col, diff, -jnp.inf))
  kdec = k * jnp.exp(cum[..., -1:] - cum)[..., None]
  qk = jnp.einsum("...tk,...ik->...ti", q, k, precision=_HI) * decay
  if delta:
    kk = jnp.einsum("...tk,...ik->...ti", k, k, precision=_HI)
    a = beta[..., :, None] * jnp.exp(jnp.where(row > col, diff, -jnp.inf)) * kk
    rhs = jnp.concatenate([(beta * gamma)[..., None] * k, beta[..., None] * v], axis=-1)
    wu = jnp.matmul(unit_lower_inverse(a), rhs, precision=_HI)
    w, u = wu[..., : k.shape[-1]], wu[..., k.shape[-1]:]
    qeff = scale * (gamma[..., None] * q - jnp.einsum("...ti,...ik->...tk", qk, w, precision=_HI))
    ointra = scale * jnp.einsum("...ti,...iv->...tv", qk, u, precision=_HI)
    eye = jnp.eye(k.shape[-1], dtype=_F32)
    p = gamma_c[..., None, None] * eye - jnp.einsum("...ck,...cj->...kj", kdec, w, precision=_HI)
    bmat = jnp.einsum("...ck,...cv->...kv", kdec, u, precision=_HI)
  else:
    qeff = scale * gamma[..., None] * q
    ointra = scale * jnp.einsum("...ti,...iv->...tv", qk, v, precision=_HI)
    p = gamma_c
    bmat = jnp.einsum("...ck,...cv->...kv", kdec, v, precision=_HI)
  return qeff, ointra, p, bmat


def apply_p(p: jax.Array, s: jax.Array) -> jax.Array:
  """P S for P a matrix `[..., K, K]` or a scalar `[...]`; s `[..., K, V]`."""
  if p.ndim == s.ndim:
    return jnp.einsum("...kj,...jv->...kv", p, s, precision=_HI)
  return p[..., None, None] * s


def apply_pt(p: jax.Array, s: jax.Array) -> jax.Array:
  """P^T S."""
  if p.ndim == s.ndim:
    return jnp.einsum("...jk,...jv->...kv", p, s, precision=_HI)
  return p[..., None, None] * s


def _chunk(x: jax.Array, i) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(x, i, axis=2, keepdims=False)


def xla_forward_pass(qeff, ointra, p, bmat, s0):
  """State pass. Returns (o `[b,h,n,C,V]`, chunk-start states `[b,h,n,K,V]`, final state `[b,h,K,V]`).

  A fori_loop indexes the chunk axis in place (a scan over moveaxis'd inputs would copy every input), and
  o = Qeff S + Ointra is formed group by group so each matmul's operands stay in cache: on this CPU a single
  batched matmul over a 16k-token sequence ran ~3x slower per FLOP than over 4k.
  """
  n = bmat.shape[2]

  def body(i, carry):
    s, starts = carry
    starts = jax.lax.dynamic_update_slice_in_dim(starts, s[:, :, None], i, axis=2)
    return apply_p(_chunk(p, i), s) + _chunk(bmat, i), starts

  final, starts = jax.lax.fori_loop(0, n, body, (s0, jnp.zeros(bmat.shape, _F32)))

  def out(_, chunks):
    qeff_g, starts_g, ointra_g = chunks
    return (jnp.einsum("...ck,...kv->...cv", qeff_g, starts_g, precision=_HI) + ointra_g,)

  (o,) = map_groups(out, (), (qeff, starts, ointra), (2,), qeff.shape[3])
  return o, starts, final


def xla_backward_pass(qeff, do, p, d_final):
  """Reverse pass lambda_n = Qeff_n^T dO_n + P_n^T lambda_{n+1}, lambda_N = d_final.

  Returns (lambda_{n+1} for every chunk n `[b,h,n,K,V]`, lambda_0 = dLoss/dS_0 `[b,h,K,V]`).
  """
  n = p.shape[2]

  def body(j, carry):
    lam, lam_next = carry
    i = n - 1 - j
    lam_next = jax.lax.dynamic_update_slice_in_dim(lam_next, lam[:, :, None], i, axis=2)
    # Qeff_n^T dO_n inside the loop: no second [n, K, V] array next to lambda.
    local = jnp.einsum("...ck,...cv->...kv", _chunk(qeff, i), _chunk(do, i), precision=_HI)
    return local + apply_pt(_chunk(p, i), lam), lam_next

  d_s0, lam_next = jax.lax.fori_loop(0, n, body, (d_final, jnp.zeros(d_final.shape[:2] + (n,) + d_final.shape[2:],
                                                                   _F32)))
  return lam_next, d_s0


# Tokens per lax.map step of the parallel per-chunk work: bounds the live C x C temporaries (and their
# autodiff residuals) to one group, so memory is O(seq * (K + V) + n_chunks * K * V) rather than
# O(seq * C * #intermediates), while each step still batches enough chunks to keep matmuls efficient.
GROUP_TOKENS = 512


def scan_groups(fn: Callable, carry, token_arrays, chunk_arrays, out_axes, chunk_size: int, reverse: bool = False):
  """fn over groups of whole chunks, in sequence order (or reversed), threading a carry.

  token_arrays: tuple of `[b, t, ...]` (t = n * C, the token axis 1); chunk_arrays: tuple of `[b, h, n, ...]`
  (the chunk axis 2). fn(carry, token_group, chunk_group) returns (carry, outputs), the i-th output with its group
  axis at out_axes[i] (1: tokens, 2: chunks). Returns (final carry, outputs over the whole sequence). A `lax.scan`
  over group indices slices the inputs where they lie (a scan over reshaped inputs would first copy every
  input) and stacks the outputs; a last, shorter group gets its own call (first, when reversed).
  """
  n = chunk_arrays[0].shape[2] if chunk_arrays else token_arrays[0].shape[1] // chunk_size
  gs = max(1, min(n, GROUP_TOKENS // chunk_size))
  ng, rem = divmod(n, gs)

  def inputs(first, size):
    return (tuple(jax.lax.dynamic_slice_in_dim(x, first * chunk_size, size * chunk_size, 1) for x in token_arrays),
            tuple(jax.lax.dynamic_slice_in_dim(x, first, size, 2) for x in chunk_arrays))

  if ng == 1 and rem == 0:
    return fn(carry, *inputs(0, gs))

  def merge(y, ax):
    # [ng, ..., gs * size, ...] -> [..., ng * gs * size, ...]
    y = jnp.moveaxis(y, 0, ax)
    return y.reshape(y.shape[:ax] + (y.shape[ax] * y.shape[ax + 1],) + y.shape[ax + 2:])

  tail = None
  if rem and reverse:
    carry, tail = fn(carry, *inputs(ng * gs, rem))
  # Stacked scan outputs rather than a fori_loop carrying the outputs with dynamic_update_slice: with the
  # latter, fwd+bwd at 16k tokens took 6-7x the time at 4k on this CPU (measured; presumably copies of the
  # carried outputs).
  carry, ys = jax.lax.scan(lambda c, i: fn(c, *inputs(i * gs, gs)), carry, jnp.arange(ng), reverse=reverse)
  outs = tuple(merge(y, ax) for y, ax in zip(ys, out_axes))
  if rem and not reverse:
    carry, tail = fn(carry, *inputs(ng * gs, rem))
  if tail is not None:
    outs = tuple(jnp.concatenate([o, y], axis=ax) for o, y, ax in zip(outs, tail, out_axes))
  return carry, outs


def map_groups(fn: Callable, token_arrays, chunk_arrays, out_axes, chunk_size: int):
  """`scan_groups` without a carry: fn(token_group, chunk_group) -> outputs."""
  return scan_groups(lambda c, t, ch: (c, fn(t, ch)), None, token_arrays, chunk_arrays, out_axes, chunk_size)[1]


def _prep_group(tokens, _, chunk_size, scale, delta):
  q, k, v, g, beta = (to_chunks(x, chunk_size) for x in tokens)
  return prep(q, k, v, g, beta, scale, delta)


def xla_chunk_forward(q, k, v, g, beta, s0, chunk_size: int, scale: float, delta: bool, residuals: bool):
  """The forward of the chunked scan in XLA, group of chunks by group of chunks: `prep`, the state pass and the
  outputs of one group before the next (its C x C temporaries and chunk maps stay in cache; the state is
  carried from group to group).

  Inputs as `chunked_scan`. Returns (o `[b, t, h, V]` float32, final state, chunk-start states `[b, h, n, K, V]`
  when `residuals` (else None), None, None): the XLA backward recomputes Qeff and P per group, so only the
  states are kept.
  """

  def group(s, tokens, _):
    qeff, ointra, p, bmat = _prep_group(tokens, None, chunk_size, scale, delta)
    o, starts, s = xla_forward_pass(qeff, ointra, p, bmat, s)
    return s, (from_chunks(o, o.shape[2] * chunk_size), starts)

  final, (o, starts) = scan_groups(group, s0, (q, k, v, g, beta), (), (1, 2), chunk_size)
  return o, final, (starts if residuals else None), None, None


def xla_chunk_backward(q, k, v, g, beta, starts, qeff, p, do, d_final, chunk_size: int, scale: float, delta: bool):
  """The backward of the chunked scan in XLA, group by group from the end: recompute the group's `prep` under
  `jax.vjp`, run the reverse state pass lambda_n = Qeff_n^T dO_n + P_n^T lambda_{n+1} over its chunks (lambda =
  dLoss/dS_n, carried from group to group), and pull (dQeff, dOintra, dP, dB) = (dO_n S_n^T, dO_n,
  lambda_{n+1} S_n^T, lambda_{n+1}) back through prep. qeff and p are unused (None from `xla_chunk_forward`).

  Returns (dq, dk, dv, dg, dbeta in the inputs' dtypes, dS_0).
  """
  del qeff, p

  def group(lam, tokens, chunks):
    xs, do_g = tokens[:5], to_chunks(tokens[5], chunk_size)
    (starts_g,) = chunks
    (qeff_g, _, p_g, _), prep_vjp = jax.vjp(lambda *x: _prep_group(x, None, chunk_size, scale, delta), *xs)
    lam_next, lam = xla_backward_pass(qeff_g, do_g, p_g, lam)
    return lam, prep_vjp(_prep_cotangents(do_g, starts_g, lam_next, delta))

  d_s0, grads = scan_groups(group, d_final, (q, k, v, g, beta, do), (starts,), (1,) * 5, chunk_size, reverse=True)
  return (*(d.astype(x.dtype) for d, x in zip(grads, (q, k, v, g, beta))), d_s0)


def _prep_cotangents(do, starts, lam_next, delta: bool):
  """Cotangents of prep's outputs (Qeff, Ointra, P, B) from o = Qeff S + Ointra and S' = P S + B."""
  d_qeff = jnp.einsum("...cv,...kv->...ck", do, starts, precision=_HI)
  if delta:
    d_p = jnp.einsum("...kv,...jv->...kj", lam_next, starts, precision=_HI)
  else:
    d_p = jnp.sum(lam_next * starts, axis=(-2, -1))
  return d_qeff, do, d_p, lam_next


def state_pass_backward(q, k, v, g, beta, starts, qeff, p, do, d_final, chunk_size: int, scale: float,
                        delta: bool, *, reverse_pass: Callable):
  """The backward when the forward kept Qeff and P (the Pallas kernels): one reverse state pass over the whole
  sequence by `reverse_pass` (a kernel), then prep's VJP group by group. Returns as `xla_chunk_backward`."""
  lam_next, d_s0 = reverse_pass(qeff, to_chunks(do, chunk_size), p, d_final)

  def group_vjp(tokens, chunks):
    xs, do_g = tokens[:5], to_chunks(tokens[5], chunk_size)
    starts_g, lam_next_g = chunks
    _, prep_vjp = jax.vjp(lambda *x: _prep_group(x, None, chunk_size, scale, delta), *xs)
    return prep_vjp(_prep_cotangents(do_g, starts_g, lam_next_g, delta))

  grads = map_groups(group_vjp, (q, k, v, g, beta, do), (starts, lam_next), (1,) * 5, chunk_size)
  return (*(d.astype(x.dtype) for d, x in zip(grads, (q, k, v, g, beta))), d_s0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def chunked_scan(q, k, v, g, beta, s0, chunk_size: int, scale: float, delta: bool, chunk_forward: Callable,
                 chunk_backward: Callable):
  """The chunked scan; q, k `[b, t, h, K]`, v `[b, t, h, V]`, g, beta `[b, t, h]` with t a multiple of
  chunk_size (any dtype; math in float32), s0 `[b, h, K, V]` float32.

  Returns (o `[b, t, h, V]` float32, final state `[b, h, K, V]`). chunk_forward runs the forward (the contract of
  `xla_chunk_forward`; a fused Pallas kernel in linear_scan_pallas) and chunk_backward the backward (the
  contract of `xla_chunk_backward`). The residuals are the inputs, one state per chunk (never one per token)
  and whatever Qeff / P the forward chose to keep; all C x C quantities are recomputed.
  """
  return chunk_forward(q, k, v, g, beta, s0, chunk_size, scale, delta, False)[:2]


def _chunked_scan_fwd(q, k, v, g, beta, s0, chunk_size, scale, delta, chunk_forward, chunk_backward):
  o, final, starts, qeff, p = chunk_forward(q, k, v, g, beta, s0, chunk_size, scale, delta, True)
  return (o, final), (q, k, v, g, beta, starts, qeff, p)


def _chunked_scan_bwd(chunk_size, scale, delta, chunk_forward, chunk_backward, res, cts):
  del chunk_forward
  return chunk_backward(*res, *cts, chunk_size, scale, delta)


chunked_scan.defvjp(_chunked_scan_fwd, _chunked_scan_bwd)


def run_chunked(q, k, v, g, beta, initial_state, scale: float, chunk_size: int,
                chunk_forward: Callable = xla_chunk_forward, chunk_backward: Callable = xla_chunk_backward):
  """`[b, t, h, d]` inputs -> (o `[b, t, h, V]` in q's dtype, final state float32), via `chunked_scan`."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  delta = beta is not None
  zeros = jnp.zeros((b, t, h), _F32)
  g = zeros if g is None else g
  # Without the delta rule beta is unused: a zero placeholder keeps one custom_vjp signature.
  beta = zeros if beta is None else beta
  pad = -t % chunk_size
  if pad:  # zero tokens at the end leave the state unchanged (g = 0, beta = 0, k = 0): exact
    q, k, v, g, beta = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in (q, k, v, g, beta))
  s0 = jnp.zeros((b, h, dk, dv), _F32) if initial_state is None else initial_state.astype(_F32)
  o, final = chunked_scan(q, k, v, g, beta, s0, chunk_size, scale, delta, chunk_forward, chunk_backward)
  return o[:, :t].astype(q.dtype), final


def linear_scan_xla(q, k, v, g, beta, initial_state, scale: float, chunk_size: int):
  """The chunked scan with XLA state passes. Shapes as `kernels.linear_scan`."""
  return run_chunked(q, k, v, g, beta, initial_state, scale, chunk_size)
