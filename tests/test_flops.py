"""memarch.flops against XLA's own count, and the launch planner's consistency.

XLA's cost analysis counts every HLO op: the matmuls (2 FLOPs per multiply-add, as memarch.flops does) plus one
FLOP per output element of elementwise ops (norms, activations, gates, softmax), which memarch.flops leaves
out; its optimizer also folds products with operands known to be zero (Titans' initial momentum S_0 = 0). At
the tiny widths tested here the elementwise share is a few percent, so the analytic count must be within 15%
of XLA's for the forward and 20% for the training step (XLA's count of jax.grad: the backward's recomputation
included). The configs are fully unrolled: one attention block, one scan chunk, one memory chunk (XLA counts a
loop body once whatever its trip count, so only a trip count of 1 is comparable).
"""

import math

import jax
import jax.numpy as jnp
import pytest

from experiments.benchmarks import harness
from memarch import flops
from memarch.models import build_model

pytestmark = pytest.mark.timeout(120)

T = 32  # tokens: one attention block, one chunk of 32 (scan and memory)

CASES = {
    "transformer": ("configs/transformer.py:size=tiny",
                    ['model.layer_blocks=("attention", "mlp")', "model.embed_dim=128", "model.mlp_dim=384",
                     "model.attention_impl=xla"]),
    "gated_deltanet": ("configs/gated_deltanet.py:size=tiny",
                       ['model.layer_blocks=("linear_memory", "mlp")', "model.chunk_size=32", "model.scan_impl=xla"]),
    "titans_lmm": ("configs/titans.py:variant=lmm,size=tiny", ["model.memory_chunk_size=32"]),
    # ATLAS: Omega window 8, muon (Newton-Schulz on every token's momentum), polynomial features.
    "titans_atlas": ("configs/titans.py:variant=atlas,size=tiny", ["model.memory_chunk_size=32"]),
}


def _xla_flops(model_cfg, *, train: bool, compiled: bool) -> float:
  model = build_model(model_cfg)
  tokens = jnp.ones((1, T), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
  fwd = lambda p, x: model.apply(p, x, mutable=["losses", "metrics"])[0]
  fn = jax.grad(lambda p, x: jnp.sum(fwd(p, x))) if train else fwd
  lowered = jax.jit(fn).lower(params, tokens)
  return (lowered.compile() if compiled else lowered).cost_analysis()["flops"]


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_train_flops_match_xla_cost_analysis(name):
  spec, overrides = CASES[name]
  model_cfg, _ = harness.model_config(spec, overrides)
  est = flops.model_flops(model_cfg, T)
  fwd = _xla_flops(model_cfg, train=False, compiled=True) / T
  assert 0.85 <= fwd / est["per_token_forward"] <= 1.15, (fwd, est["per_token_forward"])
  # The gradient's cost from the lowered (unoptimized) module: compiling it would dominate the test's time.
  train = _xla_flops(model_cfg, train=True, compiled=False) / T
  assert 0.8 <= train / est["per_token_train"] <= 1.2, (train, est["per_token_train"])


def test_conventions():
  """Causal halving, windows, the train multiplier with recomputation, by_layer sums, config forms."""
  assert flops.mean_visible_keys(4) == 2.5  # (1 + 2 + 3 + 4) / 4
  assert flops.mean_visible_keys(6, window=2) == (1 + 2 * 5) / 6
  assert flops.mean_visible_keys(6, window=10) == flops.mean_visible_keys(6)
  model_cfg, config = harness.model_config("configs/transformer.py:size=small")
  a = flops.model_flops(config, 2048)  # full config: vocab from config.data
  b = flops.model_flops(model_cfg, 2048)
  assert a == b
  by = a["by_layer"]
  assert math.isclose(sum(v["forward"] for v in by.values()), a["per_token_forward"])
  assert math.isclose(sum(v["train"] for v in by.values()), a["per_token_train"])
  # MLP: no recomputation, exactly 3x; attention: 3x plus the recomputed QK^T.
  assert by["mlp"]["train"] == 3 * by["mlp"]["forward"]
  assert by["attention"]["train"] > 3 * by["attention"]["forward"]
  assert by["unembedding"]["forward"] == 2 * 256 * 8192
  # Full attention grows with length, a sliding window saturates, a memory model's cost per token is flat.
  assert flops.model_flops(config, 8192)["per_token_forward"] > 2 * a["per_token_forward"] - by["attention"]["forward"]
  gdn, _ = harness.model_config("configs/gated_deltanet.py:size=small")
  assert flops.model_flops(gdn, 16384)["per_token_forward"] == flops.model_flops(gdn, 2048)["per_token_forward"]


def test_every_family_has_a_count():
  for spec in ("configs/based.py:size=small", "configs/mom.py:size=small", "configs/titans.py:variant=mac,size=small",
               "configs/titans.py:variant=mag,size=small", "configs/titans.py:variant=mal,size=small",
               "configs/hmt.py:size=small,segment=256,sensory=32", "configs/hmt.py:size=tiny,backbone=gated_deltanet",
               "configs/linear_attention.py:rule=delta,size=small"):
    model_cfg, _ = harness.model_config(spec)
    out = flops.model_flops(model_cfg, 2048)
    assert out["per_token_train"] > 3 * out["per_token_forward"] > 0, spec
  mom, _ = harness.model_config("configs/mom.py:size=small")
  entry = flops.model_flops(mom, 2048)["by_layer"]["mom"]
  assert entry["executed_forward"] > entry["forward"]  # the gather implementation scans every memory
  atlas, _ = harness.model_config("configs/titans.py:variant=atlas,size=small")
  lmm, _ = harness.model_config("configs/titans.py:variant=lmm,size=small")
  # Newton-Schulz on every token's momentum makes the ATLAS memory several times the Titans one.
  assert (flops.model_flops(atlas, 2048)["by_layer"]["neural_memory"]["forward"]
          > 3 * flops.model_flops(lmm, 2048)["by_layer"]["neural_memory"]["forward"])
  with pytest.raises(ValueError, match="seq_len"):
    flops.model_flops(mom, 0)


# ------------------------------------------------------------------------------------------ launch planner


def _plan(mesh, batch=4, seq=64, spec="configs/transformer.py:size=tiny"):
  from experiments import sweep  # noqa: PLC0415
  from experiments.benchmarks import plan  # noqa: PLC0415

  config = sweep.load_config(spec)
  return plan.plan(config, plan.parse_mesh(mesh), "h100", batch=batch, seq=seq, compute_dtype="float32", mfu=0.4)


def test_plan_counts_the_real_parameters_and_splits_memory_over_fsdp():
  import flax.linen as nn  # noqa: PLC0415

  p1 = _plan("data=1")
  model_cfg, _ = harness.model_config("configs/transformer.py:size=tiny")
  params = nn.meta.unbox(jax.jit(build_model(model_cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  assert p1["parameters"] == sum(x.size for x in jax.tree.leaves(params))
  assert p1["flops_per_token_train"] == flops.model_flops(model_cfg, 64)["per_token_train"]
  p2 = _plan("fsdp=2")
  m1, m2 = p1["memory_per_device_bytes"], p2["memory_per_device_bytes"]
  for key in ("parameters", "gradients", "adamw_moments", "activations", "logits"):
    assert m2[key] == pytest.approx(m1[key] / 2), key  # tiny's dims and the batch divide by 2
  assert p1["communication_bytes_per_device"]["fsdp_all_gather"] == 0
  assert p2["communication_bytes_per_device"]["fsdp_all_gather"] == pytest.approx(4 * p1["parameters"])  # 2 x 1/2
  pt = _plan("tensor=2")
  assert pt["communication_bytes_per_device"]["tensor_all_reduce"] > 0
  assert pt["memory_per_device_bytes"]["activations"] < m1["activations"]
  assert p1["total_per_device_bytes_remat"] < p1["total_per_device_bytes"] and p1["fits"]
  with pytest.raises(ValueError, match="does not split"):
    _plan("data=3")


def test_plan_activation_estimate_against_compiled_memory():
  """The analytic per-device total against XLA's memory analysis of the compiled train step (one CPU device):
  the same order of magnitude (XLA keeps temporaries the analytic model does not list, and reuses buffers)."""
  from experiments.benchmarks import plan  # noqa: PLC0415

  p = _plan("data=1", batch=4, seq=128)
  compiled = plan.compiled_memory("configs/transformer.py:size=tiny", [], plan.parse_mesh("data=1"), 4, 128)
  ratio = compiled["peak"] / p["total_per_device_bytes"]
  assert 1 / 3 <= ratio <= 3, (compiled, p["total_per_device_bytes"])
