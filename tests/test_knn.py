"""Exact kNN search (blocked, sharded) against brute-force numpy; kNN-LM distributions; log-space interpolation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memarch.knn import knn_lm, search

pytestmark = pytest.mark.timeout(300)



def brute_force(q, keys, k, exclude=None):
  """float64 distances, ordered by (distance, index): the ground truth, ties to the lower index."""
  d = ((q[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
  if exclude is not None:
    d[np.arange(len(q)), exclude] = np.inf
  order = np.lexsort((np.broadcast_to(np.arange(keys.shape[0]), d.shape), d), axis=-1)[:, :k]
  return np.take_along_axis(d, order, -1), order


def check_against(dist, idx, q, keys, k, exclude=None):
  ref_d, ref_i = brute_force(q, keys.astype(np.float32), k, exclude)
  dist, idx = np.asarray(dist), np.asarray(idx)
  # float32 tolerance: the |q|^2 - 2 q.k + |k|^2 expansion loses ~1e-6 of |q|^2 + |k|^2 (float16 keys are
  # compared with their own float32 values, so the same tolerance holds).
  scale = (q.astype(np.float64) ** 2).sum(-1, keepdims=True) + (keys.astype(np.float64) ** 2).sum(-1).max()
  tol = 2e-5 * scale
  assert np.all(np.abs(dist - ref_d) < tol), np.abs(dist - ref_d).max()
  # Where a distance is separated from its neighbours in the ranking by more than the tolerance, the index
  # must be exactly the reference's.
  gaps = np.diff(ref_d, axis=-1)
  separated = np.ones_like(ref_d, bool)
  separated[:, 1:] &= gaps > tol
  separated[:, :-1] &= gaps > tol
  np.testing.assert_array_equal(idx[separated], ref_i[separated])
  # Every returned index is a distinct valid key at the distance it claims.
  true_d = ((q[:, None, :].astype(np.float64) - keys.astype(np.float64)[idx]) ** 2).sum(-1)
  assert np.all(np.abs(true_d - dist) < tol)
  assert all(len(set(r)) == k for r in idx)
  if exclude is not None:
    assert not (idx == exclude[:, None]).any()


@pytest.mark.parametrize("n,block,k", [(1000, 256, 5), (777, 128, 8), (50, 1024, 50), (2113, 64, 3)])
def test_blocked_search_matches_brute_force(n, block, k):
  rng = np.random.default_rng(n)
  q = rng.normal(size=(37, 16)).astype(np.float32)
  keys = rng.normal(size=(n, 16)).astype(np.float32)
  dist, idx = search.knn_search(q, keys, k, block_size=block)
  assert dist.shape == (37, k) and idx.dtype == jnp.int32
  check_against(dist, idx, q, keys, k)


def test_two_stage_block_selection_exact():
  """Blocks large enough for the grouped selection (>= 2k groups of 32), with clustered near-duplicates."""
  rng = np.random.default_rng(1)
  centers = rng.normal(size=(20, 8))
  keys = (centers[rng.integers(0, 20, 5000)] + 1e-2 * rng.normal(size=(5000, 8))).astype(np.float32)
  q = (centers[rng.integers(0, 20, 64)] + 1e-2 * rng.normal(size=(64, 8))).astype(np.float32)
  dist, idx = search.knn_search(q, keys, 16, block_size=2048)
  check_against(dist, idx, q, keys, 16)


def test_ties_go_to_the_lower_index():
  """Exact duplicates of a key at scattered indices, across blocks and groups: the lower indices come first."""
  rng = np.random.default_rng(2)
  keys = rng.normal(size=(3000, 8)).astype(np.float32) * 10
  dup = rng.normal(size=(8,)).astype(np.float32)
  where = np.array([2999, 5, 1500, 64, 700, 2048, 33])
  keys[where] = dup
  q = np.stack([dup, dup + 1e-3]).astype(np.float32)
  for block in (64, 1024, 4096):
    dist, idx = search.knn_search(q, keys, 5, block_size=block)
    np.testing.assert_array_equal(np.asarray(idx), np.tile(np.sort(where)[:5], (2, 1)))
    assert np.all(np.asarray(dist)[0] == np.asarray(dist)[0, 0])
  # lax.top_k's rule itself (documented: equal elements -> lower index first) on this backend
  v, i = jax.lax.top_k(jnp.array([1.0, 3.0, 3.0, 2.0, 3.0]), 3)
  np.testing.assert_array_equal(np.asarray(i), [1, 2, 4])


def test_leave_one_out_excludes_exactly_the_query():
  rng = np.random.default_rng(3)
  keys = rng.normal(size=(500, 8)).astype(np.float32)
  own = np.array([0, 17, 499, 250, 31], np.int32)
  q = keys[own]
  dist, idx = search.knn_search(q, keys, 4, block_size=96, exclude=own)
  check_against(dist, idx, q, keys, 4, exclude=own)
  # without the exclusion the query's own entry is its nearest neighbour at distance 0
  d0, i0 = search.knn_search(q, keys, 4, block_size=96)
  np.testing.assert_array_equal(np.asarray(i0)[:, 0], own)
  np.testing.assert_array_equal(np.asarray(i0)[:, 1:], np.asarray(idx)[:, :3])
  # -1 excludes nothing
  d1, i1 = search.knn_search(q, keys, 4, block_size=96, exclude=np.full(5, -1, np.int32))
  np.testing.assert_array_equal(np.asarray(i1), np.asarray(i0))


def test_float16_keys_and_batched_search():
  rng = np.random.default_rng(4)
  keys = rng.normal(size=(900, 16)).astype(np.float16)
  q = rng.normal(size=(70, 16)).astype(np.float32)
  dist, idx = search.knn_search_batched(q, keys, 6, query_batch=32, block_size=256, progress=False,
                                        exclude=np.arange(70, dtype=np.int32))
  check_against(dist, idx, q, keys, 6, exclude=np.arange(70))


def test_approx_option_runs():
  """approx=True (lax.approx_max_k; TPU's fast path) is exact top-k on CPU: the same distances."""
  rng = np.random.default_rng(7)
  keys = rng.normal(size=(600, 8)).astype(np.float32)
  q = rng.normal(size=(9, 8)).astype(np.float32)
  d_ex, _ = search.knn_search(q, keys, 5, block_size=128)
  d_ap, i_ap = search.knn_search(q, keys, 5, block_size=128, approx=True)
  np.testing.assert_allclose(np.asarray(d_ap), np.asarray(d_ex), rtol=1e-5, atol=1e-5)
  true = ((q[:, None] - keys[np.asarray(i_ap)]) ** 2).sum(-1)
  np.testing.assert_allclose(np.asarray(d_ap), true, rtol=1e-4, atol=1e-4)


def test_bad_arguments():
  keys = np.zeros((10, 4), np.float32)
  with pytest.raises(ValueError, match="k=11"):
    search.knn_search(np.zeros((2, 4)), keys, 11)
  with pytest.raises(ValueError, match="leave-one-out"):
    search.knn_search(np.zeros((2, 4)), keys, 10, exclude=np.zeros(2, np.int32))
  with pytest.raises(ValueError, match="same d"):
    search.knn_search(np.zeros((2, 3)), keys, 1)


_SHARDED = textwrap.dedent("""
    import numpy as np, jax
    from memarch.knn import search
    from tests.test_knn import check_against
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("shard",))
    rng = np.random.default_rng(5)
    keys = rng.normal(size=(1001, 16)).astype(np.float32)   # not a multiple of 4 * block
    keys[[3, 600, 999]] = keys[800]                          # ties across shards
    q = np.concatenate([rng.normal(size=(20, 16)), keys[[800]]]).astype(np.float32)
    for block in (64, 1024):
      dist, idx = search.sharded_knn_search(q, keys, 7, mesh=mesh, axis="shard", block_size=block)
      check_against(dist, idx, q, keys, 7)
      assert list(np.asarray(idx)[-1, :4]) == [3, 600, 800, 999], np.asarray(idx)[-1]
      own = np.arange(21, dtype=np.int32)
      dist, idx = search.sharded_knn_search(q, keys, 7, mesh=mesh, axis="shard", block_size=block, exclude=own)
      check_against(dist, idx, q, keys, 7, exclude=own)
      ref_d, ref_i = search.knn_search(q, keys, 7, block_size=block, exclude=own)
      np.testing.assert_allclose(np.asarray(dist), np.asarray(ref_d), rtol=1e-5, atol=1e-4)
    print("SHARDED_OK")
""")


def test_sharded_search_on_4_simulated_devices():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", ""), "PYTHONPATH": root,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _SHARDED], cwd=root, env=env, capture_output=True, text=True,
                       timeout=240)
  assert out.returncode == 0 and "SHARDED_OK" in out.stdout, out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------------
# kNN-LM distributions


def _neighbours(rng, q=6, k=10, vocab=12):
  dist = rng.uniform(0, 20, size=(q, k)).astype(np.float32)
  values = rng.integers(0, vocab, size=(q, k)).astype(np.int32)
  return dist, values


def test_knn_distribution_sums_to_one_on_neighbour_values():
  rng = np.random.default_rng(6)
  dist, values = _neighbours(rng)
  for temp in (0.5, 3.0):
    lp = np.asarray(knn_lm.knn_log_probs(dist, values, 12, temp), np.float64)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-5)
    # naive reference: a loop over neighbours in float64
    for r in range(dist.shape[0]):
      w = np.exp(-dist[r].astype(np.float64) / temp)
      w /= w.sum()
      ref = np.zeros(12)
      for j in range(dist.shape[1]):
        ref[values[r, j]] += w[j]
      np.testing.assert_allclose(np.exp(lp[r]), ref, rtol=1e-5, atol=1e-7)
      assert np.all(np.isneginf(lp[r][ref == 0]))  # no mass off the neighbours' values
    targets = rng.integers(0, 12, size=6)
    lt = np.asarray(knn_lm.knn_target_log_prob(dist, values, targets, temp))
    np.testing.assert_allclose(lt, lp[np.arange(6), targets], rtol=1e-5)
    ids, probs = map(np.asarray, knn_lm.sparse_knn_targets(dist, values, temp))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    for r in range(6):
      kept = ids[r][probs[r] > 0]
      assert len(set(kept)) == len(kept)  # merged duplicates
      np.testing.assert_allclose(probs[r][probs[r] > 0], np.exp(lp[r][kept]), rtol=1e-5)
  with pytest.raises(ValueError, match="temperature"):
    knn_lm.knn_log_probs(dist, values, 12, 0.0)


def test_interpolation_is_exact_in_log_space():
  lp_lm = np.array([-0.1, -3.0, -80.0, -200.0, -np.inf, -2.0])
  lp_o = np.array([-5.0, -0.2, -1.0, -150.0, -1.0, -np.inf])
  for lam in (0.0, 1e-12, 0.3, 1 - 1e-7, 1 - 1e-12, 1.0):
    got = np.asarray(knn_lm.interpolate_log_probs(lp_lm, lp_o, lam), np.float64)
    assert not np.isnan(got).any()
    l = np.float64(lam)
    with np.errstate(divide="ignore"):
      ref = np.logaddexp(np.log1p(-l) + lp_lm, np.log(l) + lp_o)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
  # far below exp's float32 range: the log-space result keeps the value
  got = float(knn_lm.interpolate_log_probs(-200.0, -150.0, 1e-12))
  np.testing.assert_allclose(got, np.logaddexp(np.log1p(-1e-12) - 200.0, np.log(1e-12) - 150.0), rtol=1e-6)
  got = float(knn_lm.interpolate_log_probs(-3.0, -1.0, 1 - 1e-12))  # the LM's share is log(1e-12) - 3 below
  np.testing.assert_allclose(got, np.logaddexp(np.log(1e-12) - 3.0, np.log1p(-1e-12) - 1.0), rtol=1e-7)
  # lambda as an array (float32 inside jit) agrees with the scalar path
  arr = np.asarray(knn_lm.interpolate_log_probs(lp_lm[:4], lp_o[:4], np.full(4, 0.3, np.float32)))
  np.testing.assert_allclose(arr, np.asarray(knn_lm.interpolate_log_probs(lp_lm[:4], lp_o[:4], 0.3)), rtol=1e-6)
  with pytest.raises(ValueError, match="lambda"):
    knn_lm.interpolate_log_probs(-1.0, -1.0, 1.5)
  assert float(knn_lm.interpolate_log_probs(-1.0, -np.inf, 0.0)) == -1.0
  assert float(knn_lm.interpolate_log_probs(-np.inf, -2.0, 1.0)) == -2.0
  ppl = knn_lm.perplexity_grid(lp_lm[:4], lp_o[:4], [0.0, 1.0])
  np.testing.assert_allclose(ppl, [np.exp(-lp_lm[:4].mean()), np.exp(-lp_o[:4].mean())], rtol=1e-5)
