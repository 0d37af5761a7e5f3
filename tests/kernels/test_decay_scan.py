"""Tests of kernels.decay_scan (h_t = a_t * h_{t-1} + x_t along axis 1) against the reference loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from kernels import decay_scan
from kernels.decay_scan_pallas import decay_scan_pallas_leaf

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _normal(rng, *shape):
  # numpy, not jax.random: an eager jax.random call compiles a threefry program per new shape (seconds).
  return rng.standard_normal(shape, dtype=np.float32)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def make_tree(b, t, dtype, seed=0, with_h0=True):
  rng = np.random.default_rng(seed)
  a = jnp.asarray(_sigmoid(_normal(rng, b, t, 3) + 1.0))  # one gate per token and head
  x = {"w": jnp.asarray(_normal(rng, b, t, 3, 4, 5), dtype), "bias": jnp.asarray(_normal(rng, b, t, 3), dtype)}
  h0 = None
  if with_h0:
    h0 = {"w": jnp.asarray(_normal(rng, b, 3, 4, 5), dtype), "bias": jnp.asarray(_normal(rng, b, 3), dtype)}
  return a, x, h0


def value_and_grads(fn, a, x, h0, seed=1):
  h, vjp = jax.vjp(fn, a, x, h0)
  leaves, treedef = jax.tree.flatten(h)
  rng = np.random.default_rng(seed)
  ct = treedef.unflatten([jnp.asarray(_normal(rng, *l.shape), l.dtype) for l in leaves])
  return h, vjp(ct)


def compare(h, grads, h_ref, grads_ref, tol):
  for got, want in zip(jax.tree.leaves(h), jax.tree.leaves(h_ref)):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert rel_err(got, want) < tol
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    assert got.shape == want.shape
    assert rel_err(got, want) < tol


@pytest.mark.timeout(120)
@pytest.mark.parametrize("impl,dtype,t", [
    ("xla", jnp.float32, 130), ("auto", jnp.bfloat16, 1),
    ("pallas_interpret", jnp.float32, 130), ("pallas_interpret", jnp.bfloat16, 9),
])
def test_pytree_with_h0(impl, dtype, t):
  a, x, h0 = make_tree(2, t, dtype)
  ref = jax.jit(lambda a, x, h0: decay_scan(a, x, h0, impl="reference"))
  fn = jax.jit(lambda a, x, h0: decay_scan(a, x, h0, impl=impl))
  compare(*value_and_grads(fn, a, x, h0), *value_and_grads(ref, a, x, h0), TOL[dtype])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_array_without_h0(impl):
  rng = np.random.default_rng(3)
  a = jnp.asarray(rng.uniform(size=(3, 50, 7)), jnp.float32)
  x = jnp.asarray(_normal(rng, 3, 50, 7))
  h = jax.jit(lambda a, x: decay_scan(a, x, impl=impl))(a, x)
  a, x = np.asarray(a), np.asarray(x)
  loop, prev = [], np.zeros((3, 7))
  for t in range(50):  # the definition, in plain numpy
    prev = a[:, t] * prev + x[:, t]
    loop.append(prev)
  assert rel_err(h, np.stack(loop, axis=1)) < 1e-5
  gx = jax.jit(jax.grad(lambda a, x: jnp.sum(jnp.sin(decay_scan(a, x, impl=impl))), argnums=(0, 1)))(a, x)
  gr = jax.jit(jax.grad(lambda a, x: jnp.sum(jnp.sin(decay_scan(a, x, impl="reference"))), argnums=(0, 1)))(a, x)
  assert rel_err(gx[0], gr[0]) < 1e-5 and rel_err(gx[1], gr[1]) < 1e-5


@pytest.mark.timeout(60)
def test_per_leaf_gates_and_extremes():
  """A pytree of gates (one per leaf), with gates exactly 0 (reset) and 1 (carry)."""
  rng = np.random.default_rng(4)
  x = {"m": jnp.asarray(_normal(rng, 2, 33, 4, 6)), "s": jnp.asarray(_normal(rng, 2, 33))}
  a = {"m": jnp.asarray(np.where(rng.uniform(size=(2, 33, 4)) < 0.3, 0.0, 1.0), jnp.float32),
       "s": jnp.asarray(rng.uniform(size=(2, 33)) * 1e-3, jnp.float32)}
  h0 = jax.tree.map(lambda l: jnp.ones(l.shape[:1] + l.shape[2:]), x)
  ref = value_and_grads(jax.jit(lambda a, x, h0: decay_scan(a, x, h0, impl="reference")), a, x, h0)
  for impl in ["xla"]:  # per-leaf gates are handled before the impl; the Pallas kernel is covered above
    out = value_and_grads(jax.jit(lambda a, x, h0: decay_scan(a, x, h0, impl=impl)), a, x, h0)
    assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(out))
    compare(*out, *ref, 1e-5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["tpu", "triton"])
def test_kernel_layouts_interpreted(backend):
  """Both kernel variants in the interpreter, incl. wide leaves (TPU lane blocks, Triton power-of-2 padding)."""
  rng = np.random.default_rng(5)
  a = jnp.asarray(rng.uniform(size=(2, 70, 1)), jnp.float32)
  x = jnp.asarray(_normal(rng, 2, 70, 1100))
  h0 = jnp.asarray(_normal(rng, 2, 1100))
  fn = lambda a, x, h0: decay_scan_pallas_leaf(a, x, h0, interpret=True, backend=backend)
  ref = lambda a, x, h0: decay_scan(a, x, h0, impl="reference")
  compare(*value_and_grads(jax.jit(fn), a, x, h0), *value_and_grads(jax.jit(ref), a, x, h0), 1e-5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("platform,backend,call", [
    ("tpu", "tpu", "tpu_custom_call"), ("cuda", "triton", "__gpu$xla.gpu.triton")])
def test_kernel_exports_fwd_and_bwd(platform, backend, call):
  checks = [export.DisabledSafetyCheck.custom_call(call)] if platform == "cuda" else []

  def f(a, x, h0):
    h = decay_scan_pallas_leaf(a, x, h0, interpret=False, backend=backend)
    return h, jax.grad(lambda *z: jnp.sum(decay_scan_pallas_leaf(*z, interpret=False, backend=backend)),
                       argnums=(0, 1, 2))(a, x, h0)

  sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  text = export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(
      sds(2, 100, 4), sds(2, 100, 4, 64, 64), sds(2, 4, 64, 64)).mlir_module()
  # Forward, forward again under grad, and the reversed backward kernel.
  assert text.count(call) >= 2 and "decay_scan" in text


@pytest.mark.timeout(60)
def test_validation():
  x = jnp.zeros((2, 5, 3, 4))
  with pytest.raises(ValueError, match="broadcast"):
    decay_scan(jnp.zeros((2, 5, 4)), x)
  with pytest.raises(ValueError, match="broadcast"):
    decay_scan(jnp.zeros((2, 6, 3)), x)
  with pytest.raises(ValueError, match="h0"):
    decay_scan(jnp.zeros((2, 5, 3)), x, jnp.zeros((2, 5, 3, 4)))
  with pytest.raises(ValueError, match="floating"):
    decay_scan(jnp.zeros((2, 5)), jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="unknown impl"):
    decay_scan(jnp.zeros((2, 5)), jnp.zeros((2, 5)), impl="gpu")
