"""The block types a decoder stack is assembled from (`config.model.blocks`).

Every block is a Flax module built from the model config, called as
`block(x, *, positions, segment_ids, cache, cache_index) -> (y, new_cache)` on the pre-normed input
x `[batch, seq, embed]`, with `init_cache(batch, max_len)` giving its decoding state (None if stateless).
The stack adds y to the residual stream. Adding a block type is one entry here.
"""

from __future__ import annotations

from memarch.layers.attention import Attention
from memarch.layers.mlp import SwiGLU

BLOCKS = {
    "attention": Attention,  # Transformer++ attention (RoPE, GQA; sliding window with model.window > 0)
    "mlp": SwiGLU,  # SwiGLU feed-forward
}


def get_block(name: str):
  if name not in BLOCKS:
    raise ValueError(f"unknown block type {name!r} in config.model.blocks; known: {sorted(BLOCKS)}.")
  return BLOCKS[name]
