"""The Titans neural memory over a sequence split across devices (context parallelism of `neural.chunked_update`).

Device i of a mesh axis holds the contiguous slice i of the keys, values, queries and gates. Two schemes:

Affine (depth-1 memories, optimizer "momentum" or "gd", objective window 1). A depth-1 memory M_W(x) = x W
(+ x with the residual) has token gradients u_i = 2 k_i^T (k_i W - v_i [+ k_i]), affine in W, so every chunk of
the closed form (`neural` module docstring) maps the state X = (W, S) affinely:
X -> A X + B, with A acting on the left (`[d_in, d_in]` blocks A_WW, A_WS, A_SW, A_SS per batch and head,
independent of the values and of the residual) and B the state reached from X = 0. The reads are linear in X
too. So each device runs its slice three times at once (`chunked_update` from zero with the real values; and,
with values 0 and no residual, from X = (I, 0) and X = (0, I), which gives the columns of A and the reads
q_t A_t^{W.}); the maps are composed across devices (`kernels.affine_exclusive_scan`), and the reads corrected:
read_t = read_t^0 + (q_t A_t^{WW}) W_in + (q_t A_t^{WS}) S_in. Exact; the slices run in parallel; cost per
device about 3x its slice's update (the two basis runs are d_in wide).

Hand-off (everything else: deep MLP memories, whose update is not affine in the weights; muon; the Omega
rule's window, whose c - 1 previous tokens ride along in the carry): `kernels.sequential_handoff`, device i
continues from device i - 1's (W, S) after it finished. Activation memory stays sharded, but the slices run
one after another: no speed-up (see kernels/sequence_parallel.py).

Both equal `neural.chunked_update` over the whole sequence when the chunks of the two coincide, i.e. when the
slice length is a multiple of chunk_size (checked: a clear error otherwise).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import kernels
from memarch.memory import neural

_F32 = jnp.float32


def is_affine(spec: neural.MemorySpec, window: int = 1, optimizer: str = "momentum") -> bool:
  """Whether the memory's update is affine in its state (the parallel scheme applies)."""
  return spec.depth == 1 and window == 1 and optimizer in ("momentum", "gd")


def _check_slice(t: int, chunk_size: int, op: str) -> None:
  if t % chunk_size:
    raise ValueError(
        f"{op}: each device's slice ({t} tokens) must be a multiple of memory_chunk_size ({chunk_size}), so that the "
        "chunks (whose gradients share the chunk's starting weights) are those of the unsplit sequence. Change "
        "the sequence length, the 'sequence' mesh axis or memory_chunk_size.")


def _rule(gamma, window, window_state, optimizer):
  rule = {}
  if gamma is not None or window > 1:
    rule.update(gamma=gamma, window=window, window_state=window_state)
  if optimizer != "momentum":
    rule["optimizer"] = optimizer
  return rule


def sequence_parallel_update(weights, momentum, k, v, q, theta, eta, alpha, spec: neural.MemorySpec, *,
                             axis_name: str, chunk_size: int = 16, read: str = "after", gamma=None,
                             window: int = 1, window_state=None, optimizer: str = "momentum", scheme: str = "auto"):
  """`neural.chunked_update` of this device's slice, continuing from the slices before it (inside shard_map).

  Args:
    weights, momentum: the state before the whole sequence (the same on every device): per layer
      `[batch, heads, d_in, d_out]`.
    k, v, q: `[batch, t, heads, dim]`, theta, eta, alpha, gamma: `[batch, t, heads]`: this device's slice;
      t must be a multiple of chunk_size.
    spec, chunk_size, read, window, window_state, optimizer: as `neural.chunked_update` (window_state: the
      window before the whole sequence, None for none).
    axis_name: the mesh axis the sequence is split over.
    scheme: "auto" (affine where `is_affine`, else hand-off), "affine" or "handoff".

  Returns:
    `(reads [batch, t, heads, dim] float32, (weights, momentum))`: this slice's reads and the state after it
    (on the last device: after the whole sequence). The window state after the call is
    `neural.next_window` of the last device's slice.
  """
  _check_slice(k.shape[1], chunk_size, "sequence_parallel_update")
  if scheme not in ("auto", "affine", "handoff"):
    raise ValueError(f"sequence_parallel_update: scheme must be 'auto', 'affine' or 'handoff', got {scheme!r}.")
  affine = is_affine(spec, window, optimizer) and gamma is None
  if scheme == "affine" and not affine:
    raise ValueError("sequence_parallel_update: the affine scheme needs a depth-1 memory, optimizer momentum or "
                     f"gd and window 1 (got depth {spec.depth}, optimizer {optimizer!r}, window {window}).")
  if affine and scheme != "handoff":
    return _affine_update(weights, momentum, k, v, q, theta, eta, alpha, spec, axis_name, chunk_size, read,
                          optimizer)
  return _handoff_update(weights, momentum, k, v, q, theta, eta, alpha, spec, axis_name, chunk_size, read, gamma,
                         window, window_state, optimizer)


def _handoff_update(weights, momentum, k, v, q, theta, eta, alpha, spec, axis_name, chunk_size, read, gamma,
                    window, window_state, optimizer):
  if window > 1 and window_state is None:  # device 0's window: c - 1 tokens with gamma 0 (= no window state)
    window_state = neural.empty_window(k.shape[0], k.shape[2], window, spec)
  carry = (tuple(x.astype(_F32) for x in weights), tuple(x.astype(_F32) for x in momentum), window_state)

  def fn(carry, xs):
    w, s, ws = carry
    k_, v_, q_, th, et, al, gm = xs
    reads, (w, s) = neural.chunked_update(w, s, k_, v_, q_, th, et, al, spec, chunk_size=chunk_size, read=read,
                                          **_rule(gm, window, ws, optimizer))
    ws = None if window == 1 else tuple(x.astype(_F32) for x in neural.next_window(ws, k_, v_, gm, window))
    return reads, (tuple(w), tuple(s), ws)

  reads, (w, s, _) = kernels.sequential_handoff(fn, carry, (k, v, q, theta, eta, alpha, gamma), axis_name=axis_name)
  return reads, (w, s)


def _affine_update(weights, momentum, k, v, q, theta, eta, alpha, spec, axis_name, chunk_size, read, optimizer):
  (w0,), (s0,) = weights, momentum
  bsz, _, h, din = k.shape
  kw = dict(chunk_size=chunk_size, read=read, **_rule(None, 1, None, optimizer))
  zeros = jnp.zeros(w0.shape, _F32)
  reads0, (b_w, b_s) = neural.chunked_update((zeros,), (zeros,), k, v, q, theta, eta, alpha, spec, **kw)
  # The linear part: values 0, no residual, from the basis states (I, 0) and (0, I), both in one batch.
  lin = neural.MemorySpec(dim=din, depth=1)
  eye = jnp.broadcast_to(jnp.eye(din, dtype=_F32), (bsz, h, din, din))
  zsq = jnp.zeros_like(eye)
  two = lambda x: jnp.concatenate([x, x], axis=0)
  r_lin, (a_w, a_s) = neural.chunked_update(
      (jnp.concatenate([eye, zsq]),), (jnp.concatenate([zsq, eye]),), two(k), jnp.zeros((2 * bsz,) + k.shape[1:], k.dtype),
      two(q), two(theta), two(eta), two(alpha), lin, **kw)
  a_w, a_s = a_w[0], a_s[0]
  a_map = (a_w[:bsz], a_w[bsz:], a_s[:bsz], a_s[bsz:])  # A_WW, A_WS, A_SW, A_SS
  mm = lambda a, x: jnp.einsum("bhij,bhjo->bhio", a, x)

  def apply(a, x):
    aww, aws, asw, ass = a
    return (mm(aww, x[0]) + mm(aws, x[1]), mm(asw, x[0]) + mm(ass, x[1]))

  s_in, s_out = kernels.affine_exclusive_scan(apply, a_map, (b_w[0], b_s[0]), (w0.astype(_F32), s0.astype(_F32)),
                                              axis_name=axis_name)
  rd = lambda r, x: jnp.einsum("bthi,bhio->btho", r, x)
  reads = reads0 + rd(r_lin[:bsz], s_in[0]) + rd(r_lin[bsz:], s_in[1])
  return reads, ((s_out[0],), (s_out[1],))


def sharded_update(weights, momentum, k, v, q, theta, eta, alpha, spec: neural.MemorySpec, *, chunk_size: int = 16,
                   read: str = "after", gamma=None, window: int = 1, window_state=None, optimizer: str = "momentum",
                   scheme: str = "auto", mesh=None, axis_name: str = "sequence", batch_axes=None, head_axes=None):
  """`sequence_parallel_update` on global arrays: `jax.shard_map` over `mesh` (None: the mesh set with
  `jax.set_mesh`), the sequence split over `axis_name`, batch and heads over `batch_axes` / `head_axes` (mesh
  axis names, tuples of them or None, dividing those dimensions), manual over every mesh axis. Arguments and
  results as `neural.chunked_update` (without a window state after the call); the sequence must split into
  slices that are multiples of chunk_size.
  """
  n = kernels.mesh_axis_size(mesh, axis_name)
  t = k.shape[1]
  if t % n:
    raise ValueError(f"sharded_update: sequence length {t} must be a multiple of the '{axis_name}' mesh axis "
                     f"({n} devices).")
  _check_slice(t // n, chunk_size, "sharded_update")
  seq4, seq3 = P(batch_axes, axis_name, head_axes, None), P(batch_axes, axis_name, head_axes)
  state, stacked = P(batch_axes, head_axes, None, None), P(axis_name, batch_axes, head_axes, None, None)

  def fn(weights, momentum, window_state, k, v, q, theta, eta, alpha, gamma):
    reads, (w, s) = sequence_parallel_update(
        weights, momentum, k, v, q, theta, eta, alpha, spec, axis_name=axis_name, chunk_size=chunk_size,
        read=read, gamma=gamma, window=window, window_state=window_state, optimizer=optimizer, scheme=scheme)
    return reads, (tuple(x[None] for x in w), tuple(x[None] for x in s))

  # The state after each device's slice comes back stacked [n, ...]; the last one is the final state.
  reads, (w, s) = jax.shard_map(
      fn, mesh=mesh, in_specs=(state, state, P(batch_axes, None, head_axes)) + (seq4,) * 3 + (seq3,) * 4,
      out_specs=(seq4, (stacked, stacked)), check_vma=False,
  )(tuple(weights), tuple(momentum), window_state, k, v, q, theta, eta, alpha, gamma)
  return reads, (tuple(x[-1] for x in w), tuple(x[-1] for x in s))
