"""Blockwise (flash) attention in pure JAX: the CPU path and the fallback of the Pallas kernels.

Forward: for each query block (lax.map), an online softmax over only the key blocks it can see
(a `fori_loop` with traced bounds from `attention_common.rest_blocks_for_q_block`, plus the prefix blocks),
so memory is O(seq x block) and fully masked blocks cost nothing. Backward (FlashAttention-2): for each key
block, recompute the probabilities of the query blocks that see it from the saved log-sum-exp, accumulating
dk, dv for the block and dq into one buffer. Statistics and accumulators are float32; matmul inputs stay in
the input dtype (bf16 in, f32 accumulate).

Shapes use the internal layout of `attention_common` with heads split as `[b, kv_heads, group, ...]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kernels.attention_common import Geometry, Ints, prefix_blocks, q_blocks_for_rest_block
from kernels.attention_common import rest_blocks_for_q_block, visible

_F32 = jnp.float32


def _dot(spec: str, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=_F32)


def _tile_mask(geo: Geometry, ints: Ints, q_start, k_start, prefix: bool):
  """Visibility `[b, 1, 1, bq, bk]` of a tile: queries q_start.., keys at slot k_start.. (prefix or rest)."""
  qi = q_start + jnp.arange(geo.block_q, dtype=jnp.int32)[None, :, None]
  kj = k_start + jnp.arange(geo.block_k, dtype=jnp.int32)[None, None, :]
  if prefix:
    vis = kj < ints.prefix_len[:, None, None]
    vis = jnp.broadcast_to(vis, (geo.batch, geo.block_q, geo.block_k))
  else:
    r = kj - geo.prefix_pad
    q_seg = k_seg = None
    if ints.q_seg is not None:
      q_seg = lax.dynamic_slice_in_dim(ints.q_seg, q_start, geo.block_q, axis=1)[:, :, None]
      k_seg = lax.dynamic_slice_in_dim(ints.k_seg, k_start - geo.prefix_pad, geo.block_k, axis=1)[:, None, :]
    vis = visible(
        geo, qi, r, q_offset=ints.q_offset[:, None, None], k_offset=ints.k_offset[:, None, None],
        rest_len=ints.rest_len[:, None, None], q_seg=q_seg, k_seg=k_seg,
    )
  return vis[:, None, None]


def _split_heads(geo: Geometry, x):
  """[b, h, t, ...] -> [b, hkv, g, t, ...]."""
  return x.reshape(geo.batch, geo.kv_heads, geo.group, *x.shape[2:])


def _key_loops(geo: Geometry, ints: Ints, q_block, body, init):
  """Runs `body(k_start, prefix, carry)` over the prefix key blocks, then the visible rest key blocks."""
  carry = init
  if geo.num_prefix_blocks:
    n = prefix_blocks(geo, ints)
    carry = lax.fori_loop(0, n, lambda j, c: body(j * geo.block_k, True, c), carry)
  if geo.num_rest_blocks:
    lo, hi = rest_blocks_for_q_block(geo, ints, q_block)
    carry = lax.fori_loop(lo, hi, lambda j, c: body(geo.prefix_pad + j * geo.block_k, False, c), carry)
  return carry


def xla_forward(geo: Geometry, q, k, v, ints: Ints):
  """q `[b, h, Tqp, d]`, k/v `[b, hkv, Tkp, d|dv]` -> o `[b, h, Tqp, dv]` (q dtype), lse `[b, h, Tqp]` f32."""
  b, hkv, g, bq, bk = geo.batch, geo.kv_heads, geo.group, geo.block_q, geo.block_k
  qs = _split_heads(geo, q)  # [b, hkv, g, Tqp, d]

  def one_q_block(qb):
    q_start = qb * bq
    qblk = lax.dynamic_slice_in_dim(qs, q_start, bq, axis=3)

    def body(k_start, prefix, carry):
      m, l, acc = carry
      kblk = lax.dynamic_slice_in_dim(k, k_start, bk, axis=2)
      vblk = lax.dynamic_slice_in_dim(v, k_start, bk, axis=2)
      s = _dot("bhgqd,bhkd->bhgqk", qblk, kblk) * geo.scale
      s = jnp.where(_tile_mask(geo, ints, q_start, k_start, prefix), s, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing visible yet stays at p = 0
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      l = alpha * l + jnp.sum(p, axis=-1)
      acc = alpha[..., None] * acc + _dot("bhgqk,bhkd->bhgqd", p.astype(v.dtype), vblk)
      return m_new, l, acc

    init = (
        jnp.full((b, hkv, g, bq), -jnp.inf, _F32),
        jnp.zeros((b, hkv, g, bq), _F32),
        jnp.zeros((b, hkv, g, bq, geo.v_dim), _F32),
    )
    m, l, acc = _key_loops(geo, ints, qb, body, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o = jnp.where(seen[..., None], acc / l_safe[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)
    return o.astype(q.dtype), lse

  o, lse = lax.map(one_q_block, jnp.arange(geo.num_q_blocks, dtype=jnp.int32))
  # [nq, b, hkv, g, bq, dv] -> [b, h, Tqp, dv]
  o = jnp.moveaxis(o, 0, 3).reshape(b, geo.heads, geo.tq_pad, geo.v_dim)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, geo.heads, geo.tq_pad)
  return o, lse


def backward_rowterms(o, do, lse, dlse):
  """FlashAttention-2's per-row terms: lse with -inf made +inf (so exp(s - lse) = 0 on empty rows) and
  `delta = rowsum(do * o) - dlse` (the lse cotangent enters as ds = p * (dp - delta)). All `[b, h, Tqp]`."""
  lse_b = jnp.where(jnp.isfinite(lse), lse, jnp.inf)
  delta = jnp.sum(do.astype(_F32) * o.astype(_F32), axis=-1) - dlse.astype(_F32)
  return lse_b, delta


def xla_backward(geo: Geometry, q, k, v, o, lse, do, dlse, ints: Ints):
  """Gradients (dq `[b, h, Tqp, d]`, dk, dv `[b, hkv, Tkp, d|dv]`) in the inputs' dtypes, float32 inside."""
  b, hkv, g, bq, bk = geo.batch, geo.kv_heads, geo.group, geo.block_q, geo.block_k
  lse_b, delta = backward_rowterms(o, do, lse, dlse)
  qs, dos = _split_heads(geo, q), _split_heads(geo, do.astype(q.dtype))
  lse_s, delta_s = _split_heads(geo, lse_b), _split_heads(geo, delta)

  def key_block(k_start, prefix, q_lo, q_hi, carry):
    dq, dk, dv = carry
    kblk = lax.dynamic_slice_in_dim(k, k_start, bk, axis=2)
    vblk = lax.dynamic_slice_in_dim(v, k_start, bk, axis=2)
    # dq^T = k^T ds contracts the key axis, leading in both operands. XLA folds the transpose into the dot and,
    # unoptimized (the tests' fast compile), runs it on a generic path that has no bf16 x bf16 -> f32: this
    # product is done in float32 (ds is float32 anyway; k^T is one small block).
    kblk_t = jnp.swapaxes(kblk, 2, 3).astype(_F32)

    def q_body(qb, inner):
      # The tile is computed transposed, keys first (`[b, hkv, bk, g, bq]`), and dq is accumulated transposed
      # (`[b, hkv, d, g, Tqp]`): every product then contracts the tile over its trailing (group, query) axes or
      # over its leading key axis as a plain matmul, with no transposed copy of a bk x bq tile. In the
      # query-first layout XLA on CPU copied p and ds into key-first order for dk and dv (or ds for dq), and
      # those strided copies took 40-50% of the backward (measured at 2048 tokens, 8 heads of 32).
      dq, dkb, dvb = inner
      q_start = qb * bq
      qblk = lax.dynamic_slice_in_dim(qs, q_start, bq, axis=3)
      doblk = lax.dynamic_slice_in_dim(dos, q_start, bq, axis=3)
      lblk = lax.dynamic_slice_in_dim(lse_s, q_start, bq, axis=3)[:, :, None]  # [b, hkv, 1, g, bq]
      dblk = lax.dynamic_slice_in_dim(delta_s, q_start, bq, axis=3)[:, :, None]
      s = _dot("bhkd,bhgqd->bhkgq", kblk, qblk) * geo.scale
      mask = jnp.swapaxes(_tile_mask(geo, ints, q_start, k_start, prefix)[:, 0, 0], 1, 2)  # [b, bk, bq]
      s = jnp.where(mask[:, None, :, None, :], s, -jnp.inf)
      p = jnp.exp(s - lblk)
      dp = _dot("bhkd,bhgqd->bhkgq", vblk, doblk)
      ds = p * (dp - dblk) * geo.scale
      dvb = dvb + _dot("bhkgq,bhgqd->bhkd", p.astype(do.dtype), doblk)
      dkb = dkb + _dot("bhkgq,bhgqd->bhkd", ds.astype(q.dtype), qblk)
      dqb = _dot("bhdk,bhkgq->bhdgq", kblk_t, ds)
      dq = lax.dynamic_update_slice_in_dim(dq, lax.dynamic_slice_in_dim(dq, q_start, bq, axis=4) + dqb, q_start, axis=4)
      return dq, dkb, dvb

    zk = jnp.zeros((b, hkv, bk, geo.head_dim), _F32)
    zv = jnp.zeros((b, hkv, bk, geo.v_dim), _F32)
    dq, dkb, dvb = lax.fori_loop(q_lo, q_hi, q_body, (dq, zk, zv))
    dk = lax.dynamic_update_slice_in_dim(dk, dkb, k_start, axis=2)
    dv = lax.dynamic_update_slice_in_dim(dv, dvb, k_start, axis=2)
    return dq, dk, dv

  carry = (
      jnp.zeros((b, hkv, geo.head_dim, g, geo.tq_pad), _F32),  # dq, transposed (see q_body)
      jnp.zeros((b, hkv, geo.tk_pad, geo.head_dim), _F32),
      jnp.zeros((b, hkv, geo.tk_pad, geo.v_dim), _F32),
  )
  if geo.num_prefix_blocks:
    n = prefix_blocks(geo, ints)
    carry = lax.fori_loop(0, n, lambda j, c: key_block(j * bk, True, 0, geo.num_q_blocks, c), carry)
  if geo.num_rest_blocks:

    def rest(j, c):
      lo, hi = q_blocks_for_rest_block(geo, ints, j)
      return key_block(geo.prefix_pad + j * bk, False, lo, hi, c)

    carry = lax.fori_loop(0, geo.num_rest_blocks, rest, carry)
  dq, dk, dv = carry
  dq = jnp.moveaxis(dq, 2, 4).reshape(b, geo.heads, geo.tq_pad, geo.head_dim)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def cache_attention(q, k, v, *, q_offset, kv_lengths, window, scale, block_k: int = 512):
  """Attention of a few new queries over a KV cache in the cache's own layout: the decoding fast path.

  q `[b, tq, h, d]` (tq small: the tokens of one decode step), k/v `[b, T, hkv, d|dv]` (a cache of capacity
  T, slots 0..kv_lengths[b]-1 filled, slot r at position r), causal from query positions q_offset + i, an
  optional `window`. Returns o `[b, tq, h, dv]` in q's dtype.

  `attention` would first copy the whole cache into its padded [b, h, T, d] layout, an O(capacity) copy per
  layer per step (measured: a small Transformer++'s decode step took 4.6 ms with a 1k cache and 150 ms with a
  64k one, for the same 1k-token context). Here a `fori_loop` reads only the key blocks below the longest
  length (and inside the window), sliced straight from the cache. Forward only: the loop's bounds are traced,
  so it is not reverse-differentiable (decoding never is).
  """
  b, tq, h, d = q.shape
  t, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  bk = min(block_k, t)
  qg = q.reshape(b, tq, hkv, g, d)
  q_offset = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (b,))
  lengths = jnp.asarray(kv_lengths, jnp.int32)
  qpos = q_offset[:, None] + jnp.arange(tq, dtype=jnp.int32)[None]  # [b, tq]
  hi_key = jnp.minimum(jnp.max(lengths), jnp.max(qpos) + 1)  # exclusive
  hi = jnp.minimum((hi_key + bk - 1) // bk, -(-t // bk))
  lo = jnp.int32(0)
  if window is not None:
    lo = jnp.maximum(0, (jnp.min(qpos) - int(window) + 1) // bk)

  def body(j, carry):
    m, l, acc = carry
    start = j * bk
    s0 = jnp.minimum(start, t - bk)  # dynamic_slice would clamp the last block; its overlap is masked below
    kb = lax.dynamic_slice_in_dim(k, s0, bk, axis=1)
    vb = lax.dynamic_slice_in_dim(v, s0, bk, axis=1)
    s = _dot("bqhgd,bkhd->bhgqk", qg, kb) * scale
    kpos = s0 + jnp.arange(bk, dtype=jnp.int32)  # [bk]
    vis = (kpos[None, None] >= start) & (kpos[None, None] < lengths[:, None, None])
    vis = vis & (kpos[None, None] <= qpos[:, :, None])  # [b, tq, bk]
    if window is not None:
      vis = vis & (qpos[:, :, None] - kpos[None, None] < int(window))
    s = jnp.where(vis[:, None, None], s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - safe[..., None])
    corr = jnp.exp(jnp.where(jnp.isfinite(m), m - safe, -jnp.inf))
    l = l * corr + jnp.sum(p, axis=-1)
    acc = acc * corr[..., None] + _dot("bhgqk,bkhd->bhgqd", p.astype(vb.dtype), vb)
    return m_new, l, acc

  init = (jnp.full((b, hkv, g, tq), -jnp.inf, _F32), jnp.zeros((b, hkv, g, tq), _F32),
          jnp.zeros((b, hkv, g, tq, v.shape[-1]), _F32))
  _, l, acc = lax.fori_loop(lo, hi, body, init)
  o = acc / jnp.where(l > 0, l, 1.0)[..., None]  # a query that sees nothing reads 0, as `attention` defines
  return o.transpose(0, 3, 1, 2, 4).reshape(b, tq, h, v.shape[-1]).astype(q.dtype)
