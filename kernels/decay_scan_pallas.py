"""Pallas kernel for `decay_scan`: h_t = a_t * h_{t-1} + x_t over `[batch, seq, features]`.

Every feature column is an independent recurrence, so the kernel tiles (batch, feature blocks) and walks
time sequentially, one row per step:
- TPU (Mosaic): grid (batch, feature blocks, time blocks), the time axis "arbitrary" (sequential) with h
  `[1, Mb]` in VMEM scratch across time blocks; inside a block, `lax.fori_loop` over its rows.
- GPU (Triton): grid (batch, feature blocks); one program loops over all time steps with h in registers.

The backward (custom VJP) is the same kernel on time-reversed inputs: with lambda_t = dL/dh_t (total),
lambda_t = dh_t + a_{t+1} lambda_{t+1}; then dx_t = lambda_t, da_t = lambda_t h_{t-1}, dh0 = a_0 lambda_0.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.decay_scan import _gate_for

_F32 = jnp.float32


def _default_backend() -> str:
  return "triton" if jax.default_backend() in ("gpu", "cuda", "rocm") else "tpu"


def _kernel_tpu(a_ref, x_ref, h0_ref, h_ref, h_scr):
  @pl.when(pl.program_id(2) == 0)
  def _():
    h_scr[...] = h0_ref[...]

  def body(i, h):
    h = a_ref[pl.ds(i, 1), :] * h + x_ref[pl.ds(i, 1), :]
    h_ref[pl.ds(i, 1), :] = h
    return h

  h_scr[...] = jax.lax.fori_loop(0, a_ref.shape[0], body, h_scr[...])


def _kernel_triton(a_ref, x_ref, h0_ref, h_ref):
  def body(i, h):
    h = a_ref[pl.ds(i, 1), :] * h + x_ref[pl.ds(i, 1), :]
    h_ref[pl.ds(i, 1), :] = h
    return h

  jax.lax.fori_loop(0, a_ref.shape[0], body, h0_ref[...])


def _pad_to(x: jax.Array, axis: int, size: int, value: float = 0.0) -> jax.Array:
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def scan_kernel(a: jax.Array, x: jax.Array, h0: jax.Array, *, backend: str, interpret: bool) -> jax.Array:
  """The kernel on float32 a, x `[b, t, m]`, h0 `[b, m]`; returns h `[b, t, m]`."""
  b, t, m = x.shape
  if backend == "tpu":
    # Lane dim: the full width when it is small, else 512-wide blocks (a multiple of 128); time blocks of
    # up to 64 rows (a multiple of 8). Padded rows come after the real ones and are dropped.
    mb = m if m <= 1024 else 512
    mp = -(-m // mb) * mb
    tb = min(64, -(-t // 8) * 8)
    tp = -(-t // tb) * tb
    a_p, x_p = (_pad_to(_pad_to(y, 1, tp), 2, mp) for y in (a, x))
    h0_p = _pad_to(h0, 1, mp)[:, None, :]
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top

    h = pl.pallas_call(
        _kernel_tpu,
        grid=(b, mp // mb, tp // tb),
        in_specs=[
            pl.BlockSpec((None, tb, mb), lambda i, j, n: (i, n, j)),
            pl.BlockSpec((None, tb, mb), lambda i, j, n: (i, n, j)),
            pl.BlockSpec((None, 1, mb), lambda i, j, n: (i, 0, j)),
        ],
        out_specs=pl.BlockSpec((None, tb, mb), lambda i, j, n: (i, n, j)),
        out_shape=jax.ShapeDtypeStruct((b, tp, mp), _F32),
        scratch_shapes=[pltpu.VMEM((1, mb), _F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="decay_scan",
    )(a_p, x_p, h0_p)
    return h[:, :t, :m]
  # Triton: loaded rows must have a power-of-2 size.
  mb = min(1 << max(0, math.ceil(math.log2(max(m, 1)))), 512)
  mp = -(-m // mb) * mb
  a_p, x_p = (_pad_to(y, 2, mp) for y in (a, x))
  h0_p = _pad_to(h0, 1, mp)[:, None, :]
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top

    compiler_params = plgpu.CompilerParams(num_warps=4, num_stages=1)
  h = pl.pallas_call(
      _kernel_triton,
      grid=(b, mp // mb),
      in_specs=[
          pl.BlockSpec((None, t, mb), lambda i, j: (i, 0, j)),
          pl.BlockSpec((None, t, mb), lambda i, j: (i, 0, j)),
          pl.BlockSpec((None, 1, mb), lambda i, j: (i, 0, j)),
      ],
      out_specs=pl.BlockSpec((None, t, mb), lambda i, j: (i, 0, j)),
      out_shape=jax.ShapeDtypeStruct((b, t, mp), _F32),
      compiler_params=compiler_params,
      interpret=interpret,
      name="decay_scan",
  )(a_p, x_p, h0_p)
  return h[:, :, :m]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _scan(a, x, h0, backend, interpret):
  return scan_kernel(a, x, h0, backend=backend, interpret=interpret)


def _scan_fwd(a, x, h0, backend, interpret):
  h = scan_kernel(a, x, h0, backend=backend, interpret=interpret)
  return h, (a, h, h0)


def _scan_bwd(backend, interpret, res, dh):
  a, h, h0 = res
  # lambda_t = dh_t + a_{t+1} lambda_{t+1}: the forward recurrence on reversed time with gates shifted by one.
  a_next = jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)
  lam = jnp.flip(scan_kernel(jnp.flip(a_next, 1), jnp.flip(dh, 1), jnp.zeros_like(h0), backend=backend,
                             interpret=interpret), 1)
  h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
  return lam * h_prev, lam, a[:, 0] * lam[:, 0]


_scan.defvjp(_scan_fwd, _scan_bwd)


def decay_scan_pallas_leaf(a: jax.Array, x: jax.Array, h0: jax.Array | None, *, interpret: bool,
                           backend: str | None = None) -> jax.Array:
  """One leaf: a broadcastable `[b, t, ...]`, x `[b, t, ...]`, h0 `[b, ...]` or None -> h like x.

  The gate is broadcast to the leaf's shape (its gradient is summed back by autodiff of the broadcast).
  backend: "tpu" or "triton"; default by platform ("tpu" semantics in the interpreter).
  """
  backend = backend or _default_backend()
  b, t = x.shape[:2]
  m = math.prod(x.shape[2:])
  a_full = jnp.broadcast_to(_gate_for(a, x), x.shape).reshape(b, t, m)
  h0_flat = jnp.zeros((b, m), _F32) if h0 is None else h0.astype(_F32).reshape(b, m)
  h = _scan(a_full, x.astype(_F32).reshape(b, t, m), h0_flat, backend, interpret)
  return h.reshape(x.shape).astype(x.dtype)
