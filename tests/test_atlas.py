"""ATLAS options of the neural memory (issue 14): the Omega rule (objective window c with gates gamma), the gd and
muon optimizers, polynomial feature maps, and the atlas config.

Ground truths: `reference_update` (token recurrence, each windowed gradient by jax.grad at W_{t-1}),
`minibatch_reference` (every gradient of a chunk's windows at the chunk's start weights, by jax.grad, the
optimizer token by token) and, independently of both, `naive_omega` below (plain Python loops over chunks,
tokens and window positions). Float64 where the comparison is exact math (tolerance 1e-10); float32 1e-5.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import titans
from memarch.layers.neural_memory import NeuralMemory
from memarch.memory import neural as nm
from memarch.models import build_model
from tests.test_neural_memory import rel_err
from tests.test_titans import model_config, tokens_

pytestmark = pytest.mark.timeout(300)

B, H, D = 2, 2, 4
T = 13  # a multiple of no chunk size used here
TOL64 = 1e-10


def make(t=T, depth=2, seed=0, dtype=np.float64, in_dim=0):
  """A random problem: spec, (weights, momentum, k, v, q, theta, eta, alpha), gamma. Unit keys and queries,
  small learning rates (a stable inner recurrence)."""
  spec = nm.MemorySpec(dim=D, depth=depth, expansion=2, in_dim=in_dim)
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s).astype(dtype)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  w = tuple(jnp.asarray(normal(B, H, i, o) / np.sqrt(i)) for i, o in spec.shapes)
  s = tuple(jnp.asarray(0.1 * normal(B, H, i, o)) for i, o in spec.shapes)
  di = spec.input_dim
  k, q = jnp.asarray(unit(normal(B, t, H, di))), jnp.asarray(unit(normal(B, t, H, di)))
  v = jnp.asarray(normal(B, t, H, D))
  uni = lambda lo, hi: jnp.asarray(rng.uniform(lo, hi, (B, t, H)).astype(dtype))
  return spec, (w, s, k, v, q, uni(0, 0.1), uni(0, 1), uni(0, 0.3)), uni(0, 1)


_STATIC = ("spec", "read", "window", "optimizer")
chunked = jax.jit(nm.chunked_update, static_argnames=_STATIC + ("chunk_size",))
reference = jax.jit(nm.reference_update, static_argnames=_STATIC)
minibatch = jax.jit(nm.minibatch_reference, static_argnames=_STATIC + ("chunk_size",))


def naive_omega(w, s, k, v, q, theta, eta, alpha, gamma, spec, *, window, chunk, optimizer):
  """The Omega rule's chunked form by plain loops (one batch element and head at a time, jax.grad per token):
  per chunk, g_j = sum over window positions i of token j (in [j - c + 1, j], clipped at 0) of
  gamma_i grad ||M_W0(k_i) - v_i||^2, then the optimizer token by token. Read "after"."""
  k, v, q, theta, eta, alpha, gamma = (np.asarray(x) for x in (k, v, q, theta, eta, alpha, gamma))
  grad = jax.jit(jax.grad(lambda ws, kk, vv: jnp.sum((nm._mlp(ws, kk, spec) - vv) ** 2)))
  t = k.shape[1]
  reads = np.zeros(v.shape)
  for bi in range(B):
    for h in range(H):
      ws = [np.asarray(x[bi, h]) for x in w]
      ss = [np.asarray(x[bi, h]) for x in s]
      for start in range(0, t, chunk):
        w0 = tuple(jnp.asarray(x) for x in ws)
        for j in range(start, min(start + chunk, t)):
          g = [np.zeros_like(x) for x in ws]
          for i in range(max(0, j - window + 1), j + 1):
            u = grad(w0, k[bi, i, h], v[bi, i, h])
            g = [a + float(gamma[bi, i, h]) * np.asarray(b) for a, b in zip(g, u)]
          th, et, al = (float(x[bi, j, h]) for x in (theta, eta, alpha))
          if optimizer == "momentum":
            ss = [et * a - th * b for a, b in zip(ss, g)]
            ws = [(1 - al) * a + b for a, b in zip(ws, ss)]
          else:  # muon
            ss = [et * a + b for a, b in zip(ss, g)]
            ws = [(1 - al) * a - th * np.asarray(nm.newton_schulz(jnp.asarray(b))) for a, b in zip(ws, ss)]
          reads[bi, j, h] = np.asarray(nm._mlp(tuple(jnp.asarray(x) for x in ws), q[bi, j, h], spec))
  return reads


# ------------------------------------------------------------------------------------------------ Titans


def test_window_one_momentum_identity_is_titans():
  """The ATLAS code path at c = 1, gamma = 1, momentum (forced by passing gamma) equals the Titans closed form
  exactly (float32; reads after and before), and so does the decoding step; the layer built without the ATLAS keys
  and with their defaults has the same parameters and the same output, bit for bit."""
  spec, args, _ = make(dtype=np.float32)
  ones = jnp.ones(args[2].shape[:-1], jnp.float32)
  for read in ("after", "before"):
    want = chunked(*args, spec=spec, chunk_size=4, read=read)
    got = chunked(*args, spec=spec, chunk_size=4, read=read, gamma=ones, window=1)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  one = lambda x: x[:, 0]
  w, s, k, v, q, th, et, al = args
  got = nm.step(w, s, one(k), one(v), one(q), one(th), one(et), one(al), spec, gamma=one(ones))
  want = nm.step(w, s, one(k), one(v), one(q), one(th), one(et), one(al), spec)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  # Layer: a config without the ATLAS keys (as before issue 14) and one with their defaults.
  full = model_config("lmm", memory_chunk_size=4)
  old = {k: val for k, val in full.items() if k not in ("memory_objective_window", "memory_optimizer",
                                                       "memory_feature_map", "memory_feature_degree")}
  old = ml_collections.FrozenConfigDict(old)
  assert full.memory_objective_window == 1 and full.memory_optimizer == "momentum"
  x = jax.random.normal(jax.random.key(0), (2, T, full.embed_dim))
  outs = []
  for c in (old, full):
    block = NeuralMemory(c)
    params = nn.meta.unbox(jax.jit(block.init)(jax.random.key(1), x))
    outs.append((params, jax.jit(block.apply)(params, x)[0]))
  assert jax.tree.structure(outs[0][0]) == jax.tree.structure(outs[1][0])
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------ Omega rule


@pytest.mark.parametrize("window", [4, pytest.param(2, marks=pytest.mark.slow), pytest.param(16, marks=pytest.mark.slow)])
def test_chunk_one_equals_token_reference(window):
  """Chunk size 1 of the chunked form == the token-by-token Omega rule (gradients at W_{t-1}); window 16 > T."""
  with jax.enable_x64(True):
    spec, args, gamma = make()
    for read in ("after", "before"):
      got = chunked(*args, spec=spec, chunk_size=1, read=read, gamma=gamma, window=window)
      want = reference(*args, spec=spec, read=read, gamma=gamma, window=window)
      assert rel_err(got, want) < TOL64, read


CHUNK_CASES = [(4, 2, "after"), (4, 8, "before"), (4, 16, "chunk_start")]  # chunks smaller and larger than c
SLOW_CHUNK_CASES = [(c, b, r) for c in (2, 4, 16) for b in (1, 3, 8, 16) for r in ("after", "before", "chunk_start")
                    if (c, b, r) not in CHUNK_CASES]


def _check_minibatch(window, chunk, read, optimizer="momentum", depth=2):
  with jax.enable_x64(True):
    spec, args, gamma = make(depth=depth)
    got = chunked(*args, spec=spec, chunk_size=chunk, read=read, gamma=gamma, window=window, optimizer=optimizer)
    want = minibatch(*args, spec=spec, chunk_size=chunk, read=read, gamma=gamma, window=window, optimizer=optimizer)
    assert rel_err(got, want) < TOL64
    # The state differs from the Titans rule's (the window matters) and from reading the whole chunk at once.
    titans_state = minibatch(*args, spec=spec, chunk_size=chunk, read=read, optimizer=optimizer)[1]
    assert rel_err(got[1], titans_state) > 1e-3


@pytest.mark.parametrize("window,chunk,read", CHUNK_CASES)
def test_chunked_equals_minibatch_reference(window, chunk, read):
  """Chunks smaller (2) and larger (8, 16 > T) than the window c = 4 == the mini-batch reference; T = 13 is a
  multiple of none (a short tail chunk)."""
  _check_minibatch(window, chunk, read)


@pytest.mark.slow
@pytest.mark.parametrize("window,chunk,read", SLOW_CHUNK_CASES)
def test_chunked_equals_minibatch_reference_grid(window, chunk, read):
  _check_minibatch(window, chunk, read)


@pytest.mark.parametrize("optimizer", ["momentum", "muon"])
def test_minibatch_reference_equals_naive_loops(optimizer):
  """The library's mini-batch reference (and so the chunked form) == plain loops written here: the window's
  tokens in the previous chunk get their gradients at the current chunk's start weights."""
  with jax.enable_x64(True):
    spec, args, gamma = make(t=7)
    got = minibatch(*args, spec=spec, chunk_size=3, gamma=gamma, window=3, optimizer=optimizer)[0]
    want = naive_omega(*args, gamma, spec, window=3, chunk=3, optimizer=optimizer)
    assert rel_err(got, want) < TOL64


def test_gd_is_momentum_without_momentum():
  """gd == momentum with eta = 0 (and a zero starting momentum), through the closed form and the reference."""
  with jax.enable_x64(True):
    spec, args, gamma = make()
    w, s, k, v, q, th, et, al = args
    s0 = tuple(jnp.zeros_like(x) for x in s)
    got = chunked(w, s, k, v, q, th, et, al, spec=spec, chunk_size=4, gamma=gamma, window=2, optimizer="gd")
    want = chunked(w, s0, k, v, q, th, jnp.zeros_like(et), al, spec=spec, chunk_size=4, gamma=gamma, window=2)
    assert rel_err(got[0], want[0]) < TOL64
    ref = reference(w, s, k, v, q, th, et, al, spec=spec, gamma=gamma, window=2, optimizer="gd")
    got1 = chunked(w, s, k, v, q, th, et, al, spec=spec, chunk_size=1, gamma=gamma, window=2, optimizer="gd")
    assert rel_err(got1, ref) < TOL64


def test_outer_gradients_match_minibatch_reference():
  """Gradients of a loss of the reads and final state w.r.t. every input (gamma included) through the chunked
  form == through the mini-batch reference (window 3, chunk 4; momentum and muon)."""
  with jax.enable_x64(True):
    spec, args, gamma = make(t=9)
    for optimizer in ("momentum", "muon"):
      def loss(fn, args, gamma):
        reads, (ws, ss) = fn(*args, spec=spec, chunk_size=4, gamma=gamma, window=3, optimizer=optimizer)
        return jnp.sum(reads ** 2) + sum(jnp.sum(jnp.sin(x)) for x in ws + ss)
      got = jax.jit(jax.grad(lambda a, g: loss(nm.chunked_update, a, g), argnums=(0, 1)))(args, gamma)
      want = jax.jit(jax.grad(lambda a, g: loss(nm.minibatch_reference, a, g), argnums=(0, 1)))(args, gamma)
      assert rel_err(got, want) < 1e-9, optimizer


# ------------------------------------------------------------------------------------------------ decoding


DECODE_CASES = [("momentum", 4), ("muon", 4)] + [pytest.param(o, c, marks=pytest.mark.slow)
                                                 for o, c in (("momentum", 2), ("momentum", 16), ("muon", 16))]


@pytest.mark.parametrize("optimizer,window", DECODE_CASES)
def test_decode_and_split_calls_equal_parallel_forward(optimizer, window):
  """Memory level: `step` token by token, carrying the window state (`next_window`), == the parallel form at
  chunk 1; two chunked calls split on a chunk boundary with the carried window state == one call (and
  dropping the window state changes the result: the window crosses the split). Window 16 > T."""
  spec, args, gamma = make(dtype=np.float32)
  w, s, k, v, q, th, et, al = args
  full1 = chunked(*args, spec=spec, chunk_size=1, gamma=gamma, window=window, optimizer=optimizer)
  step = jax.jit(nm.step, static_argnames=("spec", "window", "optimizer"))
  state, win, outs = (w, s), None, []
  for i in range(T):
    o, state = step(*state, k[:, i], v[:, i], q[:, i], th[:, i], et[:, i], al[:, i], spec=spec, gamma=gamma[:, i],
                    window=window, window_state=win, optimizer=optimizer)
    win = nm.next_window(win, k[:, i:i + 1], v[:, i:i + 1], gamma[:, i:i + 1], window)
    outs.append(o)
  assert rel_err((jnp.stack(outs, 1), state), full1) < 1e-5
  assert win[0].shape == (B, window - 1, H, D)

  full = chunked(*args, spec=spec, chunk_size=4, gamma=gamma, window=window, optimizer=optimizer)
  part = lambda a, b: tuple(x[:, a:b] for x in (k, v, q, th, et, al))
  r1, st = chunked(w, s, *part(0, 8), spec=spec, chunk_size=4, gamma=gamma[:, :8], window=window, optimizer=optimizer)
  win = nm.next_window(None, k[:, :8], v[:, :8], gamma[:, :8], window)
  r2, st2 = chunked(*st, *part(8, T), spec=spec, chunk_size=4, gamma=gamma[:, 8:], window=window,
                    window_state=win, optimizer=optimizer)
  assert rel_err((jnp.concatenate([r1, r2], 1), st2), full) < 1e-5
  r2_lost, _ = chunked(*st, *part(8, T), spec=spec, chunk_size=4, gamma=gamma[:, 8:], window=window,
                       optimizer=optimizer)
  assert rel_err(r2_lost, r2) > 1e-4


def test_atlas_model_prefill_and_decode_equal_parallel_forward():
  """The atlas model (Omega rule, muon, polynomial features; window 3 here), memory chunk 1: prefill of 4 tokens,
  a second prefill of 4 with the carried cache, then decode_step to the end == one parallel forward; the cache
  keeps the last c - 1 keys, values and gammas (a fixed size)."""
  model = build_model(model_config("atlas", memory_objective_window=3, theta_max=0.1))
  tokens = tokens_()
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens))
  assert "w_window_gate" in str(jax.tree_util.tree_flatten_with_path(params)[0])
  full = jax.jit(model.apply)(params, tokens)
  prefill = jax.jit(lambda p, t, c: model.apply(p, t, c, method=model.prefill))
  decode = jax.jit(lambda p, t, c: model.apply(p, t, c, method=model.decode_step))
  cache = model.init_cache(2, 4)
  a, cache = prefill(params, tokens[:, :4], cache)
  b, cache = prefill(params, tokens[:, 4:8], cache)
  steps = [a, b]
  for i in range(8, tokens.shape[1]):
    logits, cache = decode(params, tokens[:, i], cache)
    steps.append(logits[:, None])
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=3e-5, rtol=1e-5)
  windows = [x for path, x in jax.tree_util.tree_flatten_with_path(cache)[0] if "window" in jax.tree_util.keystr(path)]
  assert windows and all(x.shape[1] == 2 for x in windows)


# ------------------------------------------------------------------------------------------------ muon


@pytest.mark.parametrize("window", [1, 4])
def test_muon_equals_reference_loop(window):
  """Muon's scan inside each chunk == the mini-batch reference loop (chunk 4, T = 13) and, at chunk 1, the
  token recurrence."""
  with jax.enable_x64(True):
    spec, args, gamma = make()
    got = chunked(*args, spec=spec, chunk_size=4, gamma=gamma, window=window, optimizer="muon")
    want = minibatch(*args, spec=spec, chunk_size=4, gamma=gamma, window=window, optimizer="muon")
    assert rel_err(got, want) < TOL64
    got1 = chunked(*args, spec=spec, chunk_size=1, gamma=gamma, window=window, optimizer="muon")
    want1 = reference(*args, spec=spec, gamma=gamma, window=window, optimizer="muon")
    assert rel_err(got1, want1) < TOL64


def test_newton_schulz_band_and_conditioning():
  """For random inputs (the memory's shapes [d, 4d] and [4d, d], and square) NS5's singular values lie in the
  band its quintic coefficients converge to (measured 0.68..1.16), and for inputs with condition number 100
  the output's condition number is below 2."""
  rng = np.random.default_rng(0)
  for shape in [(16, 64), (64, 16), (8, 8)]:
    x = rng.standard_normal((20,) + shape).astype(np.float32)
    sv = np.linalg.svd(np.asarray(nm.newton_schulz(jnp.asarray(x)), np.float64), compute_uv=False)
    assert 0.65 < sv.min() and sv.max() < 1.25, (shape, sv.min(), sv.max())
  u = np.linalg.qr(rng.standard_normal((20, 32, 16)))[0]
  vt = np.linalg.qr(rng.standard_normal((20, 16, 16)))[0]
  x = (u * np.logspace(0, 2, 16)) @ vt  # condition number 100
  sx = np.linalg.svd(x, compute_uv=False)
  sv = np.linalg.svd(np.asarray(nm.newton_schulz(jnp.asarray(x, jnp.float32)), np.float64), compute_uv=False)
  assert np.all(sx[:, 0] / sx[:, -1] > 99)
  assert np.all(sv[:, 0] / sv[:, -1] < 2), (sv[:, 0] / sv[:, -1]).max()


def test_newton_schulz_backward_equals_autodiff_and_finite_differences():
  """The hand-written backwards of the NS iterations equal autodiff of the plain loop (float64; wide and tall
  inputs take the Gram-space form, square ones the plain form), and finite differences."""
  a, b, c = nm.NS_COEFFICIENTS

  def plain(x):  # the textbook loop, differentiated by JAX
    tall = x.shape[-2] > x.shape[-1]
    x = jnp.swapaxes(x, -1, -2) if tall else x
    x = x / (jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=(-2, -1), keepdims=True), 1e-30)) + 1e-7)
    for _ in range(nm.NS_STEPS):
      m = x @ jnp.swapaxes(x, -1, -2)
      x = a * x + (b * m + c * (m @ m)) @ x
    return jnp.swapaxes(x, -1, -2) if tall else x

  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    for shape in [(3, 4, 9), (2, 9, 4), (2, 8, 32), (5, 5), (2, 6, 9)]:
      x = jnp.asarray(rng.standard_normal(shape))
      w = jnp.asarray(rng.standard_normal(shape))
      loss = lambda f: (lambda x: jnp.sum(w * jnp.tanh(f(x))))
      np.testing.assert_allclose(nm.newton_schulz(x), plain(x), rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(jax.grad(loss(nm.newton_schulz))(x), jax.grad(loss(plain))(x), rtol=1e-9,
                                 atol=1e-11)
      v = jnp.asarray(rng.standard_normal(shape))  # a random direction: central difference vs <grad, v>
      fd = (loss(nm.newton_schulz)(x + 1e-6 * v) - loss(nm.newton_schulz)(x - 1e-6 * v)) / 2e-6
      np.testing.assert_allclose(fd, jnp.sum(jax.grad(loss(nm.newton_schulz))(x) * v), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ features


def test_feature_maps():
  """poly: C(d+p, p) features whose dot products are the degree-p Taylor polynomial of exp(x . y);
  poly_elementwise: sum_r a_r x^r; a memory over poly features (in_dim != dim) runs the chunked form against its
  reference."""
  rng = np.random.default_rng(0)
  x, y = (jnp.asarray(rng.standard_normal((3, 5))) for _ in range(2))
  with jax.enable_x64(True):
    x, y = x.astype(jnp.float64), y.astype(jnp.float64)
    for p in (1, 2, 3):
      px, py = nm.poly_features(x, p), nm.poly_features(y, p)
      assert px.shape == (3, nm.poly_feature_size(5, p)) == (3, math.comb(5 + p, p))
      want = sum(jnp.sum(x * y, -1) ** r / math.factorial(r) for r in range(p + 1))
      np.testing.assert_allclose(jnp.sum(px * py, -1), want, rtol=1e-12)
    coeffs = jnp.asarray(rng.standard_normal((2, 3)))
    xe = jnp.asarray(rng.standard_normal((4, 2, 5)))
    want = sum(coeffs[:, r, None] * xe ** (r + 1) for r in range(3))
    np.testing.assert_allclose(nm.elementwise_poly_features(xe, coeffs), want, rtol=1e-12)

    din = nm.poly_feature_size(D, 2)
    spec, args, gamma = make(in_dim=din)
    assert spec.shapes[0] == (din, 2 * D)
    got = chunked(*args, spec=spec, chunk_size=4, gamma=gamma, window=2)
    want = minibatch(*args, spec=spec, chunk_size=4, gamma=gamma, window=2)
    assert rel_err(got, want) < TOL64


# ------------------------------------------------------------------------------------------------ configs


def test_config_and_errors():
  c = titans.get_config("variant=atlas,size=tiny")
  m = c.model
  assert m.layer_blocks == ("neural_memory", "mlp")
  assert (m.memory_objective_window, m.memory_optimizer, m.memory_feature_map) == (8, "muon", "poly_elementwise")
  lmm = titans.get_config("variant=lmm,size=tiny").model
  assert (lmm.memory_objective_window, lmm.memory_optimizer, lmm.memory_feature_map) == (1, "momentum", "identity")
  init = lambda cfg: build_model(cfg).init(jax.random.key(0), tokens_())
  with pytest.raises(ValueError, match="memory_objective_window"):
    init(model_config("atlas", memory_objective_window=0))
  with pytest.raises(ValueError, match="memory_optimizer"):
    init(model_config("atlas", memory_optimizer="adam"))
  with pytest.raises(ValueError, match="memory_feature_map"):
    init(model_config("atlas", memory_feature_map="taylor"))
  with pytest.raises(ValueError, match="memory_residual"):
    init(model_config("atlas", memory_feature_map="poly", memory_residual=True))
  with pytest.raises(NotImplementedError, match="mac"):
    init(model_config("mac", memory_objective_window=2))
  spec, args, gamma = make(dtype=np.float32)
  with pytest.raises(ValueError, match="gamma"):
    nm.chunked_update(*args, spec, gamma=gamma[:, :3], window=2)
  with pytest.raises(ValueError, match="window_state"):
    nm.chunked_update(*args, spec, gamma=gamma, window=3, window_state=nm.empty_window(B, H, 2, spec))
  with pytest.raises(ValueError, match="optimizer"):
    nm.chunked_update(*args, spec, optimizer="adam")


@pytest.fixture
def _tfds_dir(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("MEMARCH_TFDS_DIR", str(tmp_path_factory.getbasetemp() / "tfds"))


def test_atlas_config_trains(tmp_path, _tfds_dir):
  """A short training run of configs/titans.py:variant=atlas (shrunk to width 16, one layer) through
  memarch.train.train_and_evaluate ends with finite losses."""
  from memarch.train import train_and_evaluate

  c = titans.get_config("variant=atlas,size=tiny")
  c.model.embed_dim, c.model.mlp_dim, c.model.num_layers, c.model.num_heads = 16, 16, 1, 2
  c.data.mqar.num_train_examples, c.data.mqar.num_eval_examples = 64, 16
  c.data.mqar.use_tfds = False
  c.train.batch_size, c.eval.batch_size, c.eval.max_batches = 4, 8, 1
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 3, 1, 0, 0
  c.train.progress, c.train.tensorboard, c.train.async_checkpoint = "none", False, False
  result = train_and_evaluate(c, str(tmp_path / "atlas"))
  assert result.step == 3
  values = list(result.train_metrics.values()) + list(result.eval_metrics.values())
  assert values and all(np.isfinite(v) for v in values), (result.train_metrics, result.eval_metrics)
