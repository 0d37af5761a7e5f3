"""Context parallelism (kernels.ring_attention, kernels.sequence_parallel, memory.sequence_parallel, the layers'
dispatch in memarch.context_parallel) against the unsharded references, forward and gradients.

Each test runs `tests/sequence_parallel_worker.py` in a subprocess with 4 simulated CPU devices (XLA_FLAGS set
before jax is imported, DESIGN.md "Tests") and asserts on the errors it reports. Slices are 5 or 6 tokens: not
multiples of the scan's chunk size (3) or of any attention block. Tolerances are float32 (the math is float32;
the sharded results differ from the references only by summation order).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, clean_env

pytestmark = pytest.mark.timeout(600)

DEVICES = 4
_FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TOL = 2e-5  # float32, relative to the reference's largest magnitude


def run_worker(case: str, args: dict, devices: int = DEVICES) -> dict:
  env = clean_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {_FAST}")
  r = subprocess.run([sys.executable, "-m", "tests.sequence_parallel_worker", case, json.dumps(args)], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=550)
  lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
  assert r.returncode == 0 and lines, f"worker {case} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
  return json.loads(lines[-1][len("RESULT "):])


def check(res: dict, *, collective: str, tol: float = TOL, all_nonzero: bool = True) -> None:
  """Errors within tol of the reference's scale, every gradient (or, with all_nonzero=False, at least one: some
  cases have exactly zero gradients, e.g. dq with a window of 1) non-trivial, and the collective present."""
  assert res["out_err"] <= tol * max(1.0, res["out_scale"]), res
  nonzero = [scale > 0 for scale in res["grad_scale"]]
  assert (all(nonzero) if all_nonzero else any(nonzero)) or not nonzero, res  # a match means something
  for err, scale in zip(res["grad_err"], res["grad_scale"]):
    assert err <= tol * max(1.0, scale), res
  assert res[collective], f"the sharded program has no {collective}: the sequence-parallel path did not run ({res})"


# The default tests share one worker process (one interpreter and JAX start-up; compiling dominates).
DEFAULT = {
    "ring": {"variants": ["causal", "full", "window"]},
    "scan": {"variants": ["simple_gla", "gated_delta"]},
    "memory": {"variants": [{"name": "affine", "depth": 1}, {"name": "handoff", "depth": 2}]},
    "models": {"models": ["transformer", "gated_deltanet"], "seq": 16,
               "overrides": {"transformer": {"num_layers": 1}, "gated_deltanet": {"num_layers": 1}}},
    "export": {},
}


@pytest.fixture(scope="module")
def default_results():
  return run_worker("multi", DEFAULT)


def test_ring_attention(default_results):
  """Causal, full (non-causal) and causal sliding-window attention, o and dq, dk, dv (GQA: 4 q heads, 2 kv)."""
  out = default_results["ring"]
  assert sorted(k for k in out if k != "seconds") == ["causal", "full", "window"]
  for name in ("causal", "full", "window"):
    check(out[name], collective="ppermute")
    assert out[name]["cond"], name  # masked blocks are skipped under lax.cond


@pytest.mark.slow
def test_ring_attention_more():
  """Segment ids (packed documents), a window of 1, a non-causal window, the Pallas interpreter per block, and
  8 devices (causal, window)."""
  out = run_worker("ring", {"variants": ["segments", "window1", "full_window"]})
  out.update({f"pallas_{k}": v for k, v in run_worker("ring", {"variants": ["causal"], "impl": "pallas_interpret"}).items()})
  eight = run_worker("ring", {"variants": ["causal", "window"], "mesh": [1, 1, 1, 8], "seq": 40}, devices=8)
  out.update({f"8dev_{k}": v for k, v in eight.items()})
  # A window of 1: each query sees only itself, so the softmax is constant (dq = dk = 0 exactly), and the ring
  # stops after the diagonal block: no block is sent at all.
  window1 = out.pop("window1")
  check(dict(window1, ppermute=not window1["ppermute"]), collective="ppermute", all_nonzero=False)
  for res in out.values():
    check(res, collective="ppermute")


def test_linear_scan(default_results):
  """Scalar-gated Hebbian (simple_gla) and gated delta rule: o, final state, gradients of q, k, v, g, beta and
  the initial state."""
  out = default_results["scan"]
  for name in ("simple_gla", "gated_delta"):
    check(out[name], collective="all_gather")


@pytest.mark.slow
def test_linear_scan_more():
  """Hebbian without decay (linear attention) and the delta rule without decay (DeltaNet); 8 devices."""
  out = run_worker("scan", {"variants": ["linear", "delta"]})
  eight = run_worker("scan", {"variants": ["linear", "gated_delta"], "mesh": [1, 1, 1, 8], "seq": 40}, devices=8)
  out.update({f"8dev_{k}": v for k, v in eight.items()})
  for res in out.values():
    check(res, collective="all_gather")


def test_titans_memory(default_results):
  """Depth-1 memory by the affine scheme (all_gather of the maps) and a depth-2 memory by the hand-off
  (ppermute rounds under cond): reads, final (W, S), gradients of the initial state, inputs and gates."""
  out = default_results["memory"]
  assert out["affine"]["affine"] and not out["handoff"]["affine"]
  check(out["affine"], collective="all_gather")
  check(out["handoff"], collective="ppermute")


@pytest.mark.slow
def test_titans_memory_options():
  """The affine scheme with a residual memory, read 'before' / 'chunk_start' and the gd optimizer; the
  hand-off forced on a depth-1 memory, and with the Omega rule's window (3) and muon on a residual depth-2 memory."""
  variants = [
      {"name": "residual_before_gd", "depth": 1, "residual": True, "read": "before", "optimizer": "gd"},
      {"name": "chunk_start", "depth": 1, "read": "chunk_start"},
      {"name": "forced_handoff", "depth": 1, "scheme": "handoff"},
      {"name": "omega_muon", "depth": 2, "residual": True, "optimizer": "muon", "window": 3},
  ]
  out = run_worker("memory", {"variants": variants})
  for name, res in out.items():
    # gd has no momentum: the initial momentum S_0 does not enter, its gradient is exactly 0.
    check(res, collective="all_gather" if res["affine"] else "ppermute", all_nonzero=name != "residual_before_gd")


def test_models_forward(default_results):
  """A one-layer tiny Transformer (ring attention) and Gated DeltaNet (SP scan) on a (1, 1, 1, 4) mesh: the same
  logits as on one device."""
  out = default_results["models"]
  check(dict(out["transformer"], grad_err=[], grad_scale=[]), collective="ppermute")
  check(dict(out["gated_deltanet"], grad_err=[], grad_scale=[]), collective="all_gather")


def test_exports_for_tpu_and_gpu(default_results):
  """Ring attention and the SP scan with impl="pallas", gradients included, lower for TPU (Mosaic) and GPU
  (Triton) on a 4-device mesh from this CPU-only machine: the Pallas kernels and the collectives are there."""
  out = default_results["export"]
  for platform in ("tpu", "cuda"):
    assert out[f"ring_{platform}"]["kernel"] and out[f"ring_{platform}"]["collective_permute"], out
    assert out[f"scan_{platform}"]["kernel"] and out[f"scan_{platform}"]["all_gather"], out


@pytest.mark.slow
def test_models_more():
  """Mixture-of-Memories (SP scans) and Titans LMM and MAL (deep memory: the hand-off; MAL's window attention with
  persistent tokens falls back to the unsplit kernel) forward, and the gradients of the two-layer Transformer and
  Gated DeltaNet, on a (1, 1, 1, 4) mesh vs one device."""
  out = run_worker("models", {"models": ["transformer", "gated_deltanet", "mom", "titans_lmm", "titans_mal"],
                              "seq": 64, "grad": ["transformer", "gated_deltanet"]})
  for name, res in out.items():
    assert res["out_err"] <= TOL * max(1.0, res["out_scale"]), (name, res)
    if "grad_err" in res:
      assert res["grad_err"] <= 1e-4 * max(1.0, res["grad_scale"]), (name, res)
  assert out["mom"]["all_gather"] and out["titans_lmm"]["ppermute"] and out["titans_mal"]["ppermute"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [(2, 1, 1, 2), (1, 1, 2, 2)])
def test_models_mixed_mesh(mesh):
  """The sequence axis with data parallelism (batch rows split inside the shard_maps) or tensor parallelism
  (heads split): logits and gradients of Transformer, Gated DeltaNet, MoM and Titans LMM equal one device."""
  names = ["transformer", "gated_deltanet", "mom", "titans_lmm"]
  out = run_worker("models", {"models": names, "seq": 32, "mesh": list(mesh), "grad": names})
  for name, res in out.items():
    assert res["out_err"] <= TOL * max(1.0, res["out_scale"]), (name, res)
    assert res["grad_err"] <= 1e-4 * max(1.0, res["grad_scale"]), (name, res)
