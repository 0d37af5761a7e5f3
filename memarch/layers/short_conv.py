"""Short causal depthwise convolution: the local token mixing in front of linear-memory and neural-memory
projections (Mamba, DeltaNet, Gated DeltaNet, MoM, Titans all use one, width 4 by default).

    y_t = sum_{j=0}^{W-1} w_j * x_{t-W+1+j}       (per channel; x_s = 0 for s < 0, or the cached inputs)

A decoding cache holds the last W-1 inputs, so `causal_conv` over a sequence split into pieces (a prompt,
then one token at a time) equals one call over the whole sequence.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from memarch.layers.common import param_with_axes


def causal_conv(x: jax.Array, w: jax.Array, cache: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Depthwise causal convolution.

  Args:
    x: `[batch, seq, channels]`.
    w: `[width, channels]`; w[-1] multiplies the current token.
    cache: `[batch, width - 1, channels]`, the inputs before x (oldest first), or None for zeros.

  Returns:
    (y `[batch, seq, channels]` in x's dtype, new cache `[batch, width - 1, channels]`: the last width - 1
    inputs of [cache; x]).
  """
  width = w.shape[0]
  if x.ndim != 3 or w.ndim != 2 or w.shape[1] != x.shape[-1]:
    raise ValueError(f"causal_conv: x [batch, seq, channels] and w [width, channels]; got {x.shape}, {w.shape}.")
  b, t, d = x.shape
  if cache is None:
    cache = jnp.zeros((b, width - 1, d), x.dtype)
  elif cache.shape != (b, width - 1, d):
    raise ValueError(f"causal_conv: cache must be {(b, width - 1, d)}, got {cache.shape}.")
  xp = jnp.concatenate([cache.astype(x.dtype), x], axis=1)  # [b, W-1+t, d]
  y = _shifted_sum(xp, w.astype(x.dtype))
  return y.astype(x.dtype), xp[:, t:]


@jax.custom_vjp
def _shifted_sum(xp: jax.Array, w: jax.Array) -> jax.Array:
  """y[:, s] = sum_j w[j] * xp[:, s + j] for xp `[b, W-1+t, d]`, w `[W, d]` -> `[b, t, d]`.

  W shifted multiply-adds: for the widths used here (<= 8) cheaper and simpler than a conv op (XLA's depthwise
  convolution on CPU was 100x slower). The VJP is written out because autodiff's weight gradient, a
  broadcast's transpose, reduces `[b, t, d]` over its middle axis, which XLA's CPU backend ran ~100x slower
  than the same sum as a contraction (measured at [1, 2048, 256], width 4: fwd+bwd 88 ms -> 3 ms).
  """
  t = xp.shape[1] - w.shape[0] + 1
  return sum(xp[:, j:j + t] * w[j] for j in range(w.shape[0]))


def _shifted_sum_fwd(xp, w):
  return _shifted_sum(xp, w), (xp, w)


def _shifted_sum_bwd(res, dy):
  xp, w = res
  width, t = w.shape[0], dy.shape[1]
  dxp = sum(jnp.pad(dy * w[j], ((0, 0), (j, width - 1 - j), (0, 0))) for j in range(width))
  dw = jnp.stack([jnp.einsum("btd,btd->d", xp[:, j:j + t], dy, preferred_element_type=jnp.float32)
                  for j in range(width)])
  return dxp.astype(xp.dtype), dw.astype(w.dtype)


_shifted_sum.defvjp(_shifted_sum_fwd, _shifted_sum_bwd)


class ShortConv(nn.Module):
  """Learned depthwise causal convolution over the channels of x, then an optional SiLU.

  Attributes: width (kernel size, >= 1), activation ("silu" or None), axis_name (logical axis of the
  channels, for sharding the kernel `[width, channels]`).
  Call: x `[batch, seq, channels]`, cache `[batch, width-1, channels]` or None -> (y, new_cache).
  """

  width: int = 4
  activation: str | None = "silu"
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, cache: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    if self.width < 1:
      raise ValueError(f"ShortConv width must be >= 1, got {self.width}.")
    d = x.shape[-1]

    def init(key, shape, dtype):
      # Near-identity start (current token weight 1) plus small noise: the projections it follows keep
      # their meaning at initialization.
      w = 0.02 * jax.random.normal(key, shape, dtype)
      return w.at[-1].add(1.0)

    w = param_with_axes(self, "kernel", init, (self.width, d), (None, self.axis_name))
    y, new_cache = causal_conv(x, w, cache)
    if self.activation == "silu":
      y = jax.nn.silu(y)
    elif self.activation is not None:
      raise ValueError(f"ShortConv activation must be 'silu' or None, got {self.activation!r}.")
    return y, new_cache

  @staticmethod
  def empty_cache(batch: int, width: int, channels: int, dtype: Any = jnp.float32) -> jax.Array:
    """The decoding cache before any token: zeros `[batch, width - 1, channels]`."""
    return jnp.zeros((batch, width - 1, channels), dtype)
