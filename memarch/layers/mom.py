"""Mixture-of-Memories (MoM, Du et al. 2025, "Linear Sequence Modeling with Mixture-of-Memories").

N independent linear memories (each a `kernels.linear_scan` state `[heads, k_dim, v_dim]`) and a router that
sends every token to k of them; optionally one shared memory that every token writes and reads.

    p_t = softmax(x_t W_r)                       router probabilities over the N memories (float32)
    R_t = top-k(p_t),  w_t,m = p_t,m / sum_{m' in R_t} p_t,m'      (m in R_t; 0 otherwise)
    memory m sees only the subsequence of tokens routed to it, as its own sequence:
      k, v: its own projections + short causal convolutions (SiLU) over that subsequence
      q: the shared projection + the shared convolution, run over that subsequence
      beta = sigmoid(x W_b,m), g = -exp(A_log,m) * softplus(x W_a,m + dt_bias,m)   (per head)
      S_m written and decayed only at its tokens; read o_t,m = S_m,t^T q_t (the state just after token t)
    o_t = sum_{m in R_t} w_t,m o_t,m  (+ o_t,shared: the shared memory over the full sequence)
    y_t = W_o (RMSNorm(o_t) * SiLU(x_t W_g))     (norm and gate per head over v_dim)

Semantics as in the paper's released code (`MomGatedDeltaNet` in the MoM repository, read for this port):
the query projection is shared but, like k and v, it is convolved over each memory's routed subsequence
(the code projects the gathered hidden states with `q_proj` and runs `q_conv1d` on every memory's buffer,
and once more over the full sequence for the shared memory); q and k are L2-normalized for the delta rules.
Differences from that code, each deliberate:
  * Each memory has its own k/v convolution weights and its own A_log / dt_bias (the issue's spec; the
    released code shares the conv modules and A_log / dt_bias across memories and projects only W_a per
    memory). The q convolution weights are shared, as there.
  * Capacity (`capacity_factor > 0`): a memory's buffer holds its FIRST `ceil(cf * T * k / N)` routed tokens and
    later ones are dropped (they read nothing from that memory). The released code keeps the LAST tokens
    (left-truncates), which makes whether a token is kept depend on the routing of later tokens, i.e. the
    training forward is not causal; first-come-first-served keeps it causal (as in Switch Transformers).
    Prefill and decoding never drop (the buffer is the whole chunk).
  * The aux loss is the Switch / Mixtral load-balancing loss (below), as the released model computes from the
    router logits.

Static shapes (`mom_impl="gather"`): each memory's routed tokens are gathered into a left-aligned buffer of
static length L (T, or the capacity), the projections, convolutions and scan run on the buffers of all
memories at once (memories folded into the batch), and each token reads its memories' outputs back at its
slot. Unused slots at the end of a buffer write nothing (beta = 0, g = 0, k = v = 0), so the final state is
the state after the memory's last routed token. `mom_impl="dense"` runs every memory over the full sequence
with no write and no decay at unrouted tokens (beta = 0, g = 0, k = 0 there): equal to the gather form only
without short convolutions (a convolution over the full sequence mixes a token with its unrouted
neighbours), so it requires `conv_width == 0`.

Load balancing (Switch / Mixtral form, per layer): `aux = aux_loss_scale * N * sum_m f_m * P_m` with f_m the
fraction of tokens routed to memory m (over batch and sequence; the f_m sum to k, so aux = k * scale at
perfect balance) and P_m the mean router probability of m. Sown as `("losses", "aux_loss")`; the per-memory
loads f_m / k (sum to 1) as `("metrics", "mom/load_m{i}")`, and the fraction of (token, memory) assignments
dropped by the capacity as `("metrics", "mom/dropped")`. `memarch.train` adds the sown losses to the
training loss and logs the metrics; sowing is a no-op where those collections are not mutable (eval).

Config keys (model section): embed_dim, num_heads, head_dim (0: embed_dim // num_heads), value_dim (0:
head_dim), memory_rule (linear | simple_gla | delta | gated_delta), conv_width (0: no short
convolution, SiLU only), num_memories, top_k, capacity_factor (0: no capacity, buffers of length T),
shared_memory, aux_loss_scale, mom_impl (gather | dense), scan_impl, chunk_size, norm_eps,
compute_dtype, num_layers.

Parameters: `wr [e, N]` (router), `wq [e, h, dk]` (shared), per memory (leading axis M = N + shared, the
shared memory last): `wk [M, e, h, dk]`, `wv [M, e, h, dv]`, `wb [M, e, h]` (delta rules), `wa [M, e, h]`,
`a_log [M, h]`, `dt_bias [M, h]` (decaying rules), `conv_k [M, W, h*dk]`, `conv_v [M, W, h*dv]`; shared
`conv_q [W, h*dk]`, `wg [e, h, dv]`, `o_norm` (RMSNorm over dv), `wo [h, dv, e]`.

Cache (`init_cache`): `state [M, batch, h, dk, dv]` float32 and conv caches `conv_q [M, batch, W-1, h*dk]`,
`conv_k [M, batch, W-1, h*dk]`, `conv_v [M, batch, W-1, h*dv]` (the last W-1 pre-convolution inputs of each
memory's own subsequence): fixed size whatever the context. A memory's state and conv caches advance only at
tokens routed to it.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from memarch import context_parallel
from memarch.layers.common import (RMSNorm, constrain, dense, dense_init, dtype_from_name, l2_normalize,
                                   param_with_axes, residual_out_init)
from memarch.layers.linear_memory import a_log_init, dt_bias_init, log_decay, rule_flags, write_strength
from memarch.layers.short_conv import causal_conv

IMPLS = ("gather", "dense")


def _per_memory(init):
  """An initializer for a stack `[M, *shape]` that initializes each memory's slice as `init(shape)` (so
  fan-in scaling sees the per-memory shape, not the stacked one)."""

  def f(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, shape[0])
    return jax.vmap(lambda k: init(k, tuple(shape[1:]), dtype))(keys)

  return f


def _conv_init(key, shape, dtype=jnp.float32):
  # Near-identity start as in memarch.layers.short_conv.ShortConv: current-token weight 1, small noise.
  w = 0.02 * jax.random.normal(key, shape, dtype)
  return w.at[..., -1, :].add(1.0)


def router(x: jax.Array, wr: jax.Array, top_k: int):
  """Top-k softmax routing.

  Args:
    x: `[batch, seq, embed]`; wr: `[embed, N]`.
  Returns:
    (probs `[b, t, N]` float32 softmax over all memories, weights `[b, t, N]` float32: the top-k probabilities
    renormalized to sum to 1, zero elsewhere, mask `[b, t, N]` bool: routed).
  """
  probs = jax.nn.softmax(dense(x.astype(jnp.float32), wr), axis=-1)
  top_p, top_i = jax.lax.top_k(probs, top_k)
  top_w = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
  onehot = jax.nn.one_hot(top_i, wr.shape[-1], dtype=jnp.float32)  # [b, t, k, N]
  weights = jnp.einsum("btk,btkn->btn", top_w, onehot)
  mask = jnp.sum(onehot, axis=-2) > 0
  return probs, weights, mask


def load_balancing_loss(probs: jax.Array, mask: jax.Array) -> jax.Array:
  """Switch / Mixtral load-balancing loss `N * sum_m f_m * P_m` (unscaled).

  probs `[b, t, N]` router softmax, mask `[b, t, N]` routed. f_m = fraction of tokens routed to m, P_m =
  mean probability of m, both over batch and sequence.
  """
  n = probs.shape[-1]
  f = jnp.mean(mask.astype(jnp.float32), axis=(0, 1))
  p = jnp.mean(probs, axis=(0, 1))
  return n * jnp.sum(f * p)


def capacity(seq_len: int, num_memories: int, top_k: int, capacity_factor: float) -> int:
  """Static buffer length per memory: T without a capacity, else min(T, ceil(cf * T * k / N))."""
  if capacity_factor <= 0:
    return seq_len
  return max(1, min(seq_len, math.ceil(capacity_factor * seq_len * top_k / num_memories)))


def gather_plan(mask: jax.Array, length: int):
  """Where each memory's routed tokens go in its left-aligned buffer.

  Args:
    mask: `[b, t, N]` bool, routed.
    length: the static buffer length L (<= t).
  Returns:
    dict with `index [N, b, L]` int32 (the token in each slot, routed tokens first in order; unused slots
    repeat some token), `valid [N, b, L]` bool, `count [N, b]` int32 (used slots), `slot [b, t, N]` int32
    (each token's slot in each memory's buffer, clipped), `read [b, t, N]` bool (routed and not dropped),
    `dropped` float32 (the fraction of (token, memory) assignments that did not fit).
  """
  b, t, _ = mask.shape
  pos = jnp.arange(t, dtype=jnp.int32)[None, :, None]
  # Routed tokens sort first, each group in sequence order (keys are distinct, so any sort is stable).
  order = jnp.argsort(jnp.where(mask, pos, t + pos), axis=1)[:, :length]  # [b, L, N]
  routed = jnp.sum(mask, axis=1, dtype=jnp.int32)  # [b, N]
  count = jnp.minimum(routed, length)
  valid = jnp.arange(length)[None, :, None] < count[:, None, :]
  slot = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
  read = mask & (slot < length)
  dropped = jnp.sum(routed - count) / jnp.maximum(jnp.sum(routed), 1)
  return {
      "index": jnp.transpose(order, (2, 0, 1)).astype(jnp.int32),
      "valid": jnp.transpose(valid, (2, 0, 1)),
      "count": jnp.transpose(count),
      "slot": jnp.clip(slot, 0, length - 1),
      "read": read,
      "dropped": dropped.astype(jnp.float32),
  }


def gather_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
  """x `[b, t, ...]`, index `[N, b, L]` -> `[N, b, L, ...]` (x[b, index[m, b, l]])."""
  return jax.vmap(lambda xb, ib: xb[ib], in_axes=(0, 1), out_axes=1)(x, index)


def read_back(o: jax.Array, slot: jax.Array) -> jax.Array:
  """o `[N, b, L, ...]`, slot `[b, t, N]` -> `[b, t, N, ...]` (o[m, b, slot[b, t, m]])."""
  n = o.shape[0]
  return jax.vmap(lambda ob, sb: ob[jnp.arange(n)[None, :], sb], in_axes=(1, 0))(o, slot)


class MixtureOfMemories(nn.Module):
  """The MoM sequence-mixing block (see the module docstring for the math, parameters and cache).

  Call: x `[batch, seq, embed]` (pre-normed), positions / segment_ids ignored (a memory carries its state
  across documents, DESIGN.md "data"), cache from `init_cache` or None -> `(y [batch, seq, embed], new_cache)`.
  """

  config: Any

  def _dims(self):
    c = self.config
    heads = c.num_heads
    dk = c.head_dim or c.embed_dim // heads
    dv = c.value_dim or dk
    n = c.num_memories
    m = n + int(bool(c.shared_memory))
    return heads, dk, dv, n, m, c.conv_width

  def _check(self):
    c = self.config
    rule_flags(c.memory_rule)  # a clear error for an unknown rule
    if c.num_memories < 1 or not 1 <= c.top_k <= c.num_memories:
      raise ValueError(f"MoM needs num_memories >= 1 and 1 <= top_k <= num_memories; got "
                       f"num_memories={c.num_memories}, top_k={c.top_k}.")
    if c.conv_width < 0:
      raise ValueError(f"model.conv_width must be >= 0 (0: no short convolution), got {c.conv_width}.")
    impl = c.get("mom_impl", "gather")
    if impl not in IMPLS:
      raise ValueError(f"model.mom_impl must be one of {IMPLS}, got {impl!r}.")
    if impl == "dense" and c.conv_width > 0:
      raise ValueError(
          "model.mom_impl='dense' runs every memory over the full sequence, which equals MoM only without short "
          f"convolutions (a convolution would mix a token with its unrouted neighbours); conv_width is "
          f"{c.conv_width}. Set conv_width=0 or mom_impl='gather'.")
    if impl == "dense" and c.capacity_factor > 0:
      raise ValueError("model.mom_impl='dense' has no capacity (no token is dropped): set capacity_factor=0.")

  def _memories(self, p, xb, qb, valid, count, state, conv_cache, want_cache):
    """Runs a group of memories over their buffers.

    Args:
      p: the group's parameters (leading memory axis M' on the per-memory ones; conv_q shared).
      xb: `[M', b, L, e]` buffered inputs; qb: `[M', b, L, h*dk]` buffered shared-query projections.
      valid: `[M', b, L]` bool (used slots, left-aligned); count: `[M', b]` used slots.
      state: `[M', b, h, dk, dv]` float32 or None; conv_cache: (q, k, v) caches `[M', b, W-1, C]` or None.
      want_cache: also return the conv caches after the last used slot.
    Returns:
      (o `[M', b, L, h, dv]`, final state `[M', b, h, dk, dv]` float32, conv caches or None).
    """
    c = self.config
    heads, dk, dv, _, _, width = self._dims()
    use_g, use_beta = rule_flags(c.memory_rule)
    mm, b, length, e = xb.shape
    dtype = xb.dtype

    def proj(w):  # per-memory projection: [M', b, L, e] x [M', e, F] -> [M', b, L, F]
      return jnp.einsum("mble,mef->mblf", xb, w.reshape(mm, e, -1).astype(dtype))

    k_pre, v_pre = proj(p["wk"]), proj(p["wv"])

    def conv(x, w, cache):
      """Causal conv of each memory's buffer (own or shared weights), SiLU, and the cache after `count`."""
      if width == 0:
        return jax.nn.silu(x), None
      if cache is None:
        cache = jnp.zeros((mm, b, width - 1, x.shape[-1]), dtype)
      w_axis = 0 if w.ndim == 3 else None
      y, _ = jax.vmap(causal_conv, in_axes=(0, w_axis, 0))(x, w, cache.astype(dtype))
      new = None
      if want_cache:
        # The last W-1 inputs up to the memory's last used slot: positions count .. count+W-2 of [cache; x].
        xp = jnp.concatenate([cache.astype(dtype), x], axis=2)
        idx = count[..., None] + jnp.arange(width - 1)
        new = jnp.take_along_axis(xp, idx[..., None], axis=2)
      return jax.nn.silu(y), new

    cq, ck, cv = conv_cache if conv_cache is not None else (None, None, None)
    q, cq = conv(qb, p["conv_q"], cq)
    k, ck = conv(k_pre, p["conv_k"], ck)
    v, cv = conv(v_pre, p["conv_v"], cv)
    q = q.reshape(mm, b, length, heads, dk)
    k = k.reshape(mm, b, length, heads, dk)
    v = v.reshape(mm, b, length, heads, dv)
    if use_beta:  # the delta rules: L2-normalized q and k
      q, k = l2_normalize(q), l2_normalize(k)
    vm = valid[..., None, None]
    # Unused slots write nothing: k = v = 0 (Hebbian rules), beta = 0 and g = 0 (delta rule, decay).
    k = jnp.where(vm, k, 0).astype(dtype)
    v = jnp.where(vm, v, 0).astype(dtype)
    beta = g = None
    if use_beta:
      beta = jnp.where(valid[..., None], write_strength(proj(p["wb"])), 0.0)
    if use_g:
      g = log_decay(proj(p["wa"]), p["a_log"][:, None, None, :], p["dt_bias"][:, None, None, :])
      g = jnp.where(valid[..., None], g, 0.0)

    def fold(x):  # memories into the batch: the scan sees M' * b independent sequences
      return None if x is None else x.reshape(mm * b, *x.shape[2:])

    o, final = context_parallel.linear_scan(  # sequence-parallel over a `sequence` mesh axis
        fold(q), fold(k), fold(v), g=fold(g), beta=fold(beta), initial_state=fold(state),
        chunk_size=c.get("chunk_size", 64), impl=c.get("scan_impl", "auto"), split_batch=False,
    )
    o = o.reshape(mm, b, length, heads, dv)
    final = final.reshape(mm, b, heads, dk, dv)
    return o, final, ((cq, ck, cv) if want_cache and width > 0 else None)

  @nn.compact
  def __call__(self, x, *, positions=None, segment_ids=None, cache=None, cache_index=None):
    self._check()
    c = self.config
    dtype = dtype_from_name(c.compute_dtype)
    heads, dk, dv, n, m, width = self._dims()
    use_g, use_beta = rule_flags(c.memory_rule)
    impl = c.get("mom_impl", "gather")
    b, t, e = x.shape

    wr = param_with_axes(self, "wr", dense_init, (e, n), ("embed", None))
    wq = param_with_axes(self, "wq", dense_init, (e, heads, dk), ("embed", "heads", "kv"))
    per = {
        "wk": param_with_axes(self, "wk", _per_memory(dense_init), (m, e, heads, dk), (None, "embed", "heads", "kv")),
        "wv": param_with_axes(self, "wv", _per_memory(dense_init), (m, e, heads, dv), (None, "embed", "heads", "kv")),
    }
    if use_beta:
      per["wb"] = param_with_axes(self, "wb", _per_memory(dense_init), (m, e, heads), (None, "embed", "heads"))
    if use_g:
      per["wa"] = param_with_axes(self, "wa", _per_memory(dense_init), (m, e, heads), (None, "embed", "heads"))
      per["a_log"] = param_with_axes(self, "a_log", _per_memory(a_log_init), (m, heads), (None, "heads"))
      per["dt_bias"] = param_with_axes(self, "dt_bias", _per_memory(dt_bias_init), (m, heads), (None, "heads"))
    conv_q = None
    if width > 0:
      # Channels are heads * dim, head-major: split over the heads' mesh axes like the projections feeding them.
      conv_q = param_with_axes(self, "conv_q", _conv_init, (width, heads * dk), (None, "heads"))
      per["conv_k"] = param_with_axes(self, "conv_k", _conv_init, (m, width, heads * dk), (None, None, "heads"))
      per["conv_v"] = param_with_axes(self, "conv_v", _conv_init, (m, width, heads * dv), (None, None, "heads"))
    else:
      per["conv_k"] = per["conv_v"] = None
    wg = param_with_axes(self, "wg", dense_init, (e, heads, dv), ("embed", "heads", "kv"))
    wo = param_with_axes(
        self, "wo", lambda k, s, d: residual_out_init(c.num_layers)(k, (heads * dv, e), d).reshape(s),
        (heads, dv, e), ("heads", "kv", "embed"),
    )

    x = x.astype(dtype)
    probs, weights, mask = router(x, wr, c.top_k)
    q_pre = dense(x, wq).reshape(b, t, heads * dk)

    def group(sl):
      return {**{k_: (None if v_ is None else v_[sl]) for k_, v_ in per.items()}, "conv_q": conv_q}

    def cache_part(sl):
      if cache is None:
        return None, None
      conv = None
      if width > 0:
        conv = (cache["conv_q"][sl], cache["conv_k"][sl], cache["conv_v"][sl])
      return cache["state"][sl], conv

    want_cache = cache is not None
    routed = slice(0, n)
    state_r, conv_r = cache_part(routed)
    if impl == "gather":
      # Inference (a cache) never drops tokens: the buffer is the whole chunk.
      length = t if cache is not None else capacity(t, n, c.top_k, c.capacity_factor)
      plan = gather_plan(mask, length)
      xb, qb = gather_tokens(x, plan["index"]), gather_tokens(q_pre, plan["index"])
    else:  # dense: every memory over the full sequence, masked writes
      length = t
      idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, b, t))
      plan = {"index": idx, "valid": jnp.transpose(mask, (2, 0, 1)), "count": jnp.full((n, b), t, jnp.int32),
              "slot": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :, None], (b, t, n)),
              "read": mask, "dropped": jnp.zeros((), jnp.float32)}
      xb, qb = jnp.broadcast_to(x, (n, b, t, e)), jnp.broadcast_to(q_pre, (n, b, t, heads * dk))
    o_r, final_r, conv_new_r = self._memories(
        group(routed), xb, qb, plan["valid"], plan["count"], state_r, conv_r, want_cache)
    reads = read_back(o_r, plan["slot"])  # [b, t, N, h, dv]
    mix = (weights * plan["read"]).astype(dtype)
    o = jnp.einsum("btn,btnhd->bthd", mix, reads)

    if c.shared_memory:
      shared = slice(n, n + 1)
      state_s, conv_s = cache_part(shared)
      o_s, final_s, conv_new_s = self._memories(
          group(shared), x[None], q_pre[None], jnp.ones((1, b, t), bool), jnp.full((1, b), t, jnp.int32),
          state_s, conv_s, want_cache)
      o = o + o_s[0]

    new_cache = None
    if cache is not None:
      finals = [final_r] + ([final_s] if c.shared_memory else [])
      # [M, b, h, dk, dv]: the memories' states, each along batch and heads.
      new_cache = {"state": constrain(jnp.concatenate(finals, axis=0), (None, "act_batch", "act_heads", None, None))}
      if width > 0:
        convs = [conv_new_r] + ([conv_new_s] if c.shared_memory else [])
        for i, name in enumerate(("conv_q", "conv_k", "conv_v")):
          new_cache[name] = jnp.concatenate([cc[i] for cc in convs], axis=0).astype(cache[name].dtype)
    else:
      self.sow("losses", "aux_loss", c.aux_loss_scale * load_balancing_loss(probs, mask))
      load = jnp.mean(mask.astype(jnp.float32), axis=(0, 1)) / c.top_k
      for i in range(n):
        self.sow("metrics", f"mom/load_m{i}", load[i])
      self.sow("metrics", "mom/dropped", plan["dropped"])

    o = RMSNorm(c.norm_eps, dtype=dtype, axis_name="kv", name="o_norm")(o)
    o = o * jax.nn.silu(dense(x, wg))
    return dense(o.astype(dtype), wo, contract=2), new_cache

  def init_cache(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    """Zero states `[M, batch, h, dk, dv]` float32 and conv caches `[M, batch, W-1, C]` (compute dtype);
    M = num_memories (+1 with the shared memory, last). Fixed size: max_len is not used."""
    self._check()
    heads, dk, dv, _, m, width = self._dims()
    dtype = dtype_from_name(self.config.compute_dtype)
    cache = {"state": jnp.zeros((m, batch, heads, dk, dv), jnp.float32)}
    if width > 0:
      cache["conv_q"] = jnp.zeros((m, batch, width - 1, heads * dk), dtype)
      cache["conv_k"] = jnp.zeros((m, batch, width - 1, heads * dk), dtype)
      cache["conv_v"] = jnp.zeros((m, batch, width - 1, heads * dv), dtype)
    return cache
