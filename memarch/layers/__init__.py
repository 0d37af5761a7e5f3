"""Flax Linen modules: projections, gates and norms around memarch.memory and kernels."""
