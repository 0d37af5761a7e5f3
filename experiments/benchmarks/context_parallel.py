"""Benchmark of context parallelism: per-device memory (and time) of ring attention, the sequence-parallel scan
and the sequence-parallel Titans memory on n simulated devices vs the unsplit op on one device.

  python -m experiments.benchmarks.context_parallel [--devices 4] [--quick] [--out bench_results/context_parallel.json]

(Its own process: the simulated CPU devices must be requested before jax is imported, so it sets
`XLA_FLAGS=--xla_force_host_platform_device_count=N` itself and refuses to run if jax was imported first.)

For each op, the forward + backward (`jax.grad` of a sum of the outputs, all inputs differentiated) is compiled
for one device and for a (1, 1, 1, n) mesh with inputs and gradients split along the sequence; the table gives
the compiled programs' peak memory per device (XLA memory analysis, not run: temp + arguments + outputs) and
the measured wall time. Batch 1, 4 heads,
head dims 64 (Titans: 16, chunk 16), float32. Simulated devices share this machine's CPU cores, so the times
show the overhead of the split (extra work and collectives), not the speed-up of n real devices; the memory
is what one device of n would hold.
"""

from __future__ import annotations

import argparse
import os
import sys

if "jax" in sys.modules:
  raise RuntimeError("experiments.benchmarks.context_parallel must be run in its own process "
                     "(python -m experiments.benchmarks.context_parallel): jax was already imported.")


def _set_devices(argv) -> int:
  n = 4
  for i, a in enumerate(argv):
    if a == "--devices" and i + 1 < len(argv):
      n = int(argv[i + 1])
    elif a.startswith("--devices="):
      n = int(a.split("=", 1)[1])
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
  return n


_set_devices(sys.argv[1:])

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402  pylint: disable=g-import-not-at-top

import kernels  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.benchmarks.harness import (compiled_memory_bytes, environment, format_table, time_fn,  # noqa: E402
                                            write_json)
from memarch.memory import neural  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from memarch.memory import sequence_parallel as memory_sp  # noqa: E402  pylint: disable=g-import-not-at-top

HEADS, DIM, MEM_DIM, MEM_CHUNK = 4, 64, 16, 16
MIB = 2**20


def _inputs(op: str, t: int):
  key = iter(jax.random.split(jax.random.key(0), 12))
  normal = lambda *s: jax.random.normal(next(key), s, jnp.float32)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  if op == "attention":
    return (normal(1, t, HEADS, DIM), normal(1, t, HEADS, DIM), normal(1, t, HEADS, DIM))
  if op == "gated_delta":
    return (unit(normal(1, t, HEADS, DIM)), unit(normal(1, t, HEADS, DIM)), normal(1, t, HEADS, DIM),
            -jax.nn.softplus(normal(1, t, HEADS)), jax.nn.sigmoid(normal(1, t, HEADS)))
  gates = [0.02 * jax.nn.sigmoid(normal(1, t, HEADS)), jax.nn.sigmoid(normal(1, t, HEADS)),
           0.01 * jax.nn.sigmoid(normal(1, t, HEADS))]
  return (unit(normal(1, t, HEADS, MEM_DIM)), normal(1, t, HEADS, MEM_DIM), unit(normal(1, t, HEADS, MEM_DIM)),
          *gates)


def _fns(op: str):
  """(unsplit fn, split fn) of the op's inputs, each returning a pytree of outputs."""
  if op == "attention":
    return (lambda q, k, v: kernels.attention(q, k, v, impl="xla"),
            lambda q, k, v: kernels.ring_attention_sharded(q, k, v, impl="xla"))
  if op == "gated_delta":
    return (lambda q, k, v, g, b: kernels.linear_scan(q, k, v, g=g, beta=b, impl="xla"),
            lambda q, k, v, g, b: kernels.sharded_linear_scan(q, k, v, g=g, beta=b, impl="xla"))
  depth = int(op[-1])  # titans_depth1 / titans_depth2
  spec = neural.MemorySpec(dim=MEM_DIM, depth=depth, expansion=4)
  w0 = neural.broadcast(neural.init_weights(jax.random.key(1), spec, HEADS), 1)
  s0 = tuple(jnp.zeros_like(w) for w in w0)
  return (lambda k, v, q, th, et, al: neural.chunked_update(w0, s0, k, v, q, th, et, al, spec, chunk_size=MEM_CHUNK),
          lambda k, v, q, th, et, al: memory_sp.sharded_update(w0, s0, k, v, q, th, et, al, spec,
                                                               chunk_size=MEM_CHUNK))


def _grad(fn, n_args: int):
  loss = lambda *a: sum(jnp.sum(x) for x in jax.tree.leaves(fn(*a)))
  return jax.grad(loss, argnums=tuple(range(n_args)))


def run(ops, seqs, n: int) -> list[dict]:
  mesh = jax.make_mesh((1, 1, 1, n), ("data", "fsdp", "tensor", "sequence"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  rows = []
  for op in ops:
    for t in seqs[op]:
      args = _inputs(op, t)
      plain, split = (_grad(f, len(args)) for f in _fns(op))
      row = {"op": op, "seq": t, "devices": n}
      args1 = jax.device_put(args, jax.devices()[0])  # no mesh in context: one device
      row["peak_MiB_1dev"] = compiled_memory_bytes(plain, *args1)["peak"] / MIB
      row["time_s_1dev"] = time_fn(jax.jit(plain), *args1, iters=3)
      # Inputs and gradients split along the sequence, as the layers hold them.
      seq_sharding = NamedSharding(mesh, P(None, "sequence"))
      args_n = jax.device_put(args, seq_sharding)
      split_fn = lambda *a: jax.tree.map(lambda g: jax.lax.with_sharding_constraint(g, seq_sharding), split(*a))
      with jax.set_mesh(mesh):
        memn = compiled_memory_bytes(split_fn, *args_n)
        row[f"peak_MiB_per_dev_{n}dev"] = memn["peak"] / MIB
        row[f"time_s_{n}dev_simulated"] = time_fn(jax.jit(split_fn), *args_n, iters=3)
      row["memory_ratio"] = row[f"peak_MiB_per_dev_{n}dev"] / row["peak_MiB_1dev"]
      print(format_table([row], list(row)), flush=True)
      rows.append(row)
  return rows


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--devices", type=int, default=4, help="simulated devices on the sequence axis")
  p.add_argument("--quick", action="store_true", help="the smallest size of each op only")
  p.add_argument("--out", default="bench_results/context_parallel.json")
  a = p.parse_args(argv)
  if len(jax.devices()) < a.devices:
    sys.exit(f"only {len(jax.devices())} devices: run in a fresh process (XLA_FLAGS is set before jax is imported).")
  seqs = {"attention": [4096, 16384], "gated_delta": [4096, 16384], "titans_depth1": [4096],
          "titans_depth2": [4096]}
  if a.quick:
    seqs = {op: s[:1] for op, s in seqs.items()}
  rows = run(list(seqs), seqs, a.devices)
  cols = list(rows[0])
  print(format_table(rows, cols))
  write_json(a.out, {"environment": environment(), "rows": rows})


if __name__ == "__main__":
  main(sys.argv[1:])
