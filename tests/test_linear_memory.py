"""Linear-memory blocks (LinearMemory for every rule, BasedAttention) against independent references.

The references are written here from the parameters: projections, convolutions and gates by hand in numpy
(float64), then the recurrence of DESIGN.md token by token (not kernels.linear_scan). Lengths are not
multiples of the scan's chunk. Also: causality, prefill + decode and split prefill through DecoderLM,
gradients, and the configs (each builds; one train step runs).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import based, gated_deltanet, linear_attention, linear_common
from memarch.layers.linear_memory import MEMORY_RULES, BasedAttention, LinearMemory, taylor_feature_map
from memarch.models import build_model

pytestmark = pytest.mark.timeout(120)

B, T, E = 2, 13, 16  # T = 13 is not a multiple of the chunk (4): the padded tail is exercised
TOL = dict(rtol=2e-4, atol=2e-4)  # float32 layer vs float64 reference


def model_config(**overrides) -> ml_collections.FrozenConfigDict:
  m = linear_common.linear_model_config("tiny", 32).to_dict()
  m.update(vocab_size=61, embed_dim=E, num_heads=2, head_dim=8, value_dim=6, conv_width=3, chunk_size=4,
           scan_impl="xla", feature_dim=4, attention_impl="reference", num_kv_heads=0)
  m.update(overrides)
  return ml_collections.FrozenConfigDict(m)


def init_perturbed(block, x, seed=0):
  """The block's params, each shifted by noise (so conv kernels, norm scales etc. are not at their init)."""
  params = nn.meta.unbox(jax.jit(block.init)(jax.random.key(seed), x, positions=None))
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  leaves = [np.asarray(p) + 0.1 * rng.standard_normal(p.shape).astype(np.float32) for p in leaves]
  return jax.tree.unflatten(tree, [jnp.asarray(p) for p in leaves])


def inputs(seed=0, t=T):
  return jnp.asarray(np.random.default_rng(seed + 100).standard_normal((B, t, E)).astype(np.float32))


# ---------------------------------------------------------------------------------------------------------
# numpy references


def silu(x):
  return x / (1 + np.exp(-x))


def conv_ref(x, w):
  """Causal depthwise conv by a loop: x [b, t, c], w [width, c] (w[-1] on the current token)."""
  width = w.shape[0]
  y = np.zeros_like(x)
  for t in range(x.shape[1]):
    for j in range(width):
      s = t - width + 1 + j
      if s >= 0:
        y[:, t] += w[j] * x[:, s]
  return y


def linear_memory_ref(p, x, rule, conv_width):
  """LinearMemory in float64 numpy, token by token. p: the block's params, x [b, t, e]."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  b, t, _ = x.shape
  feats = {}
  for name in "qkv":
    w = p[f"w{name}"]
    y = np.einsum("bte,ehd->bthd", x, w)
    if conv_width:
      y = conv_ref(y.reshape(b, t, -1), p[f"conv_{name}"]["kernel"]).reshape(y.shape)
    feats[name] = silu(y)
  q, k, v = feats["q"], feats["k"], feats["v"]
  h, dk, dv = q.shape[2], q.shape[3], v.shape[3]
  delta = rule in ("delta", "gated_delta")
  if delta:
    q = q / np.sqrt((q**2).sum(-1, keepdims=True) + 1e-6)
    k = k / np.sqrt((k**2).sum(-1, keepdims=True) + 1e-6)
    beta = 1 / (1 + np.exp(-(x @ p["wb"])))
  if rule in ("simple_gla", "gated_delta"):
    g = -np.exp(p["a_log"]) * np.log1p(np.exp(x @ p["wa"] + p["dt_bias"]))
  else:
    g = np.zeros((b, t, h))
  o = np.zeros((b, t, h, dv))
  for bi in range(b):
    for hi in range(h):
      s = np.zeros((dk, dv))
      for ti in range(t):
        s = np.exp(g[bi, ti, hi]) * s
        kt, vt = k[bi, ti, hi], v[bi, ti, hi]
        if delta:
          s = s + beta[bi, ti, hi] * np.outer(kt, vt - s.T @ kt)
        else:
          s = s + np.outer(kt, vt)
        o[bi, ti, hi] = s.T @ q[bi, ti, hi] / np.sqrt(dk)
  normed = o / np.sqrt((o**2).mean(-1, keepdims=True) + 1e-6) * p["o_norm"]["scale"]
  gate = silu(np.einsum("bte,ehd->bthd", x, p["wg"]))
  return np.einsum("bthd,hde->bte", normed * gate, p["wo"])


def based_ref(p, x, eps=1e-6):
  """Based as materialized quadratic attention: A[t, s] = 1 + q_t.k_s/sqrt(f) + (q_t.k_s)^2/(2f), s <= t."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  q, k, v = (np.einsum("bte,ehd->bthd", x, p[n]) for n in ("wq", "wk", "wv"))
  f = q.shape[-1]
  qk = np.einsum("bthf,bshf->bhts", q, k)
  a = 1 + qk / np.sqrt(f) + qk**2 / (2 * f)
  a = a * np.tril(np.ones(a.shape[-2:]))
  o = np.einsum("bhts,bshd->bthd", a, v) / (a.sum(-1).transpose(0, 2, 1)[..., None] + eps)
  return np.einsum("bthd,hde->bte", o, p["wo"])


# ---------------------------------------------------------------------------------------------------------


def check_grads(fwd, params, x):
  cot = jnp.asarray(np.random.default_rng(7).standard_normal((B, x.shape[1], E)).astype(np.float32))
  grads = jax.jit(jax.grad(lambda p: jnp.sum(fwd(p, x) * cot)))(params)
  for path, gr in jax.tree_util.tree_leaves_with_path(grads):
    gr = np.asarray(gr)
    assert np.all(np.isfinite(gr)), path
    assert np.abs(gr).max() > 0, f"zero gradient for {jax.tree_util.keystr(path)}"


def check_causal(fwd, params, x, t=6):
  y = fwd(params, x)
  y2 = fwd(params, x.at[:, t + 1].add(1.0))
  np.testing.assert_allclose(np.asarray(y2[:, : t + 1]), np.asarray(y[:, : t + 1]), atol=1e-6)
  assert np.abs(np.asarray(y2[:, t + 1 :] - y[:, t + 1 :])).max() > 1e-4


def rule_setup(rule):
  """(jitted block forward, perturbed params, x, config) for a memory rule; delta runs without convs."""
  cfg = model_config(memory_rule=rule, conv_width=0 if rule == "delta" else 3)
  block = LinearMemory(cfg)
  x = inputs()
  params = init_perturbed(block, x)
  return jax.jit(lambda p, x: block.apply(p, x, positions=None)[0]), params, x, cfg


@pytest.mark.parametrize("rule", MEMORY_RULES)
def test_linear_memory_matches_reference_and_is_causal(rule):
  fwd, params, x, cfg = rule_setup(rule)
  y = fwd(params, x)
  assert y.shape == (B, T, E) and y.dtype == jnp.float32
  ref = linear_memory_ref(params["params"], x, rule, cfg.conv_width)
  np.testing.assert_allclose(np.asarray(y), ref, **TOL)
  check_causal(fwd, params, x)


# gated_delta has every parameter (wa, a_log, dt_bias, wb, convs): its gradients are checked by default, the
# other rules' (subsets of the same parameters through the same scan) in the slow run.
@pytest.mark.parametrize("rule", [r if r == "gated_delta" else pytest.param(r, marks=pytest.mark.slow)
                                  for r in MEMORY_RULES])
def test_linear_memory_gradients_finite_and_nonzero(rule):
  fwd, params, x, _ = rule_setup(rule)
  check_grads(fwd, params, x)


def test_taylor_feature_map_identity():
  rng = np.random.default_rng(0)
  for f in (1, 4, 16):
    q, k = rng.standard_normal((2, 5, f)), rng.standard_normal((2, 5, f))
    pq, pk = np.asarray(taylor_feature_map(jnp.asarray(q, jnp.float32))), np.asarray(taylor_feature_map(jnp.asarray(k, jnp.float32)))
    assert pq.shape == (2, 5, 1 + f + f * f)
    qk = (q * k).sum(-1)
    np.testing.assert_allclose((pq * pk).sum(-1), 1 + qk / np.sqrt(f) + qk**2 / (2 * f), rtol=1e-5, atol=1e-5)


def test_based_matches_quadratic_reference_is_causal_and_differentiable():
  block = BasedAttention(model_config())
  x = inputs(1)
  params = init_perturbed(block, x, seed=1)
  fwd = jax.jit(lambda p, x: block.apply(p, x, positions=None)[0])
  np.testing.assert_allclose(np.asarray(fwd(params, x)), based_ref(params["params"], x), **TOL)
  check_causal(fwd, params, x)
  check_grads(fwd, params, x)


def test_bad_rule_is_a_clear_error():
  block = LinearMemory(model_config(memory_rule="gated"))
  with pytest.raises(ValueError, match="memory_rule must be one of"):
    block.init(jax.random.key(0), inputs(), positions=None)


# ---------------------------------------------------------------------------------------------------------
# Decoding through DecoderLM


def lm(**overrides):
  cfg = model_config(**overrides)
  model = build_model(cfg)
  tokens = jax.random.randint(jax.random.key(0), (B, T), 0, cfg.vocab_size)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens))
  return model, params, tokens


@pytest.mark.parametrize("overrides", [
    # gated delta (with convs) and Based in one stack; the second case: Hebbian decaying memory, no convs
    dict(memory_rule="gated_delta", layer_blocks=("linear_memory", "based"), num_layers=1),
    # the Based model's own stack: sliding-window attention (a window-sized cache) and Based
    dict(layer_blocks=("attention", "based"), window=3, num_layers=1),
    pytest.param(dict(memory_rule="simple_gla", conv_width=0, layer_blocks=("linear_memory",), num_layers=2),
                 marks=pytest.mark.slow),
])
def test_prefill_decode_and_split_prefill_match_parallel_forward(overrides):
  model, params, tokens = lm(**overrides)
  full = jax.jit(model.apply)(params, tokens)
  prefill = jax.jit(lambda p, t, c: model.apply(p, t, c, method=model.prefill))
  decode = jax.jit(lambda p, t, c: model.apply(p, t, c, method=model.decode_step))
  cache0 = model.init_cache(B, 4)  # memory caches have a fixed size: max_len does not bound them
  logits, cache = prefill(params, tokens[:, :5], cache0)
  steps = [logits]
  for i in range(5, T):
    step_logits, cache = decode(params, tokens[:, i], cache)
    steps.append(step_logits[:, None])
  np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(full), atol=2e-5, rtol=1e-4)
  assert int(cache["index"]) == T
  # Two prefill calls of 5 tokens (the shape compiled above) equal the first 10 tokens of one forward.
  a, cache = prefill(params, tokens[:, :5], cache0)
  b, _ = prefill(params, tokens[:, 5:10], cache)
  np.testing.assert_allclose(np.concatenate([a, b], axis=1), np.asarray(full[:, :10]), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Configs


CONFIGS = [(gated_deltanet, ""), (linear_attention, "rule=linear"), (linear_attention, "rule=simple_gla"),
           (linear_attention, "rule=delta"), (based, "")]


def test_configs_build_every_size():
  for module, arg in CONFIGS:
    for size in linear_common.SIZES:
      c = module.get_config(",".join(filter(None, [arg, f"size={size}"])))
      assert c.model.name == "transformer" and c.model.max_len == c.data.seq_len
      assert any(b in c.model.layer_blocks for b in ("linear_memory", "based"))
  assert gated_deltanet.get_config("").model.memory_rule == "gated_delta"
  assert linear_attention.get_config("rule=delta").model.memory_rule == "delta"
  with pytest.raises(ValueError, match="unknown rule"):
    linear_attention.get_config("rule=gated_delta")
  with pytest.raises(ValueError, match="unknown size"):
    gated_deltanet.get_config("size=huge")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("module,arg", [(gated_deltanet, ""), pytest.param(based, "", marks=pytest.mark.slow),
                                        pytest.param(linear_attention, "rule=linear", marks=pytest.mark.slow)])
def test_config_trains_one_step(module, arg, tmp_path, monkeypatch):
  from memarch.train import train_and_evaluate  # noqa: PLC0415

  monkeypatch.setenv("MEMARCH_TFDS_DIR", str(tmp_path / "tfds"))
  c = module.get_config(arg)
  c.model.num_layers = 1  # the config's own blocks, one layer of them: less to compile
  c.data.mqar.use_tfds = False
  c.data.mqar.num_train_examples, c.data.mqar.num_eval_examples = 64, 16
  c.train.batch_size, c.eval.batch_size, c.eval.max_batches = 8, 16, 1
  c.train.steps, c.train.eval_every, c.train.checkpoint_every = 1, 0, 0
  c.train.progress, c.train.tensorboard = "none", False
  result = train_and_evaluate(c, str(tmp_path / "run"))
  assert result.step == 1 and np.isfinite(result.train_metrics["loss"])
