"""Kernels for memarch: Pallas kernels, XLA fallbacks and naive references behind one function per op.

Imports only jax. See `../shared/DESIGN.md` (Contracts: kernels).
"""

from kernels.attention import attention, merge_attention
from kernels.dispatch import IMPLS

__all__ = ["IMPLS", "attention", "merge_attention"]
