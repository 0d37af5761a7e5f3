r"""Linear attention and its gated / delta-rule variants (one linear-memory layer per block), on MQAR.

  python -m experiments.run --config configs/linear_attention.py:rule=linear,size=tiny --workdir runs/linear_tiny

`:arg` keys: rule=linear|simple_gla|delta (default linear), size=tiny|small|base, task=mqar|text.
  linear      S_t = S_{t-1} + k_t v_t^T                        (Katharopoulos et al. 2020; SiLU features)
  simple_gla  S_t = exp(g_t) S_{t-1} + k_t v_t^T               (scalar decay per head: RetNet / Mamba-2 style,
                                                               flash-linear-attention's "simple_gla")
  delta       S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T   (DeltaNet, Schlag et al. 2021; Yang et al. 2024)
with o_t = S_t^T q_t / sqrt(head_dim), a short convolution and SiLU on q, k, v and a gated output RMSNorm
(memarch.layers.linear_memory.LinearMemory). The gated delta rule is configs/gated_deltanet.py.
Sizes, the data / optim / train sections and the model keys are those of configs/linear_common.py
(tiny: 2 layers of width 64, 2 heads of 32 x 32, the tiny Transformer++'s MQAR task). Hybrids:
`--config.model.layer_blocks='("linear_memory", "attention")'`.
"""

from __future__ import annotations

import ml_collections

from configs import linear_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return linear_common.get_linear_config(arg, rules=("linear", "simple_gla", "delta"))
