"""Transformer++ self-attention: RoPE, grouped-query attention, no biases, through `kernels.attention`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from memarch import context_parallel
from memarch import sharding as shard_lib
from memarch.layers.common import (apply_rope, constrain, dense, dense_init, dtype_from_name, param_with_axes,
                                   residual_out_init)

HEADS_ACT = ("act_batch", "act_length", "act_heads", None)  # q, k, v, o: [batch, seq, heads, head_dim]
CACHE_ACT = ("act_batch", None, "act_heads", None)  # the KV cache [batch, max_len, kv_heads, head_dim]
# A cache call with at most this many new tokens is a decode step: kernels.attention(decode=True) reads the
# cache in place instead of copying all of it into the kernel's layout (prefill keeps the blocked kernel).
DECODE_MAX_TOKENS = 16

class Attention(nn.Module):
  """Causal multi-head self-attention with RoPE and GQA.

  Config keys (model section): embed_dim, num_heads, num_kv_heads, head_dim (0: embed_dim // num_heads),
  rope_base, window (0: full causal attention, w > 0: sliding window of w keys), attention_impl,
  compute_dtype, num_layers.

  Call: x `[batch, seq, embed]`, positions `[batch, seq]` (RoPE), segment_ids `[batch, seq]` or None.
  With `cache` (`{"k", "v"}`: `[batch, max_len, kv_heads, head_dim]`) and `cache_index` (tokens already
  in the cache), the new keys/values are written at cache_index and the queries attend over the cache.
  Returns `(y [batch, seq, embed], new_cache)`.
  """

  config: Any

  def _dims(self):
    c = self.config
    head_dim = c.head_dim or c.embed_dim // c.num_heads
    kv_heads = c.num_kv_heads or c.num_heads
    return c.num_heads, kv_heads, head_dim

  @nn.compact
  def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_index=None):
    c = self.config
    dtype = dtype_from_name(c.compute_dtype)
    heads, kv_heads, head_dim = self._dims()
    e = x.shape[-1]
    wq = param_with_axes(self, "wq", dense_init, (e, heads, head_dim), ("embed", "heads", "kv"))
    wk = param_with_axes(self, "wk", dense_init, (e, kv_heads, head_dim), ("embed", "heads", "kv"))
    wv = param_with_axes(self, "wv", dense_init, (e, kv_heads, head_dim), ("embed", "heads", "kv"))
    wo = param_with_axes(
        self, "wo", lambda k, s, d: residual_out_init(c.num_layers)(k, (heads * head_dim, e), d).reshape(s),
        (heads, head_dim, e), ("heads", "kv", "embed"),
    )
    x = x.astype(dtype)
    q, k, v = dense(x, wq), dense(x, wk), dense(x, wv)
    q = constrain(apply_rope(q, positions, c.rope_base), HEADS_ACT)
    k = constrain(apply_rope(k, positions, c.rope_base), HEADS_ACT)
    v = constrain(v, HEADS_ACT)
    window = c.window or None
    if cache is None:
      # Ring attention when a `sequence` mesh axis splits the sequence (memarch.context_parallel).
      o = context_parallel.attention(q, k, v, causal=True, window=window, segment_ids=segment_ids,
                                     impl=c.attention_impl)
      new_cache = None
    elif window:
      # Sliding window: the cache keeps only the last `window` keys (a fixed size whatever the context).
      o, new_cache = window_cache_attention(q, k, v, cache, cache_index, window, impl=c.attention_impl)
    else:
      t = x.shape[1]
      ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1)
      cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1)
      lengths = jnp.full((x.shape[0],), cache_index + t, jnp.int32)
      o = shard_lib.attention(
          q, ck.astype(dtype), cv.astype(dtype), causal=True, q_offset=cache_index,
          kv_lengths=lengths, impl=c.attention_impl, decode=t <= DECODE_MAX_TOKENS,
      )
      new_cache = {"k": constrain(ck, CACHE_ACT), "v": constrain(cv, CACHE_ACT)}
    y = dense(o, wo, contract=2)
    return y, new_cache

  def init_cache(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    """Zeros `{"k", "v"}` of shape `[batch, max_len, kv_heads, head_dim]` in the compute dtype."""
    _, kv_heads, head_dim = self._dims()
    dtype = dtype_from_name(self.config.compute_dtype)
    if self.config.window:  # sliding window: `{"window_k", "window_v"}` of the last `window` keys instead
      shape = (batch, int(self.config.window), kv_heads, head_dim)
      return {"window_k": jnp.zeros(shape, dtype), "window_v": jnp.zeros(shape, dtype)}
    shape = (batch, max_len, kv_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def window_cache_attention(q, k, v, cache, cache_index, window: int, *, prefix=None, impl: str = "auto"):
  """Sliding-window attention of t new tokens against a cache of the previous `window` keys and values.

  q `[b, t, h, d]`, k/v `[b, t, kv_heads, d]` (the new tokens, at positions cache_index..cache_index+t-1),
  cache `{"window_k", "window_v"}` `[b, window, kv_heads, d]` (the keys of positions cache_index-window..
  cache_index-1; slots before position 0 hold nothing and are masked), prefix: None or (k, v) of persistent
  tokens visible to every query. Returns (o `[b, t, h, d]`, the cache after these tokens). Any t works:
  prefill and decode are the same call.
  """
  dtype = q.dtype
  b, t = q.shape[:2]
  kw = jnp.concatenate([cache["window_k"].astype(dtype), k.astype(dtype)], axis=1)  # [b, window + t, kv, d]
  vw = jnp.concatenate([cache["window_v"].astype(dtype), v.astype(dtype)], axis=1)
  k_offset = cache_index - window
  kv_seg = jnp.where(k_offset + jnp.arange(window + t) >= 0, 0, 1).astype(jnp.int32)
  kw, vw, n_p = with_prefix(prefix, kw, vw)
  o = shard_lib.attention(
      q, kw, vw, causal=True, window=window, num_prefix=n_p, q_offset=cache_index, k_offset=k_offset,
      segment_ids=(jnp.zeros((b, t), jnp.int32), jnp.broadcast_to(kv_seg, (b, window + t))), impl=impl,
  )
  return o, {"window_k": kw[:, n_p + t:], "window_v": vw[:, n_p + t:]}


def with_prefix(prefix, k, v):
  """[prefix; k], [prefix; v] along the sequence axis, and the number of prefix keys (prefix None: k, v, 0)."""
  if prefix is None:
    return k, v, 0
  kp, vp = prefix
  return jnp.concatenate([kp, k], axis=1), jnp.concatenate([vp, v], axis=1), kp.shape[1]
