"""The block types a decoder stack is assembled from (`config.model.layer_blocks`).

Every block is a Flax module built from the model config, called as
`block(x, *, positions, segment_ids, cache, cache_index) -> (y, new_cache)` on the pre-normed input
x `[batch, seq, embed]`, with `init_cache(batch, max_len)` giving its decoding state (None if stateless).
The stack adds y to the residual stream. Adding a block type is one entry here: "module:Class", imported
on first use (so a model pulls in only the layers it uses).
"""

from __future__ import annotations

import importlib

BLOCKS = {
    # Transformer++ attention (RoPE, GQA; sliding window with model.window > 0)
    "attention": "memarch.layers.attention:Attention",
    "mlp": "memarch.layers.mlp:SwiGLU",  # SwiGLU feed-forward
    # Linear-memory family on kernels.linear_scan: model.memory_rule = linear | simple_gla | delta | gated_delta
    "linear_memory": "memarch.layers.linear_memory:LinearMemory",
    "based": "memarch.layers.linear_memory:BasedAttention",  # Taylor-feature-map linear attention (Based)
    "mom": "memarch.layers.mom:MixtureOfMemories",  # Mixture-of-Memories
    # Titans: the neural long-term memory layer (LMM, MAL) and the MAC / MAG blocks
    "neural_memory": "memarch.layers.neural_memory:NeuralMemory",
    "mac": "memarch.layers.titans:MemoryAsContext",
    "mag": "memarch.layers.titans:MemoryAsGate",
    # sliding-window attention with persistent memory and a fixed-size cache (the attention of MAL)
    "window_attention": "memarch.layers.titans:WindowAttention",
}


def get_block(name: str):
  """The block class registered under `name` (a clear error for an unknown or unavailable one)."""
  if name not in BLOCKS:
    raise ValueError(f"unknown block type {name!r} in config.model.layer_blocks; known: {sorted(BLOCKS)}.")
  module_name, cls_name = BLOCKS[name].split(":")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != module_name:
      raise
    raise NotImplementedError(f"block type {name!r} is registered but {module_name} is not implemented yet.") from e
  return getattr(module, cls_name)
