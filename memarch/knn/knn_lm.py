"""kNN-LM distributions (Khandelwal et al., 2020) and their interpolation with a language model, in log space.

    p_kNN(y) = sum_{j : value_j = y} softmax(-d / T)_j          over the K retrieved neighbours
    p(y)     = lambda * p_other(y) + (1 - lambda) * p_LM(y)      (p_other: p_kNN, MLP Memory, Memory Decoder)

A vocabulary entry that no neighbour carries has p_kNN = 0, i.e. log p_kNN = -inf; the interpolation is
computed as logaddexp(log1p(-lambda) + log p_LM, log(lambda) + log p_other), which never underflows for lambda
near 0 or 1 and is exact (no NaN) at lambda = 0 and 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _check_neighbours(dist, values, temperature: float) -> None:
  if dist.ndim != 2 or dist.shape != values.shape:
    raise ValueError(f"dist and values must both be [q, K]; got {dist.shape} and {values.shape}.")
  if not temperature > 0:
    raise ValueError(f"the kNN temperature must be > 0, got {temperature}.")


def neighbour_log_weights(dist, temperature: float):
  """log softmax(-dist / T) over the K neighbours: [q, K] float32."""
  return jax.nn.log_softmax(-jnp.asarray(dist, jnp.float32) / temperature, axis=-1)


def knn_log_probs(dist, values, vocab_size: int, temperature: float):
  """The full kNN distribution in log space.

  Args:
    dist: `[q, K]` squared distances of the neighbours. values: `[q, K]` int, their next tokens.
    vocab_size: V. temperature: T > 0.
  Returns:
    `[q, V]` float32 log p_kNN: -inf on tokens no neighbour carries; the probabilities sum to 1.
  """
  dist, values = jnp.asarray(dist), jnp.asarray(values, jnp.int32)
  _check_neighbours(dist, values, temperature)
  w = jnp.exp(neighbour_log_weights(dist, temperature))
  rows = jnp.arange(dist.shape[0])[:, None]
  p = jnp.zeros((dist.shape[0], vocab_size), jnp.float32).at[rows, values].add(w)
  return jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)


def knn_target_log_prob(dist, values, targets, temperature: float):
  """log p_kNN(targets) `[q]` float32 without materializing `[q, V]` (-inf when no neighbour carries the target)."""
  dist, values = jnp.asarray(dist), jnp.asarray(values, jnp.int32)
  _check_neighbours(dist, values, temperature)
  lw = neighbour_log_weights(dist, temperature)
  hit = values == jnp.asarray(targets, jnp.int32)[:, None]
  return jax.nn.logsumexp(jnp.where(hit, lw, -jnp.inf), axis=-1)


def sparse_knn_targets(dist, values, temperature: float):
  """p_kNN as sparse top-K targets for training: `(ids [q, K] int32, probs [q, K] float32)`.

  Neighbours that share a value are merged into the first of them (its prob is the sum; the others get prob 0),
  so `ids` with prob > 0 are distinct and `probs` sums to 1 per row: the distribution's exact support.
  """
  dist, values = jnp.asarray(dist), jnp.asarray(values, jnp.int32)
  _check_neighbours(dist, values, temperature)
  w = jnp.exp(neighbour_log_weights(dist, temperature))
  same = values[:, :, None] == values[:, None, :]  # [q, K, K]
  k = values.shape[1]
  earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # earlier[j, i]: i < j
  first = ~jnp.any(same & earlier[None], axis=-1)  # no earlier neighbour with the same value
  merged = jnp.sum(jnp.where(same, w[:, None, :], 0.0), axis=-1)
  return values, jnp.where(first, merged, 0.0)


def _log_weights(lam):
  """(log(1 - lam), log(lam)) in float32; -inf where a weight is 0.

  A Python or numpy scalar lam is taken in float64 on the host: 1 - 1e-12 is not a float32 number (it rounds to
  1), but log(1 - lam) = log1p(-lam) = -27.6 is, so lambdas next to 1 stay exact.
  """
  if np.ndim(lam) == 0 and not isinstance(lam, jax.Array):
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
      raise ValueError(f"lambda must be in [0, 1], got {lam}.")
    w_lm = np.log1p(-lam) if lam < 1.0 else -np.inf
    w_o = np.log(lam) if lam > 0.0 else -np.inf
    return jnp.float32(w_lm), jnp.float32(w_o)
  lam = jnp.asarray(lam, jnp.float32)
  w_lm = jnp.where(lam < 1, jnp.log1p(-jnp.minimum(lam, 1.0)), -jnp.inf)
  w_o = jnp.where(lam > 0, jnp.log(jnp.maximum(lam, 0.0)), -jnp.inf)
  return w_lm, w_o


def interpolate_log_probs(lp_lm, lp_other, lam):
  """log((1 - lam) exp(lp_lm) + lam exp(lp_other)), elementwise, exact at lam = 0 and 1 (no NaN, no underflow).

  lp_lm, lp_other: log-probabilities (may be -inf), broadcastable. lam: in [0, 1], a scalar (taken in float64:
  see _log_weights) or an array broadcastable with them.
  """
  w_lm, w_o = _log_weights(lam)
  lp_lm, lp_other = jnp.asarray(lp_lm, jnp.float32), jnp.asarray(lp_other, jnp.float32)
  # A term whose weight is 0 is dropped (-inf) explicitly, so -inf + -inf or 0 * inf never appear;
  # logaddexp(a, -inf) = a.
  a = jnp.where(jnp.isneginf(w_lm), -jnp.inf, w_lm + lp_lm)
  b = jnp.where(jnp.isneginf(w_o), -jnp.inf, w_o + lp_other)
  return jnp.logaddexp(a, b)


def perplexity_grid(lp_lm, lp_other, lambdas) -> np.ndarray:
  """Perplexity exp(-mean log p) of the interpolation for each lambda: `[len(lambdas)]` float64.

  lp_lm, lp_other: `[n]` log-probabilities of the true next tokens under the LM and the other distribution.
  """
  out = []
  for lam in lambdas:
    lp = np.asarray(interpolate_log_probs(lp_lm, lp_other, float(lam)), np.float64)
    out.append(float(np.exp(min(-lp.mean(), 700.0))))
  return np.asarray(out)
