"""Mixture-of-Memories: the layer against an independent per-memory reference, dense == gather, the single-memory
case against the plain linear-memory layer, causality, prefill + decode, router gradients, the load-balancing
loss and capacity on hand-made routings, and the training loss that adds the sown aux loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import kernels
from configs import mom as mom_config
from memarch import train as train_lib
from memarch.layers.mom import MixtureOfMemories, load_balancing_loss
from memarch.models import build_model
from tests.test_linear_memory import conv_ref, silu  # token-loop convolution and SiLU in numpy

pytestmark = pytest.mark.timeout(180)

VOCAB = 41
RTOL = ATOL = 2e-5  # float32 throughout


def layer_config(**overrides):
  m = mom_config.get_config("size=tiny").model.to_dict()
  m.update(embed_dim=16, num_heads=2, head_dim=4, num_memories=3, top_k=2, conv_width=3, scan_impl="reference",
           chunk_size=4, num_layers=1, vocab_size=VOCAB)
  m.update(overrides)
  return ml_collections.FrozenConfigDict(m)


def init_layer(cfg, b=2, t=11, seed=0):
  layer = MixtureOfMemories(cfg)
  x = np.random.default_rng(seed).normal(size=(b, t, cfg.embed_dim)).astype(np.float32)
  params = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(seed), x))["params"]
  # Perturb the near-identity conv kernels and the output norm scale so that they are really tested.
  rng = np.random.default_rng(seed + 1)
  params = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32), params)
  return layer, params, x


def apply_layer(layer, params, x, **kwargs):
  return jax.jit(lambda p, x: layer.apply({"params": p}, x, **kwargs))(params, x)


# ---------------------------------------------------------------------------------------------------------
# The independent reference: routing in numpy, then per batch row and per memory a python loop that keeps
# the routed tokens (in order, the first `capacity`), runs projections, a token-loop convolution and the
# reference scan on them alone, and adds the weighted reads back at the tokens' positions.


def _l2(x):
  return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def _memory_reads(p, cfg, xs, m):
  """Runs memory m (index into the stacked params) over its own token sequence xs [n, e]; reads [n, h, dv]."""
  h, dk = cfg.num_heads, cfg.head_dim
  dv = cfg.value_dim or dk
  e = xs.shape[-1]
  q = xs @ np.asarray(p["wq"]).reshape(e, -1)
  k = xs @ np.asarray(p["wk"][m]).reshape(e, -1)
  v = xs @ np.asarray(p["wv"][m]).reshape(e, -1)
  if cfg.conv_width:
    q = conv_ref(q[None], np.asarray(p["conv_q"]))[0]
    k = conv_ref(k[None], np.asarray(p["conv_k"][m]))[0]
    v = conv_ref(v[None], np.asarray(p["conv_v"][m]))[0]
  q, k, v = silu(q).reshape(-1, h, dk), silu(k).reshape(-1, h, dk), silu(v).reshape(-1, h, dv)
  beta = g = None
  if cfg.memory_rule in ("delta", "gated_delta"):
    q, k = _l2(q), _l2(k)
    beta = 1.0 / (1.0 + np.exp(-(xs @ np.asarray(p["wb"][m]))))
  if cfg.memory_rule in ("simple_gla", "gated_delta"):
    a = xs @ np.asarray(p["wa"][m]) + np.asarray(p["dt_bias"][m])
    g = -np.exp(np.asarray(p["a_log"][m])) * np.log1p(np.exp(a))
  o, _ = kernels.linear_scan(
      q[None], k[None], v[None], g=None if g is None else g[None], beta=None if beta is None else beta[None],
      impl="reference")
  return np.asarray(o[0])


def reference_mom(params, cfg, x):
  p = jax.tree.map(np.asarray, params)
  b, t, e = x.shape
  n, top_k = cfg.num_memories, cfg.top_k
  logits = x @ p["wr"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  top = np.argsort(-probs, axis=-1)[..., :top_k]  # [b, t, k]
  cap = t if cfg.capacity_factor <= 0 else min(t, int(np.ceil(cfg.capacity_factor * t * top_k / n)))
  h, dv = cfg.num_heads, cfg.value_dim or cfg.head_dim
  out = np.zeros((b, t, h, dv), np.float64)
  for bi in range(b):
    for m in range(n):
      toks = [ti for ti in range(t) if m in top[bi, ti]][:cap]
      if not toks:
        continue
      reads = _memory_reads(p, cfg, x[bi, toks], m)
      for i, ti in enumerate(toks):
        w = probs[bi, ti, m] / probs[bi, ti, top[bi, ti]].sum()
        out[bi, ti] += w * reads[i]
    if cfg.shared_memory:
      out[bi] += _memory_reads(p, cfg, x[bi], n)
  o = out / np.sqrt(np.mean(out * out, axis=-1, keepdims=True) + cfg.norm_eps) * p["o_norm"]["scale"]
  o = o * silu(np.einsum("bte,ehd->bthd", x, p["wg"]))
  return np.einsum("bthd,hde->bte", o, p["wo"])


@pytest.mark.parametrize("overrides,batch", [
    ({}, 2),  # gated delta, 3 memories, top-2, shared memory, conv width 3
    ({"memory_rule": "simple_gla", "shared_memory": False, "capacity_factor": 0.6, "conv_width": 2}, 1),  # drops
    ({"memory_rule": "linear", "top_k": 1, "conv_width": 0, "scan_impl": "xla"}, 1),  # chunked scan, T % 4 != 0
])
def test_layer_matches_per_memory_reference(overrides, batch):
  cfg = layer_config(**overrides)
  layer, params, x = init_layer(cfg, b=batch)
  y, _ = apply_layer(layer, params, x)
  want = reference_mom(params, cfg, x)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule", ["gated_delta", pytest.param("linear", marks=pytest.mark.slow)])
def test_dense_equals_gather_without_conv(rule):
  cfg_g = layer_config(conv_width=0, memory_rule=rule)
  cfg_d = layer_config(conv_width=0, memory_rule=rule, mom_impl="dense")
  layer_g, params, x = init_layer(cfg_g)
  layer_d = MixtureOfMemories(cfg_d)

  def loss(layer):
    return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(layer.apply({"params": p}, x)[0])),
                                      argnums=(0, 1)))

  (vg, (gp_g, gx_g)), (vd, (gp_d, gx_d)) = loss(layer_g)(params, x), loss(layer_d)(params, x)
  np.testing.assert_allclose(vd, vg, rtol=1e-5)
  np.testing.assert_allclose(gx_d, gx_g, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b_: np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5), gp_d, gp_g)
  assert np.abs(np.asarray(gp_g["wr"])).max() > 1e-4  # the router is trained through the mixing weights


def test_dense_form_requires_no_conv_and_no_capacity():
  with pytest.raises(ValueError, match="conv_width"):
    init_layer(layer_config(mom_impl="dense"))
  with pytest.raises(ValueError, match="capacity"):
    init_layer(layer_config(mom_impl="dense", conv_width=0, capacity_factor=1.0))
  with pytest.raises(ValueError, match="top_k"):
    init_layer(layer_config(top_k=4))


def test_single_memory_equals_linear_memory():
  linear_memory = pytest.importorskip("memarch.layers.linear_memory")
  cfg = layer_config(num_memories=1, top_k=1, shared_memory=False, aux_loss_scale=0.0)
  layer, params, x = init_layer(cfg)
  y, _ = apply_layer(layer, params, x)
  lin = linear_memory.LinearMemory(cfg)
  lin_params = nn.meta.unbox(jax.jit(lin.init)(jax.random.key(3), x))["params"]
  mapped = {}
  for name, value in lin_params.items():
    if name in ("conv_q", "conv_k", "conv_v"):
      mapped[name] = {"kernel": params[name] if name == "conv_q" else params[name][0]}
    elif name in ("wq", "wg", "wo", "o_norm"):
      mapped[name] = params[name]
    else:
      mapped[name] = params[name][0]
    assert jax.tree.map(jnp.shape, mapped[name]) == jax.tree.map(jnp.shape, value), name
  y_lin, _ = jax.jit(lambda p, x: lin.apply({"params": p}, x))(mapped, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_lin), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Hand-made routings: the router weight is the identity on a 4-dim input, so x = log(probs) routes as chosen.


def routed_layer(probs, **overrides):
  probs = np.asarray(probs, np.float32)
  n = probs.shape[-1]
  cfg = layer_config(num_memories=n, embed_dim=n, head_dim=4, **overrides)
  layer, params, _ = init_layer(cfg, t=probs.shape[1])
  params = {**params, "wr": jnp.eye(n)}
  x = np.log(probs)
  (_, sown) = jax.jit(lambda p, x: layer.apply({"params": p}, x, mutable=["losses", "metrics"]))(params, x)
  return sown


def test_aux_loss_on_hand_computed_routing():
  probs = np.array([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]])  # top-1: memories 0, 0, 1, 0
  # f = (3/4, 1/4), P = (0.65, 0.35): N * sum f P = 2 * (0.4875 + 0.0875) = 1.15
  np.testing.assert_allclose(load_balancing_loss(jnp.asarray(probs), jnp.asarray(probs > 0.5)), 1.15, rtol=1e-6)
  sown = routed_layer(probs, top_k=1, aux_loss_scale=0.1)
  np.testing.assert_allclose(sown["losses"]["aux_loss"][0], 0.115, rtol=1e-5)
  np.testing.assert_allclose(sown["metrics"]["mom/load_m0"][0], 0.75, rtol=1e-6)
  np.testing.assert_allclose(sown["metrics"]["mom/load_m1"][0], 0.25, rtol=1e-6)
  assert float(sown["metrics"]["mom/dropped"][0]) == 0.0


def test_capacity_drops_are_counted():
  # 8 tokens, top-1 over 2 memories: 7 go to memory 0, 1 to memory 1. capacity = ceil(1.0 * 8 * 1 / 2) = 4,
  # so memory 0 keeps its first 4 and drops 3: 3 of 8 assignments dropped.
  probs = np.array([[[0.9, 0.1]] * 5 + [[0.2, 0.8]] + [[0.7, 0.3]] * 2])
  sown = routed_layer(probs, top_k=1, capacity_factor=1.0, shared_memory=False)
  np.testing.assert_allclose(sown["metrics"]["mom/dropped"][0], 3 / 8, rtol=1e-6)
  np.testing.assert_allclose(sown["metrics"]["mom/load_m0"][0], 7 / 8, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Through the decoder stack.


def make_model(**overrides):
  m = layer_config(**overrides).to_dict()
  model = build_model(ml_collections.FrozenConfigDict(m))
  tokens = jax.random.randint(jax.random.key(0), (2, 13), 0, VOCAB)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens))["params"]
  return model, {"params": params}, tokens


@pytest.fixture(scope="module")
def lm():
  """One MoM layer (3 memories, top-2, shared memory, conv width 3) in the decoder stack, and its forward."""
  model, params, tokens = make_model()
  return model, params, tokens, jax.jit(model.apply)


def test_causality(lm):
  model, params, tokens, fwd = lm
  logits = fwd(params, tokens)
  t = 6
  changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % VOCAB)
  logits2 = fwd(params, changed)
  np.testing.assert_allclose(logits[:, : t + 1], logits2[:, : t + 1], atol=1e-6)
  assert np.abs(np.asarray(logits[:, t + 1:] - logits2[:, t + 1:])).max() > 1e-4


def test_prefill_then_decode_matches_parallel_forward(lm):
  model, params, tokens, fwd = lm
  full = fwd(params, tokens)
  cache = model.init_cache(2, 16)
  assert cache["layers"][0]["state"].shape == (4, 2, 2, 4, 4)  # 3 memories + shared, fixed size
  logits, cache = jax.jit(lambda p, t, c: model.apply(p, t, c, method=model.prefill))(params, tokens[:, :5], cache)
  steps = [logits]
  decode = jax.jit(lambda p, t, c: model.apply(p, t, c, method=model.decode_step))
  for i in range(5, 13):
    before = cache["layers"][0]
    step_logits, cache = decode(params, tokens[:, i], cache)
    steps.append(step_logits[:, None])
    # A memory's state and conv caches advance only at tokens routed to it: exactly 2 of 3 change per row.
    changed = np.abs(np.asarray(cache["layers"][0]["conv_k"] - before["conv_k"])).reshape(4, 2, -1).max(-1) > 0
    np.testing.assert_array_equal(changed[:3].sum(0), [2, 2])
    assert changed[3].all()  # the shared memory sees every token
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-4)


def test_training_loss_adds_the_sown_aux_loss():
  model, params, tokens = make_model(aux_loss_scale=0.5)
  model0 = build_model(ml_collections.FrozenConfigDict({**model.config.to_dict(), "aux_loss_scale": 0.0}))
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "loss_mask": jnp.ones(tokens.shape)}
  obj, (_, metrics) = jax.jit(lambda p, b: train_lib.training_loss(model, p["params"], b))(params, batch)
  obj0, (_, metrics0) = jax.jit(lambda p, b: train_lib.training_loss(model0, p["params"], b))(params, batch)
  assert float(metrics["aux_loss"]) > 0.0
  np.testing.assert_allclose(metrics["loss"], metrics0["loss"], rtol=1e-6)
  np.testing.assert_allclose(obj - obj0, metrics["aux_loss"], rtol=1e-5)
  assert float(metrics0["aux_loss"]) == 0.0
  assert {"mom/load_m0", "mom/load_m1", "mom/load_m2", "mom/dropped"} <= set(metrics)
  np.testing.assert_allclose(sum(float(metrics[f"mom/load_m{i}"]) for i in range(3)), 1.0, rtol=1e-5)
