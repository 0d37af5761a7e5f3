"""Choosing an implementation of a kernel op (recurrentgemma's `auto` pattern).

Every op in `kernels` takes `impl=` with one of IMPLS. `"auto"` picks the Pallas kernel on TPU and GPU and
the chunked XLA version on CPU (where Pallas only runs in its slow interpreter).
"""

from __future__ import annotations

import warnings

import jax

IMPLS = ("auto", "pallas", "pallas_interpret", "xla", "reference")

_warned: set[tuple[str, str]] = set()


def resolve_impl(impl: str, op: str) -> str:
  """Returns the concrete implementation for `impl` ("auto" resolved by the default backend)."""
  if impl not in IMPLS:
    raise ValueError(f"{op}: unknown impl={impl!r}; choose one of {IMPLS}.")
  if impl == "auto":
    return "pallas" if jax.default_backend() in ("tpu", "gpu", "cuda", "rocm") else "xla"
  return impl


def warn_fallback(op: str, reason: str) -> None:
  """Warns once per (op, reason) that a Pallas kernel fell back to the XLA implementation."""
  key = (op, reason)
  if key not in _warned:
    _warned.add(key)
    warnings.warn(f"{op}: the Pallas kernel does not support {reason}; using impl='xla' instead.", stacklevel=3)
