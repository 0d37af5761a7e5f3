"""Benchmark of one Titans NeuralMemory layer: forward+backward tokens/s and time against sequence length.

  python -m experiments.benchmark titans [--quick] [--chunk-size 16] [--out bench_results/titans.json]

The layer of `memarch.layers.neural_memory` (projections, short convolutions, gates, the chunked memory
update of `memarch.memory.neural`, output norm, gate and projection) at batch 1, d_model 256, 4 heads
(head_dim 64), memory chunk 16, memory depth 2, expansion 4, momentum and forgetting on (the gates come from
the layer's projections, so eta and alpha are neither 0 nor switched off), float32, for seq in
{1024, 2048, 4096, 8192, 16384}. "fwd" is the layer's output; "fwd+bwd" one call returning the gradients of
<y, dy> with respect to every parameter and the input. Times are medians after a warm-up (compilation
excluded); peak memory comes from the compiled programs' memory analysis. The time per token at each length
divided by the one at 1024 shows whether the cost is linear in the sequence (1.0 is linear).

When PyTorch and titans-pytorch import (an optional extra, never required: `pip install torch==2.13.0
titans-pytorch`), the same run times titans-pytorch's NeuralMemory at the same shape (seq 1024, its
forward+backward) and prints the ratio.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from experiments.benchmarks.harness import compiled_memory_bytes, format_table, time_fn, write_json
from memarch.layers.neural_memory import NeuralMemory

BATCH, D_MODEL, HEADS, DEPTH, EXPANSION = 1, 256, 4, 2, 4


def layer_config(chunk: int) -> ml_collections.FrozenConfigDict:
  """The model-section keys the NeuralMemory block reads (see configs/titans.py for their meaning)."""
  return ml_collections.FrozenConfigDict(dict(
      embed_dim=D_MODEL, num_heads=HEADS, head_dim=0, conv_width=4, memory_depth=DEPTH,
      memory_expansion=EXPANSION, memory_activation="silu", memory_residual=False, memory_chunk_size=chunk,
      memory_read="after", theta_max=0.02, memory_ema_momentum=True, norm_eps=1e-6, compute_dtype="float32", num_layers=1,
  ))


def build(chunk: int, seq: int):
  """(forward fn, fwd+bwd fn, params, x, dy) for one layer at this length."""
  layer = NeuralMemory(layer_config(chunk))
  kx, kp, kd = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (BATCH, seq, D_MODEL), jnp.float32)
  dy = jax.random.normal(kd, (BATCH, seq, D_MODEL), jnp.float32)
  params = nn.meta.unbox(jax.jit(layer.init)(kp, x[:, :min(seq, 64)]))

  def fwd(p, x):
    return layer.apply(p, x)[0]

  def fwd_bwd(p, x, dy):
    return jax.grad(lambda p, x: jnp.vdot(fwd(p, x), dy), argnums=(0, 1))(p, x)

  return fwd, fwd_bwd, params, x, dy


def run(seqs, chunk: int, iters: int) -> list[dict[str, Any]]:
  rows = []
  cols = ["seq", "fwd_s", "fwd_bwd_s", "fwd_bwd_tok_per_s", "time_per_token_vs_first", "fwd_bwd_peak_MiB"]
  for i, seq in enumerate(seqs):
    fwd, fwd_bwd, params, x, dy = build(chunk, seq)
    mem = compiled_memory_bytes(fwd_bwd, params, x, dy)["peak"]
    t_f = time_fn(jax.jit(fwd), params, x, iters=iters)
    t_fb = time_fn(jax.jit(fwd_bwd), params, x, dy, iters=iters)
    row = {"seq": seq, "fwd_s": t_f, "fwd_bwd_s": t_fb, "fwd_bwd_tok_per_s": BATCH * seq / t_fb,
           "fwd_bwd_peak_MiB": mem / 2**20}
    first = rows[0] if rows else row
    row["time_per_token_vs_first"] = (t_fb / seq) / (first["fwd_bwd_s"] / first["seq"])
    lines = format_table([row], cols).splitlines()
    print("\n".join(lines if i == 0 else lines[-1:]), flush=True)
    rows.append(row)
  return rows


def titans_pytorch_row(seq: int, chunk: int, iters: int) -> dict[str, Any] | None:
  """titans-pytorch's NeuralMemory fwd+bwd at the same shape, or None when torch/titans_pytorch are absent."""
  try:
    import torch
    from titans_pytorch import MemoryMLP
    from titans_pytorch import NeuralMemory as TorchNeuralMemory
  except ImportError as e:
    print(f"titans-pytorch comparison skipped ({e}); it is optional: pip install torch==2.13.0 titans-pytorch")
    return None
  torch.manual_seed(0)
  head_dim = D_MODEL // HEADS
  mem = TorchNeuralMemory(dim=D_MODEL, chunk_size=chunk, heads=HEADS, dim_head=head_dim, momentum=True,
                          model=MemoryMLP(dim=head_dim, depth=DEPTH, expansion_factor=float(EXPANSION)))
  x = torch.randn(BATCH, seq, D_MODEL, requires_grad=True)

  def once():
    out = mem(x)
    y = out[0] if isinstance(out, tuple) else out
    y.sum().backward()

  once()  # warm-up
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    once()
    times.append(time.perf_counter() - t0)
  t = sorted(times)[len(times) // 2]
  return {"impl": "titans-pytorch", "seq": seq, "fwd_bwd_s": t, "fwd_bwd_tok_per_s": BATCH * seq / t,
          "torch": torch.__version__}


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(prog="python -m experiments.benchmark titans", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="seq 1024 and 4096 only, one timing iteration")
  p.add_argument("--chunk-size", type=int, default=16, help="the memory's chunk size")
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--out", default="bench_results/titans.json")
  args = p.parse_args(argv)
  seqs = (1024, 4096) if args.quick else (1024, 2048, 4096, 8192, 16384)
  iters = 1 if args.quick else args.iters
  print(f"NeuralMemory layer on {jax.default_backend()}: batch {BATCH}, d_model {D_MODEL}, {HEADS} heads, "
        f"chunk {args.chunk_size}, depth {DEPTH}, expansion {EXPANSION}, momentum and forgetting on, float32\n")
  rows = run(seqs, args.chunk_size, iters)
  torch_row = titans_pytorch_row(seqs[0], args.chunk_size, iters)
  comparison = None
  if torch_row is not None:
    ratio = torch_row["fwd_bwd_s"] / rows[0]["fwd_bwd_s"]
    comparison = {**torch_row, "memarch_speedup": ratio, "aim": ">= 20", "met": ratio >= 20}
    print("\n" + format_table([comparison], ["impl", "seq", "fwd_bwd_s", "fwd_bwd_tok_per_s", "memarch_speedup"]))
  write_json(args.out, {"config": {"batch": BATCH, "d_model": D_MODEL, "heads": HEADS, "depth": DEPTH,
                                   "expansion": EXPANSION, "chunk_size": args.chunk_size, "quick": args.quick},
                        "rows": rows, "titans_pytorch": comparison})
