"""Pallas kernels for `linear_scan`, TPU (Mosaic) and GPU (Triton): a fused chunked forward and the reverse
state pass of the backward.

The chunked form (see `kernels.linear_scan_xla`) makes every chunk an affine map of its start state S_n:

    o_n = Qeff_n S_n + Ointra_n,     S_{n+1} = P_n S_n + B_n

- forward (one kernel, the whole algorithm): per chunk, from q, k, v, g, beta and the running state S: the
  cumulative log decay (masked reductions), the decay-masked QK^T, for the delta rule the unit-lower-triangular
  inverse of the WY/UT form (nilpotent doubling: matmuls only), w, u and the new values U = u - w S, then
  o = scale (gamma q S + (QK^T * D) U) and S <- gamma_C S + Kdec^T U. Stores S_n per chunk (the only state the
  backward keeps), and when differentiating also Qeff_n and P_n (delta rule).
- backward: lambda_N = dL/dS_final; for n = N-1..0: store lambda_{n+1}, lambda <- Qeff_n^T dO_n + P_n^T lambda;
  write lambda_0 = dL/dS_0. The gradients of Qeff, P, B (dO S^T, lambda S^T, lambda) are pulled back through
  the per-chunk math (`prep`, recomputed group by group in XLA: parallel batched matmuls) by the shared custom VJP.

Each (batch * head, value block) is independent: S `[K, Vb]` only mixes along K.
- TPU (Mosaic): grid (batch * heads, value blocks, chunks) with the chunk axis "arbitrary" (sequential) and
  the state in a VMEM scratch buffer that persists across it.
- GPU (Triton, which has no sequential grid axis or scratch memory): grid (batch * heads, value blocks); one
  program loops over chunks with `lax.fori_loop`, the state carried in registers.
`interpret=True` runs the same kernels in Pallas' interpreter (CPU tests). Unsupported shapes fall back to
the XLA implementation with a one-time warning.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.dispatch import warn_fallback
from kernels.linear_scan_xla import from_chunks, run_chunked, state_pass_backward as grouped_backward, to_chunks

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


def _mm(a, b):
  return jnp.dot(a, b, precision=_HI, preferred_element_type=_F32)


def _unit_lower_inverse(a):
  """(I + A)^{-1} for strictly lower triangular A `[C, C]` inside a kernel: with N = -A nilpotent,
  (I - N)^{-1} = (I + N)(I + N^2)(I + N^4)... (2 log2 C matmuls, no row loop, no slicing)."""
  c = a.shape[0]
  eye = (jax.lax.broadcasted_iota(jnp.int32, (c, c), 0) == jax.lax.broadcasted_iota(jnp.int32, (c, c), 1))
  nil = -a
  t = eye.astype(_F32) + nil
  p = 2
  while p < c:
    nil = _mm(nil, nil)
    t = t + _mm(t, nil)
    p *= 2
  return t


def _chunk_math(q, k, kt, v, gc, gr, bc, s, *, scale: float, delta: bool, residuals: bool):
  """One chunk of the scan from its start state, as plain 2-D array math shared by the TPU and Triton kernels.

  q, k `[C, K]`, kt = k^T `[K, C]` (so every product is a plain A @ B: no in-kernel transposes), v `[C, Vb]`,
  gc / gr: g as a column `[C, 1]` and a row `[1, C]`, bc: beta `[C, 1]`, s: the start state `[K, Vb]`.
  Cumulative sums are masked reductions (no cumsum or slicing inside kernels). Returns (o `[C, Vb]`,
  next state `[K, Vb]`, Qeff `[C, K]`, P `[K, K]`), the last two only for the delta rule with `residuals`.
  The math is `kernels.linear_scan_xla.prep` followed by one step of the state pass.
  """
  c = q.shape[0]
  row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  cum_c = jnp.sum(jnp.where(row >= col, gr, 0.0), axis=1, keepdims=True)  # G_t as a column
  cum_r = jnp.sum(jnp.where(row <= col, gc, 0.0), axis=0, keepdims=True)  # G_i as a row
  total = jnp.sum(gr, axis=1, keepdims=True)  # G_C `[1, 1]`
  diff = cum_c - cum_r  # G_t - G_i
  # Masked before exp: above the diagonal the difference is a large positive under strong decay.
  qk = _mm(q, kt) * jnp.exp(jnp.where(row >= col, diff, -jnp.inf))
  gamma = jnp.exp(cum_c)
  kdec_t = kt * jnp.exp(total - cum_r)
  qeff = p = None
  if delta:
    a = bc * jnp.exp(jnp.where(row > col, diff, -jnp.inf)) * _mm(k, kt)
    tinv = _unit_lower_inverse(a)
    w = _mm(tinv, (bc * gamma) * k)
    u = _mm(tinv, bc * v) - _mm(w, s)
    if residuals:
      qeff = scale * (gamma * q - _mm(qk, w))
      kk = kt.shape[0]
      eye = jax.lax.broadcasted_iota(jnp.int32, (kk, kk), 0) == jax.lax.broadcasted_iota(jnp.int32, (kk, kk), 1)
      p = jnp.exp(total) * eye.astype(_F32) - _mm(kdec_t, w)
  else:
    u = v
  o = scale * (gamma * _mm(q, s) + _mm(qk, u))
  s_next = jnp.exp(total) * s + _mm(kdec_t, u)
  return o, s_next, qeff, p


def _fwd_kernel_tpu(q_ref, k_ref, kt_ref, v_ref, gc_ref, gr_ref, bc_ref, s0_ref, *refs, scale, delta, residuals):
  o_ref, st_ref, fin_ref = refs[:3]
  s_scr = refs[-1]
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    s_scr[...] = s0_ref[...]

  s = s_scr[...]
  st_ref[...] = s
  o, s, qeff, p = _chunk_math(q_ref[...], k_ref[...], kt_ref[...], v_ref[...], gc_ref[...], gr_ref[...],
                              bc_ref[...], s, scale=scale, delta=delta, residuals=residuals)
  o_ref[...] = o
  if qeff is not None:
    refs[3][...] = qeff
    refs[4][...] = p
  s_scr[...] = s

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    fin_ref[...] = s


def _fwd_kernel_triton(q_ref, k_ref, kt_ref, v_ref, gc_ref, gr_ref, bc_ref, s0_ref, *refs, scale, delta, residuals):
  o_ref, st_ref, fin_ref = refs[:3]

  def body(n, s):
    st_ref[n] = s
    o, s_next, qeff, p = _chunk_math(q_ref[n], k_ref[n], kt_ref[n], v_ref[n], gc_ref[n], gr_ref[n], bc_ref[n], s,
                                     scale=scale, delta=delta, residuals=residuals)
    o_ref[n] = o
    if qeff is not None:
      refs[3][n] = qeff
      refs[4][n] = p
    return s_next

  fin_ref[...] = jax.lax.fori_loop(0, q_ref.shape[0], body, s0_ref[...])


def fused_forward(q, k, kt, v, gc, gr, bc, s0, *, scale: float, delta: bool, residuals: bool, backend: str,
                  interpret: bool):
  """The whole chunked forward in one kernel (per-chunk WY/UT solve, outputs and state pass).

  Flattened float32 inputs: q, k `[BH, N, C, K]`, kt `[BH, N, K, C]` (k transposed per chunk), v `[BH, N, C, V]`,
  gc `[BH, N, C, 1]`, gr `[BH, N, 1, C]` (g per chunk as column and row), bc `[BH, N, C, 1]` (beta), s0
  `[BH, K, V]`. Returns (o `[BH, N, C, V]`, chunk-start states `[BH, N, K, V]`, final state `[BH, K, V]`), plus
  (Qeff `[BH, N, C, K]`, P `[BH, N, K, K]`) for the delta rule with `residuals` (what the backward needs).
  """
  bh, n, c, kd = q.shape
  v_dim = v.shape[-1]
  vb = _value_block(v_dim)
  with_res = residuals and delta
  out_shape = [jax.ShapeDtypeStruct((bh, n, c, v_dim), _F32), jax.ShapeDtypeStruct((bh, n, kd, v_dim), _F32),
               jax.ShapeDtypeStruct((bh, kd, v_dim), _F32)]
  if with_res:
    out_shape += [jax.ShapeDtypeStruct((bh, n, c, kd), _F32), jax.ShapeDtypeStruct((bh, n, kd, kd), _F32)]
  flags = dict(scale=scale, delta=delta, residuals=with_res)
  args = (q, k, kt, v, gc, gr, bc, s0)
  if backend == "tpu":
    chunk = lambda *blk: pl.BlockSpec((None, None) + blk, lambda i, j, m: (i, m, 0, 0))
    vblock = lambda rows: pl.BlockSpec((None, None, rows, vb), lambda i, j, m: (i, m, 0, j))
    state = pl.BlockSpec((None, kd, vb), lambda i, j, m: (i, 0, j))  # resident across the sequential axis
    out_specs = [vblock(c), vblock(kd), state] + ([chunk(c, kd), chunk(kd, kd)] if with_res else [])
    return pl.pallas_call(
        functools.partial(_fwd_kernel_tpu, **flags),
        grid=(bh, v_dim // vb, n),
        in_specs=[chunk(c, kd), chunk(c, kd), chunk(kd, c), vblock(c), chunk(c, 1), chunk(1, c), chunk(c, 1), state],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[_vmem((kd, vb))],
        compiler_params=_tpu_params(("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="linear_scan_fwd",
    )(*args)
  seq = lambda *blk: pl.BlockSpec((None, n) + blk, lambda i, j: (i, 0, 0, 0))
  vseq = lambda rows: pl.BlockSpec((None, n, rows, vb), lambda i, j: (i, 0, 0, j))
  state = pl.BlockSpec((None, kd, vb), lambda i, j: (i, 0, j))
  out_specs = [vseq(c), vseq(kd), state] + ([seq(c, kd), seq(kd, kd)] if with_res else [])
  return pl.pallas_call(
      functools.partial(_fwd_kernel_triton, **flags),
      grid=(bh, v_dim // vb),
      in_specs=[seq(c, kd), seq(c, kd), seq(kd, c), vseq(c), seq(c, 1), seq(1, c), seq(c, 1), state],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=None if interpret else _triton_params(),
      interpret=interpret,
      name="linear_scan_fwd",
  )(*args)


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
  # The Hebbian write has the scalar P = gamma_C; the backward kernel takes one K x K form for both cases.
  if p.ndim == 3:
    return p[..., None, None] * jnp.eye(k, dtype=_F32)
  return p


def _pallas_chunk_forward(q, k, v, g, beta, s0, chunk_size, scale, delta, residuals, *, backend, interpret):
  """`kernels.linear_scan_xla.xla_chunk_forward`'s contract, by the fused kernel."""
  b, t, h, kd = q.shape
  v_dim = v.shape[-1]
  qc, kc, vc, gch, bch = (to_chunks(x, chunk_size) for x in (q, k, v, g, beta))  # [b, h, n, C, ...] float32
  flat = lambda x: x.reshape((b * h,) + x.shape[2:])
  outs = fused_forward(
      flat(qc), flat(kc), flat(jnp.swapaxes(kc, -1, -2)), flat(vc), flat(gch[..., None]), flat(gch[..., None, :]),
      flat(bch[..., None]), s0.reshape(b * h, kd, v_dim), scale=scale, delta=delta, residuals=residuals,
      backend=backend, interpret=interpret)
  unflat = lambda x: x.reshape((b, h) + x.shape[1:])
  o = from_chunks(unflat(outs[0]), t)
  final = outs[2].reshape(b, h, kd, v_dim)
  if not residuals:
    return o, final, None, None, None
  starts = unflat(outs[1])
  if delta:
    qeff, p = unflat(outs[3]), unflat(outs[4])
  else:  # Hebbian: Qeff = scale * gamma * q and P = gamma_C are cheap elementwise work, done here
    cum = jnp.cumsum(gch, axis=-1)
    qeff, p = scale * jnp.exp(cum)[..., None] * qc, jnp.exp(cum[..., -1])
  return o, final, starts, qeff, p


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
  return (functools.partial(_pallas_chunk_forward, backend=backend, interpret=interpret),
          functools.partial(grouped_backward, reverse_pass=functools.partial(
              _pallas_backward_pass, backend=backend, interpret=interpret)))


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
    return run_chunked(q, k, v, g, beta, initial_state, scale, chunk_size)
  fwd, bwd = _passes(backend, interpret)
  return run_chunked(q, k, v, g, beta, initial_state, scale, chunk_size, fwd, bwd)
