"""Sequence (context) parallelism of recurrences: the linear scan split across devices, and the hand-off.

Inside `shard_map` over a mesh axis of n devices, device i holds the contiguous slice i of a sequence. A
recurrence whose step is affine in its state, S -> A_t S + B_t, composes over a slice into one affine map
S -> A S + B (A = A_t ... A_1, B the state reached from zero). So:

1. each device runs its slice from a zero state: local outputs, and its slice's map (A_i, B_i);
2. the maps are `all_gather`ed (n is small: a handful of `[batch, heads, k, k]` matrices) and composed in
   order on every device (`affine_exclusive_scan`): device i's true incoming state is
   S_in,i = (A_{i-1} ... (A_0 S_0 + B_0) ...) + B_{i-1};
3. the outputs are corrected with S_in,i (the output is linear in the state too), without a second scan.

`sequence_parallel_linear_scan` applies this to `kernels.linear_scan` (every rule of the gated delta family):

- Hebbian write (beta None): A_t = exp(g_t) I, so A = exp(sum_t g_t) (a scalar per batch and head) and
  o_t = o_t^local + scale * exp(G_t) S_in^T q_t with G_t = sum_{s<=t} g_s (local cumulative log decay).
- Delta rule: A_t = exp(g_t) (I - beta_t k_t k_t^T), a `[k_dim, k_dim]` matrix per head that does not depend
  on v. The state's columns evolve independently, so ONE scan with values [v, 0] (v_dim + k_dim columns) from
  the initial state [0, I] carries both: its final state is [B, A] and its output columns are
  [o^local, scale * A_t^T q_t], so o_t = o_t^local + (scale A_t^T q_t)^T S_in (a `[k, v]` product per token).
  Cost: one scan of width v_dim + k_dim instead of v_dim, plus n small matrix products; no re-scan.

`sequential_handoff` is the fallback for recurrences that are not affine in their state (deep Titans
memories: an MLP's weights): device i waits for device i - 1's final state (n rounds of `ppermute`, only the
active device computing in each round, under `lax.cond`). Trade-off: activation memory stays sharded (each
device holds and differentiates only its slice, the round function is rematerialized so the backward saves
only the carry of each round), but there is no speed-up: the n slices run one after another, plus n - 1
carry transfers. The alternative, an `all_gather` of the sequence and a scan of everything on every device,
is as slow and holds the whole sequence on each device.

`sharded_linear_scan` applies `jax.shard_map` over a mesh's sequence axis to global arrays.
All functions are differentiable (autodiff goes through all_gather, ppermute and cond).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels.linear_scan import _check, linear_scan
from kernels.ring_attention import mesh_axis_size

_F32 = jnp.float32


def affine_exclusive_scan(apply: Callable[[Any, Any], Any], a, b, s0, *, axis_name: str):
  """Composes the devices' affine maps S -> apply(a_i, S) + b_i in device order along `axis_name`.

  Args:
    apply: `apply(a, s)`, the linear part of a map applied to a state (pytrees).
    a, b: this device's map (pytrees; b has the state's structure).
    s0: the state entering device 0 (the same on every device), with b's structure.
    axis_name: the mesh axis (call inside shard_map).

  Returns:
    `(s_in, s_out)`: the true state entering and leaving this device's slice. Every device composes the
    n gathered maps itself (n small), so no further communication is needed.
  """
  n = jax.lax.axis_size(axis_name)
  i = jax.lax.axis_index(axis_name)
  a_all, b_all = jax.lax.all_gather((a, b), axis_name)  # leading axis n, in device order
  s = s0
  entering = []
  for j in range(n):
    entering.append(s)
    a_j, b_j = jax.tree.map(lambda x: x[j], (a_all, b_all))
    s = jax.tree.map(jnp.add, apply(a_j, s), b_j)
  s_in = jax.tree.map(lambda *xs: jnp.stack(xs)[i], *entering)
  s_out = jax.tree.map(jnp.add, apply(a, s_in), b)
  return s_in, s_out


def sequence_parallel_linear_scan(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis_name: str,
    g: jax.Array | None = None,
    beta: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array]:
  """`kernels.linear_scan` over a sequence split in contiguous slices along `axis_name` (inside shard_map).

  Args:
    q, k: `[batch, t, heads, k_dim]`, v: `[batch, t, heads, v_dim]`: this device's slice.
    axis_name: the mesh axis the sequence is split over.
    g, beta: `[batch, t, heads]` or None, as `kernels.linear_scan`.
    initial_state: `[batch, heads, k_dim, v_dim]`, the state before the whole sequence (device 0 uses it; pass
      the same array on every device), or None for zeros.
    scale, chunk_size, impl: as `kernels.linear_scan` (each device's local scan).

  Returns:
    `(o [batch, t, heads, v_dim] in q's dtype, state [batch, heads, k_dim, v_dim] float32)`: this slice of
    the output of the scan over the whole sequence, and the state after this slice (on the last device: the
    final state of the whole sequence).
  """
  _check(q, k, v, g, beta, initial_state, chunk_size, op="sequence_parallel_linear_scan")
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  scale = float(dk ** -0.5 if scale is None else scale)
  s0 = jnp.zeros((b, h, dk, dv), _F32) if initial_state is None else initial_state.astype(_F32)
  kw = dict(g=g, scale=scale, chunk_size=chunk_size, impl=impl)
  if beta is None:
    o_loc, b_map = linear_scan(q, k, v, **kw)
    if g is None:
      cum = jnp.zeros((b, t, h), _F32)
    else:
      cum = jnp.cumsum(g.astype(_F32), axis=1)  # G_t: the decay from the slice's start to token t
    a_map = jnp.exp(cum[:, -1])  # [b, h]
    apply = lambda a, s: a[..., None, None] * s
    s_in, s_out = affine_exclusive_scan(apply, a_map, b_map, s0, axis_name=axis_name)
    qf = q.astype(_F32) * (scale * jnp.exp(cum))[..., None]
    o = o_loc.astype(_F32) + jnp.einsum("bthk,bhkv->bthv", qf, s_in)
  else:
    v_aug = jnp.concatenate([v, jnp.zeros((b, t, h, dk), v.dtype)], axis=-1)
    eye = jnp.broadcast_to(jnp.eye(dk, dtype=_F32), (b, h, dk, dk))
    init = jnp.concatenate([jnp.zeros((b, h, dk, dv), _F32), eye], axis=-1)
    o_aug, fin = linear_scan(q, k, v_aug, beta=beta, initial_state=init, **kw)
    b_map, a_map = fin[..., :dv], fin[..., dv:]  # B [b, h, dk, dv]; A [b, h, dk, dk]
    apply = lambda a, s: jnp.einsum("bhij,bhjv->bhiv", a, s)
    s_in, s_out = affine_exclusive_scan(apply, a_map, b_map, s0, axis_name=axis_name)
    # Output columns dv: are scale * A_t^T q_t (the identity block read by q), so A_t S_in read by q is this.
    o = o_aug[..., :dv].astype(_F32) + jnp.einsum("bthk,bhkv->bthv", o_aug[..., dv:].astype(_F32), s_in)
  return o.astype(q.dtype), s_out


def sharded_linear_scan(
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
    mesh=None,
    axis_name: str = "sequence",
    batch_axes=None,
    head_axes=None,
) -> tuple[jax.Array, jax.Array]:
  """`kernels.linear_scan` on global arrays by `jax.shard_map` over `mesh` (None: the mesh set with
  `jax.set_mesh`): the sequence split over `axis_name`, the batch over `batch_axes`, the heads over `head_axes`
  (mesh axis names, tuples of them or None, dividing those dimensions); manual over every mesh axis (axes no
  spec names hold replicas). Same arguments and results as `kernels.linear_scan`; the sequence length must be
  a multiple of the axis size.
  """
  n = mesh_axis_size(mesh, axis_name)
  if q.shape[1] % n:
    raise ValueError(f"sharded_linear_scan: sequence length {q.shape[1]} must be a multiple of the "
                     f"'{axis_name}' mesh axis ({n} devices).")
  seq4, seq3 = P(batch_axes, axis_name, head_axes, None), P(batch_axes, axis_name, head_axes)
  state = P(batch_axes, head_axes, None, None)
  names = [name for name, x in (("g", g), ("beta", beta), ("initial_state", initial_state)) if x is not None]
  extra = {"g": g, "beta": beta, "initial_state": initial_state}

  def fn(q, k, v, *rest):
    o, s = sequence_parallel_linear_scan(q, k, v, axis_name=axis_name, scale=scale, chunk_size=chunk_size,
                                         impl=impl, **dict(zip(names, rest)))
    return o, s[None]

  specs = (seq4,) * 3 + tuple(state if name == "initial_state" else seq3 for name in names)
  # Each device returns the state after its own slice ([1, ...] stacked to [n, ...]); the last is the final
  # state. (Not a replicated output: its transpose would be taken as n copies of the cotangent.)
  o, states = jax.shard_map(fn, mesh=mesh, in_specs=specs,
                            out_specs=(seq4, P(axis_name, batch_axes, head_axes, None, None)),
                            check_vma=False)(q, k, v, *(extra[nm] for nm in names))
  return o, states[-1]


def sequential_handoff(fn: Callable[[Any, Any], tuple[Any, Any]], carry, xs, *, axis_name: str,
                       remat: bool = True):
  """Runs `fn` on the devices' slices one after another, passing the carry from device i to i + 1.

  Device 0 starts from `carry`; device i starts from the carry device i - 1 returned. In round r only device
  r computes (`lax.cond` on the device index), then every device's carry moves one step along the axis
  (`ppermute`), so after n rounds each device has run `fn` once from its true incoming carry. See the module
  docstring for the trade-off (sharded activation memory, no speed-up).

  Args:
    fn: `fn(carry, xs) -> (out, new_carry)` on this device's slice (e.g. a chunked memory update).
    carry: the carry entering device 0 (the same on every device); new_carry must have its structure.
    xs: this device's slice of the inputs (any pytree).
    axis_name: the mesh axis (call inside shard_map).
    remat: checkpoint `fn` so the backward pass keeps only each round's inputs, not fn's internals.

  Returns:
    `(out, carry_out)`: fn's output for this device's slice and the carry after it (on the last device, the
    carry after the whole sequence).
  """
  n = jax.lax.axis_size(axis_name)
  i = jax.lax.axis_index(axis_name)
  step = jax.checkpoint(fn) if remat else fn
  out_shape, new_shape = jax.eval_shape(fn, carry, xs)
  if jax.tree.structure(new_shape) != jax.tree.structure(carry):
    raise ValueError("sequential_handoff: fn must return a carry with the structure of the carry it takes; got "
                     f"{jax.tree.structure(new_shape)} for {jax.tree.structure(carry)}.")
  out = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
  new = jax.tree.map(lambda s, c: jnp.zeros(s.shape, s.dtype), new_shape, carry)
  incoming = carry
  perm = [(j, j + 1) for j in range(n - 1)]
  for r in range(n):
    out, new = jax.lax.cond(i == r, lambda c, x, o, w: step(c, x), lambda c, x, o, w: (o, w),
                            incoming, xs, out, new)
    if r < n - 1:
      # Device r + 1 receives device r's carry; the others keep what they had (ppermute gives them zeros).
      got = jax.lax.ppermute(new, axis_name, perm)
      incoming = jax.tree.map(lambda g_, c: jnp.where(i == r + 1, g_, c), got, incoming)
  return out, new
