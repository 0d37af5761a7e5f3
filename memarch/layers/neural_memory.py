"""Titans' neural long-term memory as a sequence-mixing block (block type "neural_memory"; LMM and MAL).

Per token t and head (Behrouz et al., "Titans: Learning to Memorize at Test Time", 2024):

    q_t, k_t, v_t = SiLU(ShortConv(x W_q)), SiLU(ShortConv(x W_k)), SiLU(ShortConv(x W_v))   per head, size d
    q_t, k_t      <- q_t / ||q_t||, k_t / ||k_t||
    theta_t = theta_max * sigmoid(x_t w_theta + b_theta)    inner learning rate, in (0, theta_max)
    eta_t   = sigmoid(x_t w_eta + b_eta)                      momentum (past surprise kept), in (0, 1)
    alpha_t = sigmoid(x_t w_alpha + b_alpha)                  forgetting (weight decay), in (0, 1)
    S_t = eta_t S_{t-1} - theta_t grad_W ||M_W(k_t) - v_t||^2 |_{W_{t-1}}     (chunked: at chunk-start W)
    W_t = (1 - alpha_t) W_{t-1} + S_t
    o_t = M_{W_t}(q_t)   ("after", default)  or  M_{W_{t-1}}(q_t)   ("before")
    y_t = W_o [ RMSNorm(o_t) * SiLU(x_t W_g) ]                per head, then heads merged

M_W is an MLP per head (`memarch.memory.neural`, depth L, hidden expansion * d); its initial weights W_0
are learned parameters, broadcast over the batch; the momentum S starts at zero. The math of the memory,
the chunked parallel form and its gradients live in `memarch.memory.neural`; this module adds the
projections, the convolutions, the gates, the norm and the output gate.

Gate initialization (the biases): theta starts at theta_max / 2 (bias 0), eta at sigmoid(0) = 0.5 (moderate
momentum), alpha at sigmoid(-5) ~ 0.007 (almost no forgetting at the start: the memory keeps what it writes
until the model learns when to forget).

Choosing theta_max. The chunked form takes all b gradients of a chunk at the chunk's starting weights, so a
run of similar tokens (MQAR's zero padding, repeated words) applies the same gradient b times in one step,
and with momentum eta each application is carried on: up to b * theta / (1 - eta) times one gradient (and
~b^2 theta / 2 as eta -> 1). Mini-batch gradient descent diverges once that step exceeds about 2 / curvature
of the inner loss (measured, depth-2 memory, 256 identical tokens, chunk 16, eta ~ 0.5: the reads blow up to
inf/nan for theta_max 0.05 at head_dim 8 and for 0.2 at head_dim 16; theta_max 0.02 stays bounded at head
dims 8, 16 and 64). Training then pushes eta up: on MQAR (seq 256, 150 steps) the paper's parametrization
gave nan losses at outer learning rates >= 3e-3. Two knobs keep the step bounded:
- theta_max: keep theta_max * memory_chunk_size around 0.3 (configs/titans.py: 0.02 with chunks of 16).
- memory_ema_momentum (default True in configs/titans.py): theta_t is scaled by (1 - eta_t), i.e.
  S_t = eta_t S_{t-1} - (1 - eta_t) theta'_t u_t, momentum as an exponential moving average of the surprise
  (Adam's first moment). It is the paper's recurrence with theta_t = (1 - eta_t) theta'_t (the memory math is
  unchanged); it bounds the momentum's amplification 1 / (1 - eta) to 1 whatever eta the model learns, so
  a chunk moves the weights by at most b * theta_max gradients.
With chunk 1 (the exact recurrence) a depth-1 memory's step is the delta rule with beta = 2 theta, stable
for theta <= 0.5 with unit keys. These bounds hold at the start of training, not for every weight the outer
optimizer reaches: in the zoo (mqar256, tiny MAG, chunk 16, theta_max 0.02, outer lr 1e-3) a batch at step ~1900
made one head's memory reads non-finite from position 192 on, where chunks of 8, 4, 2 and 1 gave a finite loss
(4.51) with the same parameters on the same batch (`python -m experiments.nonfinite` finds such a place). A
model that diverges late this way wants a smaller memory_chunk_size (or theta_max), at the chunked form's cost.

Config keys (model section): embed_dim, num_heads, head_dim (0: embed_dim // num_heads), conv_width,
memory_depth, memory_expansion, memory_activation ("silu" | "gelu"), memory_residual (M(x) = x + MLP(x)),
memory_chunk_size (tokens per chunk of the parallel form: gradients inside a chunk are taken at the chunk's
starting weights), memory_read ("after" | "before" | "chunk_start"), theta_max, memory_ema_momentum (theta
scaled by 1 - eta), norm_eps, compute_dtype, num_layers.

ATLAS options (Behrouz et al., "ATLAS: Learning to Optimally Memorize the Context at Test Time", 2025; the
math in `memarch.memory.neural`). Keys a config may lack (older configs) take the Titans default:
- memory_objective_window = c (default 1, Titans): the Omega rule, each update's gradient over the last c
  tokens' losses weighted by gamma_i = sigmoid(x_i w_gamma + b_gamma) in (0, 1) per head (parameters
  `w_window_gate [embed, heads]`, `b_window_gate [heads]`, bias 0: gamma starts at 0.5; they exist only for
  c > 1). A run of similar tokens now adds up to ~c * gamma gradients per token: scale theta_max down.
- memory_optimizer = "momentum" (default) | "gd" (no momentum: eta and memory_ema_momentum unused) | "muon" (Newton-Schulz
  orthogonalized momentum S_t = eta_t S_{t-1} + g_t, W_t = (1 - alpha_t) W_{t-1} - theta_t NS5(S_t); theta is
  then a step size of an update with singular values ~1, so memory_ema_momentum does not apply to it; the
  chunked form runs a scan over each chunk's tokens, slower than the closed form).
- memory_feature_map = "identity" (default) | "poly_elementwise" | "poly", of degree memory_feature_degree = p
  (default 2), on keys and queries after their L2 norm, then L2-normalized again (unit keys keep the
  theta_max guidance above): poly_elementwise is phi(x) = sum_{r=1..p} a_r x^r elementwise with learned
  per-head coefficients `feature_coeffs [heads, p]` (initialized a_r = 1 / r!), the memory's input size stays
  head_dim; poly is every monomial of degree <= p scaled as in Based's Taylor map (phi(x).phi(y) =
  sum_{r<=p} (x.y)^r / r!), input size C(head_dim + p, p) (head_dim 16, p 2: 153; the memory's first
  layer grows accordingly; memory_residual needs identity or poly_elementwise).

Decoding. The cache is `{"weights", "momentum", "conv_q", "conv_k", "conv_v"}`: the memory state (tuples
of float32 `[batch, heads, d_in, d_out]`, a fixed size whatever the context) and the short convolutions'
last inputs; with memory_objective_window c > 1 also `"window"`: the last c - 1 (feature-mapped) keys,
values and gammas `[batch, c-1, heads, ...]` (with the current token, the c tokens of the next objective). A fresh cache (`init_cache`, which has no parameters) holds zero weights; while
`cache_index == 0` the layer uses its learned initial weights instead. A call with a cache continues the
recurrence from the cached state: one token goes through `neural.step` (the exact token recurrence, i.e.
chunk size 1), several through `neural.chunked_update` with chunks counted from the call's first token.
So prefill + decode equals the parallel forward exactly when memory_chunk_size = 1. With chunks of b > 1
tokens the parallel forward takes each chunk's gradients at the chunk's starting weights; a cached
continuation reproduces that only for calls that start at multiples of b, and decoding always follows the
exact per-token recurrence (chunk-1 semantics; the chunked form is its mini-batch approximation).

Packed documents (`segment_ids`) do not reset the memory: as DESIGN.md states, memory models carry their
state across documents.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from memarch import context_parallel
from memarch.layers.common import (STATE_ACT, RMSNorm, constrain, dense, dense_init, dtype_from_name,
                                   l2_normalize, param_with_axes, residual_out_init)
from memarch.layers.short_conv import ShortConv
from memarch.memory import neural

READ_MODES = ("after", "before", "chunk_start")
OPTIMIZERS = neural.OPTIMIZERS
FEATURE_MAPS = ("identity", "poly_elementwise", "poly")

# The ATLAS keys and their defaults (the Titans memory); older configs may lack them.
ATLAS_DEFAULTS = {"memory_objective_window": 1, "memory_optimizer": "momentum", "memory_feature_map": "identity",
                  "memory_feature_degree": 2}


def atlas_option(config, key: str):
  """config.model's ATLAS key, or its default (ATLAS_DEFAULTS) when the config has none."""
  return config.get(key, ATLAS_DEFAULTS[key]) if hasattr(config, "get") else getattr(config, key, ATLAS_DEFAULTS[key])

# Gate bias initialization (see the module docstring): theta, eta, alpha.
GATE_BIAS_INIT = (0.0, 0.0, -5.0)


def memory_spec(config) -> neural.MemorySpec:
  """The per-head memory MLP described by the model config."""
  c = config
  in_dim = 0
  if atlas_option(c, "memory_feature_map") == "poly":
    in_dim = neural.poly_feature_size(head_dim(c), int(atlas_option(c, "memory_feature_degree")))
  return neural.MemorySpec(
      dim=head_dim(c), depth=int(c.memory_depth), expansion=int(c.memory_expansion),
      activation=str(c.memory_activation), residual=bool(c.memory_residual), in_dim=in_dim,
  )


def head_dim(config) -> int:
  return config.head_dim or config.embed_dim // config.num_heads


def check_config(config) -> None:
  """Clear errors for a bad neural-memory configuration."""
  c = config
  if c.memory_depth < 1:
    raise ValueError(f"model.memory_depth must be >= 1, got {c.memory_depth}.")
  if c.memory_depth >= 2 and c.memory_expansion < 1:
    raise ValueError(f"model.memory_expansion must be >= 1, got {c.memory_expansion}.")
  if c.memory_activation not in ("silu", "gelu"):
    raise ValueError(f"model.memory_activation must be 'silu' or 'gelu', got {c.memory_activation!r}.")
  if c.memory_chunk_size < 1:
    raise ValueError(f"model.memory_chunk_size must be >= 1, got {c.memory_chunk_size}.")
  if c.memory_read not in READ_MODES:
    raise ValueError(f"model.memory_read must be one of {READ_MODES}, got {c.memory_read!r}.")
  if not c.theta_max > 0:
    raise ValueError(f"model.theta_max must be > 0, got {c.theta_max}.")
  if c.conv_width < 1:
    raise ValueError(f"model.conv_width must be >= 1, got {c.conv_width}.")
  if not c.head_dim and c.embed_dim % c.num_heads:
    raise ValueError(f"model.embed_dim ({c.embed_dim}) must be a multiple of num_heads ({c.num_heads}) "
                     "when head_dim is 0.")
  window = atlas_option(c, "memory_objective_window")
  if not isinstance(window, int) or isinstance(window, bool) or window < 1:
    raise ValueError(f"model.memory_objective_window must be an int >= 1 (the Omega rule's window c; 1 is "
                     f"Titans), got {window!r}.")
  if atlas_option(c, "memory_optimizer") not in OPTIMIZERS:
    raise ValueError(f"model.memory_optimizer must be one of {OPTIMIZERS}, got {atlas_option(c, 'memory_optimizer')!r}.")
  fmap = atlas_option(c, "memory_feature_map")
  if fmap not in FEATURE_MAPS:
    raise ValueError(f"model.memory_feature_map must be one of {FEATURE_MAPS}, got {fmap!r}.")
  degree = atlas_option(c, "memory_feature_degree")
  if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
    raise ValueError(f"model.memory_feature_degree must be an int >= 1, got {degree!r}.")
  if fmap == "poly" and c.memory_residual:
    raise ValueError("model.memory_residual needs keys of the values' size: it does not go with "
                     "memory_feature_map='poly' (use 'identity' or 'poly_elementwise').")




def select_initial(cache_weights, init_weights, cache_index):
  """The cached memory weights, or the learned initial weights while nothing has been written
  (cache_index == 0: a fresh cache from `init_cache`, which cannot see the parameters, holds zeros)."""
  fresh = jnp.asarray(cache_index) == 0
  return tuple(jnp.where(fresh, w0, w) for w0, w in zip(init_weights, cache_weights))


class NeuralMemory(nn.Module):
  """The Titans neural memory block. See the module docstring for the math, knobs and cache.

  Call: x `[batch, seq, embed]` (pre-normed), positions/segment_ids (unused: the memory is position-free
  and carries across documents), cache (see `init_cache`) and cache_index (tokens already seen) ->
  `(y [batch, seq, embed] in the compute dtype, new_cache or None)`.

  The pieces are methods so that the MAC block can run them on its own streams: `project` (q, k, v and
  gates of an input), `query` (q only), `initial_state`, `update` and `output`.
  """

  config: Any

  def setup(self):
    c = self.config
    check_config(c)
    e, h, d = c.embed_dim, c.num_heads, head_dim(c)
    self.spec = memory_spec(c)
    self.wq = param_with_axes(self, "wq", dense_init, (e, h, d), ("embed", "heads", "kv"))
    self.wk = param_with_axes(self, "wk", dense_init, (e, h, d), ("embed", "heads", "kv"))
    self.wv = param_with_axes(self, "wv", dense_init, (e, h, d), ("embed", "heads", "kv"))
    self.conv_q = ShortConv(c.conv_width, "silu", "heads", name="conv_q")  # channels heads * d, head-major
    self.conv_k = ShortConv(c.conv_width, "silu", "heads", name="conv_k")
    self.conv_v = ShortConv(c.conv_width, "silu", "heads", name="conv_v")
    # theta, eta, alpha logits: one [embed, 3, heads] projection (one matmul) plus per-head biases.
    self.w_gates = param_with_axes(self, "w_gates", dense_init, (e, 3, h), ("embed", None, "heads"))
    self.b_gates = param_with_axes(
        self, "b_gates", lambda k, s, dt: jnp.broadcast_to(jnp.asarray(GATE_BIAS_INIT, dt)[:, None], s),
        (3, h), (None, "heads"),
    )
    # The learnable initial memory W_0: one parameter per MLP layer, [heads, d_in, d_out].
    self.memory_init = [
        param_with_axes(
            self, f"memory_w{i}", lambda key, s, dt, i=i: neural.init_weights(key, self.spec, h)[i],
            shape, ("heads", None, None),
        )
        for i, shape in enumerate(self._memory_shapes())
    ]
    self.window = int(atlas_option(c, "memory_objective_window"))
    self.optimizer = str(atlas_option(c, "memory_optimizer"))
    self.feature_map = str(atlas_option(c, "memory_feature_map"))
    if self.window > 1:  # the Omega rule's gamma gates (only then: the Titans parameters stay as they were)
      self.w_window_gate = param_with_axes(self, "w_window_gate", dense_init, (e, h), ("embed", "heads"))
      self.b_window_gate = param_with_axes(self, "b_window_gate", nn.initializers.zeros, (h,), ("heads",))
    if self.feature_map == "poly_elementwise":
      p = int(atlas_option(c, "memory_feature_degree"))
      self.feature_coeffs = param_with_axes(
          self, "feature_coeffs",
          lambda k, s, dt: jnp.broadcast_to(jnp.asarray([1.0 / math.factorial(r) for r in range(1, p + 1)], dt), s),
          (h, p), ("heads", None))
    self.out_norm = RMSNorm(c.norm_eps, dtype_from_name(c.compute_dtype), axis_name="kv", name="out_norm")
    self.w_out_gate = param_with_axes(self, "w_out_gate", dense_init, (e, h, d), ("embed", "heads", "kv"))
    self.wo = param_with_axes(
        self, "wo", lambda k, s, dt: residual_out_init(c.num_layers)(k, (h * d, e), dt).reshape(s),
        (h, d, e), ("heads", "kv", "embed"),
    )

  def _memory_shapes(self):
    """Shapes `[heads, d_in, d_out]` of the memory MLP's weights (from init_weights, without computing it)."""
    h = self.config.num_heads
    shapes = jax.eval_shape(lambda: neural.init_weights(jax.random.key(0), memory_spec(self.config), h))
    return [tuple(s.shape) for s in shapes]

  @property
  def dtype(self):
    return dtype_from_name(self.config.compute_dtype)

  # ----------------------------------------------------------------------------------------- pieces

  def _heads(self, x):
    c = self.config
    return x.reshape(*x.shape[:-1], c.num_heads, head_dim(c))

  def features(self, x):
    """The feature map of keys and queries `[b, t, h, d]` (L2-normalized) -> `[b, t, h, input_dim]`; the
    identity (no op) by default."""
    if self.feature_map == "identity":
      return x
    if self.feature_map == "poly":
      phi = neural.poly_features(x, int(atlas_option(self.config, "memory_feature_degree")))
    else:
      phi = neural.elementwise_poly_features(x, self.feature_coeffs)
    return l2_normalize(phi).astype(x.dtype)

  def query(self, x, conv_cache=None):
    """Memory queries of x `[b, t, e]`: (q `[b, t, h, input_dim]` L2-normalized (then feature-mapped), new conv
    cache)."""
    q, cache = self.conv_q(dense(x, self.wq).reshape(*x.shape[:2], -1), conv_cache)
    return self.features(l2_normalize(self._heads(q))), cache

  def window_gate(self, x):
    """The Omega rule's gamma `[b, t, h]` float32 in (0, 1) of x `[b, t, e]`; None for window 1."""
    if self.window == 1:
      return None
    z = dense(x, self.w_window_gate).astype(jnp.float32) + self.b_window_gate
    return jax.nn.sigmoid(z)

  def project(self, x, conv_caches=(None, None, None)):
    """Keys, values, queries and gates of x `[b, t, e]` (compute dtype).

    Returns `(q, k, v [b, t, h, d], theta, eta, alpha [b, t, h] float32, (conv_q, conv_k, conv_v) caches)`.
    """
    c = self.config
    b, t, _ = x.shape
    q, cq = self.query(x, conv_caches[0])
    k, ck = self.conv_k(dense(x, self.wk).reshape(b, t, -1), conv_caches[1])
    v, cv = self.conv_v(dense(x, self.wv).reshape(b, t, -1), conv_caches[2])
    k = self.features(l2_normalize(self._heads(k)))
    v = self._heads(v)
    z = dense(x, self.w_gates).astype(jnp.float32) + self.b_gates  # [b, t, 3, h]
    gates = jax.nn.sigmoid(z)
    eta = gates[:, :, 1]
    theta = c.theta_max * gates[:, :, 0]
    if c.memory_ema_momentum and self.optimizer == "momentum":
      # S_t = eta S_{t-1} - (1 - eta) theta' u_t: momentum as an average of past surprise (see the docstring).
      theta = theta * (1 - eta)
    return q, k, v, theta, eta, gates[:, :, 2], (cq, ck, cv)

  def initial_state(self, batch: int):
    """(W_0 broadcast to `[batch, heads, d_in, d_out]` float32, zero momentum)."""
    w = tuple(constrain(x, STATE_ACT) for x in neural.broadcast(tuple(self.memory_init), batch))
    return w, tuple(jnp.zeros_like(x) for x in w)

  def _rule(self, gamma, window_state):
    """The ATLAS keyword arguments of the memory functions (none for the Titans memory: its code path)."""
    rule = {}
    if self.window > 1 or gamma is not None:
      rule.update(gamma=gamma, window=self.window, window_state=window_state)
    if self.optimizer != "momentum":
      rule["optimizer"] = self.optimizer
    return rule

  def update(self, weights, momentum, q, k, v, theta, eta, alpha, *, single_step: bool = False, gamma=None,
             window_state=None):
    """Writes k -> v through the memory and reads q: `(reads [b, t, h, d] float32, (weights, momentum))`.

    single_step: the exact one-token recurrence (`neural.step`, t must be 1), as in decoding.
    gamma, window_state: the Omega rule's gates (`window_gate`) and the previous c - 1 tokens (None: none).
    """
    c = self.config
    rule = self._rule(gamma, window_state)
    if single_step:
      r, state = neural.step(
          weights, momentum, k[:, 0], v[:, 0], q[:, 0], theta[:, 0], eta[:, 0], alpha[:, 0], self.spec,
          read=c.memory_read,  # "chunk_start" on one token reads the weights before it
          **(dict(rule, gamma=None if gamma is None else gamma[:, 0]) if "gamma" in rule else rule),
      )
      r = r[:, None]
    else:
      # Split over a `sequence` mesh axis when there is one (memarch.context_parallel), else chunked_update.
      r, state = context_parallel.memory_update(
          weights, momentum, k, v, q, theta, eta, alpha, self.spec, chunk_size=c.memory_chunk_size,
          read=c.memory_read, **rule,
      )
    # (weights, momentum): tuples of [b, h, d_in, d_out] per MLP layer, along batch and heads.
    return r, jax.tree.map(lambda s: constrain(s, STATE_ACT) if s.ndim == 4 else s, state)

  def output(self, reads, gate_input):
    """`W_o [RMSNorm(reads) * SiLU(gate_input W_g)]`: reads `[b, t, h, d]`, gate_input `[b, t, e]` -> `[b, t, e]`."""
    o = self.out_norm(reads)
    o = o * jax.nn.silu(dense(gate_input, self.w_out_gate)).astype(o.dtype)
    return dense(o, self.wo, contract=2)

  # ------------------------------------------------------------------------------------------- block

  def __call__(self, x, *, positions=None, segment_ids=None, cache=None, cache_index=None):
    x = x.astype(self.dtype)
    b, t, _ = x.shape
    w0, s0 = self.initial_state(b)
    gamma = self.window_gate(x)
    if cache is None:
      q, k, v, theta, eta, alpha, _ = self.project(x)
      reads, _ = self.update(w0, s0, q, k, v, theta, eta, alpha, gamma=gamma)
      return self.output(reads, x), None
    if cache_index is None:
      raise ValueError("NeuralMemory: a call with a cache needs cache_index (the number of tokens already seen).")
    weights = select_initial(cache["weights"], w0, cache_index)
    q, k, v, theta, eta, alpha, convs = self.project(x, (cache["conv_q"], cache["conv_k"], cache["conv_v"]))
    window = cache.get("window") if self.window > 1 else None
    reads, (weights, momentum) = self.update(
        weights, cache["momentum"], q, k, v, theta, eta, alpha, single_step=(t == 1), gamma=gamma,
        window_state=window)
    new_cache = {"weights": weights, "momentum": momentum, "conv_q": convs[0], "conv_k": convs[1], "conv_v": convs[2]}
    if self.window > 1:
      new_cache["window"] = tuple(w.astype(jnp.float32) for w in neural.next_window(window, k, v, gamma, self.window))
    return self.output(reads, x), new_cache

  def init_cache(self, batch: int, max_len: int) -> dict[str, Any]:
    """Fixed-size decoding state (max_len is ignored): zero memory weights (replaced by the learned initial
    weights while cache_index == 0), zero momentum, zero convolution inputs."""
    return memory_cache(self.config, batch)


def memory_cache(config, batch: int) -> dict[str, Any]:
  """The empty NeuralMemory cache (no parameters needed): see `NeuralMemory.init_cache`."""
  c = config
  spec = memory_spec(c)
  shapes = jax.eval_shape(lambda: neural.init_weights(jax.random.key(0), spec, c.num_heads))
  weights = tuple(jnp.zeros((batch,) + tuple(s.shape), jnp.float32) for s in shapes)
  channels = c.num_heads * head_dim(c)
  conv = ShortConv.empty_cache(batch, c.conv_width, channels, dtype_from_name(c.compute_dtype))
  cache = {"weights": weights, "momentum": tuple(jnp.zeros_like(w) for w in weights),
           "conv_q": conv, "conv_k": conv, "conv_v": conv}
  window = int(atlas_option(c, "memory_objective_window"))
  if window > 1:
    cache["window"] = neural.empty_window(batch, c.num_heads, window, spec)
  return cache
