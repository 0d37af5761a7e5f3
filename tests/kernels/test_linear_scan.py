"""Tests of kernels.linear_scan: every impl against the token-by-token reference, forward and gradients.

Errors are relative (||x - ref|| / ||ref||) per tensor, with thresholds per dtype as flash-linear-attention's
tests do. k is l2-normalized (as in FLA's delta-rule tests): the delta rule is only a contraction for
|k| <= 1 and beta in [0, 1]. The exhaustive grid is marked slow.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from kernels import linear_scan, linear_scan_step
from kernels import linear_scan_xla
from kernels.linear_scan_pallas import fused_forward, linear_scan_pallas, state_pass_backward

# Relative error thresholds per tensor and input dtype. bf16: the inputs are bf16 in both impls and the math
# f32, so o (stored as bf16) and the input gradients (cast back to bf16) carry bf16 rounding; the f32 state
# does not.
TOL = {
    jnp.float32: {"o": 1e-5, "state": 1e-5, "grad": 5e-5},
    jnp.bfloat16: {"o": 1e-2, "state": 1e-4, "grad": 2e-2},
}
GRAD_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def make_inputs(b, t, h, dk, dv, dtype, use_g, use_beta, use_s0, seed=0):
  # numpy's generator, not jax.random: every new shape of an eager jax.random call compiles a threefry
  # program (seconds each on this CPU), which dominated the test time.
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  q = normal(b, t, h, dk)
  k = normal(b, t, h, dk)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  v = normal(b, t, h, dv)
  g = np.log(1 / (1 + np.exp(-(normal(b, t, h) + 2.0)))) if use_g else None  # log_sigmoid
  beta = 1 / (1 + np.exp(-normal(b, t, h))) if use_beta else None
  s0 = jnp.asarray(normal(b, h, dk, dv)) if use_s0 else None
  cast = lambda x: None if x is None else jnp.asarray(x, dtype)
  # The state is float32 whatever the compute dtype (DESIGN: recurrent states stay float32).
  return cast(q), cast(k), cast(v), cast(g), cast(beta), s0


def run_with_grads(fn, q, k, v, g, beta, s0, seed=1):
  """(o, state, grads) of fn(q, k, v, g, beta, s0) -> (o, state) under random cotangents."""
  args = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": s0}
  present = {n: x for n, x in args.items() if x is not None}

  def f(present):
    full = {**args, **present}
    return fn(full["q"], full["k"], full["v"], full["g"], full["beta"], full["initial_state"])

  (o, s), vjp = jax.vjp(f, present)
  rng = np.random.default_rng(seed)
  do = jnp.asarray(rng.standard_normal(o.shape, dtype=np.float32), o.dtype)
  ds = jnp.asarray(rng.standard_normal(s.shape, dtype=np.float32))
  (grads,) = vjp((do, ds))
  return o, s, grads


def scan_fn(impl, chunk_size):
  def fn(q, k, v, g, beta, s0):
    return linear_scan(q, k, v, g=g, beta=beta, initial_state=s0, chunk_size=chunk_size, impl=impl)

  return jax.jit(fn)


def check_against_reference(impl, dtype, t, chunk_size, use_g, use_beta, use_s0, dk=16, dv=16, fn=None):
  inputs = make_inputs(2, t, 2, dk, dv, dtype, use_g, use_beta, use_s0)
  o_ref, s_ref, g_ref = run_with_grads(scan_fn("reference", chunk_size), *inputs)
  o, s, grads = run_with_grads(fn or scan_fn(impl, chunk_size), *inputs)
  tol = TOL[dtype]
  assert o.dtype == dtype and o.shape == o_ref.shape
  assert s.dtype == jnp.float32 and s.shape == s_ref.shape
  errors = {"o": rel_err(o, o_ref), "state": rel_err(s, s_ref)}
  for name in g_ref:
    assert grads[name].dtype == g_ref[name].dtype
    errors[f"d{name}"] = rel_err(grads[name], g_ref[name])
  bad = {n: e for n, e in errors.items() if e > tol.get(n, tol["grad"])}
  assert not bad, f"relative errors over tolerance {tol}: {bad} (all: {errors})"


# (impl, dtype, seq, chunk_size, g, beta, initial_state, k_dim, v_dim): every option at least once (each
# case costs a compilation of both impls' gradients, so the default run keeps few).
DEFAULT_CASES = [
    ("auto", jnp.float32, 1, 16, True, True, True, 16, 16),
    ("xla", jnp.float32, 63, 32, False, True, False, 16, 32),
    ("xla", jnp.bfloat16, 64, 64, True, False, True, 16, 16),
    ("xla", jnp.float32, 65, 16, True, True, True, 32, 16),
    ("xla", jnp.bfloat16, 500, 64, True, True, False, 16, 16),
    ("pallas_interpret", jnp.float32, 63, 16, True, True, True, 16, 32),
    ("pallas_interpret", jnp.bfloat16, 20, 16, False, False, True, 16, 16),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("impl,dtype,t,chunk,use_g,use_beta,use_s0,dk,dv", DEFAULT_CASES)
def test_against_reference(impl, dtype, t, chunk, use_g, use_beta, use_s0, dk, dv):
  check_against_reference(impl, dtype, t, chunk, use_g, use_beta, use_s0, dk, dv)


SLOW_CASES = [
    (impl, dtype, t, chunk, use_g, use_beta, use_s0)
    for impl, dtype, t, chunk, use_g, use_beta, use_s0 in itertools.product(
        ["xla", "pallas_interpret"], [jnp.float32, jnp.bfloat16], [1, 63, 64, 65, 500], [16, 32, 64],
        [False, True], [False, True], [False, True])
    # The interpreter runs the kernel step by step: keep it to the short lengths.
    if not (impl == "pallas_interpret" and t == 500)
]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("impl,dtype,t,chunk,use_g,use_beta,use_s0", SLOW_CASES)
def test_against_reference_grid(impl, dtype, t, chunk, use_g, use_beta, use_s0):
  check_against_reference(impl, dtype, t, chunk, use_g, use_beta, use_s0, dk=16, dv=32)


@pytest.mark.timeout(120)
def test_triton_kernel_interpreted():
  """The Triton-style kernels (fori_loop over chunks, state in registers), run by the interpreter."""

  def fn(q, k, v, g, beta, s0):
    return linear_scan_pallas(q, k, v, g, beta, s0, 16**-0.5, 16, interpret=True, backend="triton")

  check_against_reference(None, jnp.float32, 40, 16, True, True, True, 16, 32, fn=jax.jit(fn))


@pytest.mark.timeout(120)
def test_chunk_groups(monkeypatch):
  """Several lax.map groups of chunks, with a padded last group and a padded last chunk."""
  monkeypatch.setattr(linear_scan_xla, "GROUP_TOKENS", 32)  # 7 chunks: 3 groups of 2 and a group of 1
  check_against_reference("xla", jnp.float32, 100, 16, True, True, True)


@pytest.mark.timeout(120)
def test_fallback_warns_and_is_exact():
  q, k, v, g, beta, s0 = make_inputs(1, 30, 2, 16, 16, jnp.float32, True, True, True)
  with pytest.warns(UserWarning, match="chunk_size=12"):
    o, s = jax.jit(lambda *a: linear_scan(*a[:3], g=a[3], beta=a[4], initial_state=a[5], chunk_size=12,
                                          impl="pallas_interpret"))(q, k, v, g, beta, s0)
  o_r, s_r = jax.jit(lambda *a: linear_scan(*a[:3], g=a[3], beta=a[4], initial_state=a[5], impl="reference"))(
      q, k, v, g, beta, s0)
  assert rel_err(o, o_r) < 1e-5 and rel_err(s, s_r) < 1e-5


@pytest.mark.timeout(120)
def test_chaining_two_calls():
  q, k, v, g, beta, s0 = make_inputs(1, 96, 2, 16, 24, jnp.float32, True, True, True)
  # Halves of 48 tokens with chunk 32: each call ends on a partial chunk, and both halves share one compile.
  scan = jax.jit(lambda q, k, v, g, beta, s: linear_scan(q, k, v, g=g, beta=beta, initial_state=s, chunk_size=32,
                                                         impl="xla"))
  o, s = scan(q, k, v, g, beta, s0)
  h1, h2 = (tuple(x[:, sl] for x in (q, k, v, g, beta)) for sl in (slice(0, 48), slice(48, 96)))
  o1, s1 = scan(*h1, s0)
  o2, s2 = scan(*h2, s1)
  assert rel_err(jnp.concatenate([o1, o2], axis=1), o) < 1e-5
  assert rel_err(s2, s) < 1e-5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("use_beta", [False, True])
def test_step_chain_equals_scan(use_beta):
  q, k, v, g, beta, s0 = make_inputs(2, 10, 3, 8, 12, jnp.float32, True, use_beta, True)
  o, s = jax.jit(lambda *a: linear_scan(*a[:3], g=a[3], beta=a[4], initial_state=a[5], impl="reference"))(
      q, k, v, g, beta, s0)
  # numpy inputs: slicing them per token is free (slicing a jax array eagerly compiles a program per index).
  q, k, v, g = (np.asarray(x) for x in (q, k, v, g))
  beta = None if beta is None else np.asarray(beta)
  step = jax.jit(linear_scan_step)
  state, outs = s0, []
  for t in range(q.shape[1]):
    if t % 2:  # both accepted layouts: [b, h, d] and [b, 1, h, d]
      o_t, state = step(q[:, t], k[:, t], v[:, t], state, g=g[:, t], beta=None if beta is None else beta[:, t])
    else:
      sl = slice(t, t + 1)
      o_t, state = step(q[:, sl], k[:, sl], v[:, sl], state, g=g[:, sl], beta=None if beta is None else beta[:, sl])
      o_t = o_t[:, 0]
    outs.append(o_t)
  assert rel_err(jnp.stack(outs, axis=1), o) < 1e-5
  assert rel_err(state, s) < 1e-5
  assert state.dtype == jnp.float32


@pytest.mark.timeout(120)
def test_stability_strong_decay_and_extreme_beta():
  """g = -20 per token (the state decays by e^-20 each step: every token on head 0, every third on head 1)
  and beta exactly 0 and 1: finite outputs and gradients, and still equal to the reference."""
  q, k, v, _, _, s0 = make_inputs(1, 100, 2, 16, 16, jnp.float32, False, False, True)
  t_idx = jnp.arange(100)[None, :, None]
  head = jnp.arange(2)[None, None, :]
  g = jnp.where((head == 0) | (t_idx % 3 == 0), -20.0, -0.05)
  beta = jnp.where(t_idx % 4 == 0, 0.0, 1.0) * jnp.ones((1, 100, 2))
  o, s, grads = run_with_grads(scan_fn("xla", 32), q, k, v, g, beta, s0)
  o_r, s_r, g_r = run_with_grads(scan_fn("reference", 32), q, k, v, g, beta, s0)
  for x in [o, s, *grads.values(), o_r, s_r, *g_r.values()]:
    assert bool(jnp.all(jnp.isfinite(x)))
  assert rel_err(o, o_r) < 1e-5 and rel_err(s, s_r) < 1e-5
  for n in g_r:
    assert rel_err(grads[n], g_r[n]) < 1e-4, n


# ------------------------------------------------------------------------------------------------ export


def _export_text(fn, platform, *shapes):
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if platform == "cuda" else []
  sds = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*sds).mlir_module()


CUSTOM_CALL = {"tpu": ("tpu", "tpu_custom_call"), "triton": ("cuda", "__gpu$xla.gpu.triton")}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["tpu", "triton"])
def test_kernels_export(backend):
  platform, call = CUSTOM_CALL[backend]
  bh, n, c, k, v = 4, 3, 64, 64, 128
  for delta, residuals in ((False, False), (True, False), (True, True)):
    fwd = _export_text(
        lambda *a: fused_forward(*a, scale=0.125, delta=delta, residuals=residuals, backend=backend,
                                 interpret=False),
        platform, (bh, n, c, k), (bh, n, c, k), (bh, n, k, c), (bh, n, c, v), (bh, n, c, 1), (bh, n, 1, c),
        (bh, n, c, 1), (bh, k, v))
    assert call in fwd and "linear_scan_fwd" in fwd
  bwd = _export_text(lambda *a: state_pass_backward(*a, backend=backend, interpret=False), platform,
                     (bh, n, k, c), (bh, n, c, v), (bh, n, k, k), (bh, k, v))
  assert call in bwd and "linear_scan_bwd" in bwd


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["tpu", "triton"])
def test_linear_scan_grad_exports(backend):
  """The whole op (XLA prep + kernels) and its gradient lower for the target: both kernels appear."""
  platform, call = CUSTOM_CALL[backend]

  def loss(q, k, v, g, beta, s0):
    o, s = linear_scan_pallas(q, k, v, g, beta, s0, 0.125, 64, interpret=False, backend=backend)
    return jnp.sum(o) + jnp.sum(s)

  text = _export_text(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)), platform,
                      (1, 200, 2, 64), (1, 200, 2, 64), (1, 200, 2, 64), (1, 200, 2), (1, 200, 2), (1, 2, 64, 64))
  assert text.count(call) >= 2 and "linear_scan_fwd" in text and "linear_scan_bwd" in text


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.timeout(60)
def test_input_validation():
  q = jnp.zeros((2, 10, 3, 8))
  v = jnp.zeros((2, 10, 3, 4))
  bad = [
      (dict(q=q[0]), "q must be"),
      (dict(k=jnp.zeros((2, 10, 3, 6))), "same shape"),
      (dict(v=jnp.zeros((2, 11, 3, 4))), "batch/seq/heads of v"),
      (dict(g=jnp.zeros((2, 10, 4))), "g must be"),
      (dict(beta=jnp.zeros((2, 10, 3, 1))), "beta must be"),
      (dict(initial_state=jnp.zeros((2, 3, 4, 8))), "initial_state must be"),
      (dict(chunk_size=0), "chunk_size"),
      (dict(impl="cuda"), "unknown impl"),
      (dict(q=q.astype(jnp.int32)), "floating point"),
  ]
  for override, msg in bad:
    args = dict(q=q, k=q, v=v)
    kwargs = {n: override.pop(n) for n in list(override) if n not in args}
    args.update(override)
    with pytest.raises(ValueError, match=msg):
      linear_scan(args["q"], args["k"], args["v"], **kwargs)
  with pytest.raises(ValueError, match="one token"):
    linear_scan_step(q, q, v, jnp.zeros((2, 3, 8, 4)))
  with pytest.raises(ValueError, match="initial_state|state"):
    linear_scan_step(q[:, 0], q[:, 0], v[:, 0], jnp.zeros((2, 3, 4, 4)))
