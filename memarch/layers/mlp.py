"""SwiGLU feed-forward block (Transformer++ / Llama): down(silu(x W_gate) * (x W_up))."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from memarch.layers.common import constrain, dense, dense_init, dtype_from_name, param_with_axes, residual_out_init


class SwiGLU(nn.Module):
  """Config keys: mlp_dim, compute_dtype, num_layers. x `[batch, seq, embed]` -> `([batch, seq, embed], None)`.

  Takes (and ignores) the same keyword arguments as the sequence mixers, so a stack treats every block alike.
  """

  config: Any

  @nn.compact
  def __call__(self, x, *, positions=None, segment_ids=None, cache=None, cache_index=None):
    c = self.config
    dtype = dtype_from_name(c.compute_dtype)
    e = x.shape[-1]
    w_gate = param_with_axes(self, "w_gate", dense_init, (e, c.mlp_dim), ("embed", "mlp"))
    w_up = param_with_axes(self, "w_up", dense_init, (e, c.mlp_dim), ("embed", "mlp"))
    w_down = param_with_axes(self, "w_down", residual_out_init(c.num_layers), (c.mlp_dim, e), ("mlp", "embed"))
    x = x.astype(dtype)
    h = jax.nn.silu(dense(x, w_gate)) * dense(x, w_up)
    h = constrain(h, ("act_batch", "act_length", "act_mlp"))
    return dense(h, w_down), cache

  def init_cache(self, batch: int, max_len: int):
    """A feed-forward block keeps no state."""
    return None
