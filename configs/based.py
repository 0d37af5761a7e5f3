r"""Based (Arora et al. 2024): Taylor-feature-map linear attention alternated with sliding-window attention.

  python -m experiments.run --config configs/based.py:size=tiny --workdir runs/based_tiny

Based's linear attention (memarch.layers.linear_memory.BasedAttention) projects q and k to `feature_dim` (16)
per head and maps them with the second-order Taylor map phi (phi(q).phi(k) = 1 + q.k/4 + (q.k)^2/32 at
f = 16), so its state per head is (1 + f + f^2) x (head_dim + 1) floats: the recall-versus-state-size
reference point. Small sliding-window attention layers (`model.window` keys) give precise local mixing.

`:arg` keys: size=tiny|small|base, task=mqar|text. tiny: one sliding-window attention block (window 16,
well below the 64-token MQAR sequences, so recall must come from the linear attention) followed by one Based
block, width 64, 4 heads (value dim 16), no MLP; small / base: (attention, MLP, Based, MLP) layers with
window 64. Data / optim / train sections as the Transformer++ config of the same size (configs/linear_common.py).
"""

from __future__ import annotations

import ml_collections

from configs import linear_common

# Based model settings per size: (num_layers of the (attention, based) pair, heads, value dim per head, window)
BASED = {"tiny": (1, 4, 16, 16), "small": (2, 4, 64, 64), "base": (6, 12, 64, 64)}


def _based(model: ml_collections.ConfigDict, size: str) -> None:
  layers, heads, head_dim, window = BASED[size]
  model.num_layers = layers  # repeats of layer_blocks
  # Sliding-window attention first: it gives each token its neighbours (the shift that associative recall
  # needs), which Based's linear attention, having no convolution, lacks.
  model.layer_blocks = ("attention", "based") if size == "tiny" else ("attention", "mlp", "based", "mlp")
  model.num_heads = heads
  model.head_dim = head_dim  # value dim per Based head, and the head dim of the attention blocks
  model.window = window  # the sliding-window attention blocks' window
  model.memory_rule = "linear"  # unused by Based (kept for a "linear_memory" block in a hybrid override)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return linear_common.get_linear_config(arg, block="based", customize=_based)
