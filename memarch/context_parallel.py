"""Context (sequence) parallelism for the layers: attention, linear scans and Titans memory updates split
over the `sequence` mesh axis when the mesh in context has one of size > 1.

Each function takes the arguments of the op it stands for and returns what that op returns:

- `attention` -> `kernels.ring_attention_sharded` (ring attention) for a training self-attention call (q and k
  of the same length, no prefix keys, no offsets or cache lengths, no lse), else `sharding.attention`;
- `linear_scan` -> `kernels.sharded_linear_scan` (per-slice affine maps composed across devices), else
  `sharding.linear_scan`;
- `memory_update` -> `memory.sequence_parallel.sharded_update` (affine for depth-1 memories, hand-off
  otherwise) when each slice is a whole number of memory chunks, else `neural.chunked_update`.

The other path is taken whenever the sequence axis is 1 (the single-device code, unchanged) or the call does
not split: a sequence length that the axis does not divide (a one-token decode step, a short prompt), cached
prefill/decoding (attention over a KV cache), prefix keys (Titans' persistent memory in WindowAttention). The
fallback is still correct under the automatic partitioner (it gathers the sequence), just not
context-parallel. Batch and heads are split inside the shard_map as `sharding.attention` splits them
(`act_batch`, `act_heads` rules, only where they divide).
"""

from __future__ import annotations

import numbers

import jax

import kernels
from memarch import sharding as shard_lib
from memarch.memory import neural
from memarch.memory import sequence_parallel as memory_sp


def _split_axes(batch: int, *heads: int):
  """(batch mesh axes, head mesh axes) for the shard_map: the `act_batch` / `act_heads` rules' axes that divide
  the dimensions (None where nothing divides)."""
  sizes = dict(jax.sharding.get_abstract_mesh().shape)
  return (shard_lib._dims_spec(sizes, shard_lib.BATCH_NAME, batch),  # pylint: disable=protected-access
          shard_lib._dims_spec(sizes, shard_lib.HEADS_NAME, *heads))  # pylint: disable=protected-access


def _splits(t: int, n: int) -> bool:
  return n > 1 and t >= n and t % n == 0


def _zero(x) -> bool:
  return isinstance(x, numbers.Integral) and x == 0


def attention(q: jax.Array, k: jax.Array, v: jax.Array, **kwargs):
  """`kernels.attention(q, k, v, **kwargs)`; ring attention over the sequence axis where it applies."""
  n = shard_lib.sequence_axis_size()
  seg = kwargs.get("segment_ids")
  ring = (_splits(q.shape[1], n) and k.shape[1] == q.shape[1] and kwargs.get("num_prefix", 0) == 0
          and _zero(kwargs.get("q_offset", 0)) and _zero(kwargs.get("k_offset", 0))
          and kwargs.get("kv_lengths") is None and not kwargs.get("return_lse", False)
          and not isinstance(seg, (tuple, list)))
  if not ring:
    return shard_lib.attention(q, k, v, **kwargs)
  batch_axes, head_axes = _split_axes(q.shape[0], q.shape[2], k.shape[2])
  return kernels.ring_attention_sharded(
      q, k, v, axis_name=shard_lib.SEQUENCE_AXIS, batch_axes=batch_axes, head_axes=head_axes,
      causal=kwargs.get("causal", True), window=kwargs.get("window"), segment_ids=seg, scale=kwargs.get("scale"),
      impl=kwargs.get("impl", "auto"))


def linear_scan(q: jax.Array, k: jax.Array, v: jax.Array, *, split_batch: bool = True, **kwargs):
  """`kernels.linear_scan(q, k, v, **kwargs)`; the sequence-parallel scan over the sequence axis where the
  axis divides the sequence. split_batch=False keeps the batch axis whole inside the shard_map (for a batch
  that is not the model's: MoM folds its memories into it)."""
  if not _splits(q.shape[1], shard_lib.sequence_axis_size()):
    return shard_lib.linear_scan(q, k, v, **kwargs)
  batch_axes, head_axes = _split_axes(q.shape[0], q.shape[2])
  batch_axes = batch_axes if split_batch else None
  return kernels.sharded_linear_scan(q, k, v, axis_name=shard_lib.SEQUENCE_AXIS, batch_axes=batch_axes,
                                     head_axes=head_axes, **kwargs)


def memory_update(weights, momentum, k, v, q, theta, eta, alpha, spec: neural.MemorySpec, *, chunk_size: int,
                  **kwargs):
  """`neural.chunked_update(...)` (same arguments); split over the sequence axis when every slice is a whole
  number of chunks (`memory.sequence_parallel`: affine for depth-1 memories, hand-off otherwise)."""
  n = shard_lib.sequence_axis_size()
  t = k.shape[1]
  if not (_splits(t, n) and (t // n) % chunk_size == 0):
    return neural.chunked_update(weights, momentum, k, v, q, theta, eta, alpha, spec, chunk_size=chunk_size,
                                 **kwargs)
  batch_axes, head_axes = _split_axes(k.shape[0], k.shape[2])
  return memory_sp.sharded_update(weights, momentum, k, v, q, theta, eta, alpha, spec, chunk_size=chunk_size,
                                  axis_name=shard_lib.SEQUENCE_AXIS, batch_axes=batch_axes, head_axes=head_axes,
                                  **kwargs)
