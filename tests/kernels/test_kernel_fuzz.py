"""Property tests (hypothesis) of `kernels.attention` and `kernels.linear_scan` over random inputs.

Shapes (lengths that are not multiples of the blocks or chunks, one-token sequences, empty batches,
sequences or key sets, GQA ratios, odd head dims), dtypes (float32, bfloat16) and options (causal, window,
num_prefix, offsets, kv_lengths, segments; g / beta / initial state present or not, chunk sizes) are drawn at
random, and some draws are invalid on purpose (heads that do not divide, window 0 or not an int, num_prefix
beyond the keys, zero or mismatched dims, bad chunk sizes, integer inputs). The property: for a valid draw
every impl ("xla", with small blocks for attention) matches the "reference" impl within the per-dtype
tolerance below, with finite outputs; for an invalid draw the impl and the reference both raise a ValueError
/ TypeError with a message. Never a silent wrong answer, never a crash of the process.

What this found (fixed in kernels/): a float window (2.5) was floored by the blockwise impls but compared as a
float by the reference (a silent wrong answer; now an error); empty batches, queries or keys divided by zero
in the blockwise attention (and zero keys failed in the reference), zero tokens failed in the chunked scan
with an obscure slicing error, and zero heads or head dims raised ZeroDivisionError (now o = 0 / lse = -inf,
the state unchanged, and clear errors for zero dims).

Tolerances: attention (max abs error of o; lse where finite): float32 1e-4, bfloat16 3e-2 + 1e-2 |o| (o: one
bf16 ulp at |o| in [4, 8) is 0.031) / 2e-2 (lse), as tests/kernels/test_attention.py plus that relative term. linear_scan (relative error ||x - ref|| / ||ref|| of o and the final
state): float32 1e-4, bfloat16 2e-2 (o) / 1e-3 (state), a little looser than tests/kernels/test_linear_scan.py
(whose inputs are fixed) since random draws include single-chunk and long single-token-chunk scans.

Examples are derandomized (the same draws every run); the default run keeps few examples per property (each
costs an XLA compilation), `-m slow` runs many more.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kernels import attention, linear_scan
from kernels.attention import attention_blockwise

pytestmark = pytest.mark.timeout(300)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# bfloat16 o also gets a relative term: the inputs have std 2, so |o| reaches 4-8, where one bf16 ulp is 2^-5.
ATTN_TOL = {"float32": dict(o=1e-4, o_rel=0.0, lse=1e-4), "bfloat16": dict(o=3e-2, o_rel=1e-2, lse=2e-2)}
SCAN_TOL = {"float32": dict(o=1e-4, state=1e-4), "bfloat16": dict(o=2e-2, state=1e-3)}
ERRORS = (ValueError, TypeError)

FAST = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Invalid calls are refused before any compilation: cheap, so more of them.
FAST_INVALID = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MANY = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ----------------------------------------------------------------------------------------------------------
# attention


@st.composite
def attention_cases(draw, invalid: bool, max_len: int = 40) -> dict:
  """A random attention call: shapes, dtype, options and impl; `invalid` names what is wrong with it (or None;
  drawn among the defects when `invalid`, else a valid call, empty ones included). Lengths up to `max_len`
  with blocks of 8 or 16 (or the public defaults) cover several blocks and ragged tails; q_offset is an int
  or one per sequence."""
  kv_heads = draw(st.integers(1, 3))
  c = dict(
      b=draw(st.integers(1, 2)), tq=draw(st.integers(1, max_len)), tk_rest=draw(st.integers(0, max_len)),
      kv_heads=kv_heads, heads=kv_heads * draw(st.integers(1, 3)), d=draw(st.sampled_from([4, 6, 8, 16])),
      dv=draw(st.sampled_from([3, 8, 16])), dtype=draw(st.sampled_from(sorted(DTYPES))),
      causal=draw(st.booleans()), window=draw(st.one_of(st.none(), st.integers(1, 24))),
      num_prefix=draw(st.integers(0, 5)), q_offset=draw(st.one_of(st.integers(0, 20), st.lists(st.integers(0, 20), min_size=2, max_size=2))), k_offset=draw(st.integers(-4, 4)),
      kv_lengths=draw(st.booleans()), segments=draw(st.booleans()),
      blocks=draw(st.sampled_from([None, (8, 8), (8, 16), (16, 8)])), impl=draw(st.sampled_from(["xla", "reference"])),
      seed=draw(st.integers(0, 2**16)), invalid=None,
  )
  c["tk"] = c["num_prefix"] + c["tk_rest"]
  if c["tk"] == 0:
    c["tk"] = c["tk_rest"] = 1
  # Packed-document ids need q and the non-prefix keys to share positions (the same length).
  c["segments"] = c["segments"] and c["tq"] == c["tk_rest"]
  if invalid:
    kind = draw(st.sampled_from(["heads", "window", "window_float", "num_prefix", "head_dim", "zero_dim",
                                 "int_dtype"]))
  else:
    kind = draw(st.sampled_from(["valid", "empty"] if draw(st.integers(0, 7)) == 0 else ["valid"]))
  if kind == "empty":  # valid: no batch rows, no queries or no keys (o = 0, lse = -inf)
    c.update(draw(st.sampled_from([dict(b=0), dict(tq=0), dict(tk=0, tk_rest=0, num_prefix=0, segments=False)])))
  elif kind == "heads":
    c["kv_heads"] = kv_heads + 1
    c["heads"] = kv_heads * (kv_heads + 1) + 1  # never a multiple of kv_heads + 1
    c["invalid"] = "heads"
  elif kind == "window":
    c["window"] = draw(st.integers(-3, 0))
    c["invalid"] = "window"
  elif kind == "window_float":  # the blockwise impls would floor it, the reference compare with it
    c["window"] = draw(st.sampled_from([2.5, 7.0, True]))
    c["invalid"] = "window_float"
  elif kind == "zero_dim":
    c.update(draw(st.sampled_from([dict(d=0), dict(dv=0), dict(heads=0)])))
    c["invalid"] = "zero_dim"
  elif kind == "num_prefix":
    c["num_prefix"] = c["tk"] + draw(st.integers(1, 3))
    c["invalid"] = "num_prefix"
  elif kind == "head_dim":
    c["dk"] = c["d"] + 1  # k's head dim differs from q's
    c["invalid"] = "head_dim"
  elif kind == "int_dtype":
    c["invalid"] = "int_dtype"
  if c["invalid"] or 0 in (c["b"], c["tq"], c["tk"]):
    c["blocks"] = None  # invalid and empty inputs go through the public, checking entry point
  return c


def _attention_inputs(c):
  rng = np.random.default_rng(c["seed"])
  dtype = jnp.int32 if c["invalid"] == "int_dtype" else DTYPES[c["dtype"]]
  normal = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 2, jnp.float32).astype(dtype)
  q = normal(c["b"], c["tq"], c["heads"], c["d"])
  k = normal(c["b"], c["tk"], c["kv_heads"], c.get("dk", c["d"]))
  v = normal(c["b"], c["tk"], c["kv_heads"], c["dv"])
  q_offset = c["q_offset"]
  if isinstance(q_offset, list):  # one offset per sequence
    q_offset = jnp.asarray((q_offset * c["b"])[: c["b"]], jnp.int32)
  kw = dict(causal=c["causal"], window=c["window"], num_prefix=c["num_prefix"], q_offset=q_offset,
            k_offset=c["k_offset"], kv_lengths=None, segment_ids=None)
  if c["kv_lengths"] and c["b"]:
    kw["kv_lengths"] = jnp.asarray(rng.integers(0, c["tk"] + 1, size=c["b"]), jnp.int32)
  if c["segments"]:
    seg = np.cumsum(rng.random((c["b"], c["tq"])) < 0.2, axis=1).astype(np.int32)
    kw["segment_ids"] = jnp.asarray(seg)
  return q, k, v, kw


def _run_attention(c, q, k, v, kw, impl):
  """(o, lse) of one impl, jitted (one compilation per example); blockwise with the case's blocks."""
  if impl != "reference" and c["blocks"] is not None:
    seg = kw["segment_ids"]
    inner = dict(kw, scale=q.shape[-1] ** -0.5, q_segment_ids=seg, kv_segment_ids=seg)
    inner.pop("segment_ids")
    fn = lambda q, k, v, kvl: attention_blockwise(
        q, k, v, impl=impl, block_q=c["blocks"][0], block_k=c["blocks"][1], **dict(inner, kv_lengths=kvl))
  else:
    fn = lambda q, k, v, kvl: attention(q, k, v, **dict(kw, kv_lengths=kvl), return_lse=True, impl=impl)
  return jax.jit(fn)(q, k, v, kw["kv_lengths"])


def check_attention_case(c) -> None:
  """The property for one case (see the module docstring)."""
  q, k, v, kw = _attention_inputs(c)
  if c["invalid"]:
    for impl in (c["impl"], "reference"):
      with pytest.raises(ERRORS) as info:
        attention(q, k, v, **kw, impl=impl)
      assert str(info.value), f"{c['invalid']}: an error without a message"
    return
  o_ref, lse_ref = _run_attention(c, q, k, v, kw, "reference")
  o, lse = _run_attention(c, q, k, v, kw, c["impl"])
  assert o.shape == o_ref.shape == (c["b"], c["tq"], c["heads"], c["dv"]) and o.dtype == q.dtype
  assert lse.shape == lse_ref.shape and lse.dtype == jnp.float32
  o, o_ref = np.asarray(o, np.float32), np.asarray(o_ref, np.float32)
  assert np.all(np.isfinite(o)), "non-finite attention output"
  lse, lse_ref = np.asarray(lse), np.asarray(lse_ref)
  # A query that sees no key: -inf lse and a zero output in every impl.
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_ref), err_msg="fully masked rows differ")
  tol = ATTN_TOL[c["dtype"]]
  np.testing.assert_allclose(o, o_ref, atol=tol["o"], rtol=tol["o_rel"], err_msg=str(c))
  fin = np.isfinite(lse_ref)
  np.testing.assert_allclose(lse[fin], lse_ref[fin], atol=tol["lse"], rtol=0, err_msg=str(c))


def _attention_event(c) -> str:
  return c["invalid"] or ("empty" if 0 in (c["b"], c["tq"], c["tk"]) else "valid")


@FAST
@given(attention_cases(invalid=False))
def test_attention_fuzz(c):
  event(_attention_event(c))
  check_attention_case(c)


@FAST_INVALID
@given(attention_cases(invalid=True))
def test_attention_fuzz_invalid(c):
  event(_attention_event(c))
  check_attention_case(c)


@pytest.mark.slow
@MANY
@given(st.booleans().flatmap(lambda invalid: attention_cases(invalid=invalid, max_len=300)))
def test_attention_fuzz_many(c):
  event(_attention_event(c))
  check_attention_case(c)


@pytest.mark.parametrize("shape", [dict(b=0), dict(tq=0), dict(tk=0)])
def test_attention_empty(shape):
  """No batch rows, queries or keys: every query sees no key, o = 0 and lse = -inf, in every impl (the
  blockwise impls used to divide by zero here and the reference failed on zero keys)."""
  d = {"b": 2, "tq": 5, "tk": 7, **shape}
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((d["b"], d["tq"], 4, 8), dtype=np.float32))
  k = jnp.asarray(rng.standard_normal((d["b"], d["tk"], 2, 8), dtype=np.float32))
  v = jnp.asarray(rng.standard_normal((d["b"], d["tk"], 2, 3), dtype=np.float32))
  for impl in ("xla", "reference", "pallas_interpret"):
    o, lse = attention(q, k, v, window=3, return_lse=True, impl=impl)
    assert o.shape == (d["b"], d["tq"], 4, 3) and lse.shape == (d["b"], d["tq"], 4)
    assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(lse)))


def test_attention_fuzz_pallas_interpret():
  """One small case of the property through the Pallas kernel (interpreted): ragged lengths, GQA, a window,
  prefix keys, kv_lengths and segments."""
  c = dict(b=2, tq=11, tk_rest=11, tk=14, kv_heads=1, heads=2, d=8, dv=8, dtype="float32", causal=True, window=5,
           num_prefix=3, q_offset=0, k_offset=0, kv_lengths=True, segments=True, blocks=(8, 8),
           impl="pallas_interpret", seed=3, invalid=None)
  check_attention_case(c)


# ----------------------------------------------------------------------------------------------------------
# linear_scan


@st.composite
def scan_cases(draw, invalid: bool, max_len: int = 40) -> dict:
  """A random linear_scan call; `invalid` names what is wrong with it (or None; drawn among the defects when
  `invalid`, else a valid call, empty ones included)."""
  c = dict(
      b=draw(st.integers(1, 2)), t=draw(st.integers(1, max_len)), h=draw(st.integers(1, 3)),
      dk=draw(st.sampled_from([1, 4, 8, 16])), dv=draw(st.sampled_from([1, 5, 8, 16])),
      dtype=draw(st.sampled_from(sorted(DTYPES))), use_g=draw(st.booleans()), use_beta=draw(st.booleans()),
      use_s0=draw(st.booleans()), chunk_size=draw(st.sampled_from([1, 3, 8, 16, 64])),
      scale=draw(st.one_of(st.none(), st.sampled_from([0.5, 1.0]))),
      impl=draw(st.sampled_from(["xla", "reference"])), seed=draw(st.integers(0, 2**16)), invalid=None,
  )
  if invalid:
    kind = draw(st.sampled_from(["chunk", "zero_dim", "gqa", "g_shape", "state_shape", "v_len", "int_dtype"]))
  else:
    kind = draw(st.sampled_from(["valid", "empty"] if draw(st.integers(0, 7)) == 0 else ["valid"]))
  if kind == "empty":  # valid: no batch rows or no tokens (no output, the state unchanged)
    c.update(draw(st.sampled_from([dict(b=0), dict(t=0)])))
  elif kind != "valid":
    c["invalid"] = kind
  if kind == "chunk":
    c["chunk_size"] = draw(st.sampled_from([0, -1, 2.5, True]))
  elif kind == "zero_dim":
    c.update(draw(st.sampled_from([dict(dk=0), dict(dv=0), dict(h=0)])))
  return c


def _scan_inputs(c):
  """q, k, v (k l2-normalized: the delta rule is a contraction only for |k| <= 1), g = log_sigmoid(.) <= 0,
  beta in (0, 1), an initial state; then the case's defect, if any."""
  rng = np.random.default_rng(c["seed"])
  dtype = DTYPES[c["dtype"]]
  b, t, h, dk, dv = c["b"], c["t"], c["h"], c["dk"], c["dv"]
  normal = lambda *s: rng.standard_normal(s, dtype=np.float32)
  k = normal(b, t, h, dk)
  k = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-6)
  x = dict(q=normal(b, t, h, dk), k=k, v=normal(b, t, h, dv),
           g=np.log(1 / (1 + np.exp(-(normal(b, t, h) + 2.0)))) if c["use_g"] else None,
           beta=1 / (1 + np.exp(-normal(b, t, h))) if c["use_beta"] else None)
  x = {n: None if a is None else jnp.asarray(a, dtype) for n, a in x.items()}
  x["initial_state"] = jnp.asarray(normal(b, h, dk, dv)) if c["use_s0"] else None
  bad = c["invalid"]
  if bad == "gqa":  # fewer k heads than q heads: linear_scan has no GQA
    x["k"] = x["k"][:, :, :1] if h > 1 else jnp.concatenate([x["k"], x["k"]], axis=2)
  elif bad == "g_shape":
    x["g"] = jnp.zeros((b, t, h + 1), dtype)
  elif bad == "state_shape":
    x["initial_state"] = jnp.zeros((b, h, dk + 1, dv), jnp.float32)
  elif bad == "v_len":
    x["v"] = x["v"][:, :-1] if t > 1 else jnp.concatenate([x["v"], x["v"]], axis=1)
  elif bad == "int_dtype":
    x["q"] = x["q"].astype(jnp.int32)
  return x


def _rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _run_scan(c, x, impl):
  fn = lambda q, k, v, g, beta, s0: linear_scan(q, k, v, g=g, beta=beta, initial_state=s0, scale=c["scale"],
                                               chunk_size=c["chunk_size"], impl=impl)
  return jax.jit(fn)(x["q"], x["k"], x["v"], x["g"], x["beta"], x["initial_state"])


def check_scan_case(c) -> None:
  """The property for one case (see the module docstring)."""
  x = _scan_inputs(c)
  if c["invalid"]:
    for impl in (c["impl"], "reference"):
      with pytest.raises(ERRORS) as info:
        linear_scan(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], initial_state=x["initial_state"],
                    scale=c["scale"], chunk_size=c["chunk_size"], impl=impl)
      assert str(info.value), f"{c['invalid']}: an error without a message"
    return
  o_ref, s_ref = _run_scan(c, x, "reference")
  o, s = _run_scan(c, x, c["impl"])
  assert o.shape == o_ref.shape == (c["b"], c["t"], c["h"], c["dv"]) and o.dtype == x["q"].dtype
  assert s.shape == s_ref.shape == (c["b"], c["h"], c["dk"], c["dv"]) and s.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(o, np.float32))) and np.all(np.isfinite(np.asarray(s)))
  tol = SCAN_TOL[c["dtype"]]
  errors = {"o": _rel_err(o, o_ref), "state": _rel_err(s, s_ref)}
  assert all(errors[n] <= tol[n] for n in errors), f"relative errors {errors} over {tol} for {c}"


def _scan_event(c) -> str:
  return c["invalid"] or ("empty" if 0 in (c["b"], c["t"]) else "valid")


@FAST
@given(scan_cases(invalid=False))
def test_linear_scan_fuzz(c):
  event(_scan_event(c))
  check_scan_case(c)


@FAST_INVALID
@given(scan_cases(invalid=True))
def test_linear_scan_fuzz_invalid(c):
  event(_scan_event(c))
  check_scan_case(c)


@pytest.mark.slow
@MANY
@given(st.booleans().flatmap(lambda invalid: scan_cases(invalid=invalid, max_len=200)))
def test_linear_scan_fuzz_many(c):
  event(_scan_event(c))
  check_scan_case(c)


@pytest.mark.parametrize("shape", [dict(b=0), dict(t=0)])
def test_linear_scan_empty(shape):
  """No batch rows or no tokens: an empty output and the initial state unchanged, in every impl (the chunked
  impls used to fail with an obscure slicing error on zero tokens)."""
  d = {"b": 2, "t": 6, **shape}
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((d["b"], d["t"], 2, 4), dtype=np.float32))
  v = jnp.asarray(rng.standard_normal((d["b"], d["t"], 2, 3), dtype=np.float32))
  s0 = jnp.asarray(rng.standard_normal((d["b"], 2, 4, 3), dtype=np.float32))
  g = jnp.zeros(q.shape[:3])
  for impl in ("xla", "reference", "pallas_interpret"):
    o, s = linear_scan(q, q, v, g=g, beta=g, initial_state=s0, impl=impl)
    assert o.shape == (d["b"], d["t"], 2, 3) and s.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s0))
    _, s = linear_scan(q, q, v, impl=impl)
    np.testing.assert_array_equal(np.asarray(s), np.zeros((d["b"], 2, 4, 3), np.float32))


def test_linear_scan_fuzz_pallas_interpret():
  """One small case of the property through the Pallas kernel (interpreted): a ragged tail, delta rule with
  decay and an initial state."""
  c = dict(b=1, t=19, h=2, dk=8, dv=5, dtype="float32", use_g=True, use_beta=True, use_s0=True, chunk_size=8,
           scale=None, impl="pallas_interpret", seed=5, invalid=None)
  check_scan_case(c)
