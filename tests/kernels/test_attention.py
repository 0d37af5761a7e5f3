"""Tests of `kernels.attention`: every impl against the materialized reference (outputs, lse, gradients of
q, k, v, including through lse), merge_attention, Pallas exports for TPU and GPU (Triton), input errors.

Tolerances (max abs error unless stated):
  float32: o and lse 1e-4; gradients 2e-4 abs + 2e-4 relative.
  bfloat16 (inputs bf16, reference in f32 math on the same bf16 inputs; the kernels feed bf16 probabilities
  to the matmuls): o 3e-2; lse 2e-2; gradients: max error <= 4e-2 of the reference gradient's max magnitude.

The default run keeps one case of each kind with small blocks (several blocks per axis, lengths that are not
multiples of them); the full grid is marked `slow`.
"""

from __future__ import annotations

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from kernels import attention, merge_attention
from kernels.attention import attention_blockwise
from kernels.dispatch import resolve_impl

F32_TOL = dict(o=1e-4, lse=1e-4, grad_abs=2e-4, grad_rel=2e-4)
BF16_TOL = dict(o=3e-2, lse=2e-2, grad_norm=4e-2)

# name -> keyword overrides of the base case (b=2, tq=tk=37, h=4, kv_heads=2, d=16, causal).
CASES = {
    "causal": {},
    "noncausal_tq_ne_tk": dict(causal=False, tq=29, tk=45, heads=2, kv_heads=2),
    "window_lt_block": dict(window=5),
    "segments_window_lt_block": dict(window=5, segments=True, heads=2, kv_heads=1),
    "window_gt_block": dict(window=40, tk=45, tq=45),
    "prefix_window": dict(num_prefix=6, tk=43, window=7, heads=8, kv_heads=2),
    "prefix_no_window": dict(num_prefix=6, tk=43),
    "prefix_noncausal": dict(num_prefix=5, tk=42, causal=False),
    "prefix_noncausal_kv_lengths": dict(num_prefix=5, tk=42, causal=False, kv_lengths=[10, 42]),
    "decode_step": dict(tq=1, tk=45, q_offset=[44, 19], kv_lengths=[45, 20], num_prefix=3, k_offset=-3),
    "prefill_chunk": dict(tq=16, tk=48, q_offset=32),
    "prefill_chunk_window": dict(tq=16, tk=48, q_offset=32, window=20, heads=4, kv_heads=1),
    "kv_lengths_prefix": dict(num_prefix=4, tk=45, kv_lengths=[10, 45]),
    "segments": dict(segments=True),
    "segments_prefix_window_noncausal": dict(segments=True, num_prefix=3, tk=40, causal=False, window=9),
    "fully_masked_rows": dict(kv_lengths=[0, 30], k_offset=16),
    # Sequences at different positions: the kernels' per-sequence block ranges (a union would overflow
    # the TPU grid's static bound on the key blocks a query block sees under a window).
    "batch_offsets_window": dict(heads=2, kv_heads=1, tq=20, tk=64, num_prefix=4, q_offset=[36, 4], window=7,
                                 kv_lengths=[64, 30]),
}


def _case(name, **over):
  c = dict(b=2, tq=37, tk=37, heads=4, kv_heads=2, d=16, dv=16, causal=True, window=None, num_prefix=0,
           q_offset=0, k_offset=0, kv_lengths=None, segments=False)
  c.update(CASES.get(name, {}))
  c.update(over)
  return c


def _inputs(c, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 8)
  q = jax.random.normal(ks[0], (c["b"], c["tq"], c["heads"], c["d"]), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (c["b"], c["tk"], c["kv_heads"], c["d"]), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (c["b"], c["tk"], c["kv_heads"], c["dv"]), jnp.float32).astype(dtype)
  w = jax.random.normal(ks[3], (c["b"], c["tq"], c["heads"], c["dv"]), jnp.float32)
  u = jax.random.normal(ks[4], (c["b"], c["tq"], c["heads"]), jnp.float32)
  seg = None
  if c["segments"]:
    rest = c["tk"] - c["num_prefix"]
    # Packed documents: ids increase along the sequence; q and the rest keys share positions when tq == rest.
    kv_seg = jnp.cumsum(jax.random.bernoulli(ks[5], 0.15, (c["b"], rest)), axis=1)
    q_seg = kv_seg[:, : c["tq"]] if c["tq"] <= rest else jnp.cumsum(jax.random.bernoulli(ks[6], 0.15, (c["b"], c["tq"])), 1)
    seg = (q_seg, kv_seg)
  return q, k, v, w, u, seg


def _kwargs(c, seg):
  kvl = None if c["kv_lengths"] is None else jnp.asarray(c["kv_lengths"], jnp.int32)
  qo = c["q_offset"] if isinstance(c["q_offset"], int) else jnp.asarray(c["q_offset"], jnp.int32)
  return dict(causal=c["causal"], window=c["window"], num_prefix=c["num_prefix"], q_offset=qo,
              k_offset=c["k_offset"], kv_lengths=kvl, segment_ids=seg)


def _internal_kwargs(c, seg):
  kw = _kwargs(c, seg)
  s = kw.pop("segment_ids")
  kw.update(q_segment_ids=None if s is None else s[0], kv_segment_ids=None if s is None else s[1],
            scale=c["d"] ** -0.5)
  return kw


# XLA's CPU backend spends most of a test's time compiling; these options halve it (the numbers checked
# are the same programs, only less optimized).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled(f, *args):
  """jit + compile with _FAST_COMPILE, then run on args."""
  return jax.jit(f).lower(*args).compile(compiler_options=_FAST_COMPILE)(*args)


def _loss_and_grads(fn, q, k, v, w, u):
  """o, lse and the gradients of a loss through both o and lse (merge_attention users differentiate lse)."""

  def loss(q, k, v):
    o, lse = fn(q, k, v)
    return jnp.sum(o.astype(jnp.float32) * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse * u, 0.0)), (o, lse)

  (_, (o, lse)), grads = _compiled(jax.value_and_grad(loss, (0, 1, 2), has_aux=True), q, k, v)
  return o, lse, grads


def _compare(c, fn, dtype, seed=0):
  q, k, v, w, u, seg = _inputs(c, dtype, seed)
  ref = lambda q, k, v: attention(q, k, v, **_kwargs(c, seg), return_lse=True, impl="reference")
  o_r, lse_r, g_r = _loss_and_grads(ref, q, k, v, w, u)
  o_x, lse_x, g_x = _loss_and_grads(lambda q, k, v: fn(q, k, v, seg), q, k, v, w, u)
  assert o_x.shape == o_r.shape and o_x.dtype == q.dtype
  assert lse_x.shape == lse_r.shape and lse_x.dtype == jnp.float32
  np.testing.assert_array_equal(np.isfinite(lse_x), np.isfinite(lse_r))
  fin = np.isfinite(np.asarray(lse_r))
  tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
  o_r, o_x = np.asarray(o_r, np.float32), np.asarray(o_x, np.float32)
  np.testing.assert_allclose(o_x, o_r, atol=tol["o"], rtol=0)
  np.testing.assert_allclose(np.asarray(lse_x)[fin], np.asarray(lse_r)[fin], atol=tol["lse"], rtol=0)
  for name, a, b in zip("qkv", g_x, g_r):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a)), f"d{name} has non-finite values"
    if dtype == jnp.float32:
      np.testing.assert_allclose(a, b, atol=tol["grad_abs"], rtol=tol["grad_rel"], err_msg=f"d{name}")
    else:
      err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6)
      assert err <= tol["grad_norm"], f"d{name}: relative max error {err:.3g}"


def _blockwise(c, impl, block_q, block_k):
  def fn(q, k, v, seg):
    return attention_blockwise(q, k, v, impl=impl, block_q=block_q, block_k=block_k, **_internal_kwargs(c, seg))

  return fn


def _public(c, impl):
  def fn(q, k, v, seg):
    return attention(q, k, v, **_kwargs(c, seg), return_lse=True, impl=impl)

  return fn


# ----------------------------------------------------------------------------------------------------------
# xla


# Cases whose options another default case already covers run in the slow grid only.
# Default cases: causal (GQA 2), noncausal_tq_ne_tk (GQA 1), segments_window_lt_block,
# batch_offsets_window (prefix + window + kv_lengths), prefill_chunk_window (window > block, GQA 4),
# decode_step (prefix + kv_lengths), segments_prefix_window_noncausal.
_SLOW_ONLY = ("prefix_no_window", "window_lt_block", "segments", "prefill_chunk", "kv_lengths_prefix",
              "prefix_noncausal", "fully_masked_rows", "window_gt_block", "prefix_window",
              "prefix_noncausal_kv_lengths")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", [n for n in CASES if n not in _SLOW_ONLY] + [
    pytest.param(n, marks=pytest.mark.slow) for n in _SLOW_ONLY])
def test_xla_f32(name):
  c = _case(name)
  _compare(c, _blockwise(c, "xla", 8, 16), jnp.float32)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["prefix_window", "decode_step"] + [
    pytest.param(n, marks=pytest.mark.slow) for n in ("causal", "segments", "segments_prefix_window_noncausal")])
def test_xla_bf16(name):
  c = _case(name)
  _compare(c, _blockwise(c, "xla", 8, 16), jnp.bfloat16)


@pytest.mark.timeout(120)
def test_public_default_blocks():
  c = _case("prefix_window", tq=140, tk=146, heads=2, kv_heads=1, window=50)  # 2 blocks of 128
  _compare(c, _public(c, "xla"), jnp.float32)


@pytest.mark.timeout(30)
def test_auto_resolves_per_backend():
  expected = "xla" if jax.default_backend() == "cpu" else "pallas"
  assert resolve_impl("auto", "attention") == expected


@pytest.mark.timeout(120)
def test_xla_traced_offsets_under_jit():
  c = _case("prefill_chunk_window")
  q, k, v, _, _, _ = _inputs(c, jnp.float32)

  def both(qo, ko, kvl):
    kw = dict(causal=True, window=20, q_offset=qo, k_offset=ko, kv_lengths=kvl, return_lse=True)
    return attention(q, k, v, **kw, impl="xla"), attention(q, k, v, **kw, impl="reference")

  f = jax.jit(both).lower(jnp.zeros(2, jnp.int32), jnp.int32(0), jnp.zeros(2, jnp.int32)).compile(
      compiler_options=_FAST_COMPILE)
  for qo, ko in ((32, 0), (40, 8), (0, 30)):
    (o, lse), (o_r, lse_r) = f(jnp.array([qo, qo + 3]), jnp.int32(ko), jnp.array([48, 30]))
    np.testing.assert_allclose(o, o_r, atol=1e-4)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(lse_r))


@pytest.mark.timeout(60)
def test_fully_masked_query_gives_zero_and_neg_inf():
  c = _case("fully_masked_rows")
  q, k, v, _, _, _ = _inputs(c, jnp.float32)

  def f(q):
    o, lse = attention(q, k, v, **_kwargs(c, None), return_lse=True, impl="xla")
    return jnp.sum(o), (o, lse)

  (_, (o, lse)), g = _compiled(jax.value_and_grad(f, has_aux=True), q)
  assert np.all(np.asarray(o[0]) == 0) and np.all(np.isneginf(np.asarray(lse[0])))
  assert np.all(np.asarray(g[0]) == 0)


# ----------------------------------------------------------------------------------------------------------
# Pallas kernels through the interpreter (slow: small shapes, blocks of 16).

INTERPRET_CASES = ["batch_offsets_window", "decode_step", "segments_prefix_window_noncausal"]


def _small(name):
  # Fewer heads and one sequence: the interpreter's cost grows with the number of grid steps.
  return _case(name, heads=2, kv_heads=1, b=2 if name in ("decode_step", "batch_offsets_window") else 1)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("variant", ["pallas_tpu_interpret", "pallas_triton_interpret"])
@pytest.mark.parametrize("name", INTERPRET_CASES)
def test_pallas_interpret_f32(variant, name):
  c = _small(name)
  if variant == "pallas_tpu_interpret" and name == "decode_step":
    # Through the public impl name and its default (TPU-tiled) block sizes.
    _compare(c, _public(c, "pallas_interpret"), jnp.float32)
  else:
    _compare(c, _blockwise(c, variant, 16, 16), jnp.float32)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("variant", [pytest.param("pallas_tpu_interpret", marks=pytest.mark.slow),
                                     "pallas_triton_interpret"])
def test_pallas_interpret_bf16(variant):
  c = _case("causal", b=1, tq=40, tk=40, heads=2, kv_heads=1)
  _compare(c, _blockwise(c, variant, 16, 16), jnp.bfloat16)


@pytest.mark.timeout(60)
def test_pallas_unsupported_head_dim_falls_back_with_warning():
  c = _case("causal", d=24, dv=24)
  q, k, v, _, _, _ = _inputs(c, jnp.float32)
  kw = _internal_kwargs(c, None)
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    o, lse = _compiled(lambda q, k, v: attention_blockwise(q, k, v, impl="pallas_triton_interpret", **kw), q, k, v)
  o_r, lse_r = _compiled(lambda q, k, v: attention(q, k, v, **_kwargs(c, None), return_lse=True, impl="reference"),
                         q, k, v)
  np.testing.assert_allclose(o, o_r, atol=F32_TOL["o"])
  np.testing.assert_allclose(lse, lse_r, atol=F32_TOL["lse"])
  assert any("head_dim 24" in str(r.message) and "impl='xla'" in str(r.message) for r in rec)


@pytest.mark.timeout(30)
def test_pallas_on_cpu_is_a_clear_error():
  if jax.default_backend() != "cpu":
    pytest.skip("CPU only")
  q = jnp.ones((1, 8, 2, 16))
  with pytest.raises(ValueError, match="pallas_interpret"):
    attention(q, q, q, impl="pallas")


# ----------------------------------------------------------------------------------------------------------
# merge_attention


@pytest.mark.timeout(120)
@pytest.mark.parametrize("impl", ["reference", pytest.param("xla", marks=pytest.mark.slow)])
def test_merge_two_halves_equals_full(impl):
  # merge_attention is exact whatever computed the halves; the xla path's lse gradient is checked in _compare.
  c = _case("causal", tq=24, tk=40)
  q, k, v, w, _, _ = _inputs(c, jnp.float32)
  qo = 16  # queries at positions 16..39 over keys 0..39

  def merged(q, k, v):
    a = attention(q, k[:, :20], v[:, :20], q_offset=qo, k_offset=0, return_lse=True, impl=impl)
    b = attention(q, k[:, 20:], v[:, 20:], q_offset=qo, k_offset=20, return_lse=True, impl=impl)
    return merge_attention(a, b)

  full = lambda q, k, v: attention(q, k, v, q_offset=qo, return_lse=True, impl="reference")

  def both(q, k, v):
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v)[0] * w) + jnp.sum(f(q, k, v)[1])
    return (merged(q, k, v), full(q, k, v), jax.grad(loss(merged), (0, 1, 2))(q, k, v),
            jax.grad(loss(full), (0, 1, 2))(q, k, v))

  (o_m, lse_m), (o_f, lse_f), g_m, g_f = _compiled(both, q, k, v)
  np.testing.assert_allclose(o_m, o_f, atol=1e-5)
  np.testing.assert_allclose(lse_m, lse_f, atol=1e-5)
  for a, b in zip(g_m, g_f):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Export: every Pallas kernel (forward; backward = dq and dk/dv kernels) lowers for TPU and for GPU (Triton).

_TRITON_CALL = "__gpu$xla.gpu.triton"


def _export_texts(variant, platform, dtype, num_prefix, segments, shape=(1, 256, 320, 4, 2, 64)):
  b, tq, tk, h, hkv, d = shape
  seg = None
  if segments:
    seg = (jnp.zeros((b, tq), jnp.int32), jnp.zeros((b, tk - num_prefix), jnp.int32))

  def fwd(q, k, v):
    return attention_blockwise(
        q, k, v, impl=variant, causal=True, window=128, num_prefix=num_prefix, q_offset=0, k_offset=0,
        kv_lengths=None, q_segment_ids=None if seg is None else seg[0],
        kv_segment_ids=None if seg is None else seg[1], scale=d**-0.5)

  def bwd(q, k, v):
    return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v)[0].astype(jnp.float32)) + jnp.sum(fwd(q, k, v)[1]),
                    (0, 1, 2))(q, k, v)

  shapes = [jax.ShapeDtypeStruct((b, tq, h, d), dtype), jax.ShapeDtypeStruct((b, tk, hkv, d), dtype),
            jax.ShapeDtypeStruct((b, tk, hkv, d), dtype)]
  checks = [export.DisabledSafetyCheck.custom_call(_TRITON_CALL)] if platform == "cuda" else []
  out = {}
  for name, f in (("fwd", fwd), ("bwd", bwd)):
    exp = export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(*shapes)
    out[name] = exp.mlir_module()
  return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("platform,variant,marker", [
    ("tpu", "pallas_tpu", "tpu_custom_call"),
    ("cuda", "pallas_triton", _TRITON_CALL),
])
@pytest.mark.parametrize("dtype,num_prefix,segments", [(jnp.float32, 0, False), (jnp.bfloat16, 64, True)])
def test_export(platform, variant, marker, dtype, num_prefix, segments):
  texts = _export_texts(variant, platform, dtype, num_prefix, segments)
  assert texts["fwd"].count(marker) >= 1 and "flash_attention_fwd" in texts["fwd"], "forward kernel missing"
  # The gradient program runs the forward kernel and the two backward kernels (dq, then dk/dv).
  assert texts["bwd"].count(marker) >= 3
  for kernel in ("flash_attention_fwd", "flash_attention_bwd_dq", "flash_attention_bwd_dkdv"):
    assert kernel in texts["bwd"], kernel


# ----------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.timeout(30)
@pytest.mark.parametrize("q_shape,k_shape,v_shape,match", [
    ((1, 8, 4, 16), (1, 8, 2, 8), (1, 8, 2, 16), "head_dim"),
    ((1, 8, 3, 16), (1, 8, 2, 16), (1, 8, 2, 16), "multiple of kv heads"),
    ((8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16), "must be \\[batch, seq, heads, head_dim\\]"),
    ((1, 8, 4, 16), (1, 8, 2, 16), (1, 9, 2, 16), "do not match"),
    ((2, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16), "do not match"),
])
def test_bad_shapes(q_shape, k_shape, v_shape, match):
  with pytest.raises(ValueError, match=match):
    attention(jnp.ones(q_shape), jnp.ones(k_shape), jnp.ones(v_shape), impl="xla")


@pytest.mark.timeout(30)
def test_bad_dtype_and_options():
  x = jnp.ones((1, 8, 2, 16))
  with pytest.raises(ValueError, match="floating point"):
    attention(x.astype(jnp.int32), x, x, impl="xla")
  with pytest.raises(ValueError, match="num_prefix"):
    attention(x, x, x, num_prefix=9, impl="xla")
  with pytest.raises(ValueError, match="window"):
    attention(x, x, x, window=0, impl="xla")
  with pytest.raises(ValueError, match="kv_lengths"):
    attention(x, x, x, kv_lengths=jnp.array([1, 2]), impl="xla")
  with pytest.raises(ValueError, match="segment_ids"):
    attention(x, x, x, segment_ids=jnp.zeros((1, 7), jnp.int32), impl="xla")
  with pytest.raises(ValueError, match="impl"):
    attention(x, x, x, impl="cuda")
  with pytest.raises(ValueError, match="offsets"):
    attention(x, x, x, q_offset=jnp.zeros((3,), jnp.int32), impl="xla")


# ----------------------------------------------------------------------------------------------------------
# The full grid (slow): every impl, dtype and option combination.

_GRID = list(itertools.product(
    [True, False],  # causal
    [None, 5, 40],  # window: smaller and larger than a block
    [0, 6],  # num_prefix
    [(4, 4), (4, 2), (4, 1)],  # heads, kv_heads: GQA 1, 2, 4
    [False, True],  # kv_lengths
    [False, True],  # segments
))


def _grid_case(causal, window, num_prefix, heads, kvl, seg, tq=37, tk=43):
  return _case("grid", causal=causal, window=window, num_prefix=num_prefix, heads=heads[0], kv_heads=heads[1],
               tq=tq, tk=tk, kv_lengths=[tk, 25] if kvl else None,
               segments=seg)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("params", _GRID)
def test_xla_grid(params, dtype):
  c = _grid_case(*params)
  _compare(c, _blockwise(c, "xla", 8, 16), dtype)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("tq,tk,q_offset", [(1, 43, 36), (16, 43, 21), (50, 30, 0)])
@pytest.mark.parametrize("window", [None, 5, 40])
def test_xla_offsets_grid(tq, tk, q_offset, window):
  c = _case("offsets", tq=tq, tk=tk, q_offset=q_offset, window=window, num_prefix=6, heads=4, kv_heads=2)
  _compare(c, _blockwise(c, "xla", 8, 16), jnp.float32)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("variant", ["pallas_tpu_interpret", "pallas_triton_interpret"])
@pytest.mark.parametrize("params", [p for p in _GRID if p[3] != (4, 2)][::3])
def test_pallas_interpret_grid(params, variant):
  c = _grid_case(*params, tq=29, tk=35)
  c["b"] = 2
  _compare(c, _blockwise(c, variant, 16, 16), jnp.float32)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("variant", ["pallas_tpu_interpret", "pallas_triton_interpret"])
@pytest.mark.parametrize("name", [n for n in CASES if n not in INTERPRET_CASES])
def test_pallas_interpret_cases(variant, name):
  c = _case(name)
  _compare(c, _blockwise(c, variant, 16, 16), jnp.float32)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("b,tq,h,hkv,cap,d,window,lengths,offsets,block_k", [
    (2, 1, 4, 2, 300, 16, None, (200, 300), (199, 299), 128),  # GQA; last block clamped (300 = 2*128 + 44)
    (2, 3, 4, 4, 200, 8, 20, (200, 90), (197, 87), 64),  # several queries, a window, ragged lengths
    (3, 1, 2, 2, 70, 8, None, (1, 70, 33), (0, 69, 32), 32),  # one row with a single key
])
def test_decode_cache_attention_matches_reference(b, tq, h, hkv, cap, d, window, lengths, offsets, block_k):
  """`attention(decode=True)` (xla): few queries read a cache in place, only the blocks below the lengths;
  equals the materialized reference, with and without jit, for any block size."""
  from kernels.attention_xla import cache_attention  # noqa: PLC0415

  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(b, tq, h, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, cap, hkv, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, cap, hkv, d)), jnp.float32)
  kw = dict(q_offset=jnp.asarray(offsets, jnp.int32), kv_lengths=jnp.asarray(lengths, jnp.int32), window=window)
  ref = attention(q, k, v, impl="reference", **kw)
  np.testing.assert_allclose(attention(q, k, v, impl="xla", decode=True, **kw), ref, atol=1e-5)
  got = jax.jit(lambda q, k, v: cache_attention(q, k, v, scale=d**-0.5, block_k=block_k, **kw))(q, k, v)
  np.testing.assert_allclose(got, ref, atol=1e-5)
  # Slots past the lengths (a cache's unused or stale entries) change nothing, however large.
  stale = jnp.arange(cap)[None, :, None, None] >= jnp.asarray(lengths)[:, None, None, None]
  k2, v2 = jnp.where(stale, 1e4, k), jnp.where(stale, -1e4, v)
  np.testing.assert_allclose(attention(q, k2, v2, impl="xla", decode=True, **kw), ref, atol=1e-5)
