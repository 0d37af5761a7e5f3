"""`decay_scan`: the first-order linear recurrence h_t = a_t * h_{t-1} + x_t along axis 1.

The momentum and forgetting recurrences of deep neural memories (Titans: S_t = eta_t S_{t-1} - theta_t u_t,
W_t = (1 - alpha_t) W_{t-1} + S_t) over arrays or pytrees of weights. The gate `a` broadcasts against each
leaf from the left: a `[b, t, h]` against a leaf `[b, t, h, d1, d2]` is one scalar per token and head for a
weight matrix per head (a is reshaped to `[b, t, h, 1, 1]`).

Implementations (`impl=`, see `kernels.dispatch`):
- "reference": a `lax.scan` loop over time, float32.
- "xla": a blocked scan: blocks of ~sqrt(t) steps scanned all at once, then a short scan across blocks
  (the associative operator (a1, x1) o (a2, x2) = (a1 a2, a2 x1 + x2) applied blockwise).
- "pallas" / "pallas_interpret": a sequential kernel over time blocks (`kernels.decay_scan_pallas`), with a
  custom VJP whose backward is the same kernel run in reverse:
  lambda_t = dh_t + a_{t+1} lambda_{t+1}, dx_t = lambda_t, da_t = lambda_t h_{t-1}, dh0 = a_0 lambda_0.
All are differentiable; the math is float32 and h has each leaf's dtype.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from kernels.dispatch import resolve_impl

_F32 = jnp.float32


def _gate_for(a: jax.Array, x: jax.Array) -> jax.Array:
  """a `[b, t, ...]` reshaped to broadcast against the leaf x (trailing singleton axes), float32."""
  return a.astype(_F32).reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _check_leaf(a, x, h0, where: str):
  if x.ndim < 2:
    raise ValueError(f"decay_scan: x{where} must be [batch, seq, ...], got shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"decay_scan: x{where} must be floating point, got {x.dtype}.")
  if a.ndim < 2 or a.ndim > x.ndim or a.shape[:2] != x.shape[:2] or any(
      da not in (1, dx) for da, dx in zip(a.shape[2:], x.shape[2:a.ndim])):
    raise ValueError(
        f"decay_scan: gate a of shape {a.shape} must be [batch, seq, ...] and broadcast from the left against "
        f"x{where} of shape {x.shape} (same batch and seq, each further axis equal or 1).")
  if h0 is not None and tuple(h0.shape) != x.shape[:1] + x.shape[2:]:
    raise ValueError(
        f"decay_scan: h0{where} must be [batch, ...] = {x.shape[:1] + x.shape[2:]} (x without the seq axis), "
        f"got {tuple(h0.shape)}.")


def decay_scan_reference_leaf(a: jax.Array, x: jax.Array, h0: jax.Array | None) -> jax.Array:
  """Loop over time. a broadcastable `[b, t, ...]`, x `[b, t, ...]`, h0 `[b, ...]` or None -> h like x."""
  a = _gate_for(a, x)
  h = jnp.zeros(x.shape[:1] + x.shape[2:], _F32) if h0 is None else h0.astype(_F32)

  def body(h, ax):
    a_t, x_t = ax
    h = a_t * h + x_t
    return h, h

  _, hs = jax.lax.scan(body, h, (jnp.swapaxes(a, 0, 1), jnp.swapaxes(x.astype(_F32), 0, 1)))
  return jnp.swapaxes(hs, 0, 1).astype(x.dtype)


def decay_scan_xla_leaf(a: jax.Array, x: jax.Array, h0: jax.Array | None) -> jax.Array:
  """Blocked scan. Shapes as `decay_scan_reference_leaf`.

  Time is cut into nb blocks of L ~ sqrt(t) steps. One `lax.scan` over the L in-block positions runs all
  blocks at once (vectorized over blocks) and gives the block-local h_local (started from 0) and
  A_local[t] = prod of a over the block up to t; a second scan over the nb blocks carries h:
  c_{n+1} = A_local[n, L-1] c_n + h_local[n, L-1]; then h = h_local + A_local c_n. O(t) work, about
  2 sqrt(t) sequential steps instead of t, and a small program (XLA's associative_scan over the whole
  sequence compiled ~10x slower). The gate keeps its small broadcast shape throughout.
  """
  a = _gate_for(a, x)
  b, t = x.shape[:2]
  blk = max(1, math.isqrt(t - 1) + 1) if t > 1 else 1
  nb = -(-t // blk)
  pad = nb * blk - t
  xf = x.astype(_F32)
  if pad:  # padded steps come last and are dropped: any gate, zero input
    xf = jnp.pad(xf, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=1.0)
  # [L, b, nb, ...]: the scan walks the in-block position, every block in parallel.
  xb = jnp.moveaxis(xf.reshape((b, nb, blk) + x.shape[2:]), 2, 0)
  ab = jnp.moveaxis(a.reshape((b, nb, blk) + a.shape[2:]), 2, 0)

  def local_step(carry, ax):
    cum_a, h = carry
    a_t, x_t = ax
    cum_a, h = cum_a * a_t, a_t * h + x_t
    return (cum_a, h), (cum_a, h)

  init = (jnp.ones(ab.shape[1:], _F32), jnp.zeros(xb.shape[1:], _F32))
  (a_last, h_last), (a_loc, h_loc) = jax.lax.scan(local_step, init, (ab, xb))

  def carry_step(c, last):
    a_n, h_n = last
    return a_n * c + h_n, c

  c0 = jnp.zeros((b,) + x.shape[2:], _F32) if h0 is None else h0.astype(_F32)
  _, starts = jax.lax.scan(carry_step, c0, (jnp.moveaxis(a_last, 1, 0), jnp.moveaxis(h_last, 1, 0)))
  h = h_loc + a_loc * jnp.moveaxis(starts, 0, 1)[None]  # [L, b, nb, ...]
  return jnp.moveaxis(h, 0, 2).reshape((b, nb * blk) + x.shape[2:])[:, :t].astype(x.dtype)


def decay_scan(a: Any, x: Any, h0: Any = None, impl: str = "auto") -> Any:
  """h_t = a_t * h_{t-1} + x_t along axis 1 (h_{-1} = h0, zeros if None).

  Args:
    a: the gate: an array `[batch, seq, ...]` that broadcasts from the left against every leaf of x (e.g.
      `[b, t, heads]` against `[b, t, heads, d1, d2]`), or a pytree of such arrays with x's structure.
    x: an array `[batch, seq, ...]` or a pytree of them.
    h0: None, or x's structure with leaves `[batch, ...]` (each leaf of x without the seq axis).
    impl: one of `kernels.dispatch.IMPLS`.

  Returns:
    h with x's structure, shapes and dtypes.
  """
  impl = resolve_impl(impl, "decay_scan")
  x_leaves, treedef = jax.tree.flatten(x)
  if isinstance(a, (jax.Array, jnp.ndarray)) or hasattr(a, "shape"):
    a_leaves = [a] * len(x_leaves)
  else:
    a_leaves = treedef.flatten_up_to(a)
  h0_leaves = [None] * len(x_leaves) if h0 is None else treedef.flatten_up_to(h0)
  for i, (al, xl, hl) in enumerate(zip(a_leaves, x_leaves, h0_leaves)):
    _check_leaf(al, xl, hl, "" if len(x_leaves) == 1 else f" (leaf {i})")
  if impl == "reference":
    leaf_fn = decay_scan_reference_leaf
  elif impl == "xla":
    leaf_fn = decay_scan_xla_leaf
  else:
    from kernels.decay_scan_pallas import decay_scan_pallas_leaf  # pylint: disable=g-import-not-at-top

    interpret = impl == "pallas_interpret"
    leaf_fn = lambda a, x, h0: decay_scan_pallas_leaf(a, x, h0, interpret=interpret)
  return treedef.unflatten([leaf_fn(al, xl, hl) for al, xl, hl in zip(a_leaves, x_leaves, h0_leaves)])
