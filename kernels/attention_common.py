"""What the blockwise attention implementations (xla, pallas) share: static geometry, padded layouts,
the per-tile visibility rule and the ranges of key (query) blocks that a query (key) block can see.

Internal layout. Keys are split into the `num_prefix` prefix keys and the `R = k_len - num_prefix` other
("rest") keys, each padded to a multiple of the key block and concatenated, so that every key block is
either all prefix or all rest: key slot `s < Pp` is prefix key `s`, slot `Pp + r` is rest key `r` (position
`k_offset + r`). This keeps the prefix out of any materialized mask and lets a loop treat prefix blocks
(visible to every query) apart from rest blocks (causal/window ranges).

  q  `[batch, heads, Tqp, d]`       Tqp = q_len rounded up to the query block
  k  `[batch, kv_heads, Pp + Rp, d]`, v likewise with v_dim
  lse `[batch, heads, Tqp]` float32
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def round_up(a: int, b: int) -> int:
  return cdiv(a, b) * b


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static description of one attention call (hashable: it is a custom_vjp nondiff argument)."""

  batch: int
  tq: int
  tk: int
  heads: int
  kv_heads: int
  head_dim: int
  v_dim: int
  causal: bool
  window: int | None
  num_prefix: int
  scale: float
  block_q: int
  block_k: int
  has_segments: bool
  impl: str  # "xla", "pallas_tpu", "pallas_triton", with "_interpret" for the interpreter
  dtype: str = "float32"

  @property
  def group(self) -> int:
    return self.heads // self.kv_heads

  @property
  def rest(self) -> int:
    return self.tk - self.num_prefix

  @property
  def tq_pad(self) -> int:
    return round_up(self.tq, self.block_q)

  @property
  def prefix_pad(self) -> int:
    return round_up(self.num_prefix, self.block_k)

  @property
  def rest_pad(self) -> int:
    return round_up(self.rest, self.block_k)

  @property
  def tk_pad(self) -> int:
    return self.prefix_pad + self.rest_pad

  @property
  def num_q_blocks(self) -> int:
    return self.tq_pad // self.block_q

  @property
  def num_prefix_blocks(self) -> int:
    return self.prefix_pad // self.block_k

  @property
  def num_rest_blocks(self) -> int:
    return self.rest_pad // self.block_k

  @property
  def max_rest_blocks_per_q_block(self) -> int:
    """A static bound on the rest key blocks one query block can see (the grid's key axis on TPU)."""
    n = self.num_rest_blocks
    if self.window is not None and self.causal:
      # Visible positions of a query block span block_q + window - 1 consecutive keys.
      n = min(n, cdiv(self.block_q + self.window - 1, self.block_k) + 1)
    return max(n, 1)

  @property
  def max_q_blocks_per_rest_block(self) -> int:
    """A static bound on the query blocks that see one rest key block (the grid's query axis on TPU)."""
    n = self.num_q_blocks
    if self.window is not None and self.causal:
      n = min(n, cdiv(self.block_k + self.window - 1, self.block_q) + 1)
    return max(n, 1)


class Ints(NamedTuple):
  """Per-batch integer inputs, normalized. All int32."""

  q_offset: jax.Array  # [b]
  k_offset: jax.Array  # [b]
  prefix_len: jax.Array  # [b] visible prefix keys (kv_lengths clipped to num_prefix)
  rest_len: jax.Array  # [b] visible rest keys (kv_lengths - num_prefix, clipped to [0, R])
  q_seg: jax.Array | None  # [b, Tqp]
  k_seg: jax.Array | None  # [b, Rp] segment ids of the rest keys


def make_ints(geo: Geometry, q_offset, k_offset, kv_lengths, q_seg, kv_seg) -> Ints:
  b = geo.batch

  def per_batch(x):
    x = jnp.asarray(x, jnp.int32)
    if x.ndim > 1 or (x.ndim == 1 and x.shape[0] not in (1, b)):
      raise ValueError(f"attention: offsets must be ints or [batch]={b} arrays, got shape {x.shape}.")
    return jnp.broadcast_to(x.reshape(-1), (b,))

  kv_len = jnp.full((b,), geo.tk, jnp.int32) if kv_lengths is None else per_batch(kv_lengths)
  prefix_len = jnp.clip(kv_len, 0, geo.num_prefix)
  rest_len = jnp.clip(kv_len - geo.num_prefix, 0, geo.rest)
  if q_seg is not None:
    q_seg = jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, geo.tq_pad - geo.tq)))
    kv_seg = jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, geo.rest_pad - geo.rest)))
  return Ints(per_batch(q_offset), per_batch(k_offset), prefix_len, rest_len, q_seg, kv_seg)


def to_blocked_layout(geo: Geometry, q, k, v):
  """[b, t, h, d] inputs -> the padded internal layout (see the module docstring)."""
  qt = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, geo.tq_pad - geo.tq), (0, 0)))

  def keys(x):
    x = x.transpose(0, 2, 1, 3)
    p = geo.num_prefix
    pre = jnp.pad(x[:, :, :p], ((0, 0), (0, 0), (0, geo.prefix_pad - p), (0, 0)))
    rest = jnp.pad(x[:, :, p:], ((0, 0), (0, 0), (0, geo.rest_pad - geo.rest), (0, 0)))
    return jnp.concatenate([pre, rest], axis=2) if geo.prefix_pad else rest

  return qt, keys(k), keys(v)


def from_blocked_q(geo: Geometry, x):
  """[b, h, Tqp, d] -> [b, tq, h, d]."""
  return x[:, :, : geo.tq].transpose(0, 2, 1, 3)


def from_blocked_k(geo: Geometry, x):
  """[b, hkv, Pp + Rp, d] -> [b, tk, hkv, d]."""
  pre = x[:, :, : geo.num_prefix]
  rest = x[:, :, geo.prefix_pad : geo.prefix_pad + geo.rest]
  return jnp.concatenate([pre, rest], axis=2).transpose(0, 2, 1, 3)


def visible(geo: Geometry, qi, r, *, q_offset, k_offset, rest_len, q_seg=None, k_seg=None):
  """Visibility of rest key `r` to query `qi` (broadcastable int arrays; offsets/lengths broadcast too)."""
  vis = r < rest_len
  qpos = q_offset + qi
  kpos = k_offset + r
  if geo.causal:
    vis = vis & (kpos <= qpos)
  if geo.window is not None:
    vis = vis & (qpos - kpos < geo.window)
  if q_seg is not None:
    vis = vis & (q_seg == k_seg)
  return vis


def rest_blocks_for_q_block(geo: Geometry, ints: Ints, qb):
  """[lo, hi) of the rest key blocks that query block `qb` (int or int array) can see, over the whole batch.

  Blocks outside it are fully masked for every sequence, so the loops skip them.
  """
  q_first = qb * geo.block_q
  q_last = jnp.minimum(q_first + geo.block_q, geo.tq) - 1
  qpos_min = jnp.min(ints.q_offset) + q_first
  qpos_max = jnp.max(ints.q_offset) + q_last
  hi = jnp.max(ints.rest_len)  # exclusive, in rest keys
  if geo.causal:
    hi = jnp.minimum(hi, qpos_max - jnp.min(ints.k_offset) + 1)
  lo = jnp.zeros_like(hi)
  if geo.window is not None:
    lo = qpos_min - geo.window + 1 - jnp.max(ints.k_offset)
  lo = jnp.broadcast_to(jnp.clip(lo, 0, geo.rest_pad), jnp.shape(q_first))
  hi = jnp.broadcast_to(jnp.clip(hi, 0, geo.rest_pad), jnp.shape(q_first))
  lo_b = lo // geo.block_k
  hi_b = (hi + geo.block_k - 1) // geo.block_k
  return lo_b.astype(jnp.int32), jnp.maximum(hi_b, lo_b).astype(jnp.int32)


def q_blocks_for_rest_block(geo: Geometry, ints: Ints, kb):
  """[lo, hi) of the query blocks that can see rest key block `kb` (int or int array), over the batch."""
  r_first = kb * geo.block_k
  r_last = jnp.minimum(r_first + geo.block_k, max(geo.rest, 1)) - 1
  kpos_min = jnp.min(ints.k_offset) + r_first
  kpos_max = jnp.max(ints.k_offset) + r_last
  lo = jnp.zeros_like(kpos_min)
  hi = jnp.full_like(kpos_min, geo.tq)
  if geo.causal:
    lo = kpos_min - jnp.max(ints.q_offset)
  if geo.window is not None:
    hi = kpos_max + geo.window - 1 - jnp.min(ints.q_offset) + 1
  # A key block past every sequence's length is seen by nobody.
  hi = jnp.where(r_first < jnp.max(ints.rest_len), hi, 0)
  lo = jnp.clip(lo, 0, geo.tq)
  hi = jnp.clip(hi, 0, geo.tq)
  lo_b = lo // geo.block_q
  hi_b = (hi + geo.block_q - 1) // geo.block_q
  return lo_b.astype(jnp.int32), jnp.maximum(hi_b, lo_b).astype(jnp.int32)


def prefix_blocks(geo: Geometry, ints: Ints):
  """Number of prefix key blocks with a visible key for some sequence (<= geo.num_prefix_blocks)."""
  return ((jnp.max(ints.prefix_len) + geo.block_k - 1) // geo.block_k).astype(jnp.int32)
