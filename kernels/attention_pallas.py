"""Pallas flash-attention kernels, forward and backward, for TPU (Mosaic) and GPU (Triton).

Both variants share the tile math (`_fwd_tile`, `_dq_tile`, `_dkdv_tile`) and the visibility rule of
`attention_common`; they differ in how they walk the blocks:

- TPU (`pallas_tpu`): the key (query) blocks a query (key) block can see are a grid axis marked
  "arbitrary", with VMEM scratch accumulators. The per-block ranges of visible blocks are scalar-prefetched
  tables; the BlockSpec index maps clamp the block index into the visible range, so grid steps outside it
  fetch nothing new (same block index as the step before) and `pl.when` skips their compute. Blocks are
  multiples of (8, 128) or whole dimensions (VMEM use: a few `[128, d]` tiles, far below the limit).
- GPU (`pallas_triton`): Triton has no sequential grid axis and no scratch, so each program owns one query
  (key) block, keeps its accumulators in registers and loops (`fori_loop` with traced bounds) over only
  the visible key (query) blocks, reading K/V (Q/dO) tiles with `pl.ds`. Power-of-two tiles of 64 fit in
  shared memory for head_dim <= 256.

Backward is FlashAttention-2 in two kernels: dq (per query block, over key blocks) and dk/dv (per key
block, over query blocks), from the saved lse and `delta = rowsum(do * o) - dlse`. dk/dv are produced per
query head in float32 and summed over each GQA group outside the kernel.

Arrays use the blocked layout of `attention_common` (`[b, h, Tqp, d]`, keys `[b, hkv, Pp + Rp, d]`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from kernels.attention_common import Geometry, Ints, prefix_blocks, q_blocks_for_rest_block
from kernels.attention_common import rest_blocks_for_q_block, round_up, visible
from kernels.attention_xla import backward_rowterms

_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
TRITON_NUM_WARPS = 4
TRITON_NUM_STAGES = 2


# ----------------------------------------------------------------------------------------------------------
# Choosing blocks and what the kernels support.


def _next_pow2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


# Shared memory the Triton kernels' streamed tiles may take: a (k, v) or (q, dO) tile pair per pipeline
# stage. 48 KiB fits the smallest target (T4: 64 KiB per block) with room for the resident q or k tile.
TRITON_SMEM_BUDGET = 48 * 1024


def _triton_block(d: int, dv: int, itemsize: int) -> int:
  """Largest power-of-two tile rows (16..64) whose streamed tile pair fits TRITON_SMEM_BUDGET."""
  for rows in (64, 32, 16):
    if rows * (d + dv) * itemsize * TRITON_NUM_STAGES <= TRITON_SMEM_BUDGET:
      return rows
  return 0


def default_blocks(impl: str, tq: int, tk_rest: int, d: int, dv: int, itemsize: int) -> tuple[int, int]:
  """Block sizes per kernel variant. TPU: 128 (lane width), or the whole (16-rounded) length when shorter,
  so every block is a multiple of (8, 128) (16 sublanes for bf16) or a full dimension; a few such tiles
  take well under 1 MiB of VMEM. Triton: powers of two >= 16 (tl.dot) sized to TRITON_SMEM_BUDGET."""
  if impl.startswith("pallas_tpu"):
    return min(128, round_up(tq, 16)), min(128, round_up(max(tk_rest, 1), 16))
  rows = _triton_block(d, dv, itemsize)
  return min(rows, max(16, _next_pow2(tq))), min(rows, max(16, _next_pow2(max(tk_rest, 1))))


def unsupported(impl: str, q, k, v, block_q, block_k) -> str | None:
  """Why the kernel variant cannot run these inputs (then `attention` falls back to xla), or None."""
  if k.shape[1] == 0 or q.shape[1] == 0:
    return "empty q or k"
  if not (q.dtype == k.dtype == v.dtype):
    return f"mixed input dtypes ({q.dtype}, {k.dtype}, {v.dtype})"
  if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype}"
  d, dv = q.shape[-1], v.shape[-1]
  if d > 256 or dv > 256:
    return f"head_dim {d} / v_dim {dv} > 256 (tiles would not fit on-chip memory)"
  if impl.startswith("pallas_triton"):
    if not _triton_block(d, dv, q.dtype.itemsize):
      return f"head_dim {d} / v_dim {dv} in {q.dtype} on Triton (16-row tiles exceed shared memory)"
    for n in (d, dv):
      if n < 16 or n & (n - 1):
        return f"head_dim {n} on Triton (needs a power of two >= 16)"
    for n in (block_q, block_k):
      if n is not None and (n < 16 or n & (n - 1)):
        return f"block size {n} on Triton (needs a power of two >= 16)"
  return None


def _interpret(geo: Geometry):
  return geo.impl.endswith("_interpret")


def _triton(geo: Geometry) -> bool:
  return geo.impl.startswith("pallas_triton")


# ----------------------------------------------------------------------------------------------------------
# Tile math shared by both variants. Statistics are [rows, 1] float32 columns (or [1, cols] rows).


def _tile_visible(geo: Geometry, qi, slot, qoff, koff, plen, rlen, q_seg, k_seg):
  """Visibility of key slot `slot` to query `qi` (int tiles that broadcast); prefix slots need no mask
  beyond kv_lengths."""
  rest_vis = visible(geo, qi, slot - geo.prefix_pad, q_offset=qoff, k_offset=koff, rest_len=rlen,
                     q_seg=q_seg, k_seg=k_seg)
  if not geo.num_prefix_blocks:
    return rest_vis
  return jnp.where(slot < geo.prefix_pad, slot < plen, rest_vis)


def _block_visible(geo: Geometry, q_block, k_block, bq: int, bk: int, qoff, koff, plen, rlen, q_seg, k_seg,
                   *, keys_first: bool = False):
  """_tile_visible for query block q_block x key block k_block: [bq, bk], or [bk, bq] if keys_first."""
  shape, q_axis = ((bk, bq), 1) if keys_first else ((bq, bk), 0)
  qidx = q_block * bq + lax.broadcasted_iota(jnp.int32, shape, q_axis)
  slot = k_block * bk + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
  return _tile_visible(geo, qidx, slot, qoff, koff, plen, rlen, q_seg, k_seg)


def _fwd_tile(geo: Geometry, q, k, v, vis, m, l, acc):
  """One online-softmax step. q [bq, d], k [bk, d], v [bk, dv], vis [bq, bk]; m, l [bq, 1]; acc [bq, dv]."""
  s = lax.dot_general(q, k, _NT, preferred_element_type=_F32) * geo.scale
  s = jnp.where(vis, s, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet keep p = 0
  p = jnp.exp(s - m_safe)
  alpha = jnp.exp(m - m_safe)
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=_F32)
  return m_new, l, acc


def _finalize(m, l, acc):
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  o = jnp.where(seen, acc / l_safe, 0.0)
  lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)
  return o, lse


def _dq_tile(geo: Geometry, q, k, v, do, lse, delta, vis, dq):
  """dq += dS k for one tile. q [bq, d], do [bq, dv], lse/delta [bq, 1] (lse +inf on empty rows)."""
  s = lax.dot_general(q, k, _NT, preferred_element_type=_F32) * geo.scale
  s = jnp.where(vis, s, -jnp.inf)
  p = jnp.exp(s - lse)
  dp = lax.dot_general(do, v, _NT, preferred_element_type=_F32)
  ds = p * (dp - delta) * geo.scale
  return dq + lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=_F32)


def _dkdv_tile(geo: Geometry, q, k, v, do, lse_row, delta_row, vis_t, dk, dv):
  """dk += dS^T q, dv += P^T dO for one tile, computed transposed ([bk, bq]) so every matmul is a @ b or
  a @ b.T. k [bk, d], v [bk, dv], q [bq, d], do [bq, dv], lse_row/delta_row [1, bq], vis_t [bk, bq]."""
  s_t = lax.dot_general(k, q, _NT, preferred_element_type=_F32) * geo.scale
  s_t = jnp.where(vis_t, s_t, -jnp.inf)
  p_t = jnp.exp(s_t - lse_row)
  dp_t = lax.dot_general(v, do, _NT, preferred_element_type=_F32)
  ds_t = p_t * (dp_t - delta_row) * geo.scale
  dv = dv + lax.dot_general(p_t.astype(do.dtype), do, _NN, preferred_element_type=_F32)
  dk = dk + lax.dot_general(ds_t.astype(q.dtype), q, _NN, preferred_element_type=_F32)
  return dk, dv


# ----------------------------------------------------------------------------------------------------------
# Block tables (traced: offsets and lengths may be traced).


def _per_sequence(fn, ints: Ints):
  """Maps fn(ints of one sequence) over the batch: ranges per sequence, so that the static bounds on the
  number of visible blocks (`Geometry.max_*_per_*`) hold whatever the spread of offsets across the batch."""

  def one(qoff, koff, plen, rlen):
    return fn(Ints(qoff[None], koff[None], plen[None], rlen[None], None, None))

  return jax.vmap(one)(ints.q_offset, ints.k_offset, ints.prefix_len, ints.rest_len)


def _fwd_tables(geo: Geometry, ints: Ints):
  """Per sequence and query block: [lo, hi) of visible rest key blocks (`[b, nq]` each), and the number of
  prefix blocks with a visible key (`[1]`)."""
  qb = jnp.arange(geo.num_q_blocks, dtype=jnp.int32)
  lo, hi = _per_sequence(lambda i: rest_blocks_for_q_block(geo, i, qb), ints)
  npd = prefix_blocks(geo, ints).reshape(1)
  return lo, hi, npd


def _bwd_tables(geo: Geometry, ints: Ints):
  """Per sequence and key block (prefix blocks first): [lo, hi) of the query blocks that see it, `[b, nkt]`."""

  def one(i: Ints):
    los, his = [], []
    if geo.num_prefix_blocks:
      kb = jnp.arange(geo.num_prefix_blocks, dtype=jnp.int32)
      los.append(jnp.zeros_like(kb))
      his.append(jnp.where(kb < prefix_blocks(geo, i), geo.num_q_blocks, 0).astype(jnp.int32))
    if geo.num_rest_blocks:
      lo, hi = q_blocks_for_rest_block(geo, i, jnp.arange(geo.num_rest_blocks, dtype=jnp.int32))
      los.append(lo)
      his.append(hi)
    return jnp.concatenate(los), jnp.concatenate(his)

  return _per_sequence(one, ints)


def _kv_block(geo: Geometry, t, lo, hi):
  """Key-block index for step t of a query block's key axis: prefix blocks first, then lo.. clamped to the
  last visible block so that steps past the visible range re-use the block already fetched."""
  npb, nrb = geo.num_prefix_blocks, geo.num_rest_blocks
  if not nrb:
    return jnp.minimum(t, npb - 1)
  rb = jnp.minimum(lo + jnp.maximum(t - npb, 0), jnp.maximum(hi - 1, lo))
  rb = jnp.clip(rb, 0, nrb - 1)
  if not npb:
    return rb
  return jnp.where(t < npb, t, npb + rb)


def _rest_block(geo: Geometry, kb):
  """Rest-block index of key block kb (clamped: the segment ids of a prefix block are never used)."""
  return jnp.clip(kb - geo.num_prefix_blocks, 0, max(geo.num_rest_blocks - 1, 0))


def _q_block(geo: Geometry, t, lo, hi):
  qb = jnp.minimum(lo + t, jnp.maximum(hi - 1, lo))
  return jnp.clip(qb, 0, geo.num_q_blocks - 1)


def _fwd_steps(geo: Geometry) -> int:
  return geo.num_prefix_blocks + (geo.max_rest_blocks_per_q_block if geo.num_rest_blocks else 0)


def _bwd_steps(geo: Geometry) -> int:
  return geo.num_q_blocks if geo.num_prefix_blocks else geo.max_q_blocks_per_rest_block


# ----------------------------------------------------------------------------------------------------------
# TPU (Mosaic) kernels.


def _tpu_params(geo: Geometry, n_parallel: int):
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",))


def _tpu_call(geo: Geometry, kernel, num_prefetch, grid, in_specs, out_specs, out_shape, scratch, name):
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=num_prefetch, grid=grid, in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=scratch,
      ),
      out_shape=out_shape,
      compiler_params=None if _interpret(geo) else _tpu_params(geo, len(grid) - 1),
      interpret=_interpret(geo),
      name=name,
  )


def _tpu_run_step(geo: Geometry, t, lo, hi, npd):
  """Whether step t of the key axis is a visible block."""
  npb = geo.num_prefix_blocks
  rest_run = t - npb < hi - lo
  if not npb:
    return rest_run
  return jnp.where(t < npb, t < npd, rest_run)


def _tpu_forward(geo: Geometry, q, k, v, ints: Ints):
  b, h, g, bq, bk = geo.batch, geo.heads, geo.group, geo.block_q, geo.block_k
  lo, hi, npd = _fwd_tables(geo, ints)
  lo, hi = lo.reshape(-1), hi.reshape(-1)  # SMEM tables, indexed [bi * nq + qi]
  nq = geo.num_q_blocks
  nt = _fwd_steps(geo)
  seg = geo.has_segments

  def kernel(qoff, koff, plen, rlen, lo_r, hi_r, npd_r, q_ref, k_ref, v_ref, *refs):
    if seg:
      qs_ref, ks_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
      o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    bi, qi, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(t == 0)
    def _init():
      m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, _F32)
      l_sc[...] = jnp.zeros(l_sc.shape, _F32)
      acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

    lo_q, hi_q = lo_r[bi * nq + qi], hi_r[bi * nq + qi]

    @pl.when(_tpu_run_step(geo, t, lo_q, hi_q, npd_r[0]))
    def _step():
      kb = _kv_block(geo, t, lo_q, hi_q)
      vis = _block_visible(geo, qi, kb, bq, bk, qoff[bi], koff[bi], plen[bi], rlen[bi],
                           qs_ref[...] if seg else None, ks_ref[...] if seg else None)
      m, l, acc = _fwd_tile(geo, q_ref[...], k_ref[...], v_ref[...], vis, m_sc[...], l_sc[...], acc_sc[...])
      m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

    @pl.when(t == nt - 1)
    def _done():
      o, lse = _finalize(m_sc[...], l_sc[...], acc_sc[...])
      o_ref[...] = o.astype(o_ref.dtype)
      lse_ref[...] = lse

  def kv_map(bi, hi_, qi, t, qoff, koff, plen, rlen, lo_r, hi_r, npd_r):
    return bi, lax.div(hi_, g), _kv_block(geo, t, lo_r[bi * nq + qi], hi_r[bi * nq + qi]), 0

  def q_map(bi, hi_, qi, t, *_):
    return bi, hi_, qi, 0

  in_specs = [
      pl.BlockSpec((None, None, bq, geo.head_dim), q_map),
      pl.BlockSpec((None, None, bk, geo.head_dim), kv_map),
      pl.BlockSpec((None, None, bk, geo.v_dim), kv_map),
  ]
  args = [q, k, v]
  if seg:
    in_specs += [
        pl.BlockSpec((None, bq, 1), lambda bi, hi_, qi, t, *_: (bi, qi, 0)),
        pl.BlockSpec((None, 1, bk), lambda bi, hi_, qi, t, qoff, koff, plen, rlen, lo_r, hi_r, npd_r: (
            bi, 0, _rest_block(geo, _kv_block(geo, t, lo_r[bi * nq + qi], hi_r[bi * nq + qi])))),
    ]
    args += [ints.q_seg[:, :, None], ints.k_seg[:, None, :]]
  out_specs = [
      pl.BlockSpec((None, None, bq, geo.v_dim), q_map),
      pl.BlockSpec((None, None, bq, 1), q_map),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((b, h, geo.tq_pad, geo.v_dim), q.dtype),
      jax.ShapeDtypeStruct((b, h, geo.tq_pad, 1), _F32),
  ]
  scratch = [pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, geo.v_dim), _F32)]
  call = _tpu_call(geo, kernel, 7, (b, h, geo.num_q_blocks, nt), in_specs, out_specs, out_shape, scratch,
                   "flash_attention_fwd")
  o, lse = call(ints.q_offset, ints.k_offset, ints.prefix_len, ints.rest_len, lo, hi, npd, *args)
  return o, lse[..., 0]


def _tpu_backward(geo: Geometry, q, k, v, o, lse, do, dlse, ints: Ints):
  b, h, g, bq, bk = geo.batch, geo.heads, geo.group, geo.block_q, geo.block_k
  lse_b, delta = backward_rowterms(o, do, lse, dlse)
  do = do.astype(q.dtype)
  seg = geo.has_segments
  scalars = (ints.q_offset, ints.k_offset, ints.prefix_len, ints.rest_len)

  # dq: per query block, over its visible key blocks (the forward's grid).
  lo, hi, npd = _fwd_tables(geo, ints)
  lo, hi = lo.reshape(-1), hi.reshape(-1)
  nq = geo.num_q_blocks
  nt = _fwd_steps(geo)

  def dq_kernel(qoff, koff, plen, rlen, lo_r, hi_r, npd_r, q_ref, k_ref, v_ref, do_ref, l_ref, d_ref, *refs):
    if seg:
      qs_ref, ks_ref, dq_ref, dq_sc = refs
    else:
      dq_ref, dq_sc = refs
    bi, qi, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(t == 0)
    def _init():
      dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)

    lo_q, hi_q = lo_r[bi * nq + qi], hi_r[bi * nq + qi]

    @pl.when(_tpu_run_step(geo, t, lo_q, hi_q, npd_r[0]))
    def _step():
      kb = _kv_block(geo, t, lo_q, hi_q)
      vis = _block_visible(geo, qi, kb, bq, bk, qoff[bi], koff[bi], plen[bi], rlen[bi],
                           qs_ref[...] if seg else None, ks_ref[...] if seg else None)
      dq_sc[...] = _dq_tile(geo, q_ref[...], k_ref[...], v_ref[...], do_ref[...], l_ref[...], d_ref[...], vis,
                            dq_sc[...])

    @pl.when(t == nt - 1)
    def _done():
      dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)

  def kv_map(bi, hi_, qi, t, qoff, koff, plen, rlen, lo_r, hi_r, npd_r):
    return bi, lax.div(hi_, g), _kv_block(geo, t, lo_r[bi * nq + qi], hi_r[bi * nq + qi]), 0

  def q_map(bi, hi_, qi, t, *_):
    return bi, hi_, qi, 0

  in_specs = [
      pl.BlockSpec((None, None, bq, geo.head_dim), q_map),
      pl.BlockSpec((None, None, bk, geo.head_dim), kv_map),
      pl.BlockSpec((None, None, bk, geo.v_dim), kv_map),
      pl.BlockSpec((None, None, bq, geo.v_dim), q_map),
      pl.BlockSpec((None, None, bq, 1), q_map),
      pl.BlockSpec((None, None, bq, 1), q_map),
  ]
  args = [q, k, v, do, lse_b[..., None], delta[..., None]]
  if seg:
    in_specs += [
        pl.BlockSpec((None, bq, 1), lambda bi, hi_, qi, t, *_: (bi, qi, 0)),
        pl.BlockSpec((None, 1, bk), lambda bi, hi_, qi, t, qoff, koff, plen, rlen, lo_r, hi_r, npd_r: (
            bi, 0, _rest_block(geo, _kv_block(geo, t, lo_r[bi * nq + qi], hi_r[bi * nq + qi])))),
    ]
    args += [ints.q_seg[:, :, None], ints.k_seg[:, None, :]]
  call = _tpu_call(
      geo, dq_kernel, 7, (b, h, geo.num_q_blocks, nt), in_specs,
      pl.BlockSpec((None, None, bq, geo.head_dim), q_map),
      jax.ShapeDtypeStruct((b, h, geo.tq_pad, geo.head_dim), q.dtype),
      [pltpu.VMEM((bq, geo.head_dim), _F32)], "flash_attention_bwd_dq",
  )
  dq = call(*scalars, lo, hi, npd, *args)

  # dk, dv: per key block (and query head), over the query blocks that see it.
  qlo, qhi = _bwd_tables(geo, ints)
  qlo, qhi = qlo.reshape(-1), qhi.reshape(-1)  # indexed [bi * nkt + kb]
  nkt = geo.num_prefix_blocks + geo.num_rest_blocks
  ns = _bwd_steps(geo)

  def dkdv_kernel(qoff, koff, plen, rlen, lo_r, hi_r, q_ref, k_ref, v_ref, do_ref, l_ref, d_ref, *refs):
    if seg:
      qs_ref, ks_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
    else:
      dk_ref, dv_ref, dk_sc, dv_sc = refs
    bi, kb, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(t == 0)
    def _init():
      dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
      dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

    lo_k, hi_k = lo_r[bi * nkt + kb], hi_r[bi * nkt + kb]

    @pl.when(t < hi_k - lo_k)
    def _step():
      qb = _q_block(geo, t, lo_k, hi_k)
      vis_t = _block_visible(geo, qb, kb, bq, bk, qoff[bi], koff[bi], plen[bi], rlen[bi],
                             qs_ref[...] if seg else None, ks_ref[...] if seg else None, keys_first=True)
      dk, dv = _dkdv_tile(geo, q_ref[...], k_ref[...], v_ref[...], do_ref[...], l_ref[...], d_ref[...], vis_t,
                          dk_sc[...], dv_sc[...])
      dk_sc[...], dv_sc[...] = dk, dv

    @pl.when(t == ns - 1)
    def _done():
      dk_ref[...] = dk_sc[...]
      dv_ref[...] = dv_sc[...]

  def qb_map(bi, hi_, kb, t, qoff, koff, plen, rlen, lo_r, hi_r):
    return bi, hi_, _q_block(geo, t, lo_r[bi * nkt + kb], hi_r[bi * nkt + kb]), 0

  def row_map(bi, hi_, kb, t, qoff, koff, plen, rlen, lo_r, hi_r):
    return bi, hi_, 0, _q_block(geo, t, lo_r[bi * nkt + kb], hi_r[bi * nkt + kb])

  def kb_map(bi, hi_, kb, t, *_):
    return bi, lax.div(hi_, g), kb, 0

  def out_map(bi, hi_, kb, t, *_):
    return bi, hi_, kb, 0

  in_specs = [
      pl.BlockSpec((None, None, bq, geo.head_dim), qb_map),
      pl.BlockSpec((None, None, bk, geo.head_dim), kb_map),
      pl.BlockSpec((None, None, bk, geo.v_dim), kb_map),
      pl.BlockSpec((None, None, bq, geo.v_dim), qb_map),
      pl.BlockSpec((None, None, 1, bq), row_map),
      pl.BlockSpec((None, None, 1, bq), row_map),
  ]
  args = [q, k, v, do, lse_b[:, :, None, :], delta[:, :, None, :]]
  if seg:
    in_specs += [
        pl.BlockSpec((None, 1, bq), lambda bi, hi_, kb, t, qoff, koff, plen, rlen, lo_r, hi_r: (
            bi, 0, _q_block(geo, t, lo_r[bi * nkt + kb], hi_r[bi * nkt + kb]))),
        pl.BlockSpec((None, bk, 1), lambda bi, hi_, kb, t, *_: (bi, _rest_block(geo, kb), 0)),
    ]
    args += [ints.q_seg[:, None, :], ints.k_seg[:, :, None]]
  out_specs = [
      pl.BlockSpec((None, None, bk, geo.head_dim), out_map),
      pl.BlockSpec((None, None, bk, geo.v_dim), out_map),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((b, h, geo.tk_pad, geo.head_dim), _F32),
      jax.ShapeDtypeStruct((b, h, geo.tk_pad, geo.v_dim), _F32),
  ]
  scratch = [pltpu.VMEM((bk, geo.head_dim), _F32), pltpu.VMEM((bk, geo.v_dim), _F32)]
  call = _tpu_call(geo, dkdv_kernel, 6, (b, h, nkt, ns), in_specs, out_specs, out_shape, scratch,
                   "flash_attention_bwd_dkdv")
  dk, dv = call(*scalars, qlo, qhi, *args)
  return dq, _sum_groups(geo, dk, k.dtype), _sum_groups(geo, dv, v.dtype)


def _sum_groups(geo: Geometry, x, dtype):
  """Per-query-head key gradients [b, h, Tkp, d] -> per-kv-head [b, hkv, Tkp, d]."""
  return x.reshape(geo.batch, geo.kv_heads, geo.group, *x.shape[2:]).sum(axis=2).astype(dtype)


# ----------------------------------------------------------------------------------------------------------
# GPU (Triton) kernels: one program per (query or key block, batch, head), looping over visible blocks.


def _triton_call(geo: Geometry, kernel, grid, in_specs, out_specs, out_shape, name):
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=None if _interpret(geo) else plgpu.CompilerParams(
          num_warps=TRITON_NUM_WARPS, num_stages=TRITON_NUM_STAGES),
      interpret=_interpret(geo),
      name=name,
  )


def _meta(geo: Geometry, ints: Ints):
  """Per-batch scalars for Triton (which has no scalar prefetch): [b, 8] int32 rows of
  (q_offset, k_offset, prefix_len, rest_len, visible prefix blocks, 0, 0, 0)."""
  npd = jnp.broadcast_to(prefix_blocks(geo, ints), (geo.batch,))
  z = jnp.zeros((geo.batch,), jnp.int32)
  return jnp.stack([ints.q_offset, ints.k_offset, ints.prefix_len, ints.rest_len, npd, z, z, z], axis=1)


def _triton_forward(geo: Geometry, q, k, v, ints: Ints):
  b, h, g, bq, bk = geo.batch, geo.heads, geo.group, geo.block_q, geo.block_k
  lo, hi, _ = _fwd_tables(geo, ints)
  ranges = jnp.stack([lo, hi], axis=-1)  # [b, nq, 2]
  seg = geo.has_segments

  def kernel(meta_ref, rng_ref, q_ref, k_ref, v_ref, *refs):
    if seg:
      qs_ref, ks_ref, o_ref, lse_ref = refs
    else:
      o_ref, lse_ref = refs
    qi = pl.program_id(0)
    qoff, koff, plen, rlen, npd = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3], meta_ref[4]
    qblk = q_ref[...]
    qidx = qi * bq + jnp.arange(bq, dtype=jnp.int32)[:, None]
    q_seg = qs_ref[...][:, None] if seg else None

    def body(kb, carry):
      start = pl.multiple_of(kb * bk, bk)
      slot = start + jnp.arange(bk, dtype=jnp.int32)[None, :]
      k_seg = None
      if seg:
        k_seg = ks_ref[pl.ds(pl.multiple_of(jnp.maximum(start - geo.prefix_pad, 0), bk), bk)][None, :]
      vis = _tile_visible(geo, qidx, slot, qoff, koff, plen, rlen, q_seg, k_seg)
      return _fwd_tile(geo, qblk, k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :], vis, *carry)

    carry = (
        jnp.full((bq, 1), -jnp.inf, _F32),
        jnp.zeros((bq, 1), _F32),
        jnp.zeros((bq, geo.v_dim), _F32),
    )
    if geo.num_prefix_blocks:
      carry = lax.fori_loop(0, npd, body, carry)
    if geo.num_rest_blocks:
      npb = geo.num_prefix_blocks
      carry = lax.fori_loop(rng_ref[0] + npb, rng_ref[1] + npb, body, carry)
    o, lse = _finalize(*carry)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]

  q_map = lambda qi, bi, hi_: (bi, hi_, qi, 0)
  kv_map = lambda qi, bi, hi_: (bi, lax.div(hi_, g), 0, 0)
  in_specs = [
      pl.BlockSpec((None, 8), lambda qi, bi, hi_: (bi, 0)),
      pl.BlockSpec((None, None, 2), lambda qi, bi, hi_: (bi, qi, 0)),
      pl.BlockSpec((None, None, bq, geo.head_dim), q_map),
      pl.BlockSpec((None, None, geo.tk_pad, geo.head_dim), kv_map),
      pl.BlockSpec((None, None, geo.tk_pad, geo.v_dim), kv_map),
  ]
  args = [_meta(geo, ints), ranges, q, k, v]
  if seg:
    in_specs += [
        pl.BlockSpec((None, bq), lambda qi, bi, hi_: (bi, qi)),
        pl.BlockSpec((None, geo.rest_pad), lambda qi, bi, hi_: (bi, 0)),
    ]
    args += [ints.q_seg, ints.k_seg]
  out_specs = [
      pl.BlockSpec((None, None, bq, geo.v_dim), q_map),
      pl.BlockSpec((None, None, bq), lambda qi, bi, hi_: (bi, hi_, qi)),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((b, h, geo.tq_pad, geo.v_dim), q.dtype),
      jax.ShapeDtypeStruct((b, h, geo.tq_pad), _F32),
  ]
  call = _triton_call(geo, kernel, (geo.num_q_blocks, b, h), in_specs, out_specs, out_shape,
                      "flash_attention_fwd")
  return tuple(call(*args))


def _triton_backward(geo: Geometry, q, k, v, o, lse, do, dlse, ints: Ints):
  b, h, g, bq, bk = geo.batch, geo.heads, geo.group, geo.block_q, geo.block_k
  lse_b, delta = backward_rowterms(o, do, lse, dlse)
  do = do.astype(q.dtype)
  seg = geo.has_segments
  meta = _meta(geo, ints)
  npb = geo.num_prefix_blocks

  # dq: one program per query block, looping over its visible key blocks.
  lo, hi, _ = _fwd_tables(geo, ints)
  ranges = jnp.stack([lo, hi], axis=-1)  # [b, nq, 2]

  def dq_kernel(meta_ref, rng_ref, q_ref, k_ref, v_ref, do_ref, l_ref, d_ref, *refs):
    if seg:
      qs_ref, ks_ref, dq_ref = refs
    else:
      (dq_ref,) = refs
    qi = pl.program_id(0)
    qoff, koff, plen, rlen, npd = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3], meta_ref[4]
    qblk, doblk = q_ref[...], do_ref[...]
    lblk, dblk = l_ref[...][:, None], d_ref[...][:, None]
    qidx = qi * bq + jnp.arange(bq, dtype=jnp.int32)[:, None]
    q_seg = qs_ref[...][:, None] if seg else None

    def body(kb, dq):
      start = pl.multiple_of(kb * bk, bk)
      slot = start + jnp.arange(bk, dtype=jnp.int32)[None, :]
      k_seg = None
      if seg:
        k_seg = ks_ref[pl.ds(pl.multiple_of(jnp.maximum(start - geo.prefix_pad, 0), bk), bk)][None, :]
      vis = _tile_visible(geo, qidx, slot, qoff, koff, plen, rlen, q_seg, k_seg)
      return _dq_tile(geo, qblk, k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :], doblk, lblk, dblk,
                      vis, dq)

    dq = jnp.zeros((bq, geo.head_dim), _F32)
    if npb:
      dq = lax.fori_loop(0, npd, body, dq)
    if geo.num_rest_blocks:
      dq = lax.fori_loop(rng_ref[0] + npb, rng_ref[1] + npb, body, dq)
    dq_ref[...] = dq.astype(dq_ref.dtype)

  q_map = lambda qi, bi, hi_: (bi, hi_, qi, 0)
  row_map = lambda qi, bi, hi_: (bi, hi_, qi)
  kv_map = lambda qi, bi, hi_: (bi, lax.div(hi_, g), 0, 0)
  in_specs = [
      pl.BlockSpec((None, 8), lambda qi, bi, hi_: (bi, 0)),
      pl.BlockSpec((None, None, 2), lambda qi, bi, hi_: (bi, qi, 0)),
      pl.BlockSpec((None, None, bq, geo.head_dim), q_map),
      pl.BlockSpec((None, None, geo.tk_pad, geo.head_dim), kv_map),
      pl.BlockSpec((None, None, geo.tk_pad, geo.v_dim), kv_map),
      pl.BlockSpec((None, None, bq, geo.v_dim), q_map),
      pl.BlockSpec((None, None, bq), row_map),
      pl.BlockSpec((None, None, bq), row_map),
  ]
  args = [meta, ranges, q, k, v, do, lse_b, delta]
  if seg:
    in_specs += [
        pl.BlockSpec((None, bq), lambda qi, bi, hi_: (bi, qi)),
        pl.BlockSpec((None, geo.rest_pad), lambda qi, bi, hi_: (bi, 0)),
    ]
    args += [ints.q_seg, ints.k_seg]
  call = _triton_call(
      geo, dq_kernel, (geo.num_q_blocks, b, h), in_specs,
      pl.BlockSpec((None, None, bq, geo.head_dim), q_map),
      jax.ShapeDtypeStruct((b, h, geo.tq_pad, geo.head_dim), q.dtype), "flash_attention_bwd_dq",
  )
  dq = call(*args)

  # dk, dv: one program per key block and query head, looping over the query blocks that see it.
  qlo, qhi = _bwd_tables(geo, ints)
  qranges = jnp.stack([qlo, qhi], axis=-1)  # [b, nkt, 2]
  nkt = npb + geo.num_rest_blocks

  def dkdv_kernel(meta_ref, rng_ref, q_ref, k_ref, v_ref, do_ref, l_ref, d_ref, *refs):
    if seg:
      qs_ref, ks_ref, dk_ref, dv_ref = refs
    else:
      dk_ref, dv_ref = refs
    kb = pl.program_id(0)
    qoff, koff, plen, rlen = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]
    kblk, vblk = k_ref[...], v_ref[...]
    slot = kb * bk + jnp.arange(bk, dtype=jnp.int32)[:, None]
    k_seg = ks_ref[...][:, None] if seg else None

    def body(qb, carry):
      start = pl.multiple_of(qb * bq, bq)
      qidx = start + jnp.arange(bq, dtype=jnp.int32)[None, :]
      q_seg = qs_ref[pl.ds(start, bq)][None, :] if seg else None
      vis_t = _tile_visible(geo, qidx, slot, qoff, koff, plen, rlen, q_seg, k_seg)
      return _dkdv_tile(geo, q_ref[pl.ds(start, bq), :], kblk, vblk, do_ref[pl.ds(start, bq), :],
                        l_ref[pl.ds(start, bq)][None, :], d_ref[pl.ds(start, bq)][None, :], vis_t, *carry)

    carry = (jnp.zeros((bk, geo.head_dim), _F32), jnp.zeros((bk, geo.v_dim), _F32))
    dk, dv = lax.fori_loop(rng_ref[0], rng_ref[1], body, carry)
    dk_ref[...] = dk
    dv_ref[...] = dv

  full_q = lambda kb, bi, hi_: (bi, hi_, 0, 0)
  full_row = lambda kb, bi, hi_: (bi, hi_, 0)
  kb_map = lambda kb, bi, hi_: (bi, lax.div(hi_, g), kb, 0)
  out_map = lambda kb, bi, hi_: (bi, hi_, kb, 0)
  in_specs = [
      pl.BlockSpec((None, 8), lambda kb, bi, hi_: (bi, 0)),
      pl.BlockSpec((None, None, 2), lambda kb, bi, hi_: (bi, kb, 0)),
      pl.BlockSpec((None, None, geo.tq_pad, geo.head_dim), full_q),
      pl.BlockSpec((None, None, bk, geo.head_dim), kb_map),
      pl.BlockSpec((None, None, bk, geo.v_dim), kb_map),
      pl.BlockSpec((None, None, geo.tq_pad, geo.v_dim), full_q),
      pl.BlockSpec((None, None, geo.tq_pad), full_row),
      pl.BlockSpec((None, None, geo.tq_pad), full_row),
  ]
  args = [meta, qranges, q, k, v, do, lse_b, delta]
  if seg:
    in_specs += [
        pl.BlockSpec((None, geo.tq_pad), lambda kb, bi, hi_: (bi, 0)),
        pl.BlockSpec((None, bk), lambda kb, bi, hi_: (bi, jnp.clip(kb - npb, 0, max(geo.num_rest_blocks - 1, 0)))),
    ]
    args += [ints.q_seg, ints.k_seg]
  out_specs = [
      pl.BlockSpec((None, None, bk, geo.head_dim), out_map),
      pl.BlockSpec((None, None, bk, geo.v_dim), out_map),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((b, h, geo.tk_pad, geo.head_dim), _F32),
      jax.ShapeDtypeStruct((b, h, geo.tk_pad, geo.v_dim), _F32),
  ]
  call = _triton_call(geo, dkdv_kernel, (nkt, b, h), in_specs, out_specs, out_shape, "flash_attention_bwd_dkdv")
  dk, dv = call(*args)
  return dq, _sum_groups(geo, dk, k.dtype), _sum_groups(geo, dv, v.dtype)


# ----------------------------------------------------------------------------------------------------------
# Entry points used by `kernels.attention`'s custom_vjp.


def pallas_forward(geo: Geometry, q, k, v, ints: Ints):
  """q `[b, h, Tqp, d]`, k/v `[b, hkv, Tkp, d|dv]` -> (o `[b, h, Tqp, dv]`, lse `[b, h, Tqp]` f32)."""
  if _triton(geo):
    return _triton_forward(geo, q, k, v, ints)
  return _tpu_forward(geo, q, k, v, ints)


def pallas_backward(geo: Geometry, q, k, v, o, lse, do, dlse, ints: Ints):
  """(dq `[b, h, Tqp, d]`, dk, dv `[b, hkv, Tkp, d|dv]`) from the forward's o and lse and the cotangents."""
  if _triton(geo):
    return _triton_backward(geo, q, k, v, o, lse, do, dlse, ints)
  return _tpu_backward(geo, q, k, v, o, lse, do, dlse, ints)
