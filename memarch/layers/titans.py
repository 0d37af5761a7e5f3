"""Titans' attention blocks: sliding-window attention with persistent memory, MAG and MAC.

(Behrouz et al., "Titans: Learning to Memorize at Test Time", 2024.) The neural memory itself is
`memarch.layers.neural_memory.NeuralMemory`; this module combines it with attention:

- `WindowAttention` (block "window_attention"): causal sliding-window attention (RoPE, GQA) whose keys are
  preceded by `num_persistent` learned persistent-memory tokens (projected to keys and values, visible to
  every query, not rotated). MAL is the stack ("neural_memory", "window_attention", "mlp").
- `MemoryAsGate` (block "mag"): two branches on the same input, sliding-window attention with the
  persistent prefix and the neural memory, combined by a learned normalized gate:
  `y = W_o [RMSNorm(attn) * sigmoid(RMSNorm(memory))]` (both norms with learned scales).
- `MemoryAsContext` (block "mac"): the sequence in segments of `segment_len` tokens. For segment s:
  retrieve h_j = M_{s-1}(q_j) with the memory state from before the segment (one token h_j per segment
  token, projected to the model width and normed); attend over [persistent; h; segment], where query i
  sees the persistent tokens and h_j, x_j for j <= i only (h_j carries x_j: a later h_j would leak the
  future), as two attention calls over the two key sets merged exactly with `kernels.merge_attention`;
  update the memory with the attention outputs y (keys, values, queries and gates projected from y);
  output `W_f [y_i * sigmoid(m_i)]`, m_i the memory's read of y_i after the update through token i (each
  token's own weights, as the chunked form provides). Retrieve, attend, update, in that order. The memory's
  projections, convolutions, gates and output head are shared between the x stream (retrieval queries)
  and the y stream (writes and the final read).

Fixed-size decoding state (so generation runs over any length):
- WindowAttention keeps the last `window` keys and values (post-RoPE) in `{"window_k", "window_v"}`
  `[batch, window, kv_heads, head_dim]`; a call with t new tokens attends over [persistent; cached window;
  new keys] with positions `cache_index - window + j` for the cached slots, whose slots before position 0
  are masked (segment id 1), then keeps the last `window` of them. (The names are not "k"/"v", which
  DecoderLM reads as a growing KV cache with a capacity.)
- MAG: `{"attention": <window cache>, "memory": <NeuralMemory cache>}`.
- MAC: the memory state (running weights and momentum, and the weights at the current segment's start
  for retrieval), the short-convolution caches of both streams, and the current segment's attention keys
  and values for h and x (`segment_len` slots each). A call with a cache runs token by token (a `scan` of
  the exact recurrence with memory chunk size 1), so it works for any split of the sequence; it equals the
  parallel forward exactly when memory_chunk_size = 1 (see NeuralMemory for why chunks of b > 1 differ).

NeuralMemory's ATLAS options (memory_optimizer, memory_feature_map) apply to MAG and MAC alike; the Omega rule
(memory_objective_window > 1) to MAG (whose memory is the whole NeuralMemory layer) but not yet to MAC
(NotImplementedError: its segment scan would have to carry the window).

Config keys (model section), besides NeuralMemory's: num_kv_heads (0: num_heads), rope_base, window
(WindowAttention and MAG; >= 1), num_persistent (>= 0), segment_len (MAC; >= 1), attention_impl.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import kernels
from memarch import context_parallel
from memarch import sharding as shard_lib
from memarch.layers.attention import window_cache_attention, with_prefix
from memarch.layers.common import RMSNorm, apply_rope, dense, dense_init, dtype_from_name, param_with_axes, residual_out_init
from memarch.layers.neural_memory import NeuralMemory, atlas_option, memory_cache, select_initial
from memarch.memory import neural

# Persistent tokens start with unit-variance entries: the scale of the pre-normed tokens they sit beside.
persistent_init = nn.initializers.normal(1.0)


def _attention_dims(c):
  heads = c.num_heads
  kv_heads = c.num_kv_heads or heads
  return heads, kv_heads, c.head_dim or c.embed_dim // heads


def _attention_params(module: nn.Module, c, *, out_init) -> dict[str, jax.Array]:
  """q, k, v, o projections and the persistent tokens `[num_persistent, embed]` (None if 0) of an attention."""
  if c.num_persistent < 0:
    raise ValueError(f"model.num_persistent must be >= 0, got {c.num_persistent}.")
  heads, kv_heads, hd = _attention_dims(c)
  if heads % kv_heads:
    raise ValueError(f"model.num_heads ({heads}) must be a multiple of num_kv_heads ({kv_heads}).")
  e = c.embed_dim
  p = {
      "wq": param_with_axes(module, "wq", dense_init, (e, heads, hd), ("embed", "heads", "kv")),
      "wk": param_with_axes(module, "wk", dense_init, (e, kv_heads, hd), ("embed", "heads", "kv")),
      "wv": param_with_axes(module, "wv", dense_init, (e, kv_heads, hd), ("embed", "heads", "kv")),
      "wo": param_with_axes(
          module, "wo", lambda k, s, d: out_init(k, (heads * hd, e), d).reshape(s), (heads, hd, e),
          ("heads", "kv", "embed")),
      "persistent": None,
  }
  if c.num_persistent:
    p["persistent"] = param_with_axes(module, "persistent", persistent_init, (c.num_persistent, e), (None, "embed"))
  return p


def _persistent_kv(p, batch: int, dtype):
  """Keys and values `[batch, num_persistent, kv_heads, head_dim]` of the persistent tokens (no RoPE), or None."""
  if p["persistent"] is None:
    return None
  tok = p["persistent"].astype(dtype)
  kp, vp = dense(tok, p["wk"]), dense(tok, p["wv"])
  bcast = lambda a: jnp.broadcast_to(a[None], (batch,) + a.shape)
  return bcast(kp), bcast(vp)


class WindowAttention(nn.Module):
  """Sliding-window attention with persistent memory and a fixed-size cache (see the module docstring).

  Call: x `[batch, seq, embed]`, positions `[batch, seq]` (RoPE), segment_ids or None, cache
  (`init_cache`) and cache_index -> `(y [batch, seq, embed], new_cache)`.
  """

  config: Any
  out_init: Any = None  # the output projection's init (None: residual_out_init(num_layers))

  @nn.compact
  def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_index=None):
    c = self.config
    window = _window(c)
    dtype = dtype_from_name(c.compute_dtype)
    p = _attention_params(self, c, out_init=self.out_init or residual_out_init(c.num_layers))
    x = x.astype(dtype)
    b = x.shape[0]
    q = apply_rope(dense(x, p["wq"]), positions, c.rope_base)
    k = apply_rope(dense(x, p["wk"]), positions, c.rope_base)
    v = dense(x, p["wv"])
    prefix = _persistent_kv(p, b, dtype)
    if cache is None:
      ks, vs, n_p = with_prefix(prefix, k, v)
      o = context_parallel.attention(q, ks, vs, causal=True, window=window, num_prefix=n_p,
                                     segment_ids=segment_ids, impl=c.attention_impl)
      new_cache = None
    else:
      if cache_index is None:
        raise ValueError("WindowAttention: a call with a cache needs cache_index.")
      o, new_cache = window_cache_attention(q, k, v, cache, cache_index, window, prefix=prefix,
                                            impl=c.attention_impl)
    return dense(o, p["wo"], contract=2), new_cache

  def init_cache(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    """Zeros `{"window_k", "window_v"}` `[batch, window, kv_heads, head_dim]` (max_len is ignored)."""
    return window_cache(self.config, batch)


def _window(c) -> int:
  if int(c.window) < 1:
    raise ValueError(f"Titans attention needs model.window >= 1 (a fixed-size cache), got {c.window}.")
  return int(c.window)


def window_cache(c, batch: int) -> dict[str, jax.Array]:
  _, kv_heads, hd = _attention_dims(c)
  shape = (batch, _window(c), kv_heads, hd)
  dtype = dtype_from_name(c.compute_dtype)
  return {"window_k": jnp.zeros(shape, dtype), "window_v": jnp.zeros(shape, dtype)}


class MemoryAsGate(nn.Module):
  """MAG: sliding-window attention with persistent memory, gated by the neural memory of the same input.

  `y = W_o [RMSNorm_a(attn(x)) * sigmoid(RMSNorm_m(memory(x)))]`. Call and cache as the other blocks
  (cache `{"attention", "memory"}`).
  """

  config: Any

  @nn.compact
  def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_index=None):
    c = self.config
    dtype = dtype_from_name(c.compute_dtype)
    # Inside the gate, each branch's output is normalized: no depth-scaled init needed for them.
    a, ca = WindowAttention(c, out_init=dense_init, name="attention")(
        x, positions=positions, segment_ids=segment_ids, cache=None if cache is None else cache["attention"],
        cache_index=cache_index)
    m, cm = NeuralMemory(c, name="memory")(
        x, positions=positions, segment_ids=segment_ids, cache=None if cache is None else cache["memory"],
        cache_index=cache_index)
    a = RMSNorm(c.norm_eps, dtype, name="attention_norm")(a)
    g = jax.nn.sigmoid(RMSNorm(c.norm_eps, jnp.float32, name="memory_norm")(m)).astype(dtype)
    e = c.embed_dim
    wo = param_with_axes(self, "wo", residual_out_init(c.num_layers), (e, e), ("embed", None))
    y = dense(a * g, wo)
    return y, None if cache is None else {"attention": ca, "memory": cm}

  def init_cache(self, batch: int, max_len: int) -> dict[str, Any]:
    return {"attention": window_cache(self.config, batch), "memory": memory_cache(self.config, batch)}


class _MACCore(nn.Module):
  """MAC's parameters and its two step functions: one segment (parallel) and one token (decoding).

  Both run inside Flax's lifted `nn.scan` (over segments, or over tokens) with the parameters broadcast.
  """

  config: Any

  def setup(self):
    c = self.config
    self.memory = NeuralMemory(c, name="memory")
    # y feeds the memory's projections: a plain fan-in init for the attention's output projection.
    self.attn = _attention_params(self, c, out_init=dense_init)
    h, d = c.num_heads, self.memory_head_dim
    self.w_retrieve = param_with_axes(self, "w_retrieve", dense_init, (h, d, c.embed_dim), ("heads", "kv", "embed"))
    self.retrieve_norm = RMSNorm(c.norm_eps, dtype_from_name(c.compute_dtype), name="retrieve_norm")
    self.w_final = param_with_axes(self, "w_final", residual_out_init(c.num_layers), (c.embed_dim, c.embed_dim),
                                   ("embed", None))

  @property
  def memory_head_dim(self):
    return self.config.head_dim or self.config.embed_dim // self.config.num_heads

  @property
  def dtype(self):
    return dtype_from_name(self.config.compute_dtype)

  def _retrieve(self, seg_weights, x, conv_qx):
    """h tokens `[b, t, e]`: the memory (weights before the segment) read at x's queries, projected, normed."""
    qx, conv_qx = self.memory.query(x, conv_qx)
    h = neural.apply(seg_weights, qx, self.memory.spec).astype(self.dtype)
    return self.retrieve_norm(dense(h, self.w_retrieve, contract=2)), conv_qx

  def _qkv(self, x, h_tok, positions):
    p, c = self.attn, self.config
    q = apply_rope(dense(x, p["wq"]), positions, c.rope_base)
    kx = apply_rope(dense(x, p["wk"]), positions, c.rope_base)
    kh = apply_rope(dense(h_tok, p["wk"]), positions, c.rope_base)
    return q, kx, dense(x, p["wv"]), kh, dense(h_tok, p["wv"])

  def _attend(self, q, kx, vx, kh, vh, *, q_offset, k_offset, kv_len=None, segment_ids=None):
    """Attention of the segment's queries over [persistent; h] and over x (each causal by position),
    merged exactly. kv_len: valid slots of kx/kh (decoding buffers), or None for all."""
    c = self.config
    b = q.shape[0]
    ks, vs, n_p = with_prefix(_persistent_kv(self.attn, b, self.dtype), kh, vh)
    seg = None if segment_ids is None else (segment_ids, segment_ids)
    common = dict(causal=True, q_offset=q_offset, k_offset=k_offset, segment_ids=seg, return_lse=True,
                  impl=c.attention_impl)
    len_h = None if kv_len is None else jnp.full((b,), n_p + kv_len, jnp.int32)
    len_x = None if kv_len is None else jnp.full((b,), kv_len, jnp.int32)
    oh = shard_lib.attention(q, ks, vs, num_prefix=n_p, kv_lengths=len_h, **common)
    ox = shard_lib.attention(q, kx, vx, kv_lengths=len_x, **common)
    o, _ = kernels.merge_attention(oh, ox)
    return dense(o, self.attn["wo"], contract=2)

  def _write_and_output(self, y, weights, momentum, convs, *, single_step):
    """Updates the memory with y, reads it at y (each token's own weights) and gates y by that read."""
    q, k, v, theta, eta, alpha, convs = self.memory.project(y, convs)
    reads, (weights, momentum) = self.memory.update(weights, momentum, q, k, v, theta, eta, alpha,
                                                    single_step=single_step)
    m = self.memory.output(reads, y)
    out = dense(y * jax.nn.sigmoid(m.astype(jnp.float32)).astype(y.dtype), self.w_final)
    return out, weights, momentum, convs

  def initial_state(self, batch):
    return self.memory.initial_state(batch)

  def segment(self, carry, xs):
    """One segment in parallel. carry: (weights, momentum, conv_qx, (conv_q, conv_k, conv_v)).
    xs: (x `[b, C, e]`, positions `[b, C]`, segment_ids `[b, C]` or None) -> (carry, out `[b, C, e]`)."""
    weights, momentum, conv_qx, convs = carry
    x, positions, segment_ids = xs
    h_tok, conv_qx = self._retrieve(weights, x, conv_qx)
    q, kx, vx, kh, vh = self._qkv(x, h_tok, positions)
    y = self._attend(q, kx, vx, kh, vh, q_offset=0, k_offset=0, segment_ids=segment_ids)
    out, weights, momentum, convs = self._write_and_output(y, weights, momentum, convs, single_step=False)
    return (weights, momentum, conv_qx, convs), out

  def token(self, cache, xs):
    """One token with the decoding cache (see MemoryAsContext.init_cache). xs: (x `[b, 1, e]`,
    positions `[b, 1]`, index: the token's position in the stream) -> (cache, out `[b, 1, e]`)."""
    x, positions, index = xs
    c = self.config
    seg_len = int(c.segment_len)
    i = index % seg_len  # slot in the current segment
    w0, _ = self.initial_state(x.shape[0])
    weights = select_initial(cache["weights"], w0, index)
    # A new segment retrieves with the memory as it is after the previous segment.
    seg_weights = tuple(jnp.where(i == 0, w, sw) for w, sw in zip(weights, cache["seg_weights"]))
    h_tok, conv_qx = self._retrieve(seg_weights, x, cache["conv_qx"])
    q, kx, vx, kh, vh = self._qkv(x, h_tok, positions)
    put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), i, axis=1)
    bufs = {n: put(cache[n], a) for n, a in (("seg_kx", kx), ("seg_vx", vx), ("seg_kh", kh), ("seg_vh", vh))}
    cast = lambda a: a.astype(self.dtype)
    y = self._attend(q, cast(bufs["seg_kx"]), cast(bufs["seg_vx"]), cast(bufs["seg_kh"]), cast(bufs["seg_vh"]),
                     q_offset=index, k_offset=index - i, kv_len=i + 1)
    convs = (cache["conv_q"], cache["conv_k"], cache["conv_v"])
    out, weights, momentum, convs = self._write_and_output(y, weights, cache["momentum"], convs, single_step=True)
    new = dict(cache, weights=weights, momentum=momentum, seg_weights=seg_weights, conv_qx=conv_qx,
               conv_q=convs[0], conv_k=convs[1], conv_v=convs[2], **bufs)
    return new, out


def _check_mac_options(c) -> None:
  """MAC runs the memory's pieces itself; the Omega rule's window would have to travel across its segments."""
  window = atlas_option(c, "memory_objective_window")
  if window != 1:
    raise NotImplementedError(
        f"model.memory_objective_window={window} with the 'mac' block: MAC carries the memory state across "
        "segments itself and does not yet carry the Omega rule's window of c - 1 tokens (nor its gates); use the "
        "'neural_memory' (lmm, atlas) or 'mag' blocks, or window 1. memory_optimizer and memory_feature_map work.")


class MemoryAsContext(nn.Module):
  """MAC (see the module docstring). Call: x `[batch, seq, embed]`, positions `[batch, seq]`, segment_ids
  or None, cache (`init_cache`) and cache_index -> `(y [batch, seq, embed], new_cache)`."""

  config: Any

  @nn.compact
  def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_index=None):
    c = self.config
    seg_len = int(c.segment_len)
    if seg_len < 1:
      raise ValueError(f"model.segment_len must be >= 1, got {c.segment_len}.")
    _check_mac_options(c)
    dtype = dtype_from_name(c.compute_dtype)
    x = x.astype(dtype)
    b, t, e = x.shape
    core = _MACCore(c, name="core")
    if cache is not None:
      if cache_index is None:
        raise ValueError("MemoryAsContext: a call with a cache needs cache_index.")
      index = jnp.asarray(cache_index, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
      xs = (x.transpose(1, 0, 2)[:, :, None], positions.transpose(1, 0)[:, :, None], index)
      scan = nn.scan(lambda mdl, carry, xs: mdl.token(carry, xs), variable_broadcast="params",
                     split_rngs={"params": False})
      cache, out = scan(core, dict(cache), xs)
      return out[:, :, 0].transpose(1, 0, 2), cache
    # Parallel form: pad to whole segments (padding comes after every real token, so it changes nothing
    # they produce), then scan over segments carrying the memory state and the convolution caches.
    n = -(-t // seg_len)
    pad = n * seg_len - t
    extra = positions[:, -1:] + 1 + jnp.arange(pad, dtype=positions.dtype)
    pos = jnp.concatenate([positions, extra], axis=1) if pad else positions
    xp = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    split = lambda a: a.reshape(b, n, seg_len, *a.shape[2:]).swapaxes(0, 1)  # [n, b, C, ...]
    segs = None if segment_ids is None else split(jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1))
    w0, s0 = core.initial_state(b)
    channels = c.num_heads * core.memory_head_dim
    zero_conv = jnp.zeros((b, c.conv_width - 1, channels), dtype)
    carry = (w0, s0, zero_conv, (zero_conv,) * 3)
    scan = nn.scan(lambda mdl, carry, xs: mdl.segment(carry, xs), variable_broadcast="params",
                   split_rngs={"params": False})
    _, out = scan(core, carry, (split(xp), split(pos), segs))
    return out.swapaxes(0, 1).reshape(b, n * seg_len, e)[:, :t], None

  def init_cache(self, batch: int, max_len: int) -> dict[str, Any]:
    """Fixed-size state (max_len ignored): the NeuralMemory cache (running weights, momentum, the y-stream
    convolutions), `seg_weights` (weights at the segment's start), `conv_qx` (the x-stream query
    convolution) and the segment's attention keys/values `seg_kx, seg_vx, seg_kh, seg_vh`
    `[batch, segment_len, kv_heads, head_dim]`."""
    c = self.config
    mem = memory_cache(c, batch)
    _, kv_heads, hd = _attention_dims(c)
    dtype = dtype_from_name(c.compute_dtype)
    buf = jnp.zeros((batch, int(c.segment_len), kv_heads, hd), dtype)
    return dict(mem, seg_weights=mem["weights"], conv_qx=mem["conv_q"], seg_kx=buf, seg_vx=buf, seg_kh=buf, seg_vh=buf)
