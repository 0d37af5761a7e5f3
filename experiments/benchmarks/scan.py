"""Benchmark of `kernels.linear_scan`: time, compiled peak memory and achieved GFLOP/s per impl.

  python -m experiments.benchmark scan [--quick] [--chunk-size 64] [--out bench_results/scan.json]

Batch 1, 4 heads, k_dim = v_dim = 64, float32, gated (g given), with and without the delta rule (beta), for
seq in {1024, 4096, 16384}. Impls: "xla" (chunked, custom VJP), "reference" (the token-by-token lax.scan,
differentiated by autodiff), "pallas_interpret" (the kernels in the interpreter, smallest size only: it is
for tests, not speed). Forward and forward+backward (one vjp call: the forward and the gradients of q, k, v,
g, beta) wall time, median; peak memory from the compiled programs' memory analysis (not run). GFLOP/s
divide an analytic FLOP count of each impl's algorithm (XLA's cost analysis counts a loop body once) by the
time; this machine's float32 matmul GFLOP/s is measured in the same run for comparison.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import jax
import jax.numpy as jnp

from experiments.benchmarks.harness import compiled_memory_bytes, find_row, format_table, matmul_gflops, time_fn, write_json
from kernels import linear_scan

BATCH, HEADS, K_DIM, V_DIM = 1, 4, 64, 64
REFERENCE_MAX_RUN_SEQ = 4096  # autodiff through the reference stores a state per token: ~1 GB at 16384
INTERPRET_MAX_SEQ = 1024


# ------------------------------------------------------------------------------------------ FLOP counts


def _inverse_flops(n: int) -> int:
  """Matmul FLOPs of kernels.linear_scan_xla.unit_lower_inverse on one n x n block."""
  if n <= 16:
    flops, p = 0, 2
    while p < n:
      flops += 2 * 2 * n**3
      p *= 2
    return flops
  h = n // 2
  return _inverse_flops(h) + _inverse_flops(n - h) + 2 * 2 * h * h * (n - h)


def chunked_flops(seq: int, chunk: int, delta: bool) -> tuple[float, float]:
  """(forward, forward+backward) FLOPs of the chunked algorithm, batch * heads included.

  Per chunk of C tokens: prep (QK^T, and for the delta rule KK^T, the unit-lower inverse, W/U, Qeff, Ointra,
  P, B), then the state pass (Qeff S, P S). The backward recomputes prep and pulls back through it (a matmul's
  VJP is two matmuls: 3x prep), runs the reverse pass (Qeff^T dO, P^T lambda) and forms dQeff = dO S^T and
  dP = lambda S^T.
  """
  c, k, v = chunk, K_DIM, V_DIM
  n = -(-seq // c)
  if delta:
    prep = (2 * c * c * k * 2 + _inverse_flops(c) + 2 * c * c * (k + v) + 2 * c * c * k + 2 * c * c * v
            + 2 * c * k * k + 2 * c * k * v)
    fwd_pass = 2 * c * k * v + 2 * k * k * v
    bwd_extra = 2 * (2 * c * k * v + 2 * k * k * v)
  else:
    prep = 2 * c * c * k + 2 * c * c * v + 2 * c * k * v
    fwd_pass = 2 * c * k * v + k * v
    bwd_extra = 2 * (2 * c * k * v + k * v)
  fwd = n * (prep + fwd_pass)
  fwd_bwd = fwd + n * (3 * prep + bwd_extra)
  return BATCH * HEADS * fwd, BATCH * HEADS * fwd_bwd


def recurrent_flops(seq: int, delta: bool) -> tuple[float, float]:
  """(forward, forward+backward) FLOPs of the token-by-token recurrence (decay, write, read per token; the
  delta rule adds the prediction S^T k); autodiff doubles each product."""
  k, v = K_DIM, V_DIM
  per_token = k * v + 2 * k * v + 2 * k * v + (2 * k * v + 2 * v if delta else 0)
  fwd = seq * per_token
  return BATCH * HEADS * fwd, BATCH * HEADS * 3 * fwd


# ------------------------------------------------------------------------------------------- functions


def _fn(impl: str, delta: bool, chunk: int) -> Callable:
  def f(q, k, v, g, beta):
    return linear_scan(q, k, v, g=g, beta=beta if delta else None, chunk_size=chunk, impl=impl)

  return f


def _fwd_bwd(fn: Callable) -> Callable:
  """(q, k, v, g, beta, do, ds) -> gradients: the forward and the backward of one call."""

  def f(q, k, v, g, beta, do, ds):
    _, vjp = jax.vjp(fn, q, k, v, g, beta)
    return vjp((do, ds))

  return f


def _inputs(seq: int):
  ks = jax.random.split(jax.random.key(0), 7)
  q = jax.random.normal(ks[0], (BATCH, seq, HEADS, K_DIM))
  k = jax.random.normal(ks[1], (BATCH, seq, HEADS, K_DIM))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)  # the delta rule's usual l2-normalized keys
  v = jax.random.normal(ks[2], (BATCH, seq, HEADS, V_DIM))
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (BATCH, seq, HEADS)) + 3.0)
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (BATCH, seq, HEADS)))
  do = jax.random.normal(ks[5], (BATCH, seq, HEADS, V_DIM))
  ds = jax.random.normal(ks[6], (BATCH, HEADS, K_DIM, V_DIM))
  return q, k, v, g, beta, do, ds


def _shapes(seq: int):
  return [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in jax.eval_shape(lambda: _inputs(seq))]


COLUMNS = ["seq", "delta", "impl", "fwd_s", "fwd_bwd_s", "fwd_GFLOPs", "fwd_bwd_GFLOPs", "fwd_peak_MiB",
           "fwd_bwd_peak_MiB"]


def run(seqs, impls, chunk: int, iters: int) -> list[dict[str, Any]]:
  rows = []
  header_printed = False
  cols = COLUMNS
  for seq in seqs:
    data = _inputs(seq)
    shapes = _shapes(seq)
    for delta in (False, True):
      for impl in impls:
        if impl == "pallas_interpret" and seq > INTERPRET_MAX_SEQ:
          continue
        fn = _fn(impl, delta, chunk)
        fb_fn = _fwd_bwd(fn)
        flops = recurrent_flops(seq, delta) if impl == "reference" else chunked_flops(seq, chunk, delta)
        mem_f = compiled_memory_bytes(fn, *shapes[:5])["peak"]
        mem_fb = compiled_memory_bytes(fb_fn, *shapes)["peak"]
        row: dict[str, Any] = {"seq": seq, "delta": delta, "impl": impl, "fwd_peak_MiB": mem_f / 2**20,
                               "fwd_bwd_peak_MiB": mem_fb / 2**20}
        if not (impl == "reference" and seq > REFERENCE_MAX_RUN_SEQ):
          fwd = time_fn(jax.jit(fn), *data[:5], iters=iters)
          fb = time_fn(jax.jit(fb_fn), *data, iters=iters)
          row.update(fwd_s=fwd, fwd_bwd_s=fb, fwd_GFLOPs=flops[0] / fwd / 1e9, fwd_bwd_GFLOPs=flops[1] / fb / 1e9)
        lines = format_table([row], cols).splitlines()
        if not header_printed:
          print("\n".join(lines[:2]))
          header_printed = True
        print(lines[-1], flush=True)
        rows.append(row)
  return rows


def aims(rows, mid: int, long: int) -> list[dict[str, Any]]:
  """The issue's aims as ratios (missing numbers are skipped)."""
  out = []
  for delta in (False, True):
    tag = "delta" if delta else "hebbian"
    x, r = find_row(rows, seq=mid, delta=delta, impl="xla"), find_row(rows, seq=mid, delta=delta, impl="reference")
    if x and r and r.get("fwd_bwd_s"):
      ratio = r["fwd_bwd_s"] / x["fwd_bwd_s"]
      out.append({"aim": f"{tag}: reference/xla fwd+bwd time @ {mid}", "ratio": ratio, "target": ">= 5",
                  "met": ratio >= 5})
    if x and r:
      ratio = x["fwd_bwd_peak_MiB"] / r["fwd_bwd_peak_MiB"]
      out.append({"aim": f"{tag}: xla/reference fwd+bwd memory @ {mid}", "ratio": ratio, "target": "<= 0.125",
                  "met": ratio <= 0.125})
    xl = find_row(rows, seq=long, delta=delta, impl="xla")
    if x and xl:
      for key, label in (("fwd_bwd_s", "time"), ("fwd_bwd_peak_MiB", "memory")):
        ratio = xl[key] / x[key]
        out.append({"aim": f"{tag}: xla fwd+bwd {label} {long}/{mid}", "ratio": ratio, "target": f"<= {long / mid * 1.125:.3g}",
                    "met": ratio <= long / mid * 1.125})
  return out


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(prog="python -m experiments.benchmark scan", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="small run: seq 256/1024/4096, one timing iteration")
  p.add_argument("--chunk-size", type=int, default=64, help="chunk size of the chunked impls")
  p.add_argument("--out", default="bench_results/scan.json")
  p.add_argument("--iters", type=int, default=3)
  args = p.parse_args(argv)
  seqs = (256, 1024, 4096) if args.quick else (1024, 4096, 16384)
  iters = 1 if args.quick else args.iters
  impls = ["xla", "reference", "pallas_interpret"]
  mm = matmul_gflops()
  print(f"linear_scan benchmark on {jax.default_backend()} ({jax.device_count()} device(s)): batch {BATCH}, "
        f"heads {HEADS}, k_dim {K_DIM}, v_dim {V_DIM}, float32, gated, chunk {args.chunk_size}")
  print(f"this machine's float32 matmul (1024^3): {mm:.1f} GFLOP/s\n")
  rows = run(seqs, impls, args.chunk_size, iters)
  result = aims(rows, seqs[1], seqs[2])
  print(f"\nlinear_scan: time (s, median), achieved GFLOP/s (analytic count; matmul here: {mm:.1f}), compiled peak "
        "memory (MiB)")
  print(format_table(rows, COLUMNS))
  print("\naims")
  print(format_table(result, ["aim", "ratio", "target", "met"]))
  write_json(args.out, {"config": {"batch": BATCH, "heads": HEADS, "k_dim": K_DIM, "v_dim": V_DIM,
                                   "chunk_size": args.chunk_size, "quick": args.quick},
                        "matmul_gflops": mm, "rows": rows, "aims": result})
