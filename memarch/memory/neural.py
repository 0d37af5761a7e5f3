"""The Titans neural long-term memory: a per-head MLP whose weights learn at test time.

Per batch element and head, the memory M_W is an MLP of depth L >= 1 on vectors of size d
(`MemorySpec`): L = 1 is one matrix (M_W(x) = x W, a linear memory); L >= 2 has hidden size
`expansion * d`, the activation between layers, no biases, and optionally a residual M_W(x) = x + MLP_W(x).
For token t with key k_t, value v_t, query q_t and gates theta_t (learning rate), eta_t (momentum),
alpha_t (forgetting), all per head:

    loss_t(W) = || M_W(k_t) - v_t ||^2                        (sum over d, no 1/2)
    u_t       = grad_W loss_t(W_{t-1})
    S_t       = eta_t S_{t-1} - theta_t u_t                   (momentum, "surprise")
    W_t       = (1 - alpha_t) W_{t-1} + S_t                   (forgetting)
    read      = M_{W_t}(q_t)  (read="after")   or   M_{W_{t-1}}(q_t)  (read="before")

`reference_update` runs this recurrence token by token (the inner gradient by `jax.grad`): the ground truth.

The chunked (mini-batch) form of the paper takes every gradient of a chunk of b tokens at the chunk's
starting weights W_0 (momentum S_0); `minibatch_reference` is that rule as a slow loop that materializes each
token's weights. `chunked_update` computes the same thing in closed form. With local products
beta_t = prod_{m<=t} (1 - alpha_m) and E_t = prod_{m<=t} eta_m (t = 1..b inside the chunk):

    W_t = beta_t W_0 + b_t S_0 - sum_{i<=t} C[t, i] u_i
    S_t = E_t S_0 - sum_{i<=t} theta_i (E_t / E_i) u_i
    b_t = sum_{j<=t} (beta_t / beta_j) E_j,     C[t, i] = theta_i sum_{j=i..t} (beta_t / beta_j) (E_j / E_i)

Every layer x -> x W has token gradients u_i = x_i^T delta_i (its input at W_0 times the back-propagated
error, computed by hand, never materialized per token), so the read of input z_t through W_t is
`beta_t z_t W_0 + b_t z_t S_0 - sum_i C[t, i] (z_t . x_i) delta_i`; for the whole chunk

    R = diag(beta) Z W_0 + diag(b) Z S_0 - (C * (Z X^T)) Delta,

applied layer after layer (each layer's read input Z is the previous layer's activated read). Ratios of
products are exponentials of segment sums of log(1 - alpha) and log(eta) (sums over m in (j, t], computed by a
masked cumulative sum: no differences of large cumulative sums, so no cancellation). Gates at the ends of
[0, 1] are allowed: a log of 0 is replaced by a large negative finite value (its exponential is exactly 0 in
float32); the gradient with respect to a gate that is exactly 0 (eta) or exactly 1 (alpha) is then 0 instead of
its one-sided value (the layers' sigmoid parametrizations only reach those values where their own gradient
vanishes). With chunk_size = 1 the chunked form equals `reference_update`.

read="chunk_start" reads every token of a chunk with the chunk's starting weights W_0: cheaper (one MLP
forward), an approximation that lags up to b - 1 tokens behind (with b = 1 it equals read="before").

Outer gradients: `chunked_update` is a `lax.scan` over chunks whose body is wrapped in `jax.checkpoint`, so
reverse-mode autodiff saves only the per-chunk carries (W, S) (n_chunks x weights) and recomputes each chunk's
internals in the backward pass; no weight matrix per token is ever stored.

ATLAS options (the section "ATLAS options" below): the Omega rule (`window`, `gamma`, `window_state`), the
optimizers gd | momentum | muon (`optimizer`) and polynomial feature maps of keys and queries
(`poly_features`, `elementwise_poly_features`, MemorySpec.in_dim). Their defaults are the rule above, run by
the same code.

Layout: k, v, q `[batch, seq, heads, d]` (any float dtype), gates `[batch, seq, heads]`, weights and momentum
tuples of `[batch, heads, d_in, d_out]` (layer l maps d_in -> d_out). The math and the state are float32 (float64
when an input is float64, for finite-difference tests).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32
# Stand-in for log(0): exp of it (and of any sum containing it) is exactly 0 in float32, and sums of at most a
# chunk's worth of them stay finite.
_LOG_ZERO = -1e4
READ_MODES = ("after", "before", "chunk_start")
Weights = tuple  # tuple of jax.Array, one per layer


@dataclasses.dataclass(frozen=True)
class MemorySpec:
  """Static shape of the memory MLP of one head.

  dim: d_h, the size of values (the memory's output) and, when in_dim is 0, of keys and queries.
  in_dim: the size of keys and queries (the memory's input) when a feature map changes it (0: dim).
  depth: number of weight matrices L >= 1 (1: a matrix, a linear memory).
  expansion: hidden size = expansion * dim for depth >= 2.
  activation: "silu" | "gelu" (exact, erf) between layers.
  residual: M(x) = x + MLP(x) when True.
  """
  dim: int
  depth: int = 2
  expansion: int = 4
  activation: str = "silu"
  residual: bool = False
  in_dim: int = 0

  def __post_init__(self):
    for name in ("dim", "depth", "expansion"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"MemorySpec.{name} must be a positive int, got {value!r}.")
    if not isinstance(self.in_dim, int) or self.in_dim < 0:
      raise ValueError(f"MemorySpec.in_dim must be an int >= 0 (0: dim), got {self.in_dim!r}.")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"MemorySpec.activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}.")
    if self.residual and self.input_dim != self.dim:
      raise ValueError(f"MemorySpec: residual=True needs in_dim == dim (M(x) = x + MLP(x)), got in_dim "
                       f"{self.input_dim} and dim {self.dim}.")

  @property
  def input_dim(self) -> int:
    """The size of keys and queries (in_dim, or dim when in_dim is 0)."""
    return self.in_dim or self.dim

  @property
  def shapes(self) -> tuple[tuple[int, int], ...]:
    """(d_in, d_out) of each layer."""
    if self.depth == 1:
      return ((self.input_dim, self.dim),)
    hidden = self.expansion * self.dim
    return ((self.input_dim, hidden),) + ((hidden, hidden),) * (self.depth - 2) + ((hidden, self.dim),)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def _act_and_grad(spec: MemorySpec, a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The activation of `a` and its elementwise derivative (a forward-mode tangent of ones)."""
  return jax.jvp(_ACTIVATIONS[spec.activation], (a,), (jnp.ones_like(a),))


# ------------------------------------------------------------------------------------------------ weights


def init_weights(key: jax.Array, spec: MemorySpec, num_heads: int) -> Weights:
  """The learnable initial memory: a tuple of float32 `[heads, d_in, d_out]`, normal(0, 1/d_in) entries."""
  keys = jax.random.split(key, spec.depth)
  return tuple(
      jax.random.normal(kk, (num_heads, din, dout), _F32) * (din**-0.5)
      for kk, (din, dout) in zip(keys, spec.shapes))


def broadcast(weights: Weights, batch: int) -> Weights:
  """`[heads, d_in, d_out]` per layer -> `[batch, heads, d_in, d_out]` float32 (the per-sequence state)."""
  return tuple(jnp.broadcast_to(w.astype(_compute_dtype(w))[None], (batch,) + w.shape) for w in weights)


def apply(weights: Weights, x: jax.Array, spec: MemorySpec) -> jax.Array:
  """M_W(x). weights: per layer `[batch, heads, d_in, d_out]` (or `[heads, d_in, d_out]`, shared over the batch);
  x `[batch, seq, heads, input_dim]` -> `[batch, seq, heads, dim]` float32."""
  _check_weights(weights, spec, None, "apply")
  if x.ndim != 4 or x.shape[-1] != spec.input_dim:
    raise ValueError(f"apply: x must be [batch, seq, heads, {spec.input_dim}], got shape {x.shape}.")
  dt = _compute_dtype(weights, x)
  # [b, t, h, d] -> [b, h, t, d]: the heads become a batch axis of the matmuls (shared weights broadcast).
  y = _mlp(_cast(tuple(weights), dt), jnp.swapaxes(x.astype(dt), 1, 2), spec)
  return jnp.swapaxes(y, 1, 2)


def _mlp(ws, x, spec: MemorySpec):
  """M_W(x) by broadcasting matmuls: x `[..., dim]`, ws per layer `[..., d_in, d_out]` with batch axes matching
  x's leading axes but the last (one head: `[dim]` and `[d_in, d_out]`; a chunk: `[B, H, b, dim]` and
  `[B, H, d_in, d_out]`)."""
  z = x
  for l, w in enumerate(ws):
    z = z @ w
    if l < spec.depth - 1:
      z = _ACTIVATIONS[spec.activation](z)
  return z + x if spec.residual else z


# ------------------------------------------------------------------------------------------------ checks


def _check_weights(weights, spec: MemorySpec, lead: tuple[int, ...] | None, op: str):
  if not isinstance(spec, MemorySpec):
    raise ValueError(f"{op}: spec must be a MemorySpec, got {type(spec).__name__}.")
  if not isinstance(weights, (tuple, list)) or len(weights) != spec.depth:
    raise ValueError(f"{op}: weights must be a tuple of {spec.depth} arrays (one per layer), got {type(weights)}"
                     f"{'' if not isinstance(weights, (tuple, list)) else f' of length {len(weights)}'}.")
  for l, (w, (din, dout)) in enumerate(zip(weights, spec.shapes)):
    if w.shape[-2:] != (din, dout) or (lead is not None and tuple(w.shape[:-2]) != lead) or w.ndim not in (3, 4):
      want = (lead if lead is not None else ("[batch,]", "heads")) + (din, dout)
      raise ValueError(f"{op}: layer {l} weights must have shape {want}, got {tuple(w.shape)}.")


def _check_inputs(weights, momentum, k, v, q, theta, eta, alpha, spec, read, op, seq_axis=True):
  nd = 4 if seq_axis else 3
  layout = "[batch, seq, heads, dim]" if seq_axis else "[batch, heads, dim]"
  for name, x, size in (("k", k, spec.input_dim), ("v", v, spec.dim), ("q", q, spec.input_dim)):
    if x.ndim != nd or x.shape[-1] != size:
      raise ValueError(f"{op}: {name} must be {layout} with dim={size}, got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{op}: {name} must be floating point, got {x.dtype}.")
  if not (k.shape == q.shape and k.shape[:-1] == v.shape[:-1]):
    raise ValueError(f"{op}: k {k.shape}, v {v.shape} and q {q.shape} must have the same shape (but the last "
                     "axis of v when a feature map changes the keys' size).")
  for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
    if tuple(g.shape) != k.shape[:-1]:
      raise ValueError(f"{op}: gate {name} must have shape {k.shape[:-1]} (k without dim), got {tuple(g.shape)}.")
  lead = (k.shape[0], k.shape[-2])
  _check_weights(weights, spec, lead, op)
  _check_weights(momentum, spec, lead, op + " (momentum)")
  if read not in READ_MODES:
    raise ValueError(f"{op}: read must be one of {READ_MODES}, got {read!r}.")


# ------------------------------------------------------------------------------------------------ references


def _loss_one(ws, k, v, spec):
  """loss(W) = ||M_W(k) - v||^2 of one head: ws per layer `[d_in, d_out]`, k, v `[dim]`."""
  return jnp.sum((_mlp(ws, k, spec) - v) ** 2)


def _apply_one(ws, x, spec):
  """M_W(x) of one head: ws per layer `[d_in, d_out]`, x `[dim]`."""
  return _mlp(ws, x, spec)


def _compute_dtype(*trees) -> jnp.dtype:
  """float32, or float64 when an input is float64 (finite-difference tests): never below float32."""
  return jnp.promote_types(jnp.result_type(*jax.tree.leaves(trees)), _F32)


def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype), tree)


def _per_head(fn):
  """Maps a one-head function over batch and heads (axis 0 and 1 of every argument)."""
  return jax.vmap(jax.vmap(fn))


def _time_major(dt, *xs):
  return tuple(jnp.swapaxes(x.astype(dt), 0, 1) for x in xs)


def reference_update(weights, momentum, k, v, q, theta, eta, alpha, spec: MemorySpec, *, read: str = "after",
                     gamma=None, window: int = 1, window_state=None, optimizer: str = "momentum"):
  """The token recurrence (module docstring), one `lax.scan` step per token; the inner gradient by `jax.grad`.

  Args:
    weights, momentum: per layer `[batch, heads, d_in, d_out]` (W_0 and S_0).
    k, v, q: `[batch, seq, heads, dim]`.
    theta, eta, alpha: `[batch, seq, heads]`, in [0, 1] (theta may exceed 1).
    read: "after" (M_{W_t}(q_t)) or "before" (M_{W_{t-1}}(q_t)); "chunk_start" is only defined for a chunked
      rule (use `minibatch_reference` / `chunked_update`).
    gamma, window, window_state, optimizer: the ATLAS options (section "ATLAS options"): the Omega rule's
      gates `[batch, seq, heads]` (None: ones), its window c, the previous c - 1 tokens (None: none), and
      "gd" | "momentum" | "muon". The defaults are the Titans rule above.

  Returns:
    `(reads [batch, seq, heads, dim] float32, (weights_T, momentum_T))`.
  """
  _check_inputs(weights, momentum, k, v, q, theta, eta, alpha, spec, read, "reference_update")
  if read == "chunk_start":
    raise ValueError("reference_update: read='chunk_start' needs chunks; use minibatch_reference or chunked_update.")
  _check_rule(k, v, gamma, window, window_state, optimizer, "reference_update")
  if not _plain(gamma, window, window_state, optimizer):
    return _atlas_reference_update(weights, momentum, k, v, q, theta, eta, alpha, spec, read, gamma, window,
                                   window_state, optimizer)
  grad_fn = _per_head(jax.grad(lambda ws, kk, vv: _loss_one(ws, kk, vv, spec)))
  apply_fn = _per_head(lambda ws, x: _apply_one(ws, x, spec))

  def body(carry, xs):
    ws, ss = carry
    k_t, v_t, q_t, th, et, al = xs
    before = apply_fn(ws, q_t) if read == "before" else None
    us = grad_fn(ws, k_t, v_t)
    ss = tuple(et[..., None, None] * s - th[..., None, None] * u for s, u in zip(ss, us))
    ws = tuple((1 - al)[..., None, None] * w + s for w, s in zip(ws, ss))
    out = before if read == "before" else apply_fn(ws, q_t)
    return (ws, ss), out

  dt = _compute_dtype(weights, momentum, k, v, q, theta, eta, alpha)
  carry = _cast((tuple(weights), tuple(momentum)), dt)
  carry, reads = jax.lax.scan(body, carry, _time_major(dt, k, v, q, theta, eta, alpha))
  return jnp.swapaxes(reads, 0, 1), carry


def _pad_seq(x, total, value=0.0):
  """Pads axis 1 (seq) of x to `total` with `value`."""
  pad = total - x.shape[1]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _chunks(x, n, b):
  """`[batch, n*b, ...]` -> `[n, b, batch, ...]` (chunk-major, then time-major inside a chunk)."""
  x = x.reshape((x.shape[0], n, b) + x.shape[2:])
  return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 1)


def minibatch_reference(weights, momentum, k, v, q, theta, eta, alpha, spec: MemorySpec, *, chunk_size: int,
                        read: str = "after", gamma=None, window: int = 1, window_state=None,
                        optimizer: str = "momentum"):
  """The chunked (mini-batch) rule as a slow loop: per chunk, every token's gradient at the chunk's start
  weights (`jax.grad`, vmapped over the chunk's tokens), then the momentum and forgetting recurrences token by
  token, materializing each token's weights and reading with them. Arguments and outputs as `reference_update`,
  plus `chunk_size`; read in {"after", "before", "chunk_start"}. The tail chunk may be shorter (its missing
  tokens are skipped, so the state is exact). The ATLAS options as `reference_update`: every gradient of a
  chunk's windows (tokens of earlier chunks included) at the chunk's start weights."""
  _check_inputs(weights, momentum, k, v, q, theta, eta, alpha, spec, read, "minibatch_reference")
  _check_chunk(chunk_size, "minibatch_reference")
  _check_rule(k, v, gamma, window, window_state, optimizer, "minibatch_reference")
  if not _plain(gamma, window, window_state, optimizer):
    return _atlas_minibatch_reference(weights, momentum, k, v, q, theta, eta, alpha, spec, chunk_size, read, gamma,
                                      window, window_state, optimizer)
  t = k.shape[1]
  b = chunk_size
  n = -(-t // b)
  valid = _pad_seq(jnp.ones(k.shape[:2], bool), n * b, False)[..., None]  # [batch, n*b, 1]
  dt = _compute_dtype(weights, momentum, k, v, q, theta, eta, alpha)
  xs = [_chunks(_pad_seq(x.astype(dt), n * b), n, b) for x in (k, v, q, theta, eta, alpha)]
  xs.append(_chunks(valid, n, b))
  grad_fn = _per_head(jax.vmap(jax.grad(lambda ws, kk, vv: _loss_one(ws, kk, vv, spec)), in_axes=(None, 0, 0)))
  apply_fn = _per_head(lambda ws, x: _apply_one(ws, x, spec))

  def chunk(carry, cx):
    w0, s0 = carry
    kc, vc, qc, thc, etc, alc, vac = cx  # [b, batch, heads, ...]
    # Gradients of every token of the chunk at W_0: [batch, heads, b, d_in, d_out] per layer.
    us = grad_fn(w0, jnp.moveaxis(kc, 0, 2), jnp.moveaxis(vc, 0, 2))
    us = tuple(jnp.moveaxis(u, 2, 0) for u in us)  # [b, batch, heads, d_in, d_out]

    def token(c, x):
      ws, ss = c
      u, q_t, th, et, al, ok = x
      new_ss = tuple(et[..., None, None] * s - th[..., None, None] * g for s, g in zip(ss, u))
      new_ws = tuple((1 - al)[..., None, None] * w + s for w, s in zip(ws, new_ss))
      if read == "after":
        out = apply_fn(new_ws, q_t)
      elif read == "before":
        out = apply_fn(ws, q_t)
      else:
        out = apply_fn(w0, q_t)
      keep = ok[..., None, None]
      new_ws = tuple(jnp.where(keep, nw, w) for nw, w in zip(new_ws, ws))
      new_ss = tuple(jnp.where(keep, ns, s) for ns, s in zip(new_ss, ss))
      return (new_ws, new_ss), out

    carry, outs = jax.lax.scan(token, (w0, s0), (us, qc, thc, etc, alc, vac))
    return carry, outs

  carry = _cast((tuple(weights), tuple(momentum)), dt)
  carry, reads = jax.lax.scan(chunk, carry, tuple(xs))  # reads [n, b, batch, heads, d]
  reads = jnp.moveaxis(reads, 2, 0).reshape((k.shape[0], n * b) + v.shape[2:])
  return reads[:, :t], carry


def _check_chunk(chunk_size, op):
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
    raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}.")


# ------------------------------------------------------------------------------------------------ chunked form


def _safe_log(x: jax.Array) -> jax.Array:
  """log(x) for x in [0, 1], with log(0) -> _LOG_ZERO and a zero (not NaN) gradient there."""
  pos = x > 0
  return jnp.where(pos, jnp.log(jnp.where(pos, x, 1.0)), _LOG_ZERO)


def _segsum(x: jax.Array) -> jax.Array:
  """x `[..., b]` -> `[..., b, b]` with [t, j] = sum_{m=j+1..t} x_m for j <= t (0 on the diagonal), 0 above.

  A masked cumulative sum over m (Mamba-2's segsum): only terms of one segment are added, never differences of
  long cumulative sums, so a huge negative term (a gate at 0) cannot swamp the others through cancellation.
  """
  b = x.shape[-1]
  m = jnp.arange(b)
  below = m[:, None] > m[None, :]  # [m, j]: m > j
  terms = jnp.where(below, x[..., :, None], 0.0)  # [..., m, j]
  return jnp.cumsum(terms, axis=-2)  # [..., t, j] = sum_{j < m <= t} x_m (0 where t <= j)


def _ratio(x: jax.Array) -> jax.Array:
  """exp(segsum(x)) on and below the diagonal, 0 above: [t, j] = prod_{m=j+1..t} exp(x_m)."""
  b = x.shape[-1]
  m = jnp.arange(b)
  return jnp.where(m[:, None] >= m[None, :], jnp.exp(_segsum(x)), 0.0)


def _chunk_coefficients(theta, eta, alpha):
  """The closed-form coefficients of chunks; gates `[..., b]` (e.g. [n_chunks, batch, heads, b]) float32.

  Returns a dict of float32 arrays:
    beta `[.., b]`: prod_{m<=t} (1 - alpha_m); E `[.., b]`: prod_{m<=t} eta_m;
    bS `[.., b]`: b_t; C `[.., b, b]`: C[t, i] (lower triangular, diagonal included);
    SE `[.., b, b]`: theta_i E_t / E_i for i <= t (the momentum's coefficients).
  """
  la = _safe_log(1.0 - alpha)  # 1 - alpha is exact enough in float32 for alpha in [0, 1]
  le = _safe_log(eta)
  beta = jnp.exp(jnp.cumsum(la, axis=-1))
  e = jnp.exp(jnp.cumsum(le, axis=-1))
  a_ratio = _ratio(la)  # [t, j] = beta_t / beta_j
  e_ratio = _ratio(le)  # [j, i] = E_j / E_i
  c = jnp.einsum("...tj,...ji->...ti", a_ratio, e_ratio) * theta[..., None, :]
  bs = jnp.einsum("...tj,...j->...t", a_ratio, e)
  return {"beta": beta, "E": e, "bS": bs, "C": c, "SE": e_ratio * theta[..., None, :]}


def _forward_backward(w0, k, v, spec: MemorySpec):
  """The memory's forward on the keys at W_0 and the hand backward of ||M(k) - v||^2.

  w0: per layer `[B, H, d_in, d_out]`; k, v `[B, H, b, dim]` float32.
  Returns (xs, deltas): per layer the inputs X_l `[B, H, b, d_in]` and output errors Delta_l `[B, H, b, d_out]`,
  so that token i's gradient for layer l is u_i = X_l[i]^T Delta_l[i].
  """
  xs, dacts = [], []
  z = k
  for l, w in enumerate(w0):
    xs.append(z)
    a = z @ w
    if l < spec.depth - 1:
      z, da = _act_and_grad(spec, a)
      dacts.append(da)
    else:
      z = a
  y = z + k if spec.residual else z
  delta = 2.0 * (y - v)  # d/dy ||y - v||^2; the residual adds nothing to the weights' gradients
  deltas = [None] * spec.depth
  for l in range(spec.depth - 1, -1, -1):
    deltas[l] = delta
    if l > 0:
      delta = (delta @ jnp.swapaxes(w0[l], -1, -2)) * dacts[l - 1]
  return xs, deltas


def _chunk_reads(w0, s0, xs, deltas, q, beta, bs, c, spec: MemorySpec):
  """Reads of q `[B, H, b, dim]` through each token's own weights
  W_t = beta_t W_0 + bs_t S_0 - sum_i c[t, i] X[i]^T Delta[i], layer after layer:
  R = diag(beta) Z W_0 + diag(bs) Z S_0 - (c * (Z X^T)) Delta."""
  z = q
  for l in range(spec.depth):
    r = (beta[..., None] * (z @ w0[l]) + bs[..., None] * (z @ s0[l])
         - (c * (z @ jnp.swapaxes(xs[l], -1, -2))) @ deltas[l])
    z = _ACTIVATIONS[spec.activation](r) if l < spec.depth - 1 else r
  return z + q if spec.residual else z


def _read_and_end_coefficients(theta, eta, alpha, read: str, last: int):
  """All chunks' coefficients at once (outside the sequential scan: a few large vectorized ops instead of many
  small ones per chunk). Gates `[..., b]` (any leading axes, e.g. [n, B, H]); `last` is the row of the state
  after the final chunk's last real token (static: every other chunk ends at row b - 1).

  Returns (read coefficients (beta, bS `[..., b]`, C `[..., b, b]`) or None for read="chunk_start",
  end coefficients (beta, bS, E `[...]`, C row, SE row `[..., b]`)).
  """
  co = _chunk_coefficients(theta, eta, alpha)
  b = theta.shape[-1]

  def end_row(x, vector):  # row b - 1 of every chunk, row `last` of the final one
    pick = lambda r: x[..., r, :] if vector else x[..., r]
    out = pick(b - 1)
    return out if last == b - 1 else out.at[-1].set(pick(last)[-1])

  end = (end_row(co["beta"], False), end_row(co["bS"], False), end_row(co["E"], False), end_row(co["C"], True),
         end_row(co["SE"], True))
  if read == "chunk_start":
    return None, end
  beta, bs, c = co["beta"], co["bS"], co["C"]
  if read == "before":
    # W_{t-1}: the coefficients of the previous row (row -1 is W_0 itself: beta = 1, b = 0, no gradients).
    beta = jnp.concatenate([jnp.ones_like(beta[..., :1]), beta[..., :-1]], axis=-1)
    bs = jnp.concatenate([jnp.zeros_like(bs[..., :1]), bs[..., :-1]], axis=-1)
    c = jnp.concatenate([jnp.zeros_like(c[..., :1, :]), c[..., :-1, :]], axis=-2)
  return (beta, bs, c), end


def _chunk_step(carry, cx, *, spec: MemorySpec):
  """One chunk of `chunked_update`: carry (W_0, S_0) -> (W_end, S_end), reads `[B, H, b, dim]`.

  cx: (k, v, q `[B, H, b, dim]`, read coefficients or None (read="chunk_start"), end coefficients), from
  `_read_and_end_coefficients`. Padding tokens of a tail chunk have theta = 0: read but never written.
  """
  w0, s0 = carry
  k, v, q, read_co, (beta_e, bs_e, e_e, c_e, se_e) = cx
  xs, deltas = _forward_backward(w0, k, v, spec)

  if read_co is None:  # chunk_start: every token reads W_0
    reads = _mlp(w0, q, spec)
  else:
    reads = _chunk_reads(w0, s0, xs, deltas, q, *read_co, spec)

  # The state after the chunk's last real token.
  w_end, s_end = [], []
  for l in range(spec.depth):
    xt = jnp.swapaxes(xs[l], -1, -2)
    w_end.append(beta_e[..., None, None] * w0[l] + bs_e[..., None, None] * s0[l] - xt @ (c_e[..., None] * deltas[l]))
    s_end.append(e_e[..., None, None] * s0[l] - xt @ (se_e[..., None] * deltas[l]))
  return (tuple(w_end), tuple(s_end)), reads


def chunked_update(weights, momentum, k, v, q, theta, eta, alpha, spec: MemorySpec, *, chunk_size: int = 16,
                   read: str = "after", gamma=None, window: int = 1, window_state=None,
                   optimizer: str = "momentum"):
  """The chunked (mini-batch gradient) update in closed form; equals `minibatch_reference` (and, with
  chunk_size = 1, `reference_update`). See the module docstring for the math.

  Args:
    weights, momentum: per layer `[batch, heads, d_in, d_out]` (W_0, S_0).
    k, v, q: `[batch, seq, heads, dim]`, any float dtype (math in float32); seq need not be a multiple of
      chunk_size (the tail is padded with theta = 0 and the state is taken at the last real token).
    theta, eta, alpha: `[batch, seq, heads]`: learning rate (>= 0), momentum and forgetting gates in [0, 1].
    chunk_size: b, tokens per chunk whose gradients share the chunk's starting weights.
    read: "after" | "before" | "chunk_start" (module docstring).
    gamma, window, window_state, optimizer: the ATLAS options as `reference_update` (section "ATLAS options":
      gd and momentum by the closed form widened by the window's band, muon per chunk around a batched NS5).
      The window state after the call is `next_window(window_state, k, v, gamma, window)`.

  Returns:
    `(reads [batch, seq, heads, dim] float32, (weights_T, momentum_T))`, the state float32.

  Memory: a `lax.scan` over chunks with a `jax.checkpoint`ed body: autodiff saves one (W, S) per chunk.
  The coefficients depend on the gates only and are computed for all chunks before the scan. Measured
  (`experiments.benchmarks.harness.compiled_memory_bytes` of the gradient; batch 1, 4 heads, d 64, depth 2,
  expansion 4, chunk 16): peak 82 MiB at 1k tokens, 311 MiB at 4k, 1.2 GiB at 16k (the per-chunk states are
  64 MiB per 1k tokens); without the checkpoint 300 MiB at 1k; a weight matrix per token would be 1 GiB per 1k.
  """
  _check_inputs(weights, momentum, k, v, q, theta, eta, alpha, spec, read, "chunked_update")
  _check_chunk(chunk_size, "chunked_update")
  _check_rule(k, v, gamma, window, window_state, optimizer, "chunked_update")
  if not _plain(gamma, window, window_state, optimizer):
    return _atlas_chunked_update(weights, momentum, k, v, q, theta, eta, alpha, spec, chunk_size, read, gamma,
                                 window, window_state, optimizer)
  dt = _compute_dtype(weights, momentum, k, v, q, theta, eta, alpha)
  carry = _cast((tuple(weights), tuple(momentum)), dt)
  if k.shape[1] == 0:
    return jnp.zeros(v.shape, dt), carry
  t, b, n, heads_major = _chunk_layout(k, chunk_size, dt)
  bsz, heads = k.shape[0], k.shape[2]
  # Batch and heads folded into one axis inside the scan ([n, B*H, b, ...], weights [B*H, d_in, d_out]): the
  # chunk math is per (batch, head) anyway, and with batch 1 a leading axis of size 1 sent the backward's small
  # reductions to slow YNNPACK fusions on XLA CPU (measured, a NeuralMemory layer's fwd+bwd at batch 1, 2048 tokens,
  # 4 heads of 64: 1.58 s -> 1.34 s).
  fold = lambda x: x.reshape((x.shape[0], bsz * heads) + x.shape[3:])
  kc, vc, qc, thc, etc, alc = (fold(heads_major(x)) for x in (k, v, q, theta, eta, alpha))
  read_co, end_co = _read_and_end_coefficients(thc, etc, alc, read, (t - 1) % b)
  carry = jax.tree.map(lambda w: w.reshape((bsz * heads,) + w.shape[2:]), carry)
  body = jax.checkpoint(lambda c, x: _chunk_step(c, x, spec=spec))
  carry, reads = jax.lax.scan(body, carry, (kc, vc, qc, read_co, end_co))  # reads [n, B*H, b, d]
  carry = jax.tree.map(lambda w: w.reshape((bsz, heads) + w.shape[1:]), carry)
  return _seq_major(reads.reshape((n, bsz, heads) + reads.shape[2:]), t), carry


def _chunk_layout(k, chunk_size: int, dt):
  """(t, b, n, heads_major) of a chunked call on k `[B, t, H, .]` (t > 0): chunk size b = min(chunk_size, t),
  n chunks, and the function that pads `[B, t, H, ...]` to n*b tokens and lays it out `[n, B, H, b, ...]`."""
  bsz, t = k.shape[:2]
  b = min(chunk_size, t)
  n = -(-t // b)

  def heads_major(x):  # [B, n*b, H, ...] -> [n, B, H, b, ...]
    x = _pad_seq(x.astype(dt), n * b).reshape((bsz, n, b) + x.shape[2:])
    return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)

  return t, b, n, heads_major


def _seq_major(reads, t: int):
  """Reads `[n, B, H, b, d]` -> `[B, t, H, d]` (the padding of the tail chunk dropped)."""
  n, bsz, h, b, d = reads.shape
  reads = jnp.moveaxis(reads, 0, 1)  # [B, n, H, b, d]
  return jnp.swapaxes(reads, 2, 3).reshape(bsz, n * b, h, d)[:, :t]


# ------------------------------------------------------------------------------------------------ decoding


def step(weights, momentum, k, v, q, theta, eta, alpha, spec: MemorySpec, *, read: str = "after", gamma=None,
         window: int = 1, window_state=None, optimizer: str = "momentum"):
  """One token (decoding): the recurrence's step with the hand backward of `chunked_update`.

  Args:
    weights, momentum: per layer `[batch, heads, d_in, d_out]`.
    k, v, q: `[batch, heads, dim]`; theta, eta, alpha: `[batch, heads]`.
    read: "after" or "before"; "chunk_start" reads with the weights before this token (a decoding chunk of
      one token: the same as "before").
    gamma `[batch, heads]` or None, window, window_state, optimizer: the ATLAS options as `reference_update`
      (the caller advances the window with `next_window`).

  Returns:
    `(read [batch, heads, dim] float32, (weights, momentum))`: the state has a fixed size.
  """
  _check_inputs(weights, momentum, k, v, q, theta, eta, alpha, spec, read, "step", seq_axis=False)
  _check_rule(k, v, gamma, window, window_state, optimizer, "step")
  if not _plain(gamma, window, window_state, optimizer):
    return _atlas_step(weights, momentum, k, v, q, theta, eta, alpha, spec, read, gamma, window, window_state,
                       optimizer)
  dt = _compute_dtype(weights, momentum, k, v, q, theta, eta, alpha)
  w0, s0 = _cast((tuple(weights), tuple(momentum)), dt)
  k, v, q = (x.astype(dt)[:, :, None, :] for x in (k, v, q))  # [B, H, 1, d]: a chunk of one token
  theta, eta, alpha = (g.astype(dt)[..., None, None] for g in (theta, eta, alpha))
  xs, deltas = _forward_backward(w0, k, v, spec)
  s1 = tuple(eta * s - theta * (jnp.swapaxes(x, -1, -2) @ dl) for s, x, dl in zip(s0, xs, deltas))
  w1 = tuple((1 - alpha) * w + s for w, s in zip(w0, s1))
  out = _mlp(w1 if read == "after" else w0, q, spec)
  return out[:, :, 0], (w1, s1)


# ------------------------------------------------------------------------------------------------ ATLAS options
#
# Options of the same memory (Behrouz et al., "ATLAS: Learning to Optimally Memorize the Context at Test Time",
# 2025), selected by keyword arguments of reference_update / minibatch_reference / chunked_update / step; their
# defaults (window=1, gamma=None, window_state=None, optimizer="momentum") run the Titans code above unchanged.
#
# Omega rule (window = c >= 1, gates gamma_i in [0, 1], `[batch, seq, heads]`; None: all ones):
#
#     g_t = grad_W sum_{i=t-c+1..t} gamma_i || M_W(k_i) - v_i ||^2 |_{W_{t-1}}
#
# replaces u_t (c = 1 with gamma = 1 is Titans). Tokens before the sequence come from `window_state`, the
# last c - 1 (keys, values, gammas) `[batch, c-1, heads, ...]` of the previous call (None: none, i.e. gamma 0);
# `next_window` gives the state after a call. The chunked form takes every gradient of a chunk's windows at the
# chunk's starting weights W_0, including those of window tokens that lie in earlier chunks (recomputed at the new
# W_0, never reused): with the chunk extended by its c - 1 previous tokens to E = b + c - 1 tokens and per-token
# gradients u_i at W_0, g_j = sum_i Band[j, i] gamma_i u_i with Band[j, i] = 1 for j <= i <= j + c - 1 (the
# sliding sum). Since g is linear in the u_i, the Titans closed form holds with C and the momentum coefficients
# multiplied on the right by Band diag(gamma): C'[t, i] = gamma_i sum_j C[t, j] Band[j, i], and the read is
# R = diag(beta) Z W_0 + diag(b) Z S_0 - (C' * (Z X_ext^T)) Delta_ext over the E extended tokens.
#
# Optimizers (the gradient g_t of either rule):
#     momentum:  S_t = eta_t S_{t-1} - theta_t g_t,   W_t = (1 - alpha_t) W_{t-1} + S_t        (Titans)
#     gd:        S_t = - theta_t g_t,                 W_t = (1 - alpha_t) W_{t-1} + S_t        (eta ignored)
#     muon:      S_t = eta_t S_{t-1} + g_t,           W_t = (1 - alpha_t) W_{t-1} - theta_t NS5(S_t)
# NS5 is the Newton-Schulz orthogonalization of each weight matrix (per batch element and head; 5 steps of
# X <- a X + (b A + c A^2) X, A = X X^T, (a, b, c) = (3.4445, -4.7750, 2.0315), after X = S / ||S||_F), as in the
# Muon optimizer: theta is the step size of the orthogonalized momentum (ATLAS writes its learning rate inside the
# momentum; NS5 removes the momentum's scale, so only the step after it bounds the update). Muon is not linear in
# the momentum, so the Titans closed form over a chunk does not hold; but with every gradient at W_0 (the hand
# backward), S_t and W_t are each a linear recurrence inside the chunk: `chunked_update` computes every token's
# S_t in closed form, NS5 of all of them in one batched call, then every W_t in closed form (`_muon_chunk_step`),
# materializing the chunk's b weight matrices per layer; it equals `minibatch_reference` (and with chunk_size 1,
# `reference_update`).
#
# Feature maps (`poly_features`, `elementwise_poly_features`) are applied to keys and queries by the layer;
# a map that changes their size is described by MemorySpec.in_dim.

OPTIMIZERS = ("gd", "momentum", "muon")
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def newton_schulz(x: jax.Array, steps: int = NS_STEPS, eps: float = 1e-7) -> jax.Array:
  """Approximate orthogonalization U V^T of x = U S V^T over the last two axes (Muon's quintic Newton-Schulz).

  x `[..., m, n]` -> `[..., m, n]` float32 (float64 for float64 input); singular values land in about
  [0.7, 1.2] (the quintic's coefficients trade exactness for speed: it does not converge to 1). Differentiable
  by a hand-written backward of the iterations (`_ns_iterations`).
  """
  dt = _compute_dtype(x)
  x = x.astype(dt)
  tall = x.shape[-2] > x.shape[-1]
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  # The norm's square root at a floor: a zero matrix (e.g. eta = 0 and no gradient) gets a zero output and a
  # finite gradient (sqrt'(0) would make it NaN, even through a discarding jnp.where).
  x = x / (jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=(-2, -1), keepdims=True), 1e-30)) + eps)
  # Same iterations, two orders of evaluation: in the m x m Gram space when x is at least twice as wide as it
  # is tall (the memory's [d, 4d] layers; fewer FLOPs), on x itself otherwise (square: fewer FLOPs there).
  if uses_gram_space(*x.shape[-2:]):
    for k in gram_segments(steps):
      x = _ns_gram_iterations(x, k)
  else:
    x = _ns_iterations(x, steps)
  return jnp.swapaxes(x, -1, -2) if tall else x


def _gram(x: jax.Array) -> jax.Array:
  return jnp.einsum("...ik,...jk->...ij", x, x)  # X X^T without materializing the transpose


def _matmul(x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.einsum("...ij,...jk->...ik", x, y)


def _ns_poly(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(A, P) of one iteration X -> a X + P X: A = X X^T, P = b A + c A^2."""
  _, b, c = NS_COEFFICIENTS
  m = _gram(x)
  return m, b * m + c * _matmul(m, m)


def _ns_step(x: jax.Array) -> jax.Array:
  return NS_COEFFICIENTS[0] * x + _matmul(_ns_poly(x)[1], x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ns_iterations(x: jax.Array, steps: int) -> jax.Array:
  """`steps` Newton-Schulz iterations on wide x `[..., m, n]`, m <= n.

  Why a custom VJP: in the muon memory the per-token NS5 is most of the train step, and autodiff's backward of
  these small batched matmuls ran at 7x the forward on CPU (transposed operands); this backward is ~1.5x faster
  (measured on [1024, 16, 64]). Per iteration, with G the cotangent of X' = a X + P X:
      dX = a G + P G + (dA + dA^T) X,  dA = b dP + c (dP A + A dP),  dP = G X^T   (A, P symmetric)
  recomputing A and P from the saved X of each iteration."""
  for _ in range(steps):
    x = _ns_step(x)
  return x


def _ns_iterations_fwd(x, steps):
  saved = []
  for _ in range(steps):
    saved.append(x)
    x = _ns_step(x)
  return x, tuple(saved)


def _ns_iterations_bwd(steps, saved, g):
  del steps
  a, b, c = NS_COEFFICIENTS
  for x in reversed(saved):
    m, p = _ns_poly(x)
    dp = jnp.einsum("...ik,...jk->...ij", g, x)  # G X^T
    dm = b * dp + c * (_matmul(dp, m) + _matmul(m, dp))
    g = a * g + _matmul(p, g) + _matmul(dm + jnp.swapaxes(dm, -1, -2), x)
  return (g,)


_ns_iterations.defvjp(_ns_iterations_fwd, _ns_iterations_bwd)


# NS5 in the Gram space. Every iteration multiplies X on the left by a polynomial of A = X X^T, so after k of
# them X_k = Q_k X_0 with Q_k a polynomial of A_0 = X_0 X_0^T, and all of A_k, q_k, Q_k are symmetric and commute:
#     q_k = a I + b A_k + c A_k^2,   Q_{k+1} = q_k Q_k,   A_{k+1} = X_{k+1} X_{k+1}^T = q_k (q_k A_k),
# and X_k = Q_k X_0. For a wide m x n input that is one Gram (m^2 n), m x m products per step and one final
# Q X_0 (m^2 n), instead of three products per step of which two are m^2 n. But Q grows like a^k (a = 3.4445)
# along the small singular directions, and its rounding errors leak into the others: in float32, all five steps
# in one Gram space were 50-200x less accurate than the plain loop on momenta of condition number >= 100 (a
# momentum of a few rank-one gradients is). Restarting after two steps (X_2 = Q_2 X_0, a fresh Gram, three more
# steps: `gram_segments`) bounds that growth and is as accurate as the plain loop. Measured on one CPU core,
# float32, max abs error against the plain loop in float64, [200, 16, 64] inputs:
#     condition number 1e2: plain 1.0e-6, one Gram space 5.1e-5, restarted 1.5e-6
#     condition number 1e6: plain 9.6e-6, one Gram space 2.1e-4, restarted 6.4e-6
# and time on [16384, 16, 64]: forward 441 -> 300 ms, forward + backward 1146 -> 723 ms (plain -> restarted).
GRAM_RESTART = 2


def uses_gram_space(m: int, n: int) -> bool:
  """Whether `newton_schulz` runs a wide m x n matrix (m <= n) in the Gram space: at least twice as wide as tall."""
  return 2 * m <= n


def gram_segments(steps: int) -> tuple[int, ...]:
  """How the NS steps split into Gram spaces: GRAM_RESTART steps, then the rest (e.g. 5 -> (2, 3))."""
  return (steps,) if steps <= GRAM_RESTART else (GRAM_RESTART, steps - GRAM_RESTART)


def _ns_gram_fwd(x: jax.Array, steps: int):
  """The Gram-space iterations' output and what their backward needs: X_0, Q_K and each step's (A_k, q_k, Q_k)."""
  a, b, c = NS_COEFFICIENTS
  m = _gram(x)
  eye = jnp.eye(x.shape[-2], dtype=x.dtype)
  saved, big_q = [], None
  for k in range(steps):
    q = a * eye + b * m + c * _matmul(m, m)
    saved.append((m, q, big_q))
    big_q = q if big_q is None else _matmul(q, big_q)
    if k < steps - 1:
      m = _matmul(q, _matmul(q, m))
  return _matmul(big_q, x), (x, big_q, tuple(saved))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ns_gram_iterations(x: jax.Array, steps: int) -> jax.Array:
  """`_ns_iterations` evaluated in the Gram space (section comment), x `[..., m, n]`, m <= n.

  Hand backward, with H = G X_0^T the cotangent of Q_K (K = steps) and every forward matrix symmetric (so no
  transposed operand, which XLA's CPU batched matmuls run slowly): per step, last to first,
      A_{k+1} = q T, T = q A_k:   dT = q dA_{k+1};  dq = dA_{k+1} T + dT A_k;  dA_k = q dT
      Q_{k+1} = q Q_k:            dq += dQ_{k+1} Q_k;  dQ_k = q dQ_{k+1}
      q = a I + b A_k + c A_k^2:  dA_k += b dq + c (dq A_k + A_k dq)
  and dX_0 = Q_K G + (dA_0 + dA_0^T) X_0."""
  return _ns_gram_fwd(x, steps)[0]


def _ns_gram_bwd(steps, res, g):
  _, b, c = NS_COEFFICIENTS
  x, big_q_end, saved = res
  d_big_q = jnp.einsum("...ik,...jk->...ij", g, x)  # G X^T
  dx = _matmul(big_q_end, g)
  dm = None  # the cotangent of A_{k+1}; none reaches the last step's A
  for m, q, big_q in reversed(saved):
    if dm is None:
      dq, dm = 0.0, jnp.zeros_like(m)
    else:
      dt = _matmul(q, dm)
      dq = _matmul(dm, _matmul(q, m)) + _matmul(dt, m)
      dm = _matmul(q, dt)
    if big_q is None:  # Q_0 = I
      dq = dq + d_big_q
    else:
      dq = dq + _matmul(d_big_q, big_q)
      d_big_q = _matmul(q, d_big_q)
    dm = dm + b * dq + c * (_matmul(dq, m) + _matmul(m, dq))
  return (dx + _matmul(dm + jnp.swapaxes(dm, -1, -2), x),)


_ns_gram_iterations.defvjp(_ns_gram_fwd, _ns_gram_bwd)


def poly_feature_size(dim: int, degree: int) -> int:
  """C(dim + degree, degree): the number of monomials of degree <= `degree` in `dim` variables."""
  return math.comb(dim + degree, degree)


def poly_features(x: jax.Array, degree: int) -> jax.Array:
  """All monomials of x up to `degree` (Based's Taylor map, generalized): x `[..., d]` -> `[..., C(d+p, p)]`.

  Entry beta (a multi-index, |beta| <= p) is x^beta / sqrt(beta!), so that
  phi(x) . phi(y) = sum_{r=0..p} (x . y)^r / r!  (the degree-p Taylor polynomial of exp(x . y)).
  """
  if not isinstance(degree, int) or degree < 1:
    raise ValueError(f"poly_features: degree must be a positive int, got {degree!r}.")
  d = x.shape[-1]
  x = x.astype(_compute_dtype(x))
  feats = [jnp.ones(x.shape[:-1] + (1,), x.dtype)]
  for r in range(1, degree + 1):
    combos = np.asarray(list(itertools.combinations_with_replacement(range(d), r)), np.int32)  # [n_r, r]
    coef = np.asarray([1.0 / math.sqrt(math.prod(math.factorial(m) for m in collections.Counter(cb).values()))
                       for cb in combos.tolist()])
    feats.append(jnp.prod(x[..., combos], axis=-1) * coef.astype(x.dtype))
  return jnp.concatenate(feats, axis=-1)


def elementwise_poly_features(x: jax.Array, coeffs: jax.Array) -> jax.Array:
  """sum_{r=1..p} a_r x^r elementwise (the size stays d): x `[..., heads, d]`, coeffs `[heads, p]` (a_1..a_p)."""
  x = x.astype(_compute_dtype(x, coeffs))
  out, power = 0.0, jnp.ones_like(x)
  for r in range(coeffs.shape[-1]):
    power = power * x
    out = out + coeffs[..., r, None].astype(x.dtype) * power
  return out


def _plain(gamma, window, window_state, optimizer) -> bool:
  """The Titans rule (the code paths above, bit for bit)."""
  return gamma is None and window == 1 and window_state is None and optimizer == "momentum"


def _check_rule(k, v, gamma, window, window_state, optimizer, op, seq_axis=True):
  if not isinstance(window, int) or isinstance(window, bool) or window < 1:
    raise ValueError(f"{op}: window (the Omega rule's objective window c) must be a positive int, got {window!r}.")
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"{op}: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
  if gamma is not None and tuple(gamma.shape) != tuple(k.shape[:-1]):
    raise ValueError(f"{op}: gamma must have shape {tuple(k.shape[:-1])} (k without dim), got {tuple(gamma.shape)}.")
  if window_state is not None:
    if window == 1:
      raise ValueError(f"{op}: window_state is the last window - 1 tokens; with window=1 pass None.")
    bsz, h, n = k.shape[0], k.shape[-2], window - 1
    want = ((bsz, n, h, k.shape[-1]), (bsz, n, h, v.shape[-1]), (bsz, n, h))
    if not isinstance(window_state, (tuple, list)) or len(window_state) != 3:
      raise ValueError(f"{op}: window_state must be a tuple (keys, values, gammas), got {type(window_state)}.")
    for name, x, shape in zip(("keys", "values", "gammas"), window_state, want):
      if tuple(x.shape) != shape:
        raise ValueError(f"{op}: window_state {name} must have shape {shape}, got {tuple(x.shape)}.")


def empty_window(batch: int, heads: int, window: int, spec: MemorySpec, dtype=_F32):
  """The window state before any token: c - 1 zero keys and values with gamma 0 (they add nothing); None for
  window 1. Shapes `[batch, c-1, heads, input_dim]`, `[batch, c-1, heads, dim]`, `[batch, c-1, heads]`."""
  if window == 1:
    return None
  n = window - 1
  return (jnp.zeros((batch, n, heads, spec.input_dim), dtype), jnp.zeros((batch, n, heads, spec.dim), dtype),
          jnp.zeros((batch, n, heads), dtype))


def _prepend_window(window_state, k, v, g, window, dt):
  """(window_state; k, v, g) along axis 1 (seq): `[batch, c-1+t, heads, ...]` in dt."""
  k, v, g = (x.astype(dt) for x in (k, v, g))
  if window == 1:
    return k, v, g
  if window_state is None:
    window_state = empty_window(k.shape[0], k.shape[2], window,
                                MemorySpec(dim=v.shape[-1], in_dim=k.shape[-1], depth=1), dt)
  return tuple(jnp.concatenate([w.astype(dt), x], axis=1) for w, x in zip(window_state, (k, v, g)))


def next_window(window_state, k, v, gamma, window: int):
  """The window state after a call on k, q `[batch, seq, heads, ...]` (gamma `[batch, seq, heads]` or None:
  ones): the last c - 1 tokens of (window_state; k, v, gamma). None for window 1."""
  if window == 1:
    return None
  g = jnp.ones(k.shape[:-1], _F32) if gamma is None else gamma
  dt = _compute_dtype(k, v, g, window_state)
  full = _prepend_window(window_state, k, v, g, window, dt)
  return tuple(x[:, x.shape[1] - (window - 1):] for x in full)


def _opt_step(ws, ss, g, th, et, al, optimizer):
  """One optimizer step (see the section comment): gates `[batch, heads]`, the rest per layer."""
  th, et, al = (x[..., None, None] for x in (th, et, al))
  if optimizer == "momentum":
    ss = tuple(et * s - th * u for s, u in zip(ss, g))
    return tuple((1 - al) * w + s for w, s in zip(ws, ss)), ss
  if optimizer == "gd":
    ss = tuple(-th * u for u in g)
    return tuple((1 - al) * w + s for w, s in zip(ws, ss)), ss
  ss = tuple(et * s + u for s, u in zip(ss, g))
  return tuple((1 - al) * w - th * newton_schulz(s) for w, s in zip(ws, ss)), ss


def _band(b: int, window: int, dt) -> jax.Array:
  """Band `[b, b + c - 1]`: 1 where token j of the chunk has extended token i in its window (j <= i <= j+c-1)."""
  j = np.arange(b)[:, None]
  i = np.arange(b + window - 1)[None, :]
  return jnp.asarray((i >= j) & (i <= j + window - 1), dt)


def _windowed_grad_fn(spec):
  """Per head: grad_W sum_i g_i ||M_W(k_i) - v_i||^2 (ks `[c, in]`, vs `[c, d]`, gs `[c]`), by jax.grad."""
  def loss(ws, ks, vs, gs):
    return jnp.sum(gs * jax.vmap(lambda kk, vv: _loss_one(ws, kk, vv, spec))(ks, vs))
  return _per_head(jax.grad(loss))


def _atlas_reference_update(weights, momentum, k, v, q, theta, eta, alpha, spec, read, gamma, window, window_state,
                            optimizer):
  """`reference_update` with the ATLAS options: the token recurrence, each step's windowed gradient at W_{t-1}
  by jax.grad over the window's (at most c) tokens."""
  dt = _compute_dtype(weights, momentum, k, v, q, theta, eta, alpha, gamma, window_state)
  t = k.shape[1]
  g = jnp.ones(k.shape[:-1], dt) if gamma is None else gamma
  kf, vf, gf = _prepend_window(window_state, k, v, g, window, dt)  # [B, c-1+t, H, ...]
  idx = np.arange(t)[:, None] + np.arange(window)[None]  # [t, c]: token t's window in the full sequence
  kw, vw = (jnp.transpose(x[:, idx], (1, 0, 3, 2, 4)) for x in (kf, vf))  # [t, B, H, c, ...]
  gw = jnp.transpose(gf[:, idx], (1, 0, 3, 2))  # [t, B, H, c]
  grad_fn = _windowed_grad_fn(spec)
  apply_fn = _per_head(lambda ws, x: _apply_one(ws, x, spec))

  def body(carry, xs):
    ws, ss = carry
    kt, vt, gt, q_t, th, et, al = xs
    before = apply_fn(ws, q_t) if read == "before" else None
    ws, ss = _opt_step(ws, ss, grad_fn(ws, kt, vt, gt), th, et, al, optimizer)
    return (ws, ss), (before if read == "before" else apply_fn(ws, q_t))

  carry = _cast((tuple(weights), tuple(momentum)), dt)
  carry, reads = jax.lax.scan(body, carry, (kw, vw, gw) + _time_major(dt, q, theta, eta, alpha))
  return jnp.swapaxes(reads, 0, 1), carry


def _extended(kf, n, b, window):
  """Each chunk's tokens and their c - 1 predecessors: kf `[B, c-1+n*b, ...]` -> `[B, n, b+c-1, ...]`."""
  idx = np.arange(n)[:, None] * b + np.arange(b + window - 1)[None]
  return kf[:, idx]


def _atlas_minibatch_reference(weights, momentum, k, v, q, theta, eta, alpha, spec, chunk_size, read, gamma,
                               window, window_state, optimizer):
  """`minibatch_reference` with the ATLAS options: per chunk, every token's gradient of the chunk's extended
  tokens at W_0 (jax.grad), the windowed sums by an explicit band, then the optimizer token by token."""
  t, b = k.shape[1], chunk_size
  n = -(-t // b)
  e = b + window - 1
  dt = _compute_dtype(weights, momentum, k, v, q, theta, eta, alpha, gamma, window_state)
  g = jnp.ones(k.shape[:-1], dt) if gamma is None else gamma
  kf, vf, gf = _prepend_window(window_state, *(_pad_seq(x.astype(dt), n * b) for x in (k, v, g)), window, dt)
  kx, vx = (jnp.transpose(_extended(x, n, b, window), (1, 0, 3, 2, 4)) for x in (kf, vf))  # [n, B, H, e, ..]
  gx = jnp.transpose(_extended(gf, n, b, window), (1, 0, 3, 2))  # [n, B, H, e]
  valid = _pad_seq(jnp.ones(k.shape[:2], bool), n * b, False)[..., None]
  xs = [_chunks(_pad_seq(x.astype(dt), n * b), n, b) for x in (q, theta, eta, alpha)] + [_chunks(valid, n, b)]
  band = _band(b, window, dt)
  grad_fn = _per_head(jax.vmap(jax.grad(lambda ws, kk, vv: _loss_one(ws, kk, vv, spec)), in_axes=(None, 0, 0)))
  apply_fn = _per_head(lambda ws, x: _apply_one(ws, x, spec))
  del e

  def chunk(carry, cx):
    w0, s0 = carry
    kc, vc, gc, qc, thc, etc, alc, vac = cx
    us = grad_fn(w0, kc, vc)  # per layer [B, H, e, d_in, d_out], all at W_0
    gs = tuple(jnp.einsum("ji,bhi,bhixy->jbhxy", band, gc, u) for u in us)  # [b, B, H, d_in, d_out]

    def token(c, x):
      ws, ss = c
      gt, q_t, th, et, al, ok = x
      nws, nss = _opt_step(ws, ss, gt, th, et, al, optimizer)
      out = apply_fn({"after": nws, "before": ws, "chunk_start": w0}[read], q_t)
      keep = ok[..., None, None]
      nws = tuple(jnp.where(keep, a, o) for a, o in zip(nws, ws))
      nss = tuple(jnp.where(keep, a, o) for a, o in zip(nss, ss))
      return (nws, nss), out

    return jax.lax.scan(token, (w0, s0), (gs, qc, thc, etc, alc, vac))

  carry = _cast((tuple(weights), tuple(momentum)), dt)
  carry, reads = jax.lax.scan(chunk, carry, (kx, vx, gx, *xs))  # reads [n, b, B, H, d]
  reads = jnp.moveaxis(reads, 2, 0).reshape((k.shape[0], n * b) + v.shape[2:])
  return reads[:, :t], carry


def _muon_chunk_step(carry, cx, *, spec: MemorySpec, read: str):
  """One chunk under muon, every token of the chunk at once. All gradients are taken at W_0 (hand backward over
  the extended chunk), so inside the chunk both recurrences are linear and have closed forms; only the
  Newton-Schulz map between them is not, and it is applied to every token's momentum in one batched call:

      G_t = sum_i wgt[t, i] X_i^T Delta_i                       (the window's weighted gradients, per layer)
      S_t = E_t S_0 + sum_{i<=t} (E_t / E_i) G_i                 (S_t = eta_t S_{t-1} + G_t)
          = E_t S_0 + sum_j mix[t, j] X_j^T Delta_j,  mix = (E_t / E_i)_{t,i} wgt   (G_t never materialized)
      W_t = beta_t W_0 - sum_{i<=t} (beta_t / beta_i) theta_i NS5(S_i)   (W_t = (1 - alpha_t) W_{t-1} - theta_t NS5(S_t))

  with E, beta the running products of eta and 1 - alpha (ratios as in `_chunk_coefficients`). Padding tokens of
  a tail chunk (valid False) keep the state: no gradient, eta = 1, alpha = 0. Equal to a token-by-token scan;
  on CPU a scan of b small steps per chunk was ~10x slower (measured: the small atlas model's train step)."""
  w0, s0 = carry
  k, v, q, th, et, al, wgt, valid = cx  # k, v [B,H,e,.]; q [B,H,b,in]; gates [B,H,b]; wgt [B,H,b,e]; valid [b]
  xs, deltas = _forward_backward(w0, k, v, spec)
  ok = valid.astype(th.dtype)
  wgt = wgt * ok[:, None]
  et = jnp.where(valid, et, 1.0)
  th, al = th * ok, al * ok
  le, la = _safe_log(et), _safe_log(1.0 - al)
  e_run, beta_run = jnp.exp(jnp.cumsum(le, axis=-1)), jnp.exp(jnp.cumsum(la, axis=-1))  # [B, H, b]
  e_ratio, a_ratio = _ratio(le), _ratio(la)  # [B, H, b, b]: [t, i] = E_t / E_i, beta_t / beta_i
  ws, ss = [], []
  # S_t's gradient part sum_i (E_t / E_i) G_i = sum_j mix[t, j] X_j^T Delta_j: one contraction over the e window
  # tokens, without materializing the b per-token gradients G_i (one [b, d_in, d_out] tensor per layer fewer).
  mix = jnp.einsum("...ti,...ij->...tj", e_ratio, wgt)  # [B, H, b, e]
  for l in range(spec.depth):
    s_t = e_run[..., None, None] * s0[l][..., None, :, :] + jnp.einsum("...tj,...ja,...jo->...tao", mix, xs[l],
                                                                       deltas[l])
    upd = th[..., None, None] * newton_schulz(s_t)
    w_t = beta_run[..., None, None] * w0[l][..., None, :, :] - jnp.einsum("...ti,...iao->...tao", a_ratio, upd)
    ws.append(w_t)
    ss.append(s_t)
  if read == "after":
    src = ws
  elif read == "before":  # W_{t-1}: W_0 for the first token
    src = [jnp.concatenate([w0[l][..., None, :, :], ws[l][..., :-1, :, :]], axis=-3) for l in range(spec.depth)]
  else:
    src = None
  if src is None:
    reads = _mlp(w0, q, spec)
  else:  # each token through its own weights: q_t [B, H, b, 1, in] @ W_t [B, H, b, in, out]
    reads = _mlp(src, q[..., None, :], spec)[..., 0, :]
  end = (tuple(w[..., -1, :, :] for w in ws), tuple(x[..., -1, :, :] for x in ss))
  return end, reads


def _atlas_chunked_update(weights, momentum, k, v, q, theta, eta, alpha, spec, chunk_size, read, gamma, window,
                          window_state, optimizer):
  """`chunked_update` with the ATLAS options (section comment): the band-widened closed form for gd and
  momentum, every token of a chunk at once around a batched Newton-Schulz for muon (`_muon_chunk_step`)."""
  dt = _compute_dtype(weights, momentum, k, v, q, theta, eta, alpha, gamma, window_state)
  carry = _cast((tuple(weights), tuple(momentum)), dt)
  if k.shape[1] == 0:
    return jnp.zeros(v.shape, dt), carry
  t, b, n, heads_major = _chunk_layout(k, chunk_size, dt)
  total = n * b
  qc, thc, etc, alc = (heads_major(x) for x in (q, theta, eta, alpha))
  if optimizer == "gd":
    etc = jnp.zeros_like(etc)
  g = jnp.ones(k.shape[:-1], dt) if gamma is None else gamma
  kf, vf, gf = _prepend_window(window_state, *(_pad_seq(x.astype(dt), total) for x in (k, v, g)), window, dt)
  kx, vx = (jnp.transpose(_extended(x, n, b, window), (1, 0, 3, 2, 4)) for x in (kf, vf))  # [n, B, H, e, ..]
  gx = jnp.transpose(_extended(gf, n, b, window), (1, 0, 3, 2))  # [n, B, H, e]
  band = _band(b, window, dt)
  # Batch and heads folded into one axis, as in `chunked_update` (no leading axis of size 1 at batch 1).
  bsz, heads = k.shape[0], k.shape[2]
  fold = lambda x: x.reshape((x.shape[0], bsz * heads) + x.shape[3:])
  kx, vx, qc, thc, etc, alc, gx = (fold(x) for x in (kx, vx, qc, thc, etc, alc, gx))
  carry = jax.tree.map(lambda w: w.reshape((bsz * heads,) + w.shape[2:]), carry)
  if optimizer == "muon":
    wgt = band * gx[..., None, :]  # [n, B*H, b, e]
    valid = jnp.asarray(np.arange(total).reshape(n, b) < t)
    body = jax.checkpoint(functools.partial(_muon_chunk_step, spec=spec, read=read))
    carry, reads = jax.lax.scan(body, carry, (kx, vx, qc, thc, etc, alc, wgt, valid))
  else:
    read_co, end_co = _read_and_end_coefficients(thc, etc, alc, read, (t - 1) % b)
    widen = lambda m: jnp.einsum("...tj,ji->...ti", m, band) * gx[..., None, :]  # C -> C Band diag(gamma)
    if read_co is not None:
      read_co = (read_co[0], read_co[1], widen(read_co[2]))
    be, bse, ee, ce, see = end_co
    end_co = (be, bse, ee, widen(ce[..., None, :])[..., 0, :], widen(see[..., None, :])[..., 0, :])
    body = jax.checkpoint(lambda c, x: _chunk_step(c, x, spec=spec))
    carry, reads = jax.lax.scan(body, carry, (kx, vx, qc, read_co, end_co))  # reads [n, B*H, b, d]
  carry = jax.tree.map(lambda w: w.reshape((bsz, heads) + w.shape[1:]), carry)
  return _seq_major(reads.reshape((n, bsz, heads) + reads.shape[2:]), t), carry


def _atlas_step(weights, momentum, k, v, q, theta, eta, alpha, spec, read, gamma, window, window_state, optimizer):
  """`step` with the ATLAS options: the window's gradients at the current weights by the hand backward."""
  dt = _compute_dtype(weights, momentum, k, v, q, theta, eta, alpha, gamma, window_state)
  w0, s0 = _cast((tuple(weights), tuple(momentum)), dt)
  g = jnp.ones(k.shape[:-1], dt) if gamma is None else gamma
  kf, vf, gf = _prepend_window(window_state, k[:, None], v[:, None], g[:, None], window, dt)  # [B, c, H, ..]
  kx, vx = (jnp.swapaxes(x, 1, 2) for x in (kf, vf))
  gx = jnp.swapaxes(gf, 1, 2)  # [B, H, c]
  xs, deltas = _forward_backward(w0, kx, vx, spec)
  grads = tuple(jnp.swapaxes(x, -1, -2) @ (gx[..., None] * dl) for x, dl in zip(xs, deltas))
  w1, s1 = _opt_step(w0, s0, grads, *(x.astype(dt) for x in (theta, eta, alpha)), optimizer)
  out = _mlp(w1 if read == "after" else w0, q.astype(dt)[:, :, None, :], spec)
  return out[:, :, 0], (w1, s1)


__all__ = ["MemorySpec", "READ_MODES", "OPTIMIZERS", "init_weights", "broadcast", "apply", "reference_update",
           "minibatch_reference", "chunked_update", "step", "newton_schulz", "poly_features",
           "poly_feature_size", "elementwise_poly_features", "empty_window", "next_window"]
