"""Titans layers and models: the NeuralMemory block and MAC against hand-written token loops, causality,
prefill + decode and split calls against the parallel forward, gradients, configs, a train step per variant."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import titans
from memarch.layers.neural_memory import NeuralMemory
from memarch.layers.titans import MemoryAsContext
from memarch.memory import neural
from memarch.models import build_model
from tests.test_linear_memory import conv_ref  # token-loop depthwise convolution in numpy
from tests.test_linear_memory import silu as _silu

pytestmark = pytest.mark.timeout(300)

VOCAB = 29
T = 11  # not a multiple of the segment (4), the window (4) or the memory chunk (4)
VARIANTS = ("lmm", "mal", "mag", "mac")


def model_config(variant="mac", **overrides):
  """A very small model config; one layer; memory chunk 1 (exact token recurrence) unless overridden, with a
  large inner learning rate (stable at chunk 1) so that the memory's contribution is far above tolerances."""
  m = titans.get_config(f"variant={variant},size=tiny").model.to_dict()
  blocks = tuple(b for b in m["layer_blocks"] if b != "mlp")  # the MLP adds compile time and no coverage here
  m.update(vocab_size=VOCAB, embed_dim=16, num_heads=2, num_layers=1, mlp_dim=16, window=4, segment_len=4,
           num_persistent=2, memory_chunk_size=1, memory_expansion=2, theta_max=0.5, attention_impl="reference",
           max_len=16,
           layer_blocks=blocks)
  m.update(overrides)
  return ml_collections.FrozenConfigDict(m)


def tokens_(seed=0, t=T):
  return jax.random.randint(jax.random.key(seed), (2, t), 0, VOCAB)


_MODELS = {}


def model_fns(variant, **overrides):
  """(model, params, forward, prefill, decode), jitted, built once per configuration for the module."""
  key = (variant, tuple(sorted(overrides.items())))
  if key not in _MODELS:
    model = build_model(model_config(variant, **overrides))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens_()))
    fwd = jax.jit(model.apply)
    prefill = jax.jit(lambda p, t, c: model.apply(p, t, c, method=model.prefill))
    decode = jax.jit(lambda p, t, c: model.apply(p, t, c, method=model.decode_step))
    _MODELS[key] = (model, params, fwd, prefill, decode)
  return _MODELS[key]


# ------------------------------------------------------------------------------- hand-written references


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _conv_silu(u, kernel):
  """Depthwise causal conv by a direct loop, then SiLU. u [b, t, c], kernel [W, c]."""
  return _silu(conv_ref(u, kernel))


def _l2(x):
  return x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6)


def _rms(x, scale, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _rope(x, positions, base):
  """Half-split rotary embedding of x [b, t, h, d] at integer positions [t] (numpy)."""
  d = x.shape[-1]
  ang = positions[:, None] * base ** (-np.arange(d // 2) / (d // 2))  # [t, d/2]
  sin, cos = np.sin(ang)[None, :, None], np.cos(ang)[None, :, None]
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _memory_inputs(p, x, c):
  """q, k, v [b, t, h, d] and theta, eta, alpha [b, t, h] of the NeuralMemory params p on input x."""
  b, t, e = x.shape
  h = c.num_heads
  proj = lambda name: _conv_silu(x @ np.asarray(p[name]).reshape(e, -1), np.asarray(p["conv_" + name[1]]["kernel"]))
  q, k, v = (proj(n).reshape(b, t, h, -1) for n in ("wq", "wk", "wv"))
  z = _sigmoid(np.einsum("bte,egh->btgh", x, np.asarray(p["w_gates"])) + np.asarray(p["b_gates"]))
  theta = c.theta_max * z[:, :, 0] * ((1 - z[:, :, 1]) if c.memory_ema_momentum else 1.0)
  return _l2(q), _l2(k), v, theta, z[:, :, 1], z[:, :, 2]


def _memory_out(p, reads, gate_in):
  o = _rms(np.asarray(reads, np.float64), np.asarray(p["out_norm"]["scale"]))
  o = o * _silu(np.einsum("bte,ehd->bthd", gate_in, np.asarray(p["w_out_gate"])))
  return np.einsum("bthd,hde->bte", o, np.asarray(p["wo"]))


def _initial_weights(p, spec, batch):
  return neural.broadcast(tuple(p[f"memory_w{i}"] for i in range(spec.depth)), batch)


_reference_update = jax.jit(neural.reference_update, static_argnames=("spec", "read"))
_minibatch_reference = jax.jit(neural.minibatch_reference, static_argnames=("spec", "chunk_size", "read"))
_apply = jax.jit(neural.apply, static_argnames=("spec",))


def _f32(*xs):
  return tuple(jnp.asarray(x, jnp.float32) for x in xs)


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("chunk", [1, 4])
def test_neural_memory_block_matches_token_loop(chunk):
  """The block equals hand-written projections + the memory's ground truth (the token recurrence for
  chunk 1, the mini-batch loop for chunk 4; T = 11 is not a multiple of 4). With chunks of 4, two calls
  with the carried cache equal one call when the split falls on a chunk boundary (8 tokens, then 3: the
  last chunk partial on both paths)."""
  c = model_config("lmm", memory_chunk_size=chunk)
  block = NeuralMemory(c)
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, T, c.embed_dim)), np.float64)
  xf = jnp.asarray(x, jnp.float32)
  params = nn.meta.unbox(jax.jit(block.init)(jax.random.key(1), xf))
  apply = jax.jit(block.apply)
  y, _ = apply(params, xf)
  p = params["params"]
  spec = neural.MemorySpec(dim=8, depth=c.memory_depth, expansion=c.memory_expansion)
  w0 = _initial_weights(p, spec, 2)
  s0 = tuple(jnp.zeros_like(w) for w in w0)
  q, k, v, *gates = _f32(*_memory_inputs(p, x, c))
  if chunk == 1:
    reads, _ = _reference_update(w0, s0, k, v, q, *gates, spec=spec)
  else:
    reads, _ = _minibatch_reference(w0, s0, k, v, q, *gates, spec=spec, chunk_size=chunk)
  ref = _memory_out(p, reads, x)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-4, atol=2e-5)
  assert np.abs(ref).max() > 1e-3
  if chunk > 1:
    cache = block.init_cache(2, 0)
    y1, cache = apply(params, xf[:, :8], cache=cache, cache_index=0)
    y2, _ = apply(params, xf[:, 8:], cache=cache, cache_index=8)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_mac_block_matches_handwritten_segments():
  """MAC against a direct loop: retrieve with the memory before the segment, attend token by token over
  [persistent; h_{<=i}; x_{<=i}] (explicit softmax), write y_i into the memory (the token recurrence),
  gate y_i by the read after the write. 11 tokens, segments of 4 (the last one partial)."""
  c = model_config("mac")
  block = MemoryAsContext(c)
  b, e, seg, h = 2, c.embed_dim, c.segment_len, c.num_heads
  x = np.asarray(jax.random.normal(jax.random.key(0), (b, T, e)), np.float64)
  pos = jnp.broadcast_to(jnp.arange(T), (b, T))
  params = nn.meta.unbox(jax.jit(lambda k, x: block.init(k, x, positions=pos))(jax.random.key(1), jnp.asarray(x, jnp.float32)))
  y, _ = jax.jit(lambda p, x: block.apply(p, x, positions=pos))(params, jnp.asarray(x, jnp.float32))

  core = params["params"]["core"]
  mem = core["memory"]
  spec = neural.MemorySpec(dim=e // h, depth=c.memory_depth, expansion=c.memory_expansion)
  rope = lambda a, i0: _rope(a, np.arange(i0, i0 + a.shape[1]), c.rope_base)
  arr = lambda n: np.asarray(core[n], np.float64)
  qx = _memory_inputs(mem, x, c)[0]  # retrieval queries come from x
  kp = np.einsum("ne,ehd->nhd", arr("persistent"), arr("wk"))
  vp = np.einsum("ne,ehd->nhd", arr("persistent"), arr("wv"))
  weights = _initial_weights(mem, spec, b)
  momentum = tuple(jnp.zeros_like(w) for w in weights)
  ys, outs = [], []
  for s0 in range(0, T, seg):
    xs = x[:, s0:s0 + seg]
    n = xs.shape[1]
    hr = np.asarray(_apply(weights, jnp.asarray(qx[:, s0:s0 + n], jnp.float32), spec=spec), np.float64)
    htok = _rms(np.einsum("bthd,hde->bte", hr, arr("w_retrieve")), np.asarray(core["retrieve_norm"]["scale"]))
    q = rope(np.einsum("bte,ehd->bthd", xs, arr("wq")), s0)
    kx, vx = rope(np.einsum("bte,ehd->bthd", xs, arr("wk")), s0), np.einsum("bte,ehd->bthd", xs, arr("wv"))
    kh, vh = rope(np.einsum("bte,ehd->bthd", htok, arr("wk")), s0), np.einsum("bte,ehd->bthd", htok, arr("wv"))
    for i in range(n):
      keys = np.concatenate([np.broadcast_to(kp, (b,) + kp.shape), kh[:, :i + 1], kx[:, :i + 1]], 1)
      vals = np.concatenate([np.broadcast_to(vp, (b,) + vp.shape), vh[:, :i + 1], vx[:, :i + 1]], 1)
      s = np.einsum("bhd,bkhd->bhk", q[:, i], keys) / np.sqrt(q.shape[-1])
      a = np.exp(s - s.max(-1, keepdims=True))
      a /= a.sum(-1, keepdims=True)
      y_i = np.einsum("bhd,hde->be", np.einsum("bhk,bkhd->bhd", a, vals), arr("wo"))
      ys.append(y_i)
      hist = np.stack(ys, 1)  # the y stream so far: its convolutions run across segments
      mq, mk, mv, th, et, al = (z[:, -1:] for z in _memory_inputs(mem, hist, c))
      r, (weights, momentum) = _reference_update(weights, momentum, *_f32(mk, mv, mq, th, et, al), spec=spec)
      m = _memory_out(mem, r, y_i[:, None])[:, 0]
      outs.append((y_i * _sigmoid(m)) @ arr("w_final"))
  ref = np.stack(outs, 1)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-4, atol=2e-5)
  assert np.abs(ref).max() > 1e-3


# MAG holds both the window attention and the NeuralMemory block: with MAC it covers every block type's
# code path in the default run; LMM and MAL (stacks of those blocks) run under -m slow.
DEFAULT_VARIANTS = [pytest.param(v, marks=() if v in ("mag", "mac") else pytest.mark.slow) for v in VARIANTS]


@pytest.mark.parametrize("variant", DEFAULT_VARIANTS)
def test_causality(variant):
  """Perturbing token t+1 leaves the logits up to t unchanged and changes t+1 (MAC: t+1 inside a segment
  and at a segment's start)."""
  _, params, fwd, _, _ = model_fns(variant)
  tokens = tokens_()
  logits = fwd(params, tokens)
  assert logits.shape == (2, T, VOCAB)
  for t in (2, 3, 6):  # for MAC (segments of 4): token 3 inside segment 0, token 4 starts segment 1
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % VOCAB)
    logits2 = fwd(params, changed)
    np.testing.assert_allclose(logits[:, : t + 1], logits2[:, : t + 1], atol=1e-6)
    assert np.abs(np.asarray(logits[:, t + 1] - logits2[:, t + 1])).max() > 1e-5


@pytest.mark.parametrize("variant", DEFAULT_VARIANTS)
def test_prefill_split_and_decode_match_parallel_forward(variant):
  """prefill(4 tokens), a second prefill call (4 tokens) with the carried state, then decode_step token by
  token equal one parallel forward (memory chunk 1: the exact recurrence on both paths). The cache has a
  fixed size: max_len is 4 here, the sequence 11."""
  model, params, fwd, prefill, decode = model_fns(variant)
  tokens = tokens_()
  full = fwd(params, tokens)
  cache = model.init_cache(2, 4)
  a, cache = prefill(params, tokens[:, :4], cache)
  bb, cache = prefill(params, tokens[:, 4:8], cache)
  steps = [a, bb]
  for i in range(8, T):
    step_logits, cache = decode(params, tokens[:, i], cache)
    steps.append(step_logits[:, None])
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=3e-5, rtol=1e-5)
  assert int(cache["index"]) == T


@pytest.mark.parametrize("variant", ["mac", "mag"])
def test_gradients_reach_every_parameter(variant):
  """Every parameter of MAC and of MAG (which holds the window attention and the NeuralMemory block) gets a
  finite, nonzero gradient through the memory's parallel form."""
  model, params, _, _, _ = model_fns(variant)
  tokens = tokens_()

  def loss(p):
    logits = model.apply(p, tokens)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))

  grads = jax.jit(jax.grad(loss))(params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert len(flat) > 15
  for path, g in flat:
    assert np.all(np.isfinite(g)), path
    assert np.abs(np.asarray(g)).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


def test_config_errors():
  with pytest.raises(ValueError, match="unknown variant"):
    titans.get_config("variant=mat")
  with pytest.raises(ValueError, match="memory_read"):
    build_model(model_config("lmm", memory_read="later")).init(jax.random.key(0), tokens_())
  with pytest.raises(ValueError, match="window >= 1"):
    build_model(model_config("mag", window=0)).init(jax.random.key(0), tokens_())
  with pytest.raises(ValueError, match="segment_len"):
    build_model(model_config("mac", segment_len=0)).init(jax.random.key(0), tokens_())
  c = titans.get_config("variant=mal,size=small")
  assert c.model.layer_blocks == ("neural_memory", "window_attention", "mlp") and c.model.embed_dim == 256


@pytest.fixture
def _tfds_dir(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("MEMARCH_TFDS_DIR", str(tmp_path_factory.getbasetemp() / "tfds"))


def _train_smoke(variant, tmp_path):
  from memarch.train import train_and_evaluate

  c = titans.get_config(f"variant={variant},size=tiny")
  c.model.embed_dim, c.model.mlp_dim, c.model.num_layers, c.model.num_heads = 16, 16, 1, 2
  c.data.mqar.num_train_examples, c.data.mqar.num_eval_examples = 64, 16
  c.data.mqar.use_tfds = False
  c.train.batch_size, c.eval.batch_size, c.eval.max_batches = 4, 8, 1
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 1, 1, 0, 0
  c.train.progress, c.train.tensorboard, c.train.async_checkpoint = "none", False, False
  return train_and_evaluate(c, str(tmp_path / variant))


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_one_train_step_per_variant(variant, tmp_path, _tfds_dir):
  """Each documented config trains: one step through train_and_evaluate (slow: ~1 min of compilation each
  on a loaded 2-core machine; the default run checks the models' gradients directly)."""
  result = _train_smoke(variant, tmp_path)
  assert result.step == 1
  values = list(result.train_metrics.values()) + list(result.eval_metrics.values())
  assert values and all(np.isfinite(v) for v in values), (result.train_metrics, result.eval_metrics)
