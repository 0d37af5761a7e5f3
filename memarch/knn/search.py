"""Exact k-nearest-neighbour search in JAX (squared L2), blocked over the datastore, optionally sharded.

    knn_search(queries [q, d], keys [n, d], k) -> (dist [q, k] float32, idx [q, k] int32)

`dist[i, j]` is the j-th smallest squared distance |queries[i] - keys[idx[i, j]]|^2, ascending. The datastore
is scanned in blocks of `block_size` keys (`lax.scan`; the last block is padded with keys at +inf distance), so
memory is O(q * block_size) whatever n. Each block is reduced to its k best and merged with the running k best.

Distances use the expansion |q|^2 - 2 q.k + |k|^2 (one matmul per block), in float32 whatever the keys' dtype
(float16 keys halve the datastore's memory; they are upcast block by block). Its rounding error is about
1e-6 * (|q|^2 + |k|^2): distances that differ by less are ties up to float precision.

Ties. Among equal distances the lower datastore index comes first, always. This rests on `lax.top_k`'s
documented rule ("if two elements are equal, the lower-index element appears first"; tests check it on CPU)
and on keeping every candidate list in ascending index order wherever a tie could be decided:
- inside a block, the exact two-stage selection (below) gathers the chosen groups in ascending group order;
- the running best list (from earlier blocks: lower indices) is placed before the block's candidates in the
  merge, and the running list itself is sorted by (distance, index);
- the sharded merge concatenates the devices' lists in device order (device i holds lower indices than i+1).

Exact two-stage selection in a block (faster on CPU than one `top_k` over the whole block): split the block
into groups of `group` keys, take each group's minimum, keep the k groups with the smallest minima (ties:
lower group first), and run `top_k` over those k * group candidates. This is exact: if key x is among the k
best of the block (ordered by (distance, index)), every group whose (min distance, its index) precedes the
minimum of x's group holds an element that precedes x, so fewer than k groups precede x's group.

`approx=True` uses `lax.approx_max_k` per block (TPU's fast approximate top-k; on CPU and GPU it is exact
top-k by another name). Datastore sharding: `sharded_knn_search` splits the keys across the devices of a 1-D
mesh (`jax.shard_map`), each device searches its shard, and the per-device k best are gathered and merged.
"""

from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Keys per group of the two-stage block selection (see the module docstring).
GROUP = 32


def _check(queries, keys, k: int, block_size: int, exclude) -> None:
  if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
    raise ValueError(f"queries must be [q, d] and keys [n, d] with the same d; got {queries.shape} and {keys.shape}.")
  n = keys.shape[0]
  usable = n - (1 if exclude is not None else 0)
  if not 1 <= k <= usable:
    raise ValueError(f"k={k} must be in [1, {usable}]: the datastore has {n} keys"
                     + (" and one is excluded per query (leave-one-out)" if exclude is not None else "") + ".")
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}.")
  if exclude is not None and exclude.shape != (queries.shape[0],):
    raise ValueError(f"exclude must be [q] = [{queries.shape[0]}] int (-1: nothing), got {exclude.shape}.")


def _block_best(d, k: int, approx: bool):
  """The k smallest of d [q, b] (ascending; ties: lower column first) -> (values [q, k], columns [q, k])."""
  q, b = d.shape
  if approx:
    v, i = lax.approx_max_k(-d, k)
    return -v, i
  groups = b // GROUP
  if b % GROUP or groups < 2 * k:  # the two-stage selection only pays off with many groups
    v, i = lax.top_k(-d, k)
    return -v, i
  g = d.reshape(q, groups, GROUP)
  _, gi = lax.top_k(-jnp.min(g, axis=-1), k)
  gi = jnp.sort(gi, axis=-1)  # ascending group order: candidate position order == index order (ties)
  cand = jnp.take_along_axis(g, gi[:, :, None], axis=1).reshape(q, k * GROUP)
  v, j = lax.top_k(-cand, k)
  col = jnp.take_along_axis(gi, j // GROUP, axis=1) * GROUP + j % GROUP
  return -v, col


def _merge(best_d, best_i, d, i, k: int):
  """Merges two (dist, idx) lists; the first must hold only lower indices than the second (ties)."""
  cd = jnp.concatenate([best_d, d], axis=1)
  ci = jnp.concatenate([best_i, i], axis=1)
  v, j = lax.top_k(-cd, k)
  return -v, jnp.take_along_axis(ci, j, axis=1)


def _pad_keys(keys, block_size: int, multiple: int = 1):
  """Keys padded with zeros to a multiple of block_size * multiple, and their squared norms (+inf on padding)."""
  n = keys.shape[0]
  total = math.ceil(n / (block_size * multiple)) * block_size * multiple
  kf = keys.astype(jnp.float32)
  sq = jnp.sum(kf * kf, axis=-1)
  if total > n:
    keys = jnp.concatenate([keys, jnp.zeros((total - n, keys.shape[1]), keys.dtype)])
    sq = jnp.concatenate([sq, jnp.full((total - n,), jnp.inf, jnp.float32)])
  return keys, sq


def _scan_blocks(queries, keys, sq, exclude, *, k: int, block_size: int, offset, approx: bool):
  """k best over keys [m, d] (m a multiple of block_size) whose global indices start at `offset`.

  Returns (partial distances |k|^2 - 2 q.k [q, k] ascending, global idx [q, k] int32). Keys at +inf squared
  norm (padding) and the excluded index never win unless fewer than k real keys remain.
  """
  qf = queries.astype(jnp.float32)
  m, dim = keys.shape
  nb = m // block_size
  blocks = keys.reshape(nb, block_size, dim)
  sqb = sq.reshape(nb, block_size)
  kk = min(k, block_size)

  def step(carry, xs):
    best_d, best_i = carry
    kb, sb, b = xs
    d = sb[None, :] - 2.0 * (qf @ kb.astype(jnp.float32).T)  # [q, block]
    base = offset + b * block_size
    if exclude is not None:
      cols = base + jnp.arange(block_size, dtype=jnp.int32)
      d = jnp.where(cols[None, :] == exclude[:, None], jnp.inf, d)
    v, c = _block_best(d, kk, approx)
    return _merge(best_d, best_i, v, c.astype(jnp.int32) + base, k), None

  init = (jnp.full((qf.shape[0], k), jnp.inf, jnp.float32), jnp.full((qf.shape[0], k), -1, jnp.int32))
  (best_d, best_i), _ = lax.scan(step, init, (blocks, sqb, jnp.arange(nb, dtype=jnp.int32)))
  return best_d, best_i


def _finish(queries, best_d):
  qf = queries.astype(jnp.float32)
  return jnp.maximum(best_d + jnp.sum(qf * qf, axis=-1, keepdims=True), 0.0)  # rounding can go below 0


@functools.partial(jax.jit, static_argnames=("k", "block_size", "approx"))
def _knn_jit(queries, keys, sq, exclude, *, k, block_size, approx):
  d, i = _scan_blocks(queries, keys, sq, exclude, k=k, block_size=block_size, offset=0, approx=approx)
  return _finish(queries, d), i


def knn_search(queries, keys, k: int, *, block_size: int = 8192, exclude=None, approx: bool = False):
  """Exact k nearest keys of each query by squared L2 distance.

  Args:
    queries: `[q, d]` float (any float dtype; computed in float32).
    keys: `[n, d]` float32 or float16 (a datastore; float16 halves its memory, distances stay float32).
    k: neighbours per query, 1 <= k <= n (n - 1 with `exclude`).
    block_size: keys per block of the scan (the last block is padded; n need not be a multiple).
    exclude: optional `[q]` int: a datastore index each query must not return (leave-one-out: the query's own
      entry), -1 for none.
    approx: `lax.approx_max_k` per block (TPU); exact elsewhere.
  Returns:
    (dist `[q, k]` float32 ascending squared distances, idx `[q, k]` int32); ties -> lower index first.
  """
  queries, keys = jnp.asarray(queries), jnp.asarray(keys)
  if exclude is not None:
    exclude = jnp.asarray(exclude, jnp.int32)
  _check(queries, keys, k, block_size, exclude)
  block_size = min(block_size, _round_up(keys.shape[0], GROUP))
  keys, sq = _pad_keys(keys, block_size)
  return _knn_jit(queries, keys, sq, exclude, k=k, block_size=block_size, approx=approx)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def prepare_keys(keys, block_size: int = 8192):
  """The datastore padded for the scan, once: `(padded keys, squared norms (+inf on padding), block_size)`.

  Pass it to `search_prepared` to search many query batches without copying the keys each time.
  """
  keys = jnp.asarray(keys)
  if keys.ndim != 2 or block_size < 1:
    raise ValueError(f"keys must be [n, d] and block_size >= 1; got {keys.shape} and {block_size}.")
  block_size = min(block_size, _round_up(keys.shape[0], GROUP))
  padded, sq = _pad_keys(keys, block_size)
  return padded, sq, block_size


def search_prepared(queries, prepared, k: int, *, exclude=None, approx: bool = False, n: int | None = None):
  """`knn_search` against `prepare_keys`' output (jittable: call it inside a jitted function).

  n: the number of real keys (for the k check; default: the padded count)."""
  padded, sq, block_size = prepared
  if n is not None and not 1 <= k <= n - (exclude is not None):
    raise ValueError(f"k={k} must be in [1, {n - (exclude is not None)}] for a datastore of {n} keys.")
  return _knn_jit(jnp.asarray(queries), padded, sq, exclude, k=k, block_size=block_size, approx=approx)


def sharded_knn_search(queries, keys, k: int, *, mesh: jax.sharding.Mesh, axis: str, block_size: int = 8192,
                       exclude=None, approx: bool = False):
  """`knn_search` with the datastore sharded along n over the devices of mesh axis `axis`.

  Each device scans its contiguous shard of keys (global indices offset by shard * shard size) for the k best,
  the per-device lists are all-gathered and merged (device order = index order, so ties still go to the lower
  index). Queries are replicated. Same arguments and result as `knn_search`.
  """
  queries, keys = jnp.asarray(queries), jnp.asarray(keys)
  if exclude is not None:
    exclude = jnp.asarray(exclude, jnp.int32)
  _check(queries, keys, k, block_size, exclude)
  devices = mesh.shape[axis]
  block_size = min(block_size, _round_up(-(-keys.shape[0] // devices), GROUP))
  keys, sq = _pad_keys(keys, block_size, devices)
  shard = keys.shape[0] // devices
  P = jax.sharding.PartitionSpec
  ex = exclude if exclude is not None else jnp.full((queries.shape[0],), -1, jnp.int32)

  def local(q, kk, s, e):
    offset = lax.axis_index(axis) * shard
    d, i = _scan_blocks(q, kk, s, e, k=k, block_size=block_size, offset=offset, approx=approx)
    d_all = lax.all_gather(d, axis, axis=1, tiled=True)  # [q, devices * k], device order
    i_all = lax.all_gather(i, axis, axis=1, tiled=True)
    v, j = lax.top_k(-d_all, k)
    return _finish(q, -v), jnp.take_along_axis(i_all, j, axis=1)

  specs = (P(), P(axis), P(axis), P())
  fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), P()), check_vma=False)
  args = [jax.device_put(x, jax.sharding.NamedSharding(mesh, s)) for x, s in zip((queries, keys, sq, ex), specs)]
  return jax.jit(fn)(*args)


def knn_search_batched(queries, keys, k: int, *, query_batch: int = 1024, block_size: int = 8192, exclude=None,
                       approx: bool = False, progress: bool = True, desc: str = "knn search"):
  """`knn_search` over many queries in batches of `query_batch` (a tqdm bar), with the keys moved to the device
  once. queries may be a numpy memmap. Returns numpy (dist [q, k] float32, idx [q, k] int32)."""
  from tqdm import tqdm  # noqa: PLC0415

  n_q = len(queries)
  keys = jnp.asarray(keys)
  ex_all = None if exclude is None else np.asarray(exclude, np.int32)
  _check(jnp.zeros((1, queries.shape[1])), keys, k, block_size,
         None if exclude is None else jnp.zeros((1,), jnp.int32))
  prepared = prepare_keys(keys, block_size)
  dist = np.empty((n_q, k), np.float32)
  idx = np.empty((n_q, k), np.int32)
  for s in tqdm(range(0, n_q, query_batch), desc=desc, disable=not progress, file=sys.stderr,
                unit_scale=query_batch, unit="q"):
    e = min(s + query_batch, n_q)
    q = np.zeros((query_batch, queries.shape[1]), np.float32)  # full batches: one compilation
    q[: e - s] = queries[s:e]
    ex = None
    if ex_all is not None:
      ex = np.full((query_batch,), -1, np.int32)
      ex[: e - s] = ex_all[s:e]
      ex = jnp.asarray(ex)
    d, i = search_prepared(q, prepared, k, exclude=ex, approx=approx)
    dist[s:e], idx[s:e] = np.asarray(d)[: e - s], np.asarray(i)[: e - s]
  return dist, idx
