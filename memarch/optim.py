"""Optimizers from the config's `optim` section: AdamW or Muon, warmup + cosine, global-norm clipping."""

from __future__ import annotations

import jax
import optax
from optax.contrib import MuonDimensionNumbers

# Parameters that are looked up or tied rather than multiplied as matrices get AdamW, never Muon,
# and no weight decay.
_EMBEDDING_NAMES = ("embedding", "head")


def make_schedule(c, total_steps: int) -> optax.Schedule:
  """Linear warmup to c.lr over c.warmup_steps, then cosine to c.min_lr_ratio * c.lr (or constant)."""
  warmup = min(c.warmup_steps, max(total_steps - 1, 0))
  if c.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=c.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=c.lr * c.min_lr_ratio,
    )
  if c.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, c.lr, max(warmup, 1)), optax.constant_schedule(c.lr)], [warmup]
    )
  raise ValueError(f"unknown optim.schedule {c.schedule!r}; choose cosine or constant.")


def _name(path) -> str:
  return str(getattr(path[-1], "key", path[-1]))


def decay_mask(params):
  """True for matrices (ndim >= 2) other than embeddings: norms and gates are not decayed."""
  return jax.tree_util.tree_map_with_path(lambda p, x: x.ndim >= 2 and _name(p) not in _EMBEDDING_NAMES, params)


def muon_dims(params):
  """Muon's view of each weight as a matrix x W = y: reduction axes (inputs) and output axes.

  Attention projections are stored as [embed, heads, head_dim] (in) and [heads, head_dim, embed] (out);
  both are orthogonalized as the full matrix they are. Non-matrices and embeddings get None (AdamW).
  """

  def dims(path, x):
    name = _name(path)
    if name in _EMBEDDING_NAMES or x.ndim < 2:
      return None
    if name == "wo" and x.ndim == 3:
      return MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
    if x.ndim == 3:
      return MuonDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
    return MuonDimensionNumbers(reduction_axis=0, output_axis=1)

  return jax.tree_util.tree_map_with_path(dims, params)


def make_optimizer(c, total_steps: int) -> optax.GradientTransformation:
  """The optimizer for config section `c` (= config.optim) over `total_steps` steps."""
  schedule = make_schedule(c, total_steps)
  if c.name == "adamw":
    opt = optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask)
  elif c.name == "muon":
    opt = optax.contrib.muon(
        schedule, weight_decay=c.weight_decay, weight_decay_mask=decay_mask, adam_b1=c.b1, adam_b2=c.b2,
        eps=c.eps, muon_weight_dimension_numbers=muon_dims,
    )
  else:
    raise ValueError(f"unknown optim.name {c.name!r}; choose adamw or muon.")
  if c.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(c.grad_clip), opt)
  return opt
