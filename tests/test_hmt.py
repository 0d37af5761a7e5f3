"""HMT (memarch/models/hmt.py): blockwise truncated BPTT, the recall cache, causality ("previous" and "prefix"),
ragged lengths, streaming generation against the teacher-forced forward, other backbones, a short training
run and the stage-1 initialization of stage 2."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import hmt as hmt_config
from memarch.models import build_model
from memarch.models import hmt

pytestmark = pytest.mark.timeout(120)

VOCAB = 31
L, K, N = 8, 2, 3  # segment, sensory tokens, cache slots
T = 21  # not a multiple of L: two full segments and a padded third


def model_config(backbone="transformer", bb_overrides=None, **overrides):
  """A very small HMT: one backbone layer of width 32 (bb_overrides: more backbone keys)."""
  m = hmt_config.get_config(f"backbone={backbone},segment={L},sensory={K},cache={N},bptt=2").model.to_dict()
  m["vocab_size"] = VOCAB
  bb = dict(embed_dim=32, num_layers=1, num_heads=2, attention_impl="reference")
  if backbone == "transformer":
    bb.update(num_kv_heads=1, layer_blocks=("attention",))
  m["backbone"].update(bb)
  m["backbone"].update(bb_overrides or {})
  m.update(overrides)
  return ml_collections.FrozenConfigDict(m)


def tokens_(seed=0, t=T, b=2):
  return jax.random.randint(jax.random.key(seed), (b, t), 1, VOCAB)


_MODELS = {}


def model_fns(backbone="transformer", bb_overrides=None, **overrides):
  """(model, params, forward), jitted, built once per configuration for the module."""
  key = (backbone, repr(sorted((bb_overrides or {}).items())), repr(sorted(overrides.items())))
  if key not in _MODELS:
    model = build_model(model_config(backbone, bb_overrides, **overrides))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens_()))
    _MODELS[key] = (model, params, jax.jit(model.apply, static_argnames="return_hidden"))
  return _MODELS[key]


def test_truncated_bptt_gradients_stay_inside_a_block():
  """Loss on segment n, gradient w.r.t. the inputs of segment m: nonzero iff m <= n in the same block of
  bptt_depth=2 segments; exactly zero for an earlier block (and for later segments: causality)."""
  model, params, _ = model_fns()
  n_seg = 4
  x = 0.5 * jax.random.normal(jax.random.key(2), (2, n_seg * L, 32))
  w = jax.random.normal(jax.random.key(3), (2, n_seg * L, VOCAB))

  @jax.jit
  def grad(x, seg_mask):
    loss = lambda x: jnp.sum(model.apply(params, None, inputs_embeds=x) * w * seg_mask[None, :, None])
    return jax.grad(loss)(x)

  for n in range(n_seg):
    g = np.asarray(grad(x, (jnp.arange(n_seg * L) // L == n).astype(jnp.float32)))
    norms = [float(np.abs(g[:, m * L:(m + 1) * L]).max()) for m in range(n_seg)]
    for m in range(n_seg):
      if m > n or m // 2 < n // 2:
        assert norms[m] == 0.0, (n, m, norms)
      else:
        assert norms[m] > 1e-6, (n, m, norms)


def test_ring_buffer_keeps_the_last_n_and_recall_masks_empty_slots():
  e = 4
  cache, count = jnp.zeros((1, N, e)), jnp.zeros((), jnp.int32)
  pushed = [jnp.full((1, e), float(i + 1)) for i in range(5)]
  for i, m in enumerate(pushed):
    cache, count = hmt.push(cache, count, m)
    kept = sorted(float(v) for v in cache[0, :, 0] if v != 0)
    assert kept == [float(j + 1) for j in range(max(0, i + 1 - N), i + 1)]
  assert int(count) == 5

  model, params, fwd = model_fns()
  core = params["params"]["core"]
  recall = jax.jit(lambda s, c, n: model.apply(params, s, c, n, method=lambda mdl, *a: mdl.core.recall(*a)))
  s = jax.random.normal(jax.random.key(0), (2, 32))
  v = jax.random.normal(jax.random.key(1), (2, 32))
  garbage = jnp.full((2, N, 32), 1e4).at[:, 0].set(v)  # unwritten slots must not count, whatever they hold
  np.testing.assert_allclose(recall(s, garbage, 1), v, rtol=1e-6)
  np.testing.assert_allclose(recall(s, garbage, 0), np.broadcast_to(core["initial_memory"], (2, 32)))

  # The forward: the first segment reads the learned initial memory; the final cache holds the last N memory
  # embeddings (slot n % N); nothing is NaN, gradients included.
  toks = tokens_(t=5 * L)
  logits, h = fwd(params, toks, return_hidden=True)
  np.testing.assert_allclose(h["recalled"][:, 0], np.broadcast_to(core["initial_memory"], (2, 32)))
  assert int(h["cache_count"]) == 5
  for n in range(5 - N, 5):
    np.testing.assert_allclose(h["cache"][:, n % N], h["memory"][:, n])
  g = jax.jit(jax.grad(lambda p: jnp.mean(fwd(p, toks) ** 2)))(params)
  assert np.isfinite(np.asarray(logits)).all()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


@pytest.mark.parametrize("stage", [2, 1])
def test_causality_with_previous_recall(stage):
  """A change at position i leaves every logit before i unchanged, within and across segments (also at the
  padded tail); it does reach later segments (through the sensory tokens and the memory)."""
  _, params, fwd = model_fns(stage=stage)
  base = np.asarray(fwd(params, tokens_()))
  for i in (0, 3, L - 1, L, L + 5, 2 * L, T - 1):
    other = np.asarray(fwd(params, tokens_().at[:, i].set((tokens_()[:, i] + 7) % VOCAB)))
    np.testing.assert_array_equal(other[:, :i], base[:, :i], err_msg=f"position {i}")
    assert np.abs(other[:, i:] - base[:, i:]).max() > 1e-4
  # A token of the first segment (not among its sensory tokens) changes the third segment through memory alone.
  other = np.asarray(fwd(params, tokens_().at[:, 0].set((tokens_()[:, 0] + 7) % VOCAB)))
  assert np.abs(other[:, 2 * L:] - base[:, 2 * L:]).max() > 1e-6


def test_causality_of_loss_carrying_tokens_with_prefix_recall():
  model, params, fwd = model_fns(recall_query="prefix")
  j = hmt.summary_len(model.config)
  mask = model.position_loss_mask(T)
  np.testing.assert_array_equal(mask, (np.arange(T) % L >= j).astype(np.float32))
  base = np.asarray(fwd(params, tokens_()))
  for i in range(T):
    other = np.asarray(fwd(params, tokens_().at[:, i].set((tokens_()[:, i] + 7) % VOCAB)))
    before = np.arange(i) if i else np.zeros((0,), int)
    carried = before[mask[before] == 1]
    np.testing.assert_array_equal(other[:, carried], base[:, carried], err_msg=f"position {i}")
    if i == 2 * L + j - 1:  # a prompt token sees its segment's future once recall has 2+ slots: hence the mask
      assert np.abs(other[:, 2 * L] - base[:, 2 * L]).max() > 1e-6
  # The training loop takes its loss (and accuracy) through this mask.
  from memarch.train import loss_mask

  np.testing.assert_array_equal(loss_mask(model, {"loss_mask": jnp.ones((2, T))}), np.stack([mask, mask]))
  # "previous" needs no mask.
  assert model_config(recall_query="previous").recall_query == "previous"
  np.testing.assert_array_equal(build_model(model_config()).position_loss_mask(T), np.ones(T, np.float32))


def test_short_and_ragged_lengths_match_the_longer_forward():
  _, params, fwd = model_fns()
  full = np.asarray(fwd(params, tokens_()))
  assert full.shape == (2, T, VOCAB) and np.isfinite(full).all()
  for t in (3, L + 1):
    part = np.asarray(fwd(params, tokens_()[:, :t]))
    assert part.shape == (2, t, VOCAB)
    np.testing.assert_allclose(part, full[:, :t], rtol=1e-5, atol=1e-5)


def test_streaming_generation_equals_teacher_forced_logits():
  """prefill of a prompt that ends inside the first segment, then decode_step across two segment boundaries
  (write token, recall and the sensory tokens): the teacher-forced logits, to float32 rounding."""
  model, params, fwd = model_fns()
  toks = tokens_()
  want = np.asarray(fwd(params, toks))
  prefill = jax.jit(lambda p, t, c: model.apply(p, t, c, method=model.prefill))
  decode = jax.jit(lambda p, t, c: model.apply(p, t, c, method=model.decode_step))
  cache = model.init_cache(2, 0)
  got, cache = prefill(params, toks[:, :5], cache)
  got = [np.asarray(got)]
  for i in range(5, T):
    logits, cache = decode(params, toks[:, i], cache)
    got.append(np.asarray(logits)[:, None])
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, rtol=1e-4, atol=1e-4)
  assert int(cache["count"]) == T // L  # segments closed so far; the state has a fixed size
  with pytest.raises(ValueError, match="previous"):
    build_model(model_config(recall_query="prefix")).init_cache(2, 0)


def test_generate_stage1_is_greedy_teacher_forcing():
  """memarch.generate (prefill + decode_step in one jitted lax.scan) continues across segment boundaries with
  the tokens the teacher-forced forward ranks first."""
  from memarch.generate import generate

  model, params, fwd = model_fns(stage=1)
  out = generate(model, params, tokens_(t=6), max_new_tokens=T - 6)
  assert out.shape == (2, T)
  np.testing.assert_array_equal(np.argmax(np.asarray(fwd(params, out))[:, 5:-1], -1), np.asarray(out[:, 6:]))


@pytest.mark.parametrize("backbone,blocks", [("gated_deltanet", ("linear_memory",)), ("titans", ("neural_memory",))])
def test_other_backbones(backbone, blocks):
  over = dict(layer_blocks=blocks, head_dim=16, memory_chunk_size=4, chunk_size=8, scan_impl="xla")
  bb = {k: v for k, v in over.items() if k in model_config(backbone).backbone}
  model, params, fwd = model_fns(backbone, bb)
  logits = np.asarray(fwd(params, tokens_()))
  assert logits.shape == (2, T, VOCAB) and np.isfinite(logits).all()


def test_config_errors_and_defaults():
  c = hmt_config.get_config()
  assert c.model.name == "hmt" and c.model.backbone.max_len == c.model.segment_len + c.model.sensory_len + 2
  assert hmt_config.get_config("task=passkey").data.name == "passkey"
  for arg, what in (("backbone=lstm", "backbone"), ("recall=next", "recall"), ("stage=3", "stage")):
    with pytest.raises(ValueError, match=what):
      hmt_config.get_config(arg)
  for key, value in (("sensory_len", L + 1), ("cache_size", 0), ("bptt_depth", 0), ("recall_query", "x"),
                     ("summary_fraction", 0.0)):
    with pytest.raises(ValueError, match=key):
      build_model(model_config(**{key: value})).init(jax.random.key(0), tokens_())
  with pytest.raises(ValueError, match="another registered model"):
    build_model(model_config(bb_overrides={"name": "hmt"})).init(jax.random.key(0), tokens_())


@pytest.mark.timeout(240)
def test_short_training_run_and_stage1_initializes_stage2(tmp_path, monkeypatch):
  from memarch.train import train_and_evaluate

  monkeypatch.setenv("MEMARCH_TFDS_DIR", str(tmp_path / "tfds"))
  c = hmt_config.get_config("segment=16,sensory=2,cache=2,bptt=2,stage=1")
  c.model.backbone.embed_dim, c.model.backbone.num_layers, c.model.backbone.num_heads = 32, 1, 2
  c.data.mqar.num_train_examples, c.data.mqar.num_eval_examples, c.data.mqar.use_tfds = 64, 16, False
  c.train.batch_size, c.eval.batch_size, c.eval.max_batches = 4, 8, 1
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 3, 1, 0, 0
  c.train.progress, c.train.tensorboard, c.train.async_checkpoint = "none", False, False
  result = train_and_evaluate(c, str(tmp_path / "stage1"))
  assert result.step == 3
  values = list(result.train_metrics.values()) + list(result.eval_metrics.values())
  assert values and all(np.isfinite(v) for v in values), (result.train_metrics, result.eval_metrics)

  # Stage 2 from the stage-1 checkpoint: everything but the recall parameters comes from it.
  stage1 = result.state.params
  fresh = jax.tree.map(lambda x: x + 1.0, stage1)
  loaded = hmt.load_stage1_params(str(tmp_path / "stage1"), fresh)
  for path, x in jax.tree_util.tree_flatten_with_path(loaded)[0]:
    name = str(getattr(path[-1], "key", path[-1]))
    src = fresh if name in hmt.RECALL_PARAMS else stage1
    ref = dict(jax.tree_util.tree_flatten_with_path(src)[0])[path]
    np.testing.assert_array_equal(np.asarray(x), np.asarray(ref), err_msg=name)
  with pytest.raises(ValueError, match="no checkpoints"):
    hmt.load_stage1_params(str(tmp_path / "nowhere"), fresh)

  # Through the training loop: model.init_from starts stage 2 there (a negligible lr keeps the parameters put).
  c2 = hmt_config.get_config("segment=16,sensory=2,cache=2,bptt=2,stage=2")
  c2.model.backbone.embed_dim, c2.model.backbone.num_layers, c2.model.backbone.num_heads = 32, 1, 2
  c2.data, c2.train, c2.eval = c.data, c.train, c.eval
  c2.train.steps, c2.optim.lr, c2.model.init_from = 1, 1e-12, str(tmp_path / "stage1")
  second = train_and_evaluate(c2, str(tmp_path / "stage2"))
  backbone = lambda p: jax.tree.leaves(p["core"]["backbone"])  # noqa: E731
  for a, b in zip(backbone(second.state.params), backbone(stage1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-8)
