"""Ring attention: exact causal / windowed / full softmax attention over a sequence split across devices.

Liu et al., "Ring Attention with Blockwise Transformers for Near-Infinite Context" (2023). Inside
`shard_map` over a mesh axis of n devices, device i holds the contiguous slice i of the queries, keys and
values (`[batch, T/n, heads, dim]`, global positions `i*T/n .. (i+1)*T/n - 1`). The key/value blocks travel
around the ring with `ppermute`: at step s device i holds the block of device `(i - s) mod n`, attends to it
with `kernels.attention(..., q_offset, k_offset, return_lse=True)` at the true global positions, and folds the
partial `(o, lse)` into its running result with `merge_attention` (exact: softmax over a union of disjoint
key sets). After n steps every query has seen every key. Nothing of size T x T or of the whole sequence is
ever held by one device: memory per device is O(T/n), communication n - 1 block transfers per call (each
overlappable with the block's attention by XLA's scheduler).

Masked blocks. With `causal`, the block of a device to the right of i (keys in the future of all of i's
queries) is fully masked; with a causal `window` so is a block whose keys are all `>= window` positions behind
every query. Such a step is skipped with `lax.cond` (no FLOPs; its partial is `(0, lse=-inf)`, which
`merge_attention` ignores, so nothing becomes NaN), and with a causal window the loop stops after the last
step that can see anything (`ceil((window - 1) / (T/n)) + 1` steps instead of n). Load is unbalanced under
causal masking (device i does i + 1 block attentions); striped/zig-zag layouts would fix that and are not
implemented (the layers hold contiguous slices).

Differentiable: autodiff goes through `ppermute` (its transpose is the reverse permutation), `lax.cond` and
the custom VJP of `kernels.attention`; the backward pass is again a ring.

`ring_attention` is the per-device function (call it inside `shard_map`); `ring_attention_sharded` applies
`jax.shard_map` over the sequence axis of a mesh (the mesh in context by default) to global arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
  n = jax.lax.axis_size(axis_name)
  t = q.shape[1]
  i = jax.lax.axis_index(axis_name)
  perm = [(j, (j + 1) % n) for j in range(n)]  # block of device j moves to j + 1: step s holds block i - s
  kw = dict(causal=causal, window=window, scale=scale, impl=impl, return_lse=True)
  q_offset = i * t

  def block(kv, src):
    kb, vb, sb = kv
    seg = None if segment_ids is None else (segment_ids, sb)
    o, lse = attention(q, kb, vb, q_offset=q_offset, k_offset=src * t, segment_ids=seg, **kw)
    return o.astype(jnp.float32), lse

  def skipped(kv, src):
    del kv, src
    return (jnp.zeros(q.shape[:3] + (v.shape[-1],), jnp.float32),
            jnp.full(q.shape[:3], -jnp.inf, jnp.float32))

  kv = (k, v, segment_ids)
  # Step 0 is the diagonal block: every query sees at least itself (causal) or its whole slice, so the
  # running lse is finite from the start and the merges never combine two -inf.
  acc = block(kv, i)
  for s in range(1, _steps_needed(n, t, causal, window)):
    kv = jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), kv)
    src = (i - s) % n
    part = jax.lax.cond(_block_visible(i, src, t, causal, window), block, skipped, kv, src)
    acc = merge_attention(acc, part)
  return acc[0].astype(q.dtype)


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
