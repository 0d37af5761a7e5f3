"""`attention`: blockwise softmax attention with prefix keys, offsets, windows, lengths and segments.

One op, several implementations (see `kernels.dispatch`): "reference" (materialized, the ground truth),
"xla" (blockwise online softmax, the CPU path and the fallback), "pallas" / "pallas_interpret" (kernels).
The blockwise ones share one `jax.custom_vjp` (`_blockwise_core`) whose backward recomputes block by block
from the saved log-sum-exp and also takes a cotangent for lse. Internals: `attention_common` (padded layout,
visibility rule, visible block ranges), `attention_xla`, `attention_pallas`.
Layout is `[batch, seq, heads, head_dim]`, as in `jax.nn.dot_product_attention`.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from kernels import attention_common as common
from kernels.attention_reference import attention_reference
from kernels.attention_xla import cache_attention, xla_backward, xla_forward
from kernels.dispatch import resolve_impl, warn_fallback

# Block sizes of the xla path on CPU, tuned with `python -m experiments.benchmark attention` (2-core CPU):
# large enough that each step is a sizeable matmul, small enough that causal/window skipping pays off.
XLA_BLOCK_Q = 512
XLA_BLOCK_K = 512


def _check_inputs(q, k, v, num_prefix, window, segment_ids, kv_lengths):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"attention: {name} must be [batch, seq, heads, head_dim], got shape {x.shape}.")
  if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]:
    raise ValueError(f"attention: batch/seq/heads of q {q.shape}, k {k.shape}, v {v.shape} do not match.")
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(f"attention: q head_dim {q.shape[-1]} != k head_dim {k.shape[-1]}.")
  if min(q.shape[2], k.shape[2], q.shape[3], v.shape[3]) < 1:
    raise ValueError(f"attention: heads, kv heads, head_dim and v_dim must be >= 1; got q {q.shape}, k {k.shape}, "
                     f"v {v.shape}.")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"attention: q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]}) for GQA.")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"attention: {name} must be floating point, got {x.dtype}.")
  # Python/numpy ints only: a float window (2.5) would be floored by the blockwise impls but compared as a
  # float by the reference, i.e. two different masks.
  for name, x in (("num_prefix", num_prefix), ("window", window)):
    if x is not None and (isinstance(x, bool) or not isinstance(x, numbers.Integral)):
      raise ValueError(f"attention: {name} must be an int, got {x!r} ({type(x).__name__}).")
  if not 0 <= num_prefix <= k.shape[1]:
    raise ValueError(f"attention: num_prefix={num_prefix} must be in [0, {k.shape[1]}] (the number of keys).")
  if window is not None and window < 1:
    raise ValueError(f"attention: window must be a positive int or None, got {window}.")
  if kv_lengths is not None and jnp.shape(kv_lengths) != (q.shape[0],):
    raise ValueError(f"attention: kv_lengths must be [batch]={q.shape[0]}, got {jnp.shape(kv_lengths)}.")


def _split_segment_ids(segment_ids, q, k, num_prefix):
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    q_seg, kv_seg = segment_ids
  else:
    q_seg = kv_seg = segment_ids
  if q_seg.shape != q.shape[:2] or kv_seg.shape != (k.shape[0], k.shape[1] - num_prefix):
    raise ValueError(
        "attention: segment_ids must be [batch, q_len] (when q and the non-prefix keys have the same length) "
        f"or a pair ([batch, q_len], [batch, k_len - num_prefix]); got {q_seg.shape} and {kv_seg.shape} for "
        f"q {q.shape[:2]}, k {k.shape[:2]}, num_prefix {num_prefix}."
    )
  return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    window: int | None = None,
    num_prefix: int = 0,
    q_offset=0,
    k_offset=0,
    kv_lengths: jax.Array | None = None,
    segment_ids=None,
    scale: float | None = None,
    return_lse: bool = False,
    impl: str = "auto",
    decode: bool = False,
):
  """Softmax attention.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, k_len, kv_heads, head_dim]`; heads must be a multiple of kv_heads (GQA).
    v: `[batch, k_len, kv_heads, v_dim]`.
    causal: key visible only if its position <= the query's position.
    window: if set, key visible only if `qpos - kpos < window`.
    num_prefix: the first `num_prefix` keys are visible to every query (persistent memory tokens).
    q_offset, k_offset: positions of query 0 and of the first non-prefix key (ints or `[batch]`).
    kv_lengths: `[batch]`; keys at index >= kv_lengths[b] are masked (a KV cache's unused slots).
    segment_ids: `[batch, q_len]` int, or a pair (q ids, non-prefix k ids); no attention across segments.
    scale: defaults to `head_dim ** -0.5`.
    return_lse: also return the float32 log-sum-exp `[batch, q_len, heads]` (-inf where nothing is visible).
    impl: one of `kernels.dispatch.IMPLS`.
    decode: the call reads a KV cache for a few new queries (a decode step) and is never differentiated. With
      the "xla" impl, causal, no prefix keys, no segments and k_offset 0, it then runs
      `attention_xla.cache_attention` on the cache's own layout (no O(capacity) copy per step); otherwise
      it changes nothing.

  Returns:
    `o` `[batch, q_len, heads, v_dim]` in q's dtype, or `(o, lse)` if return_lse.
  """
  _check_inputs(q, k, v, num_prefix, window, segment_ids, kv_lengths)
  q_seg, kv_seg = _split_segment_ids(segment_ids, q, k, num_prefix)
  if scale is None:
    scale = q.shape[-1] ** -0.5
  impl = resolve_impl(impl, "attention")
  b, tq, h = q.shape[:3]
  if b == 0 or tq == 0 or k.shape[1] == 0:
    # Nothing to attend from or to: every query sees no key (o = 0, lse = -inf), as the reference defines.
    o, lse = jnp.zeros((b, tq, h, v.shape[-1]), q.dtype), jnp.full((b, tq, h), -jnp.inf, jnp.float32)
    return (o, lse) if return_lse else o
  kwargs = dict(
      causal=causal, window=window, num_prefix=num_prefix, q_offset=q_offset, k_offset=k_offset,
      kv_lengths=kv_lengths, q_segment_ids=q_seg, kv_segment_ids=kv_seg, scale=scale,
  )
  if (decode and impl == "xla" and causal and not num_prefix and q_seg is None and not return_lse
      and isinstance(k_offset, numbers.Integral) and k_offset == 0):
    lengths = jnp.full((b,), k.shape[1], jnp.int32) if kv_lengths is None else kv_lengths
    return cache_attention(q, k, v, q_offset=q_offset, kv_lengths=lengths, window=window, scale=scale)
  if impl == "reference":
    o, lse = attention_reference(q, k, v, **kwargs)
  else:
    o, lse = attention_blockwise(q, k, v, impl=impl, **kwargs)
  return (o, lse) if return_lse else o


def _pallas_variant(impl: str) -> str:
  """"pallas" -> the kernel for the default backend; "pallas_interpret" -> the TPU-style kernel, interpreted."""
  if impl == "pallas_interpret":
    return "pallas_tpu_interpret"
  if impl == "pallas":
    backend = jax.default_backend()
    if backend == "tpu":
      return "pallas_tpu"
    if backend in ("gpu", "cuda", "rocm"):
      return "pallas_triton"
    raise ValueError(
        f"attention: impl='pallas' needs a TPU or GPU backend (this one is {backend!r}); use "
        "impl='pallas_interpret' to run the kernels on CPU, or 'xla'."
    )
  return impl


def attention_blockwise(
    q, k, v, *, impl, causal, window, num_prefix, q_offset, k_offset, kv_lengths, q_segment_ids,
    kv_segment_ids, scale, block_q: int | None = None, block_k: int | None = None,
):
  """The blockwise implementations (impl "xla", "pallas", "pallas_interpret", or a kernel variant
  "pallas_tpu", "pallas_triton" with an optional "_interpret"). Inputs as validated by `attention`;
  returns (o `[b, tq, h, dv]` in q's dtype, lse `[b, tq, h]` float32). Block sizes default per impl.
  """
  impl = _pallas_variant(impl)
  if k.shape[1] == num_prefix:
    # Every key is a prefix key, visible whatever the segment: the segment ids change nothing.
    q_segment_ids = kv_segment_ids = None
  if impl != "xla":
    from kernels import attention_pallas  # imported lazily: only the Pallas paths need it

    reason = attention_pallas.unsupported(impl, q, k, v, block_q, block_k)
    if reason is not None:
      warn_fallback("attention", reason)
      impl, block_q, block_k = "xla", None, None
    else:
      bq, bk = attention_pallas.default_blocks(
          impl, q.shape[1], k.shape[1] - num_prefix, q.shape[-1], v.shape[-1], q.dtype.itemsize)
      block_q, block_k = block_q or bq, block_k or bk
  if impl == "xla":
    bq, bk = XLA_BLOCK_Q, XLA_BLOCK_K
    if window is not None and causal:
      # Smaller blocks waste less of each diagonal block on a narrow band (measured: window 512 at 8192
      # runs ~25% faster with 256 than with 512); below 128 the per-step overhead dominates on CPU.
      bq = bk = max(128, min(XLA_BLOCK_K, common.round_up(int(window) // 2, 8)))
    tk_rest = max(k.shape[1] - num_prefix, num_prefix, 1)
    block_q = block_q or min(bq, common.round_up(q.shape[1], 8))
    block_k = block_k or min(bk, common.round_up(tk_rest, 8))
  geo = common.Geometry(
      batch=q.shape[0], tq=q.shape[1], tk=k.shape[1], heads=q.shape[2], kv_heads=k.shape[2],
      head_dim=q.shape[3], v_dim=v.shape[3], causal=bool(causal), window=None if window is None else int(window),
      num_prefix=int(num_prefix), scale=float(scale), block_q=int(block_q), block_k=int(block_k),
      has_segments=q_segment_ids is not None, impl=impl, dtype=jnp.dtype(q.dtype).name,
  )
  ints = common.make_ints(geo, q_offset, k_offset, kv_lengths, q_segment_ids, kv_segment_ids)
  qt, kt, vt = common.to_blocked_layout(geo, q, k, v)
  ot, lse = _blockwise_core(geo, qt, kt, vt, ints)
  return common.from_blocked_q(geo, ot), lse[:, :, : geo.tq].transpose(0, 2, 1)


def _forward_impl(geo):
  if geo.impl == "xla":
    return xla_forward
  from kernels import attention_pallas

  return attention_pallas.pallas_forward


def _backward_impl(geo):
  if geo.impl == "xla":
    return xla_backward
  from kernels import attention_pallas

  return attention_pallas.pallas_backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise_core(geo, qt, kt, vt, ints):
  """(o, lse) in the blocked layout; differentiable in q, k, v through both o and lse."""
  return _forward_impl(geo)(geo, qt, kt, vt, ints)


def _blockwise_core_fwd(geo, qt, kt, vt, ints):
  o, lse = _forward_impl(geo)(geo, qt, kt, vt, ints)
  return (o, lse), (qt, kt, vt, o, lse, ints)


def _blockwise_core_bwd(geo, res, cts):
  qt, kt, vt, o, lse, ints = res
  do, dlse = cts
  dq, dk, dv = _backward_impl(geo)(geo, qt, kt, vt, o, lse, do, dlse, ints)
  # The integer inputs (offsets, lengths, segment ids) have no gradient.
  dints = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), ints)
  return dq, dk, dv, dints


_blockwise_core.defvjp(_blockwise_core_fwd, _blockwise_core_bwd)


def merge_attention(a, b):
  """Combines two attentions `(o, lse)` over disjoint key sets into the attention over their union.

  Exact: o = (exp(lse1) o1 + exp(lse2) o2) / (exp(lse1) + exp(lse2)), computed stably. A side whose
  lse is -inf (no visible key) contributes nothing. Returns `(o, lse)`, o in o1's dtype.
  """
  (o1, lse1), (o2, lse2) = a, b
  lse = jnp.logaddexp(lse1, lse2)
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  w1 = jnp.where(jnp.isfinite(lse1), jnp.exp(lse1 - lse_safe), 0.0)[..., None]
  w2 = jnp.where(jnp.isfinite(lse2), jnp.exp(lse2 - lse_safe), 0.0)[..., None]
  o = w1 * o1.astype(jnp.float32) + w2 * o2.astype(jnp.float32)
  return o.astype(o1.dtype), lse
