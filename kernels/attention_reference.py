"""The naive definition of `kernels.attention`: materialized scores and mask, float32 math.

This is the ground truth the other implementations are tested against. Memory is O(Tq * Tk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(
    tq: int,
    tk: int,
    *,
    causal: bool,
    window: int | None,
    num_prefix: int,
    q_offset,
    k_offset,
    kv_lengths=None,
    q_segment_ids=None,
    kv_segment_ids=None,
) -> jax.Array:
  """Boolean visibility mask `[batch or 1, tq, tk]` (True: the query may attend to the key).

  Key j < num_prefix is a prefix key, visible to every query (subject only to kv_lengths). Key
  num_prefix + j has position k_offset + j; query i has position q_offset + i. q_offset, k_offset are
  ints or `[batch]` arrays.
  """
  q_offset = jnp.asarray(q_offset, jnp.int32).reshape(-1, 1, 1)
  k_offset = jnp.asarray(k_offset, jnp.int32).reshape(-1, 1, 1)
  qpos = q_offset + jnp.arange(tq, dtype=jnp.int32)[None, :, None]
  kidx = jnp.arange(tk, dtype=jnp.int32)[None, None, :]
  kpos = k_offset + kidx - num_prefix
  visible = jnp.ones((1, tq, tk), dtype=bool)
  if causal:
    visible = visible & (kpos <= qpos)
  if window is not None:
    visible = visible & (qpos - kpos < window)
  if q_segment_ids is not None:
    kv_seg = jnp.pad(kv_segment_ids, ((0, 0), (num_prefix, 0)))
    visible = visible & (q_segment_ids[:, :, None] == kv_seg[:, None, :])
  is_prefix = kidx < num_prefix
  visible = visible | is_prefix
  if kv_lengths is not None:
    visible = visible & (kidx < jnp.asarray(kv_lengths, jnp.int32).reshape(-1, 1, 1))
  return visible


def attention_reference(
    q, k, v, *, causal, window, num_prefix, q_offset, k_offset, kv_lengths, q_segment_ids, kv_segment_ids, scale
):
  """Materialized attention. Shapes as in `kernels.attention`; returns (o [b, tq, h, dv] in q.dtype, lse [b, tq, h] f32).

  A query that sees no key gets o = 0 and lse = -inf.
  """
  b, tq, h, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  group = h // hkv
  qf = q.astype(jnp.float32).reshape(b, tq, hkv, group, d)
  kf = k.astype(jnp.float32)
  vf = v.astype(jnp.float32)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, kf, precision=jax.lax.Precision.HIGHEST) * scale
  mask = attention_mask(
      tq, tk, causal=causal, window=window, num_prefix=num_prefix, q_offset=q_offset, k_offset=k_offset,
      kv_lengths=kv_lengths, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
  )[:, None, None]
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(mask, jnp.exp(s - m_safe), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p / jnp.where(l > 0, l, 1.0), vf, precision=jax.lax.Precision.HIGHEST)
  lse = jnp.where(l > 0, m_safe + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]  # [b, hkv, g, tq]
  lse = lse.reshape(b, h, tq).transpose(0, 2, 1)
  return o.reshape(b, tq, h, v.shape[-1]).astype(q.dtype), lse
