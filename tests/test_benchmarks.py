"""The whole-model benchmark's pieces on tiny configs (tests never assert on time), and model.scan_layers:
the scanned stack equals the unrolled one (forward, gradients, prefill + decode) with converted parameters."""

import argparse
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.benchmarks import harness
from experiments.benchmarks import models as bench
from memarch.models import build_model
from memarch.models.lm import stack_layer_params, unstack_layer_params

pytestmark = pytest.mark.timeout(180)


def _settings(**over):
  args = argparse.Namespace(seq=64, batch=1, decode_steps=2, decode_max_cache_gib=4.0, budget_s=1.0)
  s = bench.Settings(True, args)
  for k, v in over.items():
    setattr(s, k, v)
  return s


def test_throughput_roofline_and_decode_rows(tmp_path):
  s = _settings(decode_contexts=(32, 96), decode_prefill=32)
  matmul = bench.measure_matmul(128, iters=2)
  thr = bench.part_throughput(["transformer"], s, matmul)["rows"][0]
  assert thr["seq"] == 64 and thr["tokens_per_s"] > 0 and thr["params"] > 0
  roof = bench.part_roofline(["transformer"], s, matmul)["rows"][0]
  assert roof["train_gflop_per_step"] == pytest.approx(thr["train_flops_per_token"] * 64 / 1e9)
  dec = bench.part_decode(["transformer", "gdn"], s, matmul)
  rows = {(r["model"], r["context"]): r for r in dec["rows"]}
  # The KV cache grows with the context; the linear memory's state does not.
  assert rows[("transformer", 96)]["state_bytes"] > rows[("transformer", 32)]["state_bytes"]
  assert rows[("gdn", 96)]["state_bytes"] == rows[("gdn", 32)]["state_bytes"]
  assert dec["flatness"]["gdn"]["state_bytes_constant"]
  assert "simulated" in rows[("transformer", 96)]["note"]
  # A cache over the memory limit is skipped with the reason.
  s.decode_max_cache_bytes = 1
  skipped = bench.part_decode(["transformer"], s, matmul)["rows"]
  assert all("skipped" in r["note"] for r in skipped)
  harness.write_json(str(tmp_path / "x.json"), {"rows": dec["rows"]})
  assert json.load(open(tmp_path / "x.json"))["rows"]


def test_extend_cache_tiles_the_prefilled_keys():
  k = jnp.arange(2 * 10, dtype=jnp.float32).reshape(1, 10, 2, 1)
  cache = {"index": jnp.asarray(3), "layers": [{"k": k, "v": k + 100}, {"state": jnp.ones(3)}, None]}
  out = bench._extend_cache(cache, 3, 7)
  assert int(out["index"]) == 7
  np.testing.assert_array_equal(out["layers"][0]["k"][0, :7, :, 0], np.asarray(k[0, [0, 1, 2, 0, 1, 2, 0], :, 0]))
  np.testing.assert_array_equal(out["layers"][0]["k"][0, 7:], k[0, 7:])  # slots past the context untouched
  assert out["layers"][1] is cache["layers"][1] and out["layers"][2] is None


def test_crossover_and_flag_logic():
  rows = [{"model": "transformer", "seq": s, "us_per_token": u} for s, u in ((1024, 10.0), (2048, 12.0), (4096, 16.0))]
  rows += [{"model": "gdn", "seq": s, "us_per_token": u} for s, u in ((1024, 14.0), (2048, 14.0), (4096, 14.0))]
  x = bench.crossover(rows, "gdn", "transformer")
  assert 2048 < x < 4096  # gdn cheaper between 2k (14 > 12) and 4k (14 < 16)
  assert bench.crossover(rows, "transformer", "transformer") is None
  rows += [{"model": "fast", "seq": 1024, "us_per_token": 1.0}]
  assert bench.crossover(rows, "fast", "transformer") == 1024


def _tiny(spec, overrides, **model):
  cfg, _ = harness.model_config(spec, overrides)
  d = cfg.to_dict()
  d.update(model)
  return ml_collections.FrozenConfigDict(d)


@pytest.mark.parametrize("spec,overrides", [
    ("configs/transformer.py:size=tiny", ['model.layer_blocks=("attention", "mlp")', "model.attention_impl=reference"]),
    # MoM: sown losses and metrics through the scan (slow: ~40-80 s of compilation on this machine).
    pytest.param("configs/mom.py:size=tiny", ['model.layer_blocks=("mom", "mlp")'], marks=pytest.mark.slow),
])
def test_scan_layers_equals_the_unrolled_stack(spec, overrides):
  unrolled = _tiny(spec, overrides, num_layers=3, scan_layers=False)
  scanned = _tiny(spec, overrides, num_layers=3, scan_layers=True)
  mu, ms = build_model(unrolled), build_model(scanned)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 1, unrolled.vocab_size)
  pu = nn.meta.unbox(jax.jit(mu.init)(jax.random.key(1), tokens))["params"]
  ps = stack_layer_params(pu, scanned)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(ms.init(jax.random.key(1), tokens))["params"])
  assert jax.tree.structure(ps) == jax.tree.structure(shapes)
  assert [a.shape for a in jax.tree.leaves(ps)] == [a.shape for a in jax.tree.leaves(shapes)]
  back = unstack_layer_params(ps, scanned)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(pu)):
    np.testing.assert_array_equal(a, b)

  def loss(model, p):
    logits, sown = model.apply({"params": p}, tokens, mutable=["losses", "metrics"])
    aux = sum(jnp.sum(a) for a in jax.tree.leaves(sown.get("losses", {})))
    return jnp.mean(logits**2) + aux, logits

  (lu, logits_u), gu = jax.jit(jax.value_and_grad(lambda p: loss(mu, p), has_aux=True))(pu)
  (ls, logits_s), gs = jax.jit(jax.value_and_grad(lambda p: loss(ms, p), has_aux=True))(ps)
  np.testing.assert_allclose(logits_s, logits_u, atol=1e-5)
  np.testing.assert_allclose(ls, lu, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(unstack_layer_params(gs, scanned)), jax.tree.leaves(gu)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  # Prefill + decode through the stacked cache equals the parallel forward.
  cache = ms.init_cache(2, 16)
  assert isinstance(cache["layers"], tuple) and jax.tree.leaves(cache["layers"])[0].shape[0] == 3
  out, cache = jax.jit(lambda p, t, c: ms.apply({"params": p}, t, c, method=ms.prefill))(ps, tokens[:, :9], cache)
  steps = [out]
  decode = jax.jit(lambda p, t, c: ms.apply({"params": p}, t, c, method=ms.decode_step))
  for i in range(9, 12):
    step, cache = decode(ps, tokens[:, i], cache)
    steps.append(step[:, None])
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), logits_u, atol=1e-4)


def test_scan_layers_ffn_input_of_the_last_layer_only():
  scanned = _tiny("configs/transformer.py:size=tiny", ['model.layer_blocks=("attention", "mlp")'], num_layers=2,
                  scan_layers=True)
  unrolled = _tiny("configs/transformer.py:size=tiny", ['model.layer_blocks=("attention", "mlp")'], num_layers=2)
  ms, mu = build_model(scanned), build_model(unrolled)
  tokens = jnp.ones((1, 8), jnp.int32)
  pu = nn.meta.unbox(jax.jit(mu.init)(jax.random.key(0), tokens))["params"]
  ps = stack_layer_params(pu, scanned)
  _, hu = jax.jit(lambda p, t: mu.apply({"params": p}, t, return_hidden=True))(pu, tokens)
  _, hs = jax.jit(lambda p, t: ms.apply({"params": p}, t, return_hidden=True))(ps, tokens)
  np.testing.assert_allclose(hs["ffn_input"], hu["ffn_input"], atol=1e-5)
  with pytest.raises(NotImplementedError, match="scan_layers"):
    ms.apply({"params": ps}, tokens, return_hidden=True, ffn_layer=0)


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_remat_keeps_parameters_loss_and_gradients(scan):
  plain = _tiny("configs/transformer.py:size=tiny", ['model.layer_blocks=("attention", "mlp")'], num_layers=2,
                scan_layers=scan)
  remat = _tiny("configs/transformer.py:size=tiny", ['model.layer_blocks=("attention", "mlp")'], num_layers=2,
                scan_layers=scan, remat=True)
  mp, mr = build_model(plain), build_model(remat)
  tokens = jax.random.randint(jax.random.key(3), (2, 10), 1, plain.vocab_size)
  params = nn.meta.unbox(jax.jit(mp.init)(jax.random.key(4), tokens))["params"]
  shapes = jax.eval_shape(lambda: nn.meta.unbox(mr.init(jax.random.key(4), tokens))["params"])
  assert jax.tree.structure(shapes) == jax.tree.structure(params)  # a checkpoint loads either way
  loss = lambda m: jax.jit(jax.value_and_grad(lambda p: jnp.mean(m.apply({"params": p}, tokens) ** 2)))(params)
  (lp, gp), (lr, gr) = loss(mp), loss(mr)
  np.testing.assert_allclose(lr, lp, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(gr), jax.tree.leaves(gp)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  # The cached path runs through the rematerialized blocks too.
  logits = jax.jit(lambda p, t: mr.apply({"params": p}, t))(params, tokens)
  out, _ = jax.jit(lambda p, t, c: mr.apply({"params": p}, t, c, method=mr.prefill))(params, tokens, mr.init_cache(2, 16))
  np.testing.assert_allclose(out, logits, atol=1e-5)


def test_zoo_cost_times_the_zoo_config_on_the_task_data(tmp_path):
  from experiments.benchmarks import zoo as zoo_cost

  out = tmp_path / "zoo_cost.json"
  zoo_cost.main(["--tasks", "passkey1k", "--models", "swa", "--budget-s", "0.1", "--out", str(out)])
  (row,) = json.load(open(out))["rows"]
  assert (row["task"], row["model"], row["seq"], row["batch"]) == ("passkey1k", "swa", 1024, 2)
  assert row["protocol_batch"] == 16
  assert row["tokens_per_cpu_s"] == pytest.approx(2 * 1024 / row["step_cpu_s"])
  # A stage: 250 steps x 16 rows x 1024 tokens x 3 lrs at that speed.
  assert row["stage_cpu_h"] == pytest.approx(250 * 16 * 1024 * 3 / row["tokens_per_cpu_s"] / 3600)
  with pytest.raises(SystemExit, match="unknown model"):
    zoo_cost.main(["--models", "nope"])


def test_train_step_setup_keeps_the_given_batch_and_checks_its_shape():
  model_cfg, config = harness.model_config("configs/transformer.py:size=tiny")
  tokens = np.arange(2 * 17, dtype=np.int32).reshape(2, 17) % 50 + 1
  given = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((2, 16), np.float32),
           "segment_ids": np.repeat(np.array([[1] * 8 + [2] * 8]), 2, 0).astype(np.int32)}
  step, state, data, mesh = harness.train_step_setup(model_cfg, config, batch=2, seq=16, data=given)
  assert set(data) == set(given)
  np.testing.assert_array_equal(data["inputs"], given["inputs"])
  t = harness.time_train_step(step, state, data, mesh, budget_s=0.1)
  assert t["timed_steps"] >= 2 and t["step_cpu_s"] > 0 and t["compile_s"] > 0
  with pytest.raises(ValueError, match="expected"):
    harness.train_step_setup(model_cfg, config, batch=2, seq=32, data=given)
