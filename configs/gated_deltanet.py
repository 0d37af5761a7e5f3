r"""Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024): the gated delta rule memory, on MQAR by default.

  python -m experiments.run --config configs/gated_deltanet.py:size=tiny --workdir runs/gated_deltanet_tiny

Per head a [head_dim, value_dim] float32 state, S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,
with a short convolution and SiLU on q, k, v, L2-normalized q and k, Mamba-2's decay and a gated RMSNorm on
the output (memarch.layers.linear_memory.LinearMemory, rule "gated_delta").

`:arg` keys: size=tiny|small|base (tiny: 2 layers of width 64, 2 heads of 32 x 32, no MLP, on the tiny
Transformer++'s MQAR task: 64 tokens with 4, 8, 16 pairs, vocab 256; small and base add SwiGLU MLPs and use
MQAR with the Zoology vocabulary of 8192), task=mqar|text, heads=N (N memory heads of the size's shape: e.g.
`size=tiny,heads=8` has 4x the tiny state, the Mixture-of-Memories baseline with N times the state). Model keys are documented in
configs/linear_common.py. Hybrids: `--config.model.layer_blocks='("linear_memory", "attention")'`
(and `--config.model.window=64` for sliding-window attention). Any value can be overridden, e.g.
`--config.train.steps=200 --config.model.conv_width=0`.
"""

from __future__ import annotations

import ml_collections

from configs import linear_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return linear_common.get_linear_config(arg, rules=("gated_delta",))
