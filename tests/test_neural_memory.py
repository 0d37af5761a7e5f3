"""Tests of memarch.memory.neural (the Titans neural memory) against its independent references.

`reference_update` (token recurrence, inner gradients by jax.grad) and `minibatch_reference` (a loop that
materializes each token's weights from chunk-start jax.grad gradients) are the ground truth for
`chunked_update` (closed form, hand backward) and `step`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import linear_scan
from memarch.memory import neural as nm

pytestmark = pytest.mark.timeout(300)

B, H, D = 2, 2, 4
TOL = 2e-5


def rel_err(x, ref) -> float:
  """Max over leaves of ||x - ref|| / ||ref||."""
  errs = []
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(ref), strict=True):
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    errs.append(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)))
  return max(errs)


def make(depth=2, t=37, residual=False, activation="silu", seed=0, dtype=np.float32, gates=None, expansion=2):
  """A random problem: spec, (weights, momentum, k, v, q, theta, eta, alpha). Unit-norm keys and queries and
  small learning rates keep the inner recurrence stable (as the layer's L2 norm and gates do)."""
  spec = nm.MemorySpec(dim=D, depth=depth, expansion=expansion, activation=activation, residual=residual)
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s).astype(dtype)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  w = tuple(jnp.asarray(normal(B, H, i, o) / np.sqrt(i)) for i, o in spec.shapes)
  s = tuple(jnp.asarray(0.1 * normal(B, H, i, o)) for i, o in spec.shapes)
  k, q = jnp.asarray(unit(normal(B, t, H, D))), jnp.asarray(unit(normal(B, t, H, D)))
  v = jnp.asarray(normal(B, t, H, D))
  uni = lambda lo, hi: jnp.asarray(rng.uniform(lo, hi, (B, t, H)).astype(dtype))
  theta, eta, alpha = (gates or {}).get("theta", uni(0, 0.3)), (gates or {}).get("eta", uni(0, 1)), (
      gates or {}).get("alpha", uni(0, 0.3))
  return spec, (w, s, k, v, q, theta, eta, alpha)


# ------------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("depth,read", [(2, "before"), (2, "after"),  # depth 1: the linear_scan test
                                        pytest.param(3, "after", marks=pytest.mark.slow)])
def test_chunk_size_one_equals_reference(depth, read):
  spec, args = make(depth, t=13)
  got = jax.jit(lambda *a: nm.chunked_update(*a, spec, chunk_size=1, read=read))(*args)
  want = jax.jit(lambda *a: nm.reference_update(*a, spec, read=read))(*args)
  assert rel_err(got, want) < TOL


CASES = [  # (depth, residual, read, chunk, activation)
    (1, False, "after", 4, "silu"),
    (2, True, "before", 16, "silu"),
    (2, False, "chunk_start", 4, "silu"),
    (2, False, "after", 16, "gelu"),
]
SLOW_CASES = [(d, r, m, c, "silu") for d in (1, 2, 3) for r in (False, True) for m in nm.READ_MODES
              for c in (4, 16) if (d, r, m, c, "silu") not in CASES]


def _check_minibatch(depth, residual, read, chunk, activation):
  spec, args = make(depth, t=37, residual=residual, activation=activation)
  got = jax.jit(lambda *a: nm.chunked_update(*a, spec, chunk_size=chunk, read=read))(*args)
  want = jax.jit(lambda *a: nm.minibatch_reference(*a, spec, chunk_size=chunk, read=read))(*args)
  assert rel_err(got, want) < TOL
  # The chunked rule is not the token recurrence (except at chunk 1): the test would notice a mix-up.
  if read != "chunk_start":
    tok = jax.jit(lambda *a: nm.reference_update(*a, spec, read=read))(*args)
    assert rel_err(got, tok) > 1e-4


@pytest.mark.parametrize("depth,residual,read,chunk,activation", CASES)
def test_chunked_equals_minibatch_reference(depth, residual, read, chunk, activation):
  _check_minibatch(depth, residual, read, chunk, activation)


@pytest.mark.slow
@pytest.mark.parametrize("depth,residual,read,chunk,activation", SLOW_CASES)
def test_chunked_equals_minibatch_reference_grid(depth, residual, read, chunk, activation):
  _check_minibatch(depth, residual, read, chunk, activation)


def test_depth1_matches_linear_scan_delta_rule():
  """Depth 1, chunk 1, eta = 0, alpha = 0: W_t = W_{t-1} + 2 theta_t k_t (v_t - W_{t-1}^T k_t)^T, the delta rule
  with beta = 2 theta (linear_scan's S is W: M_W(x) = x W = S^T x), reads "after" with scale 1."""
  t = 21
  zeros = jnp.zeros((B, t, H), jnp.float32)
  spec, (w, s, k, v, q, theta, eta, alpha) = make(1, t=t, gates={"eta": zeros, "alpha": zeros})
  s = tuple(jnp.zeros_like(x) for x in s)  # no momentum (eta = 0 would drop it anyway after the first token)
  reads, (w_t, _) = jax.jit(lambda *a: nm.chunked_update(*a, spec, chunk_size=1))(w, s, k, v, q, theta, eta, alpha)
  o, state = linear_scan(q, k, v, beta=2 * theta, initial_state=w[0], scale=1.0, impl="reference")
  assert rel_err(reads, o) < TOL and rel_err(w_t[0], state) < TOL
  # Chunk 4 takes gradients at chunk-start weights: no longer the delta rule (the comparison can fail).
  got = jax.jit(lambda *a: nm.chunked_update(*a, spec, chunk_size=4))(w, s, k, v, q, theta, eta, alpha)
  assert rel_err(got[0], o) > 1e-4


def test_split_sequence_carries_state():
  """Two calls with the carried (weights, momentum), cut on a chunk boundary, equal one call."""
  spec, args = make(2, t=32)
  f = jax.jit(lambda *a: nm.chunked_update(*a, spec, chunk_size=4))
  whole, state = f(*args)
  w, s, seqs = args[0], args[1], args[2:]
  first, st1 = f(w, s, *(x[:, :16] for x in seqs))
  second, st2 = f(*st1, *(x[:, 16:] for x in seqs))
  assert rel_err((jnp.concatenate([first, second], 1), st2), (whole, state)) < TOL
  assert rel_err(st1, state) > 1e-3  # the carried state is not the final one: the check can fail


@pytest.mark.parametrize("read", ["after", pytest.param("before", marks=pytest.mark.slow)])
def test_step_chain_equals_reference(read):
  spec, (w, s, k, v, q, theta, eta, alpha) = make(2, t=9, residual=True)
  stepper = jax.jit(lambda w, s, *a: nm.step(w, s, *a, spec, read=read))
  reads = []
  state = (w, s)
  for i in range(k.shape[1]):
    r, state = stepper(*state, *(x[:, i] for x in (k, v, q, theta, eta, alpha)))
    reads.append(r)
  want = jax.jit(lambda *a: nm.reference_update(*a, spec, read=read))(w, s, k, v, q, theta, eta, alpha)
  assert rel_err((jnp.stack(reads, 1), state), want) < TOL


def _check_gate_ends(gates, t):
  spec, args = make(2, t=t, gates=gates)
  f = jax.jit(lambda *a: nm.chunked_update(*a, spec, chunk_size=4))
  got = f(*args)
  want = jax.jit(lambda *a: nm.minibatch_reference(*a, spec, chunk_size=4))(*args)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got))
  assert rel_err(got, want) < TOL
  loss = lambda *a: jnp.sum(f(*a)[0] ** 2)
  grads = jax.jit(jax.grad(loss, argnums=tuple(range(8))))(*args)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grads))


def test_gates_at_interval_ends_mixed():
  """Every gate takes its end values 0 and 1 at some tokens (runs of them inside chunks included)."""
  t = 13
  rng = np.random.default_rng(3)
  pick = lambda hi: jnp.asarray(rng.choice(np.array([0.0, hi, 0.5 * hi, 0.1 * hi], np.float32), (B, t, H)))
  _check_gate_ends({"theta": pick(0.3), "eta": pick(1.0), "alpha": pick(1.0)}, t)


@pytest.mark.slow
@pytest.mark.parametrize("gate,value", [("eta", 0.0), ("eta", 1.0), ("alpha", 0.0), ("alpha", 1.0),
                                        ("theta", 0.0)])
def test_gates_at_interval_ends(gate, value):
  t = 13
  _check_gate_ends({gate: jnp.full((B, t, H), value, jnp.float32)}, t)


# ------------------------------------------------------------------------------------------------ gradients


def _outer_loss(fn, spec, chunk, read):
  def loss(w, s, k, v, q, theta, eta, alpha):
    reads, (w_t, s_t) = fn(w, s, k, v, q, theta, eta, alpha, spec, chunk_size=chunk, read=read)
    # A fixed random projection of everything: every output's cotangent is exercised.
    out = jnp.sum(jnp.sin(reads) * jnp.cos(jnp.arange(reads.size).reshape(reads.shape)))
    return out + sum(jnp.sum(jnp.tanh(x)) for x in w_t + s_t)
  return loss


@pytest.mark.parametrize("depth,read", [(2, "after"), pytest.param(1, "before", marks=pytest.mark.slow),
                                        pytest.param(2, "chunk_start", marks=pytest.mark.slow)])
def test_gradients_match_minibatch_reference(depth, read):
  spec, args = make(depth, t=11, residual=(depth == 2))
  g = jax.jit(jax.grad(_outer_loss(nm.chunked_update, spec, 4, read), argnums=tuple(range(8))))(*args)
  want = jax.jit(jax.grad(_outer_loss(nm.minibatch_reference, spec, 4, read), argnums=tuple(range(8))))(*args)
  names = ("weights", "momentum", "k", "v", "q", "theta", "eta", "alpha")
  for name, a, b in zip(names, g, want):
    assert rel_err(a, b) < 1e-4, name
    assert float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(a))) > 0, name


def test_outer_gradients_finite_differences_float64():
  """Directional derivatives of the outer loss through chunked_update vs central differences, in float64."""
  with jax.enable_x64(True):
    spec, args = make(2, t=7, residual=True, dtype=np.float64, expansion=1)
    loss = jax.jit(_outer_loss(nm.chunked_update, spec, 3, "after"))
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(8))))(*args)
    rng = np.random.default_rng(5)
    for trial in range(3):
      direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), args)
      eps = 1e-6
      plus = jax.tree.map(lambda x, d: x + eps * d, args, direction)
      minus = jax.tree.map(lambda x, d: x - eps * d, args, direction)
      fd = (float(loss(*plus)) - float(loss(*minus))) / (2 * eps)
      an = float(sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction))))
      assert grads[0][0].dtype == jnp.float64
      assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), (trial, fd, an)


def test_backward_memory_saves_one_state_per_chunk():
  """The compiled outer backward holds per-chunk states, not a weight matrix per token."""
  from experiments.benchmarks.harness import compiled_memory_bytes
  t, chunk = 256, 16
  spec = nm.MemorySpec(dim=32, depth=2, expansion=4)
  w = tuple(jax.ShapeDtypeStruct((1, 1, i, o), jnp.float32) for i, o in spec.shapes)
  seq = jax.ShapeDtypeStruct((1, t, 1, 32), jnp.float32)
  gate = jax.ShapeDtypeStruct((1, t, 1), jnp.float32)
  grad = jax.grad(_outer_loss(nm.chunked_update, spec, chunk, "after"), argnums=tuple(range(8)))
  mem = compiled_memory_bytes(grad, w, w, seq, seq, seq, gate, gate, gate)
  weight_bytes = 4 * sum(i * o for i, o in spec.shapes)
  per_token = t * 2 * weight_bytes  # (W, S) for every token: what a naive scan's backward keeps
  per_chunk = (t // chunk) * 2 * weight_bytes
  assert mem["temp"] < per_token / 4, (mem, per_token)
  assert mem["temp"] < 4 * per_chunk, (mem, per_chunk)


# ------------------------------------------------------------------------------------------------ errors


def test_bad_inputs_raise():
  spec, (w, s, k, v, q, theta, eta, alpha) = make(2, t=5)
  with pytest.raises(ValueError, match="read"):
    nm.chunked_update(w, s, k, v, q, theta, eta, alpha, spec, read="later")
  with pytest.raises(ValueError, match="chunk_size"):
    nm.chunked_update(w, s, k, v, q, theta, eta, alpha, spec, chunk_size=0)
  with pytest.raises(ValueError, match="gate theta"):
    nm.chunked_update(w, s, k, v, q, theta[:, :2], eta, alpha, spec)
  with pytest.raises(ValueError, match="layer 0"):
    nm.chunked_update((w[0][:, :, :2],) + w[1:], s, k, v, q, theta, eta, alpha, spec)
  with pytest.raises(ValueError, match="dim=4"):
    nm.step(w, s, k, v, q, theta, eta, alpha, spec)  # sequence inputs given to step
  with pytest.raises(ValueError, match="chunk_start"):
    nm.reference_update(w, s, k, v, q, theta, eta, alpha, spec, read="chunk_start")
  with pytest.raises(ValueError, match="activation"):
    nm.MemorySpec(dim=4, activation="relu6")


def test_init_broadcast_apply():
  spec = nm.MemorySpec(dim=D, depth=3, expansion=2, residual=True)
  w = nm.init_weights(jax.random.PRNGKey(0), spec, H)
  assert [x.shape for x in w] == [(H, 4, 8), (H, 8, 8), (H, 8, 4)]
  wb = nm.broadcast(w, B)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((B, 3, H, D)).astype(np.float32))
  apply = jax.jit(lambda w, x: nm.apply(w, x, spec))
  y_shared, y_batched = apply(w, x), apply(wb, x)
  want = jax.jit(jax.vmap(jax.vmap(jax.vmap(lambda ws, xx: nm._apply_one(ws, xx, spec), in_axes=(0, 0)),
                                   in_axes=(None, 0)), in_axes=(0, 0)))(wb, x)
  assert rel_err(y_shared, want) < 1e-6 and rel_err(y_batched, want) < 1e-6


def test_low_precision_inputs_and_frozen_memory():
  """bf16 k, v, q give the float32 math on the same values; with theta = 0, no momentum and no forgetting the
  memory is frozen and every read is apply(W_0, q)."""
  zeros = jnp.zeros((B, 6, H), jnp.float32)
  spec, (w, s, k, v, q, theta, eta, alpha) = make(2, t=6, gates={"theta": zeros, "alpha": zeros})
  s = tuple(jnp.zeros_like(x) for x in s)
  f = jax.jit(lambda *a: nm.chunked_update(*a, spec, chunk_size=4))
  reads, (w_t, _) = f(w, s, k, v, q, theta, eta, alpha)
  assert rel_err(reads, jax.jit(lambda w, q: nm.apply(w, q, spec))(w, q)) < 1e-6 and rel_err(w_t, w) == 0.0
  lo = [x[:, 0].astype(jnp.bfloat16) for x in (k, v, q)]
  gates = (0.5 + theta[:, 0], eta[:, 0], alpha[:, 0])
  stepper = jax.jit(lambda w, s, *a: nm.step(w, s, *a, spec))
  got = stepper(w, s, *lo, *gates)
  want = stepper(w, s, *(x.astype(jnp.float32) for x in lo), *gates)
  assert got[0].dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in jax.tree.leaves(got[1]))
  assert rel_err(got, want) == 0.0
