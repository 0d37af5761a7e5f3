"""Ring attention: exact causal / windowed / full softmax attention over a sequence split across devices.

Liu et al., "Ring Attention with Blockwise Transformers for Near-Infinite Context" (2023). Inside
`shard_map` over a mesh axis of n devices, device i holds the contiguous slice i of the queries, keys and
values (`[batch, T/n, heads, dim]`, global positions `i*T/n .. (i+1)*T/n - 1`). The key/value blocks travel
around the ring with `ppermute`: at step s device i holds the block of device `(i - s) mod n`, attends to it
with `kernels.attention(..., q_offset, k_offset, return_lse=True)` at the true global positions, and folds the
partial `(o, lse)` into its running result with `merge_attention` (exact: softmax over a union of disjoint
key sets). After n steps every query has seen every key. The steps after the first are a `fori_loop` (one
step's buffers at a time; a program whose size does not grow with n). Nothing of size T x T or of the whole
sequence is ever held by one device: memory per device is O(T/n) (measured with
`python -m experiments.benchmarks.context_parallel`: the forward + backward at T = 16384, 4 heads of 64, holds
97 MiB per device on 4 devices vs 185 MiB on one; the rest is the block kernel's fixed tile buffers).

Masked blocks. With `causal`, the block of a device to the right of i (keys in the future of all of i's
queries) is fully masked; with a causal `window` so is a block whose keys are all `>= window` positions behind
every query. Such a step is skipped with `lax.cond` (no FLOPs; its partial is `(0, lse=-inf)`, which
`merge_attention` ignores, so nothing becomes NaN), and with a causal window the loop stops after the last
step that can see anything (`ceil((window - 1) / (T/n)) + 1` steps instead of n). Load is unbalanced under
causal masking (device i does i + 1 block attentions); striped/zig-zag layouts would fix that and are not
implemented (the layers hold contiguous slices).

Differentiable by a custom VJP whose backward is again a ring: it keeps only this device's q, k, v, o and
lse (plain autodiff through the loop would keep every block that passed by, i.e. the whole sequence's keys
and values on every device), sends the key/value blocks round once more with their dk/dv accumulators, and
gets each block's gradients from the block kernel's own backward (see `_ring_bwd`). Communication: n - 1
block transfers forward; backward n transfers of each block with its dk/dv (with a causal window, fewer steps
and one more transfer of dk/dv to their device).

`ring_attention` is the per-device function (call it inside `shard_map`); `ring_attention_sharded` applies
`jax.shard_map` over the sequence axis of a mesh (the mesh in context by default) to global arrays.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kernels.attention import attention, merge_attention


def _steps_needed(n: int, block: int, causal: bool, window: int | None) -> int:
  """Ring steps whose block can hold a visible key for some query: n, or fewer with a causal window."""
  if causal and window is not None:
    # Step s holds keys s*block - block + 1 .. positions behind the nearest query: visible iff that < window.
    return min(n, (window - 2) // block + 2 if window >= 2 else 1)
  return n


def _block_visible(i, src, block: int, causal: bool, window: int | None):
  """Whether query block i can see any key of block src (traced ints): the skip predicate of a ring step."""
  ok = jnp.bool_(True)
  if causal:
    ok = ok & (src <= i)
  if window is not None:
    # The smallest qpos - kpos between the two blocks is i*block - (src*block + block - 1).
    ok = ok & ((i - src) * block - block + 1 < window)
  return ok


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis_name: str,
    causal: bool = True,
    window: int | None = None,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> jax.Array:
  """Attention of this device's query slice over the keys of every device along `axis_name`.

  Call inside `shard_map` with q, k, v (and segment_ids) split into contiguous, equal slices along the
  sequence over `axis_name` (device i holds positions i*t .. i*t + t - 1).

  Args:
    q: `[batch, t, heads, head_dim]`, this device's queries.
    k: `[batch, t, kv_heads, head_dim]`, v: `[batch, t, kv_heads, v_dim]`: this device's keys and values
      (same t: the slices of one sequence).
    axis_name: the mesh axis the sequence is split over.
    causal, window: as `kernels.attention` (compared at global positions).
    segment_ids: `[batch, t]` int, this device's slice of the segment ids (no attention across segments), or None.
    scale: default `head_dim ** -0.5`.
    impl: the `kernels.attention` implementation of each block.

  Returns:
    o `[batch, t, heads, v_dim]` in q's dtype: this slice of the attention over the whole sequence.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"ring_attention: q, k, v must be [batch, seq, heads, dim]; got {q.shape}, {k.shape}, {v.shape}.")
  if k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]:
    raise ValueError(
        f"ring_attention: each device must hold equal slices of q, k and v along the sequence (self-attention); "
        f"got q {q.shape[1]}, k {k.shape[1]}, v {v.shape[1]} tokens.")
  if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
    raise ValueError(f"ring_attention: window must be a positive int or None, got {window!r}.")
  if segment_ids is not None and tuple(segment_ids.shape) != q.shape[:2]:
    raise ValueError(f"ring_attention: segment_ids must be [batch, t] = {q.shape[:2]}, got {segment_ids.shape}.")
  cfg = _Ring(axis_name, bool(causal), window, float(q.shape[-1] ** -0.5 if scale is None else scale), impl)
  return _ring(cfg, q, k, v, segment_ids)


class _Ring(NamedTuple):
  """Static arguments of a ring (hashable: the custom VJP's nondiff argument)."""

  axis_name: str
  causal: bool
  window: int | None
  scale: float
  impl: str


def _block_fn(cfg: _Ring, q, segment_ids, i, src, t: int):
  """(k, v, k segment ids) of the block from device `src` -> (o `[b, t, h, dv]`, lse `[b, t, h]`) of q over it."""

  def fn(kb, vb, sb, q=q):
    seg = None if segment_ids is None else (segment_ids, sb)
    return attention(q, kb, vb, causal=cfg.causal, window=cfg.window, q_offset=i * t, k_offset=src * t,
                     segment_ids=seg, scale=cfg.scale, impl=cfg.impl, return_lse=True)

  return fn


def _ring_forward(cfg: _Ring, q, k, v, segment_ids):
  """(o in q's dtype, lse float32) of this device's queries over every block, merged as the blocks arrive."""
  n, i, t = jax.lax.axis_size(cfg.axis_name), jax.lax.axis_index(cfg.axis_name), q.shape[1]
  perm = [(j, (j + 1) % n) for j in range(n)]  # block of device j moves to j + 1: step s holds block i - s

  def block(kv, src):
    o, lse = _block_fn(cfg, q, segment_ids, i, src, t)(*kv)
    return o.astype(jnp.float32), lse

  def skipped(kv, src):
    del kv, src
    return (jnp.zeros(q.shape[:3] + (v.shape[-1],), jnp.float32), jnp.full(q.shape[:3], -jnp.inf, jnp.float32))

  def step(s, carry):
    kv, acc = carry
    kv = jax.tree.map(lambda x: jax.lax.ppermute(x, cfg.axis_name, perm), kv)
    src = (i - s) % n
    part = jax.lax.cond(_block_visible(i, src, t, cfg.causal, cfg.window), block, skipped, kv, src)
    return kv, merge_attention(acc, part)

  kv = (k, v, segment_ids)
  # Step 0 is the diagonal block: every query sees at least itself (causal) or its whole slice, so the
  # running lse is finite from the start and the merges never combine two -inf. The other steps are a loop
  # (not unrolled): one step's buffers at a time, and a program whose size does not grow with n.
  o, lse = block(kv, i)
  steps = _steps_needed(n, t, cfg.causal, cfg.window)
  if steps > 1:
    _, (o, lse) = jax.lax.fori_loop(1, steps, step, (kv, (o, lse)))
  return o.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg: _Ring, q, k, v, segment_ids):
  return _ring_forward(cfg, q, k, v, segment_ids)[0]


def _ring_fwd(cfg: _Ring, q, k, v, segment_ids):
  o, lse = _ring_forward(cfg, q, k, v, segment_ids)
  # Only this device's slices are kept: the backward brings the other blocks round again.
  return o, (q, k, v, segment_ids, o, lse)


def _ring_bwd(cfg: _Ring, res, do):
  """The backward ring: the key/value blocks go round once more, each with its dk/dv accumulator.

  With o = sum_j w_j o_j, w_j = exp(lse_j - lse) (o_j, lse_j: attention over block j alone), the cotangents of
  block j's attention are do_j = w_j do and dlse_j = w_j (do . (o_j - o)), so block j's own VJP (the kernel's
  backward, recomputing its forward) gives exactly the flash-attention gradients with the global softmax:
  its p_local * w_j is the global p and its ds = p (dp - do . o). dq accumulates locally; dk/dv travel with
  their block and are sent back to its device at the end.
  """
  q, k, v, segment_ids, o, lse = res
  n, i, t = jax.lax.axis_size(cfg.axis_name), jax.lax.axis_index(cfg.axis_name), q.shape[1]
  perm = [(j, (j + 1) % n) for j in range(n)]
  do32, o32 = do.astype(jnp.float32), o.astype(jnp.float32)

  def grads(kv, src):
    kb, vb, sb = kv
    (o_j, lse_j), vjp = jax.vjp(lambda q_, k_, v_: _block_fn(cfg, q_, segment_ids, i, src, t)(k_, v_, sb), q, kb, vb)
    w = jnp.where(jnp.isfinite(lse_j), jnp.exp(lse_j - lse), 0.0)
    dlse_j = w * jnp.sum(do32 * (o_j.astype(jnp.float32) - o32), axis=-1)
    dq, dk, dv = vjp(((w[..., None] * do32).astype(o_j.dtype), dlse_j))
    return dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32)

  def skipped(kv, src):
    del src
    return jnp.zeros(q.shape, jnp.float32), jnp.zeros(kv[0].shape, jnp.float32), jnp.zeros(kv[1].shape, jnp.float32)

  def step(s, carry):
    # Block i - s and its accumulators: add this device's share, then pass all of it on. (The diagonal block
    # runs in the loop too, so one block's buffers serve every step; the price is that the last step also
    # sends its k/v, which nobody needs.)
    kv, dq, dk, dv = carry
    src = (i - s) % n
    gq, gk, gv = jax.lax.cond(_block_visible(i, src, t, cfg.causal, cfg.window), grads, skipped, kv, src)
    kv, dk, dv = jax.tree.map(lambda x: jax.lax.ppermute(x, cfg.axis_name, perm), (kv, dk + gk, dv + gv))
    return kv, dq + gq, dk, dv

  steps = _steps_needed(n, t, cfg.causal, cfg.window)
  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  if steps == 1:  # only the diagonal block (a window of 1): nothing to send
    dq, dk, dv = grads((k, v, segment_ids), i)
  else:
    _, dq, dk, dv = jax.lax.fori_loop(0, steps, step, ((k, v, segment_ids), zeros(q), zeros(k), zeros(v)))
  if steps > 1 and steps % n:  # device i holds the accumulators of block i - steps: send them home
    home = [(j, (j - steps) % n) for j in range(n)]
    dk, dv = jax.tree.map(lambda x: jax.lax.ppermute(x, cfg.axis_name, home), (dk, dv))
  dseg = None if segment_ids is None else np.zeros(segment_ids.shape, jax.dtypes.float0)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dseg


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention_sharded(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh=None,
    axis_name: str = "sequence",
    batch_axes=None,
    head_axes=None,
    causal: bool = True,
    window: int | None = None,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> jax.Array:
  """`ring_attention` on global arrays: `jax.shard_map` over `mesh` (None: the mesh set with `jax.set_mesh`),
  the sequence split over `axis_name`, the batch over `batch_axes` and the heads over `head_axes` (mesh axis
  names, a tuple of them, or None; they must divide the batch and both q's and k's heads). Manual over every
  mesh axis, so each device runs the block kernels (Pallas included) on its own block; the axes no spec
  names hold replicas.

  q `[batch, T, heads, d]`, k `[batch, T, kv_heads, d]`, v `[batch, T, kv_heads, dv]`, segment_ids
  `[batch, T]` or None; T must be a multiple of the axis size. Returns o `[batch, T, heads, dv]`.
  """
  n = mesh_axis_size(mesh, axis_name)
  if q.shape[1] % n:
    raise ValueError(f"ring_attention_sharded: sequence length {q.shape[1]} must be a multiple of the "
                     f"'{axis_name}' mesh axis ({n} devices).")
  qkv = P(batch_axes, axis_name, head_axes, None)
  kw = dict(axis_name=axis_name, causal=causal, window=window, scale=scale, impl=impl)
  args = (q, k, v) if segment_ids is None else (q, k, v, segment_ids)
  specs = (qkv,) * 3 + (P(batch_axes, axis_name),) * (len(args) - 3)
  fn = lambda q, k, v, s=None: ring_attention(q, k, v, segment_ids=s, **kw)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)(*args)


def mesh_axis_size(mesh, axis_name: str) -> int:
  """Size of `axis_name` in `mesh` (or in the mesh in context), with a clear error if it has none."""
  m = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if m is None or m.empty or axis_name not in m.axis_names:
    raise ValueError(f"no mesh with a '{axis_name}' axis: pass mesh= or call inside `with jax.set_mesh(mesh):`.")
  return int(m.shape[axis_name])
