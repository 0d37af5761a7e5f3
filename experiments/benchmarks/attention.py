"""Benchmark of `kernels.attention`: time (forward, forward+backward) and compiled peak memory per impl.

  python -m experiments.benchmark attention [--quick] [--out bench_results/attention.json]

Times: batch 1, 8 heads, head_dim 64, float32, causal and causal with window 512, for seq in {512, 2048,
8192}, against `jax.nn.dot_product_attention` in the same run ("dpa"). `reference` is timed where its
materialized scores fit comfortably (seq <= 2048); `pallas_interpret` is not timed (the interpreter is for
tests). Memory: the compiled programs' memory analysis (`jax.jit(f).lower(...).compile().memory_analysis()`),
without running them, for seq up to 16384 (the materialized forms would not fit in memory there).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from experiments.benchmarks.harness import compiled_memory_bytes, find_row, format_table, time_fn, write_json
from kernels import attention

BATCH, HEADS, HEAD_DIM, WINDOW = 1, 8, 64, 512
REFERENCE_MAX_SEQ = 2048  # the reference's fwd+bwd holds several [heads, seq, seq] f32 arrays
DPA_MAX_RUN_SEQ = 8192


def _fn(impl: str, window: int | None) -> Callable:
  """(q, k, v) -> o for one impl; "dpa" is jax.nn.dot_product_attention with the same mask."""
  if impl == "dpa":
    lw = None if window is None else (window - 1, 0)  # our `qpos - kpos < window` == dpa's left window w-1
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=lw)
  return lambda q, k, v: attention(q, k, v, causal=True, window=window, impl=impl)


def _fwd_bwd(fn: Callable) -> Callable:
  """(q, k, v, do) -> (dq, dk, dv): the forward and the backward of one call."""

  def f(q, k, v, do):
    _, vjp = jax.vjp(fn, q, k, v)
    return vjp(do)

  return f


def _inputs(seq: int):
  keys = jax.random.split(jax.random.key(0), 4)
  return [jax.random.normal(k, (BATCH, seq, HEADS, HEAD_DIM), jnp.float32) for k in keys]


def _shapes(seq: int):
  return [jax.ShapeDtypeStruct((BATCH, seq, HEADS, HEAD_DIM), jnp.float32)] * 4


def run_timing(seqs, impls, iters: int) -> list[dict[str, Any]]:
  rows = []
  for seq in seqs:
    q, k, v, do = _inputs(seq)
    for window in (None, WINDOW):
      for impl in impls:
        if impl == "reference" and seq > REFERENCE_MAX_SEQ or impl == "dpa" and seq > DPA_MAX_RUN_SEQ:
          continue
        fn = _fn(impl, window)
        fwd = time_fn(jax.jit(fn), q, k, v, iters=iters)
        fb = time_fn(jax.jit(_fwd_bwd(fn)), q, k, v, do, iters=iters)
        row = {"seq": seq, "mask": "causal" if window is None else f"window{window}", "impl": impl,
               "fwd_s": fwd, "fwd_bwd_s": fb}
        print(format_table([row], list(row)).splitlines()[-1], flush=True)
        rows.append(row)
  return rows


def run_memory(seqs, impls) -> list[dict[str, Any]]:
  rows = []
  for seq in seqs:
    for impl in impls:
      fn = _fn(impl, None)
      fwd = compiled_memory_bytes(fn, *_shapes(seq)[:3])
      fb = compiled_memory_bytes(_fwd_bwd(fn), *_shapes(seq))
      rows.append({"seq": seq, "mask": "causal", "impl": impl, "fwd_peak_MiB": fwd["peak"] / 2**20,
                   "fwd_bwd_peak_MiB": fb["peak"] / 2**20, "fwd_bwd_temp_MiB": fb["temp"] / 2**20})
  return rows


def aims(timing, memory, big: int, mid: int, long: int) -> list[dict[str, Any]]:
  """The issue's three aims as ratios (None where a number is missing)."""
  out = []
  mx, md = find_row(memory, seq=big, impl="xla"), find_row(memory, seq=big, impl="dpa")
  if mx and md:
    r = mx["fwd_bwd_peak_MiB"] / md["fwd_bwd_peak_MiB"]
    out.append({"aim": f"memory xla/dpa fwd+bwd @ {big}", "ratio": r, "target": "< 0.125", "met": r < 0.125})
  tx, td = find_row(timing, seq=mid, impl="xla", mask="causal"), find_row(timing, seq=mid, impl="dpa", mask="causal")
  if tx and td:
    r = tx["fwd_bwd_s"] / td["fwd_bwd_s"]
    out.append({"aim": f"time xla/dpa fwd+bwd @ {mid}", "ratio": r, "target": "<= 1.5", "met": r <= 1.5})
  tc = find_row(timing, seq=long, impl="xla", mask="causal")
  tw = find_row(timing, seq=long, impl="xla", mask=f"window{WINDOW}")
  if tc and tw:
    for key, label in (("fwd_s", "fwd"), ("fwd_bwd_s", "fwd+bwd")):
      r = tc[key] / tw[key]
      out.append({"aim": f"speed-up window{WINDOW}/causal xla {label} @ {long}", "ratio": r, "target": ">= 3",
                  "met": r >= 3})
  return out


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(prog="python -m experiments.benchmark attention", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="small run: seq 256/512/1024, memory up to 2048")
  p.add_argument("--out", default="bench_results/attention.json")
  p.add_argument("--iters", type=int, default=3)
  args = p.parse_args(argv)
  if args.quick:
    time_seqs, mem_seqs = (256, 512, 1024), (512, 2048)
  else:
    time_seqs, mem_seqs = (512, 2048, 8192), (512, 2048, 8192, 16384)
  impls = ["xla", "reference", "dpa"]
  # Other jobs on a shared machine slow every number; the load says how much to trust them.
  load_start = os.getloadavg()[0]
  print(f"attention benchmark on {jax.default_backend()} (batch {BATCH}, heads {HEADS}, head_dim {HEAD_DIM}, "
        f"float32; dpa = jax.nn.dot_product_attention); load average {load_start:.2f} on {os.cpu_count()} CPUs")
  timing = run_timing(time_seqs, impls, args.iters)
  memory = run_memory(mem_seqs, impls)
  result = aims(timing, memory, mem_seqs[-1], time_seqs[1], time_seqs[-1])
  load_end = os.getloadavg()[0]
  print("\ntime (seconds, median)")
  print(format_table(timing, ["seq", "mask", "impl", "fwd_s", "fwd_bwd_s"]))
  print("\npeak memory from the compiled programs' memory analysis (not run)")
  print(format_table(memory, ["seq", "mask", "impl", "fwd_peak_MiB", "fwd_bwd_peak_MiB", "fwd_bwd_temp_MiB"]))
  print("\naims")
  print(format_table(result, ["aim", "ratio", "target", "met"]))
  print(f"load average at the end: {load_end:.2f}")
  write_json(args.out, {"config": {"batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM, "window": WINDOW,
                                   "quick": args.quick},
                        "load_average": {"start": load_start, "end": load_end},
                        "timing": timing, "memory": memory, "aims": result})
