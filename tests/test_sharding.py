"""Sharding on 8 simulated CPU devices: one step of each model on several meshes equals one device, parameters
really sharded, Pallas kernels under shard_map, checkpoints moved across meshes; and the spec rules themselves.

The multi-device cases run tests/sharding_worker.py in a subprocess (XLA_FLAGS must name the device count before
jax is imported); the rules (fit_spec, param_spec, batch_spec) are checked here, on one device.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import base
from memarch import sharding
from tests.conftest import REPO, clean_env

pytestmark = pytest.mark.timeout(300)

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
MESHES = ([8, 1, 1, 1], [2, 2, 2, 1], [1, 2, 4, 1], [2, 1, 1, 4])  # data, fsdp, tensor, sequence
F32_LOSS_RTOL = 1e-5  # float32: a different reduction order across devices changes the last bits only
F32_GRAD_RTOL = 1e-4  # of the largest gradient entry


def run_worker(case: str, args: dict, devices: int = 8, timeout: int = 280):
  env = clean_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")
  out = subprocess.run([sys.executable, "-m", "tests.sharding_worker", case, json.dumps({**args, "devices": devices})],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
  assert out.returncode == 0 and lines, f"worker {case} failed ({out.returncode}):\n{out.stderr[-4000:]}"
  return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------------------------------------
# Rules (one device)

SIZES = {"data": 2, "fsdp": 2, "tensor": 4, "sequence": 1}
RULES = sharding.logical_rules(base.mesh_config())


def test_fit_spec_drops_axes_that_do_not_divide():
  assert sharding.fit_spec((64, 4, 16), P("fsdp", "tensor", None), SIZES) == P("fsdp", "tensor", None)
  assert sharding.fit_spec((64, 2, 16), P("fsdp", "tensor", None), SIZES) == P("fsdp", None, None)
  # A tuple of axes keeps those that divide, in order.
  assert sharding.fit_spec((6, 3), P(("data", "fsdp")), SIZES) == P("data", None)
  assert sharding.fit_spec((8, 3), P(("data", "fsdp")), SIZES) == P(("data", "fsdp"), None)
  assert sharding.fit_spec((2, 3), P(("tensor", "data")), SIZES) == P("data", None)
  with pytest.raises(ValueError, match="more entries"):
    sharding.fit_spec((4,), P("data", None), SIZES)


def test_param_spec_rules_and_fsdp_fallback():
  spec = lambda shape, names, **kw: sharding.param_spec(shape, names, SIZES, RULES, **kw)
  assert spec((64, 4, 16), ("embed", "heads", "kv")) == P("fsdp", "tensor", None)
  assert spec((4, 16, 64), ("heads", "kv", "embed")) == P("tensor", None, "fsdp")
  assert spec((64, 192), ("embed", "mlp")) == P("fsdp", "tensor")
  assert spec((256, 64), ("vocab", "embed")) == P("tensor", "fsdp")
  # 2 heads on a tensor axis of 4: heads replicated, embed still over fsdp; no error.
  assert spec((64, 2, 32), ("embed", "heads", "kv")) == P("fsdp", None, None)
  # No embed dimension (Titans' memory MLP init [heads, d_in, d_out]): fsdp goes to the largest dividing dim.
  assert spec((4, 16, 64), ("heads", None, None)) == P("tensor", None, "fsdp")
  assert spec((4, 16, 64), ("heads", None, None), fsdp_fallback=False) == P("tensor", None, None)
  # embed of 63 does not divide fsdp=2: the fallback picks another dimension; nothing divides: replicated.
  assert spec((63, 4, 16), ("embed", "heads", "kv")) == P(None, "tensor", "fsdp")
  assert spec((3, 5), ("embed", None)) == P(None, None)
  # A per-head-dim norm scale is "kv": replicated over tensor, fsdp by the fallback.
  assert spec((32,), ("kv",)) == P("fsdp")


def test_batch_spec_rows_and_sequence():
  sizes = {"data": 2, "fsdp": 1, "tensor": 1, "sequence": 4}
  assert sharding.batch_spec((8, 64), sizes) == P("data", "sequence")  # fsdp of size 1 splits nothing
  assert sharding.batch_spec((8, 63), sizes) == P("data", None)  # 63 tokens: time not split
  assert sharding.batch_spec((8,), sizes) == P("data")
  sizes["fsdp"] = 2
  assert sharding.batch_spec((8, 64), sizes) == P(("data", "fsdp"), "sequence")
  assert sharding.batch_spec((2, 64), sizes) == P("data", "sequence")


def test_mesh_must_match_device_count():
  c = base.mesh_config()
  c.data, c.fsdp, c.tensor = 2, 2, 2
  with pytest.raises(ValueError, match="needs 8 devices, but 4 are available"):
    sharding.mesh_shape(c, 4)
  # The training entry refuses it before any model is built or compiled.
  from memarch import validate  # pylint: disable=g-import-not-at-top
  from configs import transformer  # pylint: disable=g-import-not-at-top

  config = transformer.get_config("size=tiny")
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  with pytest.raises(ValueError, match="needs 8 devices"):
    validate.validate_config(config, 1)


def test_batch_rows_per_host(monkeypatch):
  mesh = sharding.make_mesh(base.mesh_config())  # one device
  assert sharding.check_batch_size(8, mesh) == 8
  # 4 hosts but only 1 row group (data x fsdp): a host's devices would need rows that other hosts loaded.
  monkeypatch.setattr(sharding.jax, "process_count", lambda: 4)
  with pytest.raises(ValueError, match="multiple of the number of hosts"):
    sharding.check_batch_size(8, mesh)
  with pytest.raises(ValueError, match="divisible"):
    sharding.check_batch_size(6, mesh)


def test_initialize_distributed_is_a_no_op_without_a_cluster(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  monkeypatch.setattr(sharding, "_cluster_detected", lambda: False)
  assert sharding.initialize_distributed(base.distributed_config()) is False
  bad = base.distributed_config()
  bad.coordinator_address, bad.num_processes, bad.process_id = "127.0.0.1:1", 2, 5
  with pytest.raises(ValueError, match="process_id=5"):
    sharding.initialize_distributed(bad)


# ----------------------------------------------------------------------------------------------------------
# 8 devices (subprocesses)


def check_step_results(results):
  for r in results:
    what = f"{r['model']} on mesh {r['mesh']}"
    assert r["same_keys"], what
    np.testing.assert_allclose(r["loss"], r["ref_loss"], rtol=F32_LOSS_RTOL, err_msg=what)
    assert r["grad_max_err"] <= F32_GRAD_RTOL * r["grad_scale"], (what, r["grad_max_err"], r["grad_scale"])
    data, fsdp, tensor, _ = r["mesh"]
    specs, sharded = r["specs"], r["sharded"]
    if fsdp > 1 or tensor > 1:
      # Most parameters are split; the embedding (vocab x embed) always is.
      assert sharded["['embedding']"], (what, specs["['embedding']"])
      assert sum(sharded.values()) >= 0.75 * len(sharded), (what, specs)
    else:
      assert not any(sharded.values()), (what, specs)  # pure data parallelism: replicated parameters
    if tensor > 1:
      assert any("tensor" in s for s in specs.values()), what
    if fsdp > 1:
      assert any("fsdp" in s for s in specs.values()), what


@pytest.fixture(scope="module")
def default_cases(tmp_path_factory):
  """The default run's multi-device cases, in one worker process (one interpreter start and jax import): an
  attention model on a tensor-heavy mesh and a memory model on a mixed one (1-layer variants; every model on
  every mesh is the slow grid), the Pallas kernels under shard_map on (2, 1, 2, 1), and a checkpoint moved
  from (2, 2, 2, 1) to (1, 2, 4, 1)."""
  root = tmp_path_factory.mktemp("ckpt")
  return run_worker("bundle", {"cases": {
      "step": {"models": ["transformer"], "meshes": [MESHES[2]], "layers": 1},
      "step_memory": {"models": ["gated_deltanet"], "meshes": [MESHES[1]], "layers": 1},
      "kernels": {"mesh": [2, 1, 2, 1], "ops": ["attention", "linear_scan"]},
      "ckpt": {"root": str(root), "mesh_a": MESHES[1], "mesh_b": MESHES[2]},
  }})


def test_one_step_equals_one_device_representative(default_cases):
  check_step_results(default_cases["step"] + default_cases["step_memory"])
  (attn,), (gdn,) = default_cases["step"], default_cases["step_memory"]
  # (1, 2, 4, 1): 4 query heads over tensor; the 2 kv heads do not divide 4 and stay whole.
  assert attn["specs"]["['block_0_attention']['wq']"] == "P('fsdp', 'tensor', None)"
  assert attn["specs"]["['block_0_attention']['wk']"] == "P('fsdp', None, None)"
  assert gdn["specs"]["['block_0_linear_memory']['wq']"] == "P('fsdp', 'tensor', None)"


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("model", ["transformer", "titans_mac", "mom", "gated_deltanet"])
def test_one_step_equals_one_device_grid(model):
  check_step_results(run_worker("step", {"models": [model], "meshes": list(MESHES)}, timeout=1100))


def check_kernel_results(r):
  assert r.pop("xla_without_shard_map")  # impl "xla" (CPU's auto) calls the kernel directly
  for name, x in r.items():
    assert x["shard_map"] and x["pallas"], (name, x)  # really the Pallas kernel, really under shard_map
    assert x["fwd_err"] < 2e-5 and x["val_err"] < 1e-4 and x["grad_err"] < 1e-4, (name, x)


def test_pallas_kernels_under_shard_map(default_cases):
  check_kernel_results(dict(default_cases["kernels"]))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pallas_kernels_under_shard_map_grid():
  # Also the lse output of attention and the final state of the scan, on a tensor-only and a data-only mesh.
  for mesh in ([1, 1, 4, 1], [4, 1, 1, 1]):
    check_kernel_results(run_worker("kernels", {"mesh": mesh}, devices=4, timeout=800))


def test_checkpoint_moves_across_meshes(default_cases):
  r = default_cases["ckpt"]
  assert r["mesh_b"] == {"data": 1, "fsdp": 2, "tensor": 4, "sequence": 1}
  # The step-4 checkpoint written on mesh A, read straight onto mesh B's shardings (e.g. the embedding now
  # 4-way over tensor): the one-device run's parameters at step 4.
  assert "P('tensor', 'fsdp')" in r["restored_specs"]
  assert r["restore_err"] < 1e-5
  ab = [r["losses_ab"][str(s)] for s in range(1, 9)]  # steps 1-4 on mesh A, 5-8 resumed on mesh B
  ref = [r["losses_ref"][str(s)] for s in range(1, 9)]  # the same 8 steps on one device
  np.testing.assert_allclose(ab, ref, rtol=1e-5)
  assert r["param_err"] < 1e-5
