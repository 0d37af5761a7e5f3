"""causal_conv against a direct loop; split calls with the cache equal one call."""

import jax
import numpy as np
import pytest

from memarch.layers.short_conv import causal_conv

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("width", [1, 4])
def test_causal_conv_matches_loop_and_chains(width):
  x = jax.random.normal(jax.random.key(0), (2, 11, 3))
  w = jax.random.normal(jax.random.key(1), (width, 3))
  y, cache = causal_conv(x, w)
  xn, wn = np.asarray(x), np.asarray(w)
  ref = np.zeros_like(xn)
  for t in range(xn.shape[1]):
    for j in range(width):
      s = t - width + 1 + j
      if s >= 0:
        ref[:, t] += wn[j] * xn[:, s]
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  y1, c1 = causal_conv(x[:, :7], w)
  y2, c2 = causal_conv(x[:, 7:], w, c1)
  np.testing.assert_allclose(np.concatenate([y1, y2], 1), np.asarray(y), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(c2), np.asarray(cache))


def test_causal_conv_rejects_bad_cache():
  x = np.zeros((2, 5, 3), np.float32)
  with pytest.raises(ValueError, match="cache must be"):
    causal_conv(x, np.zeros((4, 3), np.float32), np.zeros((2, 2, 3), np.float32))


@pytest.mark.parametrize("width", [1, 4])
def test_causal_conv_gradients_match_loop(width):
  """The hand-written VJP (x, w and the cache) against autodiff of a direct loop."""
  import jax.numpy as jnp  # noqa: PLC0415

  keys = jax.random.split(jax.random.key(2), 4)
  x = jax.random.normal(keys[0], (2, 9, 3))
  w = jax.random.normal(keys[1], (width, 3))
  cache = jax.random.normal(keys[2], (2, width - 1, 3))
  dy = jax.random.normal(keys[3], (2, 9, 3))

  def loop(x, w, cache):
    xp = jnp.concatenate([cache, x], axis=1)
    return jnp.stack([sum(w[j] * xp[:, t + j] for j in range(width)) for t in range(x.shape[1])], axis=1)

  got = jax.grad(lambda *a: jnp.vdot(causal_conv(*a)[0], dy), argnums=(0, 1, 2))(x, w, cache)
  want = jax.grad(lambda *a: jnp.vdot(loop(*a), dy), argnums=(0, 1, 2))(x, w, cache)
  for name, g, r in zip(("x", "w", "cache"), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5, err_msg=f"d{name}")
