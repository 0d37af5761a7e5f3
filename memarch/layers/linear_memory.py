"""Linear-memory blocks on `kernels.linear_scan`: the gated delta rule family, and Based.

`LinearMemory` (block "linear_memory") is one layer for four memory rules (`model.memory_rule`), with the
state S `[k_dim, v_dim]` per head (float32) and, per token t (DESIGN.md, kernels.linear_scan):

    linear       S_t = S_{t-1} + k_t v_t^T                                         (linear attention)
    simple_gla   S_t = exp(g_t) S_{t-1} + k_t v_t^T                                (RetNet / Mamba-2 decay)
    delta        S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T                (DeltaNet)
    gated_delta  S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T  (Gated DeltaNet)
    o_t = S_t^T q_t / sqrt(k_dim)

around which the layer computes (x `[batch, seq, embed]`, h heads, dk = head_dim, dv = value_dim):

    q, k, v = SiLU(ShortConv(x W_q)), SiLU(ShortConv(x W_k)), SiLU(ShortConv(x W_v))   (SiLU only if no conv)
    q, k    = q / |q|, k / |k|                                  (delta rules: the delta write is a contraction)
    beta    = sigmoid(x W_b)                                    (delta rules)
    g       = -exp(A_log) * softplus(x W_a + dt_bias)           (simple_gla, gated_delta; Mamba-2, per head)
    y       = (RMSNorm(o) * SiLU(x W_g)) W_o                    (RMSNorm over dv, weights shared by the heads)

as Gated DeltaNet (Yang et al. 2024) and flash-linear-attention's layers do. The per-token pieces are
`LinearMemory.features` (projections, convolutions, gates) and `LinearMemory.readout` (output norm, gate,
projection), built on the module-level functions below, so that Mixture-of-Memories reuses them.

`BasedAttention` (block "based") is Based's linear attention (Arora et al. 2024) on a second-order Taylor
feature map, through the same scan. Based alternates it with sliding-window attention: that is a config
choice (`layer_blocks` with "attention" and `model.window`).

Both blocks keep a fixed-size decoding cache whatever the context length. They carry their state across
packed documents (segment ids are ignored, DESIGN.md "data").
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import kernels
from memarch import context_parallel
from memarch.layers.common import (STATE_ACT, RMSNorm, constrain, dense, dense_init, dtype_from_name, head_out_param,
                                   l2_normalize, param_with_axes)
from memarch.layers.short_conv import ShortConv

MEMORY_RULES = ("linear", "simple_gla", "delta", "gated_delta")


def rule_flags(rule: str) -> tuple[bool, bool]:
  """(uses the decay g, uses the delta rule's beta) for a memory rule, with a clear error for others."""
  if rule not in MEMORY_RULES:
    raise ValueError(f"model.memory_rule must be one of {MEMORY_RULES}, got {rule!r}.")
  return rule in ("simple_gla", "gated_delta"), rule in ("delta", "gated_delta")


def memory_dims(config) -> tuple[int, int, int]:
  """(num_heads, k_dim, v_dim) of a linear memory: head_dim 0 means embed_dim // num_heads, value_dim 0
  means head_dim."""
  c = config
  if c.num_heads < 1:
    raise ValueError(f"model.num_heads must be >= 1, got {c.num_heads}.")
  dk = c.head_dim or c.embed_dim // c.num_heads
  dv = c.value_dim or dk
  if dk < 1 or dv < 1:
    raise ValueError(f"linear memory head dims must be >= 1; got head_dim {dk}, value_dim {dv} "
                     f"(embed_dim {c.embed_dim}, num_heads {c.num_heads}).")
  return c.num_heads, dk, dv


# ----------------------------------------------------------------------------------------------------------
# Initializers and pure per-token functions (shared with the Mixture-of-Memories layer).


def a_log_init(key, shape, dtype=jnp.float32):
  """Mamba-2's A_log: log of A ~ uniform(1, 16) per head, so the decay rates -A span a decade."""
  return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


def dt_bias_init(key, shape, dtype=jnp.float32, dt_min: float = 1e-3, dt_max: float = 1e-1):
  """Mamba-2's dt bias: softplus(dt_bias) log-uniform in [dt_min, dt_max] (the inverse softplus of a
  log-uniform sample), so at init the per-token decay exp(-A dt) lies between about 0.2 and 1."""
  u = jax.random.uniform(key, shape, jnp.float32)
  dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
  dt = jnp.maximum(dt, 1e-4)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # softplus^{-1}(dt) = dt + log(1 - exp(-dt))




def log_decay(a: jax.Array, a_log: jax.Array, dt_bias: jax.Array) -> jax.Array:
  """Mamba-2 log decay g = -exp(A_log) * softplus(a + dt_bias), float32.

  a: `[..., heads]` (x W_a); a_log, dt_bias: `[heads]`. Returns g `[..., heads]` <= 0.
  """
  return -jnp.exp(a_log) * jax.nn.softplus(a.astype(jnp.float32) + dt_bias)


def write_strength(b: jax.Array) -> jax.Array:
  """The delta rule's beta = sigmoid(b), float32 (b = x W_b, `[..., heads]`)."""
  return jax.nn.sigmoid(b.astype(jnp.float32))


def conv_silu(x: jax.Array, conv: nn.Module | None, cache: jax.Array | None) -> tuple[jax.Array, Any]:
  """SiLU(ShortConv(x)) over `[batch, seq, heads, dim]` (the conv sees the flattened heads*dim channels),
  or SiLU(x) when conv is None. Returns (y, new conv cache or None)."""
  if conv is None:
    return jax.nn.silu(x), None
  b, t, h, d = x.shape
  y, new_cache = conv(x.reshape(b, t, h * d), cache)  # ShortConv applies the SiLU
  return y.reshape(b, t, h, d), new_cache


# ----------------------------------------------------------------------------------------------------------


class LinearMemory(nn.Module):
  """Linear-memory block (see the module docstring for the math).

  Config keys (model section): embed_dim, num_heads, head_dim (0: embed_dim // num_heads), value_dim
  (0: head_dim), memory_rule (linear | simple_gla | delta | gated_delta), conv_width (0: no convolution),
  chunk_size and scan_impl (of kernels.linear_scan), norm_eps, compute_dtype, num_layers.

  Parameters: wq, wk `[embed, heads, k_dim]`, wv `[embed, heads, v_dim]`, wb `[embed, heads]` (delta rules),
  wa `[embed, heads]`, a_log, dt_bias `[heads]` (decaying rules), conv_q / conv_k / conv_v (ShortConv over
  heads*dim channels; absent if conv_width is 0), wg `[embed, heads, v_dim]`, o_norm (RMSNorm over v_dim),
  wo `[heads, v_dim, embed]`.

  Call: x `[batch, seq, embed]` -> `(y [batch, seq, embed], new_cache)`. positions and segment_ids are
  accepted and ignored (no RoPE; the memory carries over document boundaries). With `cache`
  (`{"state": [batch, heads, k_dim, v_dim] float32, "conv_q"/"conv_k"/"conv_v": [batch, conv_width-1,
  heads*dim]}`, the conv entries only with conv_width > 0), a prompt runs the chunked scan from the cached
  state and a single token (seq 1) takes one `kernels.linear_scan_step`.
  """

  config: Any

  def setup(self):
    c = self.config
    self.use_decay, self.use_beta = rule_flags(c.memory_rule)
    h, dk, dv = memory_dims(c)
    e = c.embed_dim
    self.wq = param_with_axes(self, "wq", dense_init, (e, h, dk), ("embed", "heads", "kv"))
    self.wk = param_with_axes(self, "wk", dense_init, (e, h, dk), ("embed", "heads", "kv"))
    self.wv = param_with_axes(self, "wv", dense_init, (e, h, dv), ("embed", "heads", "kv"))
    if self.use_beta:
      self.wb = param_with_axes(self, "wb", dense_init, (e, h), ("embed", "heads"))
    if self.use_decay:
      self.wa = param_with_axes(self, "wa", dense_init, (e, h), ("embed", "heads"))
      self.a_log = param_with_axes(self, "a_log", a_log_init, (h,), ("heads",))
      self.dt_bias = param_with_axes(self, "dt_bias", dt_bias_init, (h,), ("heads",))
    if c.conv_width < 0:
      raise ValueError(f"model.conv_width must be >= 0 (0 disables the short convolution), got {c.conv_width}.")
    if c.conv_width:
      self.conv_q = ShortConv(c.conv_width, "silu", "heads")
      self.conv_k = ShortConv(c.conv_width, "silu", "heads")
      self.conv_v = ShortConv(c.conv_width, "silu", "heads")
    self.wg = param_with_axes(self, "wg", dense_init, (e, h, dv), ("embed", "heads", "kv"))
    self.o_norm = RMSNorm(c.norm_eps, dtype_from_name(c.compute_dtype), axis_name="kv")
    self.wo = head_out_param(self, "wo", h, dv, e, c.num_layers)

  def features(self, x: jax.Array, cache: dict | None = None) -> tuple[dict[str, jax.Array | None], dict]:
    """The per-token inputs of the scan.

    Args:
      x: `[batch, seq, embed]` in the compute dtype.
      cache: the block's cache (only its conv entries are read), or None.
    Returns:
      `({"q", "k": [b, t, h, k_dim], "v": [b, t, h, v_dim] (compute dtype), "g", "beta": [b, t, h] float32
      or None}, {"conv_q", "conv_k", "conv_v": new conv caches} ({} without convolutions))`.
    """
    convs = {}
    out = {}
    for name, w in (("q", self.wq), ("k", self.wk), ("v", self.wv)):
      conv = getattr(self, f"conv_{name}") if self.config.conv_width else None
      conv_cache = None if cache is None or conv is None else cache[f"conv_{name}"]
      y, new = conv_silu(dense(x, w), conv, conv_cache)
      out[name] = y
      if conv is not None:
        convs[f"conv_{name}"] = new
    if self.use_beta:
      out["q"], out["k"] = l2_normalize(out["q"]), l2_normalize(out["k"])
    out["beta"] = write_strength(dense(x, self.wb)) if self.use_beta else None
    out["g"] = log_decay(dense(x, self.wa), self.a_log, self.dt_bias) if self.use_decay else None
    return out, convs

  def readout(self, o: jax.Array, x: jax.Array) -> jax.Array:
    """y = (RMSNorm(o) * SiLU(x W_g)) W_o. o: `[b, t, h, v_dim]`, x: `[b, t, embed]` -> `[b, t, embed]`."""
    gate = jax.nn.silu(dense(x, self.wg))
    return dense(self.o_norm(o) * gate.astype(o.dtype), self.wo, contract=2)

  def __call__(self, x, *, positions=None, segment_ids=None, cache=None, cache_index=None):
    del positions, segment_ids, cache_index  # no RoPE; the state crosses document boundaries by design
    c = self.config
    x = x.astype(dtype_from_name(c.compute_dtype))
    f, convs = self.features(x, cache)
    if cache is not None and x.shape[1] == 1:
      o, state = kernels.linear_scan_step(f["q"], f["k"], f["v"], cache["state"], g=f["g"], beta=f["beta"])
    else:
      o, state = context_parallel.linear_scan(  # sequence-parallel over a `sequence` mesh axis
          f["q"], f["k"], f["v"], g=f["g"], beta=f["beta"],
          initial_state=None if cache is None else cache["state"], chunk_size=c.chunk_size, impl=c.scan_impl,
      )
    y = self.readout(o, x)
    return y, (None if cache is None else {"state": constrain(state, STATE_ACT), **convs})

  def init_cache(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    """Zero state `[batch, heads, k_dim, v_dim]` float32 and zero conv caches (compute dtype); max_len is
    not needed (the cache has a fixed size)."""
    del max_len
    c = self.config
    h, dk, dv = memory_dims(c)
    cache = {"state": jnp.zeros((batch, h, dk, dv), jnp.float32)}
    if c.conv_width:
      dtype = dtype_from_name(c.compute_dtype)
      for name, d in (("q", dk), ("k", dk), ("v", dv)):
        cache[f"conv_{name}"] = ShortConv.empty_cache(batch, c.conv_width, h * d, dtype)
    return cache


# ----------------------------------------------------------------------------------------------------------
# Based


def taylor_feature_map(x: jax.Array) -> jax.Array:
  """Based's second-order Taylor feature map over the last axis (d = x.shape[-1]):

      phi(x) = [1, x / d^{1/4}, vec(x x^T) / sqrt(2 d)]         (1 + d + d^2 features)

  so that phi(q) . phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d), the Taylor expansion of exp(q.k / sqrt(d))
  to second order (always >= 1/2, so the normalizer is positive). The full outer product is kept (not its
  d (d + 1) / 2 distinct entries), as in the Based and flash-linear-attention code. Computed in float32,
  returned in x's dtype: `[..., d] -> [..., 1 + d + d^2]`.
  """
  d = x.shape[-1]
  xf = x.astype(jnp.float32)
  x2 = (xf[..., :, None] * xf[..., None, :]).reshape(*x.shape[:-1], d * d)
  ones = jnp.ones((*x.shape[:-1], 1), jnp.float32)
  return jnp.concatenate([ones, xf / d**0.25, x2 / math.sqrt(2 * d)], axis=-1).astype(x.dtype)


class BasedAttention(nn.Module):
  """Based linear attention (Arora et al. 2024, "Simple linear attention language models balance the
  recall-throughput tradeoff"):

      o_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / (sum_{s<=t} phi(q_t).phi(k_s) + eps),   y = o W_o

  with q, k projected to a small `feature_dim` per head and phi the Taylor map (`taylor_feature_map`). Both
  sums come from one `kernels.linear_scan` (no decay, Hebbian write, scale 1) over phi(q), phi(k) and v with a
  ones column appended: the scan's last output column is the normalizer. The state per head is
  `[1 + f + f^2, v_dim + 1]` float32.

  Config keys (model section): embed_dim, num_heads, head_dim (the value dim per head; 0: embed_dim //
  num_heads), feature_dim (16 in the paper), chunk_size, scan_impl, compute_dtype, num_layers.
  Parameters: wq, wk `[embed, heads, feature_dim]`, wv `[embed, heads, v_dim]`, wo `[heads, v_dim, embed]`.
  Call and cache as `LinearMemory` (cache `{"state": [batch, heads, 1 + f + f^2, v_dim + 1] float32}`).
  """

  config: Any
  eps: float = 1e-6  # added to the normalizer (>= t/2 > 0 for the t-th token, so only a guard)

  def _dims(self) -> tuple[int, int, int]:
    c = self.config
    if c.feature_dim < 1:
      raise ValueError(f"model.feature_dim (Based's q/k dim per head) must be >= 1, got {c.feature_dim}.")
    return c.num_heads, c.feature_dim, c.head_dim or c.embed_dim // c.num_heads

  @nn.compact
  def __call__(self, x, *, positions=None, segment_ids=None, cache=None, cache_index=None):
    del positions, segment_ids, cache_index
    c = self.config
    h, f, dv = self._dims()
    e = x.shape[-1]
    dtype = dtype_from_name(c.compute_dtype)
    wq = param_with_axes(self, "wq", dense_init, (e, h, f), ("embed", "heads", "kv"))
    wk = param_with_axes(self, "wk", dense_init, (e, h, f), ("embed", "heads", "kv"))
    wv = param_with_axes(self, "wv", dense_init, (e, h, dv), ("embed", "heads", "kv"))
    wo = head_out_param(self, "wo", h, dv, e, c.num_layers)
    x = x.astype(dtype)
    q, k = taylor_feature_map(dense(x, wq)), taylor_feature_map(dense(x, wk))
    v = dense(x, wv)
    v1 = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)  # [b, t, h, dv + 1]
    if cache is not None and x.shape[1] == 1:
      o, state = kernels.linear_scan_step(q, k, v1, cache["state"], scale=1.0)
    else:
      o, state = context_parallel.linear_scan(  # sequence-parallel over a `sequence` mesh axis
          q, k, v1, scale=1.0, initial_state=None if cache is None else cache["state"],
          chunk_size=c.chunk_size, impl=c.scan_impl,
      )
    of = o.astype(jnp.float32)
    o = (of[..., :dv] / (of[..., dv:] + self.eps)).astype(dtype)
    y = dense(o, wo, contract=2)
    return y, (None if cache is None else {"state": state})

  def init_cache(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    """Zero state `[batch, heads, 1 + f + f^2, v_dim + 1]` float32 (fixed size; max_len unused)."""
    del max_len
    h, f, dv = self._dims()
    return {"state": jnp.zeros((batch, h, 1 + f + f * f, dv + 1), jnp.float32)}
