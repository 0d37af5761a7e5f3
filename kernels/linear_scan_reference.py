"""The naive definition of `kernels.linear_scan`: the recurrence token by token (`lax.scan`), float32.

With g (log decay) and beta (write strength), per batch and head, state `S` `[k_dim, v_dim]`:

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T      (gated delta rule)
    S_t = exp(g_t) S_{t-1} + k_t v_t^T                                        (beta=None: Hebbian write)
    o_t = scale * S_t^T q_t

g=None means g_t = 0 (no decay). This is the ground truth the other implementations are tested against,
the same convention as flash-linear-attention's `naive_recurrent_gated_delta_rule` / `simple_gla`.
Autodiff through it stores one state per token: memory O(seq * k_dim * v_dim).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def step_math(q, k, v, state, g, beta, scale):
  """One token in float32. q, k `[b, h, K]`, v `[b, h, V]`, state `[b, h, K, V]`, g/beta `[b, h]` or None.

  Returns `(o [b, h, V] float32, new_state [b, h, K, V] float32)`.
  """
  q, k, v, state = (x.astype(jnp.float32) for x in (q, k, v, state))
  if g is not None:
    state = jnp.exp(g.astype(jnp.float32))[..., None, None] * state
  if beta is not None:
    # The delta rule: write beta * (v - prediction of v from the decayed state).
    pred = jnp.einsum("bhkv,bhk->bhv", state, k)
    v = beta.astype(jnp.float32)[..., None] * (v - pred)
  state = state + k[..., :, None] * v[..., None, :]
  o = scale * jnp.einsum("bhkv,bhk->bhv", state, q)
  return o, state


def linear_scan_reference(q, k, v, g, beta, initial_state, scale: float):
  """Token-by-token linear scan.

  Args:
    q, k: `[batch, seq, heads, k_dim]`; v: `[batch, seq, heads, v_dim]`.
    g, beta: `[batch, seq, heads]` or None.
    initial_state: `[batch, heads, k_dim, v_dim]` or None (zeros).
    scale: output scale.

  Returns:
    `(o [batch, seq, heads, v_dim] in q's dtype, final_state [batch, heads, k_dim, v_dim] float32)`.
  """
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
  # Time-major so lax.scan walks axis 0.
  xs = {"q": q, "k": k, "v": v}
  if g is not None:
    xs["g"] = g
  if beta is not None:
    xs["beta"] = beta
  xs = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).astype(jnp.float32), xs)

  def body(state, x):
    o, state = step_math(x["q"], x["k"], x["v"], state, x.get("g"), x.get("beta"), scale)
    return state, o

  final, o = jax.lax.scan(body, s0, xs)
  return jnp.swapaxes(o, 0, 1).astype(q.dtype), final
