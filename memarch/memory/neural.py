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

Layout: k, v, q `[batch, seq, heads, d]` (any float dtype), gates `[batch, seq, heads]`, weights and momentum
tuples of `[batch, heads, d_in, d_out]` (layer l maps d_in -> d_out). The math and the state are float32 (float64
when an input is float64, for finite-difference tests).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

_F32 = jnp.float32
# Stand-in for log(0): exp of it (and of any sum containing it) is exactly 0 in float32, and sums of at most a
# chunk's worth of them stay finite.
_LOG_ZERO = -1e4
READ_MODES = ("after", "before", "chunk_start")
Weights = tuple  # tuple of jax.Array, one per layer


@dataclasses.dataclass(frozen=True)
class MemorySpec:
  """Static shape of the memory MLP of one head.

  dim: d_h, the size of keys, values and queries.
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

  def __post_init__(self):
    for name in ("dim", "depth", "expansion"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"MemorySpec.{name} must be a positive int, got {value!r}.")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"MemorySpec.activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}.")

  @property
  def shapes(self) -> tuple[tuple[int, int], ...]:
    """(d_in, d_out) of each layer."""
    if self.depth == 1:
      return ((self.dim, self.dim),)
    hidden = self.expansion * self.dim
    return ((self.dim, hidden),) + ((hidden, hidden),) * (self.depth - 2) + ((hidden, self.dim),)


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
  x `[batch, seq, heads, dim]` -> `[batch, seq, heads, dim]` float32."""
  _check_weights(weights, spec, None, "apply")
  if x.ndim != 4 or x.shape[-1] != spec.dim:
    raise ValueError(f"apply: x must be [batch, seq, heads, {spec.dim}], got shape {x.shape}.")
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
  for name, x in (("k", k), ("v", v), ("q", q)):
    if x.ndim != nd or x.shape[-1] != spec.dim:
      raise ValueError(f"{op}: {name} must be {layout} with dim={spec.dim}, got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{op}: {name} must be floating point, got {x.dtype}.")
  if not (k.shape == v.shape == q.shape):
    raise ValueError(f"{op}: k {k.shape}, v {v.shape} and q {q.shape} must have the same shape.")
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


def reference_update(weights, momentum, k, v, q, theta, eta, alpha, spec: MemorySpec, *, read: str = "after"):
  """The token recurrence (module docstring), one `lax.scan` step per token; the inner gradient by `jax.grad`.

  Args:
    weights, momentum: per layer `[batch, heads, d_in, d_out]` (W_0 and S_0).
    k, v, q: `[batch, seq, heads, dim]`.
    theta, eta, alpha: `[batch, seq, heads]`, in [0, 1] (theta may exceed 1).
    read: "after" (M_{W_t}(q_t)) or "before" (M_{W_{t-1}}(q_t)); "chunk_start" is only defined for a chunked
      rule (use `minibatch_reference` / `chunked_update`).

  Returns:
    `(reads [batch, seq, heads, dim] float32, (weights_T, momentum_T))`.
  """
  _check_inputs(weights, momentum, k, v, q, theta, eta, alpha, spec, read, "reference_update")
  if read == "chunk_start":
    raise ValueError("reference_update: read='chunk_start' needs chunks; use minibatch_reference or chunked_update.")
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
                        read: str = "after"):
  """The chunked (mini-batch) rule as a slow loop: per chunk, every token's gradient at the chunk's start
  weights (`jax.grad`, vmapped over the chunk's tokens), then the momentum and forgetting recurrences token by
  token, materializing each token's weights and reading with them. Arguments and outputs as `reference_update`,
  plus `chunk_size`; read in {"after", "before", "chunk_start"}. The tail chunk may be shorter (its missing
  tokens are skipped, so the state is exact)."""
  _check_inputs(weights, momentum, k, v, q, theta, eta, alpha, spec, read, "minibatch_reference")
  _check_chunk(chunk_size, "minibatch_reference")
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
  reads = jnp.moveaxis(reads, 2, 0).reshape((k.shape[0], n * b) + k.shape[2:])
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
                   read: str = "after"):
  """The chunked (mini-batch gradient) update in closed form; equals `minibatch_reference` (and, with
  chunk_size = 1, `reference_update`). See the module docstring for the math.

  Args:
    weights, momentum: per layer `[batch, heads, d_in, d_out]` (W_0, S_0).
    k, v, q: `[batch, seq, heads, dim]`, any float dtype (math in float32); seq need not be a multiple of
      chunk_size (the tail is padded with theta = 0 and the state is taken at the last real token).
    theta, eta, alpha: `[batch, seq, heads]`: learning rate (>= 0), momentum and forgetting gates in [0, 1].
    chunk_size: b, tokens per chunk whose gradients share the chunk's starting weights.
    read: "after" | "before" | "chunk_start" (module docstring).

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
  bsz, t, h, d = k.shape
  dt = _compute_dtype(weights, momentum, k, v, q, theta, eta, alpha)
  carry = _cast((tuple(weights), tuple(momentum)), dt)
  if t == 0:
    return jnp.zeros(k.shape, dt), carry
  b = min(chunk_size, t)
  n = -(-t // b)
  total = n * b

  def heads_major(x):  # [B, n*b, H, ...] -> [n, B, H, b, ...]
    x = _pad_seq(x.astype(dt), total).reshape((bsz, n, b) + x.shape[2:])
    return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)

  kc, vc, qc, thc, etc, alc = (heads_major(x) for x in (k, v, q, theta, eta, alpha))
  read_co, end_co = _read_and_end_coefficients(thc, etc, alc, read, (t - 1) % b)
  body = jax.checkpoint(lambda c, x: _chunk_step(c, x, spec=spec))
  carry, reads = jax.lax.scan(body, carry, (kc, vc, qc, read_co, end_co))  # reads [n, B, H, b, d]
  reads = jnp.moveaxis(reads, 0, 1)  # [B, n, H, b, d]
  reads = jnp.swapaxes(reads, 2, 3).reshape(bsz, total, h, d)
  return reads[:, :t], carry


# ------------------------------------------------------------------------------------------------ decoding


def step(weights, momentum, k, v, q, theta, eta, alpha, spec: MemorySpec, *, read: str = "after"):
  """One token (decoding): the recurrence's step with the hand backward of `chunked_update`.

  Args:
    weights, momentum: per layer `[batch, heads, d_in, d_out]`.
    k, v, q: `[batch, heads, dim]`; theta, eta, alpha: `[batch, heads]`.
    read: "after" or "before"; "chunk_start" reads with the weights before this token (a decoding chunk of
      one token: the same as "before").

  Returns:
    `(read [batch, heads, dim] float32, (weights, momentum))`: the state has a fixed size.
  """
  _check_inputs(weights, momentum, k, v, q, theta, eta, alpha, spec, read, "step", seq_axis=False)
  dt = _compute_dtype(weights, momentum, k, v, q, theta, eta, alpha)
  w0, s0 = _cast((tuple(weights), tuple(momentum)), dt)
  k, v, q = (x.astype(dt)[:, :, None, :] for x in (k, v, q))  # [B, H, 1, d]: a chunk of one token
  theta, eta, alpha = (g.astype(dt)[..., None, None] for g in (theta, eta, alpha))
  xs, deltas = _forward_backward(w0, k, v, spec)
  s1 = tuple(eta * s - theta * (jnp.swapaxes(x, -1, -2) @ dl) for s, x, dl in zip(s0, xs, deltas))
  w1 = tuple((1 - alpha) * w + s for w, s in zip(w0, s1))
  out = _mlp(w1 if read == "after" else w0, q, spec)
  return out[:, :, 0], (w1, s1)


__all__ = ["MemorySpec", "READ_MODES", "init_weights", "broadcast", "apply", "reference_update",
           "minibatch_reference", "chunked_update", "step"]
