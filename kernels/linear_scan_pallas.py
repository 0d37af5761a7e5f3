"""Pallas kernels for `linear_scan`: the sequential state passes of the chunked algorithm, TPU and GPU.

The chunked form (see `kernels.linear_scan_xla`) makes every chunk an affine map of its start state S_n:

    o_n = Qeff_n S_n + Ointra_n,     S_{n+1} = P_n S_n + B_n

with Qeff `[C, K]`, Ointra `[C, V]`, P `[K, K]`, B `[K, V]` computed for all chunks in parallel by `prep`
(the WY/UT solve included, as batched matmuls). The kernels run what is sequential:

- forward: for n = 0..N-1: store S_n, o_n = Qeff_n S_n + Ointra_n, S <- P_n S_n + B_n; write the final S.
- backward: lambda_N = dL/dS_final; for n = N-1..0: store lambda_{n+1}, lambda <- Qeff_n^T dO_n + P_n^T lambda;
  write lambda_0 = dL/dS_0. The gradients of Qeff, P, B (dO S^T, lambda S^T, lambda) are pulled back through
  `prep` by the shared custom VJP, per group of chunks.

Each (batch * head, value block) is independent: S `[K, Vb]` only mixes along K.
- TPU (Mosaic): grid (batch * heads, value blocks, chunks) with the chunk axis "arbitrary" (sequential) and
  the state in a VMEM scratch buffer that persists across it.
- GPU (Triton, which has no sequential grid axis or scratch memory): grid (batch * heads, value blocks); one
  program loops over chunks with `lax.fori_loop`, the state carried in registers.
`interpret=True` runs the same kernels in Pallas' interpreter (CPU tests). Unsupported shapes fall back to
the XLA passes with a one-time warning.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.dispatch import warn_fallback
from kernels.linear_scan_xla import run_chunked, xla_backward_pass, xla_forward_pass

_F32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST


def default_backend() -> str:
  """"triton" on GPUs, else "tpu" (also the interpreter's default: its sequential grid axis and scratch)."""
  return "triton" if jax.default_backend() in ("gpu", "cuda", "rocm") else "tpu"


def _value_block(v: int) -> int:
  # TPU blocks need a last dim that is the full dim or a multiple of 128; 128 keeps the Triton state
  # (K x Vb float32 in registers) small.
  return 128 if v > 128 and v % 128 == 0 else v


def unsupported(backend: str, c: int, k: int, v: int) -> str | None:
  """Why the kernel cannot take these sizes on `backend`, or None."""
  vb = _value_block(v)
  if backend == "triton":
    for name, x in (("chunk_size", c), ("k_dim", k), ("value block", vb)):
      if x < 16 or x & (x - 1):
        return f"{name}={x} on Triton (needs a power of 2 >= 16 for tl.dot)"
    if k * vb > 128 * 128:
      return f"a state block of {k}x{vb} on Triton (registers; at most 128x128)"
  else:
    if c % 8:
      return f"chunk_size={c} on TPU (needs a multiple of 8 for the sublane tiling)"
    if k > 512:
      return f"k_dim={k} on TPU (VMEM budget)"
  return None


def _tpu_params(semantics):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top

  return pltpu.CompilerParams(dimension_semantics=semantics)


def _triton_params():
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top

  return plgpu.CompilerParams(num_warps=4, num_stages=1)


def _vmem(shape):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top

  return pltpu.VMEM(shape, _F32)


# ----------------------------------------------------------------------------------------------- forward


def _fwd_kernel_tpu(qeff_ref, oin_ref, p_ref, b_ref, s0_ref, o_ref, st_ref, fin_ref, s_scr):
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    s_scr[...] = s0_ref[...]

  s = s_scr[...]
  st_ref[...] = s
  o_ref[...] = jnp.dot(qeff_ref[...], s, precision=_HI, preferred_element_type=_F32) + oin_ref[...]
  s = jnp.dot(p_ref[...], s, precision=_HI, preferred_element_type=_F32) + b_ref[...]
  s_scr[...] = s

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    fin_ref[...] = s


def _fwd_kernel_triton(qeff_ref, oin_ref, p_ref, b_ref, s0_ref, o_ref, st_ref, fin_ref):
  def body(n, s):
    st_ref[n] = s
    o_ref[n] = jnp.dot(qeff_ref[n], s, precision=_HI, preferred_element_type=_F32) + oin_ref[n]
    return jnp.dot(p_ref[n], s, precision=_HI, preferred_element_type=_F32) + b_ref[n]

  fin_ref[...] = jax.lax.fori_loop(0, qeff_ref.shape[0], body, s0_ref[...])


def state_pass_forward(qeff, ointra, p, bmat, s0, *, backend: str, interpret: bool):
  """Forward kernel on flattened inputs: qeff `[BH,N,C,K]`, ointra `[BH,N,C,V]`, p `[BH,N,K,K]`,
  bmat `[BH,N,K,V]`, s0 `[BH,K,V]` (float32). Returns (o `[BH,N,C,V]`, starts `[BH,N,K,V]`, final `[BH,K,V]`)."""
  bh, n, c, k = qeff.shape
  v = ointra.shape[-1]
  vb = _value_block(v)
  out_shape = (jax.ShapeDtypeStruct((bh, n, c, v), _F32), jax.ShapeDtypeStruct((bh, n, k, v), _F32),
               jax.ShapeDtypeStruct((bh, k, v), _F32))
  if backend == "tpu":
    return pl.pallas_call(
        _fwd_kernel_tpu,
        grid=(bh, v // vb, n),
        in_specs=[
            pl.BlockSpec((None, None, c, k), lambda i, j, m: (i, m, 0, 0)),
            pl.BlockSpec((None, None, c, vb), lambda i, j, m: (i, m, 0, j)),
            pl.BlockSpec((None, None, k, k), lambda i, j, m: (i, m, 0, 0)),
            pl.BlockSpec((None, None, k, vb), lambda i, j, m: (i, m, 0, j)),
            pl.BlockSpec((None, k, vb), lambda i, j, m: (i, 0, j)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, c, vb), lambda i, j, m: (i, m, 0, j)),
            pl.BlockSpec((None, None, k, vb), lambda i, j, m: (i, m, 0, j)),
            # Same block for every chunk: resident across the sequential axis, written back at the end.
            pl.BlockSpec((None, k, vb), lambda i, j, m: (i, 0, j)),
        ],
        out_shape=out_shape,
        scratch_shapes=[_vmem((k, vb))],
        compiler_params=_tpu_params(("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="linear_scan_fwd",
    )(qeff, ointra, p, bmat, s0)
  return pl.pallas_call(
      _fwd_kernel_triton,
      grid=(bh, v // vb),
      in_specs=[
          pl.BlockSpec((None, n, c, k), lambda i, j: (i, 0, 0, 0)),
          pl.BlockSpec((None, n, c, vb), lambda i, j: (i, 0, 0, j)),
          pl.BlockSpec((None, n, k, k), lambda i, j: (i, 0, 0, 0)),
          pl.BlockSpec((None, n, k, vb), lambda i, j: (i, 0, 0, j)),
          pl.BlockSpec((None, k, vb), lambda i, j: (i, 0, j)),
      ],
      out_specs=[
          pl.BlockSpec((None, n, c, vb), lambda i, j: (i, 0, 0, j)),
          pl.BlockSpec((None, n, k, vb), lambda i, j: (i, 0, 0, j)),
          pl.BlockSpec((None, k, vb), lambda i, j: (i, 0, j)),
      ],
      out_shape=out_shape,
      compiler_params=None if interpret else _triton_params(),
      interpret=interpret,
      name="linear_scan_fwd",
  )(qeff, ointra, p, bmat, s0)


# ---------------------------------------------------------------------------------------------- backward


def _bwd_kernel_tpu(qeff_t_ref, do_ref, p_t_ref, dfin_ref, lam_ref, ds0_ref, lam_scr):
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    lam_scr[...] = dfin_ref[...]

  lam = lam_scr[...]
  lam_ref[...] = lam
  lam = (jnp.dot(qeff_t_ref[...], do_ref[...], precision=_HI, preferred_element_type=_F32)
         + jnp.dot(p_t_ref[...], lam, precision=_HI, preferred_element_type=_F32))
  lam_scr[...] = lam

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    ds0_ref[...] = lam


def _bwd_kernel_triton(qeff_t_ref, do_ref, p_t_ref, dfin_ref, lam_ref, ds0_ref):
  num = qeff_t_ref.shape[0]

  def body(i, lam):
    n = num - 1 - i  # walk the chunks backwards
    lam_ref[n] = lam
    return (jnp.dot(qeff_t_ref[n], do_ref[n], precision=_HI, preferred_element_type=_F32)
            + jnp.dot(p_t_ref[n], lam, precision=_HI, preferred_element_type=_F32))

  ds0_ref[...] = jax.lax.fori_loop(0, num, body, dfin_ref[...])


def state_pass_backward(qeff_t, do, p_t, d_final, *, backend: str, interpret: bool):
  """Backward kernel: qeff_t `[BH,N,K,C]` (Qeff transposed), do `[BH,N,C,V]`, p_t `[BH,N,K,K]` (P transposed),
  d_final `[BH,K,V]`. Returns (lambda_{n+1} per chunk `[BH,N,K,V]`, lambda_0 `[BH,K,V]`)."""
  bh, n, k, c = qeff_t.shape
  v = do.shape[-1]
  vb = _value_block(v)
  out_shape = (jax.ShapeDtypeStruct((bh, n, k, v), _F32), jax.ShapeDtypeStruct((bh, k, v), _F32))
  if backend == "tpu":
    rev = lambda m: n - 1 - m  # the sequential axis walks the chunks backwards
    return pl.pallas_call(
        _bwd_kernel_tpu,
        grid=(bh, v // vb, n),
        in_specs=[
            pl.BlockSpec((None, None, k, c), lambda i, j, m: (i, rev(m), 0, 0)),
            pl.BlockSpec((None, None, c, vb), lambda i, j, m: (i, rev(m), 0, j)),
            pl.BlockSpec((None, None, k, k), lambda i, j, m: (i, rev(m), 0, 0)),
            pl.BlockSpec((None, k, vb), lambda i, j, m: (i, 0, j)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, k, vb), lambda i, j, m: (i, rev(m), 0, j)),
            pl.BlockSpec((None, k, vb), lambda i, j, m: (i, 0, j)),
        ],
        out_shape=out_shape,
        scratch_shapes=[_vmem((k, vb))],
        compiler_params=_tpu_params(("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="linear_scan_bwd",
    )(qeff_t, do, p_t, d_final)
  return pl.pallas_call(
      _bwd_kernel_triton,
      grid=(bh, v // vb),
      in_specs=[
          pl.BlockSpec((None, n, k, c), lambda i, j: (i, 0, 0, 0)),
          pl.BlockSpec((None, n, c, vb), lambda i, j: (i, 0, 0, j)),
          pl.BlockSpec((None, n, k, k), lambda i, j: (i, 0, 0, 0)),
          pl.BlockSpec((None, k, vb), lambda i, j: (i, 0, j)),
      ],
      out_specs=[
          pl.BlockSpec((None, n, k, vb), lambda i, j: (i, 0, 0, j)),
          pl.BlockSpec((None, k, vb), lambda i, j: (i, 0, j)),
      ],
      out_shape=out_shape,
      compiler_params=None if interpret else _triton_params(),
      interpret=interpret,
      name="linear_scan_bwd",
  )(qeff_t, do, p_t, d_final)


# ------------------------------------------------------------------------------- passes for chunked_scan


def _as_matrix(p, k):
  # The Hebbian write has the scalar P = gamma_C; the kernels take one K x K form for both cases.
  if p.ndim == 3:
    return p[..., None, None] * jnp.eye(k, dtype=_F32)
  return p


def _pallas_forward_pass(qeff, ointra, p, bmat, s0, *, backend, interpret):
  b, h, n, c, k = qeff.shape
  v = ointra.shape[-1]
  flat = lambda x: x.reshape((b * h,) + x.shape[2:])
  o, starts, final = state_pass_forward(
      flat(qeff), flat(ointra), flat(_as_matrix(p, k)), flat(bmat), flat(s0), backend=backend,
      interpret=interpret)
  return o.reshape(b, h, n, c, v), starts.reshape(b, h, n, k, v), final.reshape(b, h, k, v)


def _pallas_backward_pass(qeff, do, p, d_final, *, backend, interpret):
  b, h, n, c, k = qeff.shape
  v = do.shape[-1]
  flat = lambda x: x.reshape((b * h,) + x.shape[2:])
  lam, ds0 = state_pass_backward(
      flat(jnp.swapaxes(qeff, -1, -2)), flat(do), flat(jnp.swapaxes(_as_matrix(p, k), -1, -2)),
      flat(d_final), backend=backend, interpret=interpret)
  return lam.reshape(b, h, n, k, v), ds0.reshape(b, h, k, v)


@functools.lru_cache(maxsize=None)
def _passes(backend: str, interpret: bool):
  # Cached so the custom_vjp sees the same (hashable) functions on every call.
  return (functools.partial(_pallas_forward_pass, backend=backend, interpret=interpret),
          functools.partial(_pallas_backward_pass, backend=backend, interpret=interpret))


def linear_scan_pallas(q, k, v, g, beta, initial_state, scale: float, chunk_size: int, *, interpret: bool,
                       backend: str | None = None):
  """The chunked scan with Pallas state passes. Shapes as `kernels.linear_scan`.

  backend: "tpu" (Mosaic) or "triton"; default by the current platform ("tpu" in the interpreter). Passing
  it explicitly lets a CPU-only machine export either kernel.
  """
  backend = backend or default_backend()
  reason = unsupported(backend, chunk_size, q.shape[-1], v.shape[-1])
  if reason is not None:
    warn_fallback("linear_scan", reason)
    return run_chunked(q, k, v, g, beta, initial_state, scale, chunk_size, xla_forward_pass, xla_backward_pass)
  fwd, bwd = _passes(backend, interpret)
  return run_chunked(q, k, v, g, beta, initial_state, scale, chunk_size, fwd, bwd)
