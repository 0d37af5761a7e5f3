"""Kernels for memarch: Pallas kernels, XLA fallbacks and naive references behind one function per op.

Imports only jax. See `../shared/DESIGN.md` (Contracts: kernels).
"""

from kernels.attention import attention, merge_attention
from kernels.decay_scan import decay_scan
from kernels.dispatch import IMPLS
from kernels.linear_scan import linear_scan, linear_scan_step
from kernels.ring_attention import mesh_axis_size, ring_attention, ring_attention_sharded
from kernels.sequence_parallel import (affine_exclusive_scan, sequence_parallel_linear_scan, sequential_handoff,
                                       sharded_linear_scan)

__all__ = ["IMPLS", "attention", "merge_attention"]
__all__ += ["decay_scan", "linear_scan", "linear_scan_step"]
__all__ += ["mesh_axis_size", "ring_attention", "ring_attention_sharded"]
__all__ += ["affine_exclusive_scan", "sequence_parallel_linear_scan", "sequential_handoff", "sharded_linear_scan"]
