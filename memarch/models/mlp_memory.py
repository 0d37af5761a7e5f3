"""MLP Memory and Memory Decoder: parametric memories trained to imitate a kNN-LM retriever.

MLP Memory ("Language Modeling with Retriever-pretrained External Memory"): a network on the base LM's hidden
state at the datastore-key position (the normed input of the last feed-forward block):

    h = key W_in;  h = h + MLP(LayerNorm(h))  (depth times);  logits = LayerNorm(h) W_head

Memory Decoder ("A Pretrained, Plug-and-Play Memory for Large Language Models"): a small Transformer decoder
on the tokens themselves (a `DecoderLM` with its own small config), so it plugs into any LM with the same
tokenizer. Both are trained on

    loss = alpha * KL(p_kNN || p_mem) + (1 - alpha) * CE(p_mem, next token)

with p_kNN given as sparse top-K targets (ids, probs: memarch.knn.knn_lm.sparse_knn_targets), and at inference
interpolated with the LM: log((1 - lambda) p_LM + lambda p_mem) (memarch.knn.knn_lm.interpolate_log_probs).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from memarch.layers.common import dense, dense_init, dtype_from_name, param_with_axes, residual_out_init
from memarch.models.lm import DecoderLM


class MLPMemory(nn.Module):
  """Config keys: vocab_size, key_dim, width, depth, mlp_ratio, compute_dtype.

  keys `[..., key_dim]` -> logits `[..., vocab_size]` float32.
  """

  config: Any

  @nn.compact
  def __call__(self, keys):
    c = self.config
    if keys.shape[-1] != c.key_dim:
      raise ValueError(f"MLPMemory expects keys [..., {c.key_dim}] (model.key_dim), got {keys.shape}.")
    dtype = dtype_from_name(c.compute_dtype)
    w_in = param_with_axes(self, "w_in", dense_init, (c.key_dim, c.width), (None, "embed"))
    h = dense(keys.astype(dtype), w_in).astype(jnp.float32)  # the residual stream stays float32
    hidden = c.width * c.mlp_ratio
    for i in range(c.depth):
      x = nn.LayerNorm(name=f"norm_{i}")(h).astype(dtype)
      w1 = param_with_axes(self, f"w1_{i}", dense_init, (c.width, hidden), ("embed", "mlp"))
      w2 = param_with_axes(self, f"w2_{i}", residual_out_init(max(c.depth, 1)), (hidden, c.width), ("mlp", "embed"))
      h = h + dense(jax.nn.gelu(dense(x, w1)), w2).astype(jnp.float32)
    h = nn.LayerNorm(name="final_norm")(h)
    head = param_with_axes(self, "head", nn.initializers.normal(c.width ** -0.5), (c.width, c.vocab_size),
                           ("embed", "vocab"))
    return dense(h, head)  # logits in float32 (the softmax over the vocabulary)


class MemoryDecoder(DecoderLM):
  """A small Transformer++ decoder on the tokens (DecoderLM with the memory's own config): tokens
  `[batch, seq]` -> logits `[batch, seq, vocab]`; the same interface as any memarch LM."""


def memory_loss(logits, target_ids, target_probs, next_tokens, *, alpha: float, mask=None):
  """alpha * KL(p_kNN || p_mem) + (1 - alpha) * CE, averaged over the (masked) positions.

  Args:
    logits: `[..., V]` the memory's logits. target_ids, target_probs: `[..., K]` sparse p_kNN (probs sum to 1;
      ids with prob 0 are ignored). next_tokens: `[...]` int, the true next tokens. mask: optional `[...]`.
  Returns:
    dict(loss, kl, ce) of scalars; kl is exact for the sparse target: sum_j p_j (log p_j - log q(id_j)).
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
  logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  lq_t = jnp.take_along_axis(logq, target_ids.astype(jnp.int32), axis=-1)
  p = target_probs.astype(jnp.float32)
  kl = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - lq_t), 0.0), axis=-1)
  ce = -jnp.take_along_axis(logq, next_tokens.astype(jnp.int32)[..., None], axis=-1)[..., 0]
  m = jnp.ones(ce.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(m), 1.0)
  kl_mean, ce_mean = jnp.sum(kl * m) / count, jnp.sum(ce * m) / count
  return {"loss": alpha * kl_mean + (1.0 - alpha) * ce_mean, "kl": kl_mean, "ce": ce_mean}
