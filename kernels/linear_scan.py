"""`linear_scan` / `linear_scan_step`: the associative-memory scan of the gated delta rule family.

Per batch and head, state S `[k_dim, v_dim]` (float32), g the log decay and beta the write strength:

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T     (gated delta rule / DeltaNet)
    S_t = exp(g_t) S_{t-1} + k_t v_t^T                                       (beta=None: linear attention,
                                                                              with g: RetNet / simple GLA)
    o_t = scale * S_t^T q_t                                                  (scale defaults to k_dim ** -0.5)

g=None means no decay. The conventions are flash-linear-attention's naive recurrences, so results can be
checked against that library. Implementations (`impl=`, see `kernels.dispatch`): "reference" (token by
token), "xla" (chunked, WY/UT form for the delta rule, custom VJP with recomputation), "pallas" /
"pallas_interpret" (state-pass kernels for TPU Mosaic and GPU Triton around the chunked form).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.dispatch import resolve_impl
from kernels.linear_scan_reference import linear_scan_reference, step_math
from kernels.linear_scan_xla import linear_scan_xla


def _check(q, k, v, g, beta, initial_state, chunk_size, op="linear_scan"):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{op}: {name} must be [batch, seq, heads, dim], got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{op}: {name} must be floating point, got {x.dtype}.")
  if q.shape != k.shape:
    raise ValueError(f"{op}: q {q.shape} and k {k.shape} must have the same shape [batch, seq, heads, k_dim].")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(
        f"{op}: batch/seq/heads of v {v.shape[:3]} do not match those of q and k {q.shape[:3]}.")
  if min(q.shape[2], q.shape[3], v.shape[3]) < 1:
    raise ValueError(f"{op}: heads, k_dim and v_dim must be >= 1; got q {q.shape}, v {v.shape}.")
  bth = q.shape[:3]
  for name, x in (("g", g), ("beta", beta)):
    if x is not None and tuple(x.shape) != bth:
      raise ValueError(f"{op}: {name} must be [batch, seq, heads] = {bth}, got shape {tuple(x.shape)}.")
  if initial_state is not None:
    want = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    if tuple(initial_state.shape) != want:
      raise ValueError(
          f"{op}: initial_state must be [batch, heads, k_dim, v_dim] = {want}, got {tuple(initial_state.shape)}.")
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}.")


def linear_scan(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    g: jax.Array | None = None,
    beta: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array]:
  """Scans the associative memory over a sequence.

  Args:
    q, k: `[batch, seq, heads, k_dim]`.
    v: `[batch, seq, heads, v_dim]` (v_dim may differ from k_dim).
    g: `[batch, seq, heads]` log decay (<= 0 in the usual use), or None for no decay.
    beta: `[batch, seq, heads]` write strength of the delta rule (usually in [0, 1]), or None for the plain
      Hebbian write k v^T.
    initial_state: `[batch, heads, k_dim, v_dim]`, or None for zeros.
    scale: output scale, default `k_dim ** -0.5`.
    chunk_size: tokens per chunk of the chunked implementations (any length works; the tail is padded
      exactly).
    impl: one of `kernels.dispatch.IMPLS`.

  Returns:
    `(o, final_state)`: o `[batch, seq, heads, v_dim]` in q's dtype, final_state
    `[batch, heads, k_dim, v_dim]` float32. Internal math is float32.
  """
  _check(q, k, v, g, beta, initial_state, chunk_size)
  if scale is None:
    scale = q.shape[-1] ** -0.5
  scale = float(scale)
  impl = resolve_impl(impl, "linear_scan")
  b, t, h, dk = q.shape
  if b == 0 or t == 0:
    # An empty batch or sequence: no output and the state unchanged (what the token-by-token reference gives).
    state = (jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32))
    return jnp.zeros((b, t, h, v.shape[-1]), q.dtype), state
  if impl == "reference":
    return linear_scan_reference(q, k, v, g, beta, initial_state, scale)
  if impl == "xla":
    return linear_scan_xla(q, k, v, g, beta, initial_state, scale, chunk_size)
  from kernels.linear_scan_pallas import linear_scan_pallas  # pylint: disable=g-import-not-at-top

  return linear_scan_pallas(q, k, v, g, beta, initial_state, scale, chunk_size,
                            interpret=impl == "pallas_interpret")


def linear_scan_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    state: jax.Array,
    *,
    g: jax.Array | None = None,
    beta: jax.Array | None = None,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One token of `linear_scan`, for decoding.

  Args:
    q, k: `[batch, heads, k_dim]` (or `[batch, 1, heads, k_dim]`); v: `[batch, heads, v_dim]` (same rank).
    state: `[batch, heads, k_dim, v_dim]`.
    g, beta: `[batch, heads]` (or `[batch, 1, heads]`), or None.
    scale: default `k_dim ** -0.5`.

  Returns:
    `(o, new_state)`: o `[batch, heads, v_dim]` (or `[batch, 1, heads, v_dim]`, matching q) in q's dtype,
    new_state float32, so that chaining steps equals `linear_scan` over the sequence.
  """
  seq_axis = q.ndim == 4
  if seq_axis:
    if q.shape[1] != 1:
      raise ValueError(f"linear_scan_step: takes one token; q has seq length {q.shape[1]} (use linear_scan).")
    _check(q, k, v, g, beta, state, None, op="linear_scan_step")
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    g = None if g is None else g[:, 0]
    beta = None if beta is None else beta[:, 0]
  else:
    for name, x in (("q", q), ("k", k), ("v", v)):
      if x.ndim != 3:
        raise ValueError(f"linear_scan_step: {name} must be [batch, heads, dim], got shape {x.shape}.")
    _check(q[:, None], k[:, None], v[:, None], None if g is None else g[:, None],
           None if beta is None else beta[:, None], state, None, op="linear_scan_step")
  if scale is None:
    scale = q.shape[-1] ** -0.5
  o, new_state = step_math(q, k, v, state, g, beta, float(scale))
  o = o.astype(q.dtype)
  return (o[:, None] if seq_axis else o), new_state
