r"""Baseline config for the MoM results (issue #6): tiny Gated DeltaNet with N times the recurrent state.

  python -m experiments.sweep ... --configs gdn_x4=experiments/mom_results/gdn_wide.py:factor=4

configs/gated_deltanet.py's tiny model (2 heads of 32 x 32 per layer) with `factor` times the heads (state
factor x larger; head_dim and value_dim unchanged), so it matches the total routed state of tiny MoM with
factor = num_memories = 4 (MoM also has a shared memory: 5 x in all).
"""

from __future__ import annotations

from configs import base, gated_deltanet


def get_config(arg: str | None = None):
  a = base.parse_arg(arg, factor=4)
  config = gated_deltanet.get_config("size=tiny")
  config.model.num_heads *= a.factor  # heads of 32 x 32 states: factor x the tiny model's state
  return config
