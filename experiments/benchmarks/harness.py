"""Shared benchmark utilities: timing, compiled-memory analysis, tables and JSON.

Times are wall-clock medians of `block_until_ready` calls after a warm-up (compilation excluded).
Peak memory comes from the compiled program's memory analysis, so programs too large to run here can
still be measured.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def time_fn(fn: Callable, *args, warmup: int = 1, iters: int = 5, max_seconds: float = 30.0) -> float:
  """Median wall time in seconds of `fn(*args)` (fn should be jitted); stops early after max_seconds."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  start = time.perf_counter()
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
    if time.perf_counter() - start > max_seconds:
      break
  return statistics.median(times)


def compiled_memory_bytes(fn: Callable, *args) -> dict[str, int]:
  """Memory of the compiled `jax.jit(fn)` for these argument shapes, without running it.

  `args` may be arrays or `jax.ShapeDtypeStruct`s. Returns temp, argument, output and peak estimate
  (temp + argument + output - alias) in bytes.
  """
  compiled = jax.jit(fn).lower(*args).compile()
  m = compiled.memory_analysis()
  temp = int(getattr(m, "temp_size_in_bytes", 0))
  arg = int(getattr(m, "argument_size_in_bytes", 0))
  out = int(getattr(m, "output_size_in_bytes", 0))
  alias = int(getattr(m, "alias_size_in_bytes", 0))
  return {"temp": temp, "argument": arg, "output": out, "peak": temp + arg + out - alias}


def matmul_gflops(n: int = 1024, dtype=jnp.float32) -> float:
  """This machine's measured float32 matmul throughput (GFLOP/s) for an n x n x n product."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  t = time_fn(f, a, warmup=2, iters=5)
  return 2 * n**3 / t / 1e9


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
  """A plain-text table of `rows` (dicts) with the given columns; floats get 4 significant digits."""

  def fmt(x):
    if isinstance(x, float):
      return f"{x:.4g}"
    return "-" if x is None else str(x)

  cells = [[fmt(r.get(c)) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
  lines.append("  ".join("-" * w for w in widths))
  lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


def find_row(rows: Sequence[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
  """The first row whose values equal all of `match` (None if there is none)."""
  for r in rows:
    if all(r.get(k) == v for k, v in match.items()):
      return r
  return None


def environment() -> dict[str, Any]:
  """What the numbers were measured on."""
  return {
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }


def write_json(path: str, payload: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"environment": environment(), **payload}, f, indent=2)
  print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------ whole models


def model_config(spec: str, overrides: Sequence[str] = ()):
  """The frozen, vocab-resolved model section of a config spec 'configs/x.py:arg' (with 'model.key=value'
  style overrides as in experiments.sweep's --set), and the full config."""
  from experiments import sweep  # noqa: PLC0415 - keep the harness import light for the kernel benchmarks
  from memarch import data as data_lib  # noqa: PLC0415
  from memarch.train import resolve_model_config  # noqa: PLC0415

  config = sweep.load_config(spec)
  for item in overrides:
    sweep.apply_override(config, item)
  return resolve_model_config(config, data_lib.data_info(config.data)), config


def train_step_setup(model_cfg, config, *, batch: int, seq: int, seed: int = 0, data: dict | None = None):
  """A jitted train step of the model (forward, backward, AdamW update: `memarch.train.make_train_step`) with
  its state and a batch of `[batch, seq]` tokens, `data` (a training batch: inputs, targets, loss_mask, maybe
  segment ids) or else random tokens: `(step, state, batch_dict, mesh)`. Call the step inside
  `jax.set_mesh(mesh)`; it donates nothing, so the same state and batch can be timed repeatedly."""

  from memarch import sharding as shard_lib  # noqa: PLC0415
  from memarch.models import build_model  # noqa: PLC0415
  from memarch.optim import make_optimizer, make_schedule  # noqa: PLC0415
  from memarch.train import create_train_state, make_train_step  # noqa: PLC0415

  model = build_model(model_cfg)
  schedule = make_schedule(config.optim, config.train.steps)
  optimizer = make_optimizer(config.optim, config.train.steps)
  mesh = shard_lib.make_mesh(config.mesh)
  rules = shard_lib.logical_rules(config.mesh)
  state, _ = create_train_state(model, optimizer, seq_len=min(seq, 64), rng=jax.random.key(seed), mesh=mesh,
                                rules=rules)
  if data is None:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, model_cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq), np.float32)}
  data = {k: jnp.asarray(v) for k, v in data.items()}
  if data["inputs"].shape != (batch, seq):
    raise ValueError(f"train_step_setup: data['inputs'] is {data['inputs'].shape}, expected {(batch, seq)}")
  step = jax.jit(make_train_step(model, optimizer, schedule))
  return step, state, data, mesh


def time_calls(fn, *args, budget_s: float, max_iters: int = 5) -> tuple[float, float, int]:
  """(median wall seconds, median CPU seconds of this process, calls timed): the first call (compilation done
  beforehand), then more while the total stays within budget_s.

  CPU time is what the computation itself took on its one core: on a machine shared with other jobs the wall
  time also counts the time this process waited for the core, so ratios within a run use CPU time (on a quiet
  machine the two agree)."""
  walls, cpus = [], []
  start = time.perf_counter()
  while len(walls) < max_iters:
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    walls.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
    # A second call always (unless the first alone took 10x the budget): the first carries one-off costs
    # (allocating the step's buffers, page faults) and is dropped whenever there is another. Measured: a MAC
    # step at 16k timed once read 1.46x the per-token time of 2k (a false "not flat" flag); timed twice, 1.11x.
    if len(walls) >= 2 and time.perf_counter() - start + walls[-1] > budget_s:
      break
    if len(walls) == 1 and walls[0] > 10 * budget_s:
      break
  keep = slice(1, None) if len(walls) >= 2 else slice(None)
  return float(np.median(walls[keep])), float(np.median(cpus[keep])), len(walls)


def time_train_step(step, state, data, mesh, *, budget_s: float) -> dict[str, Any]:
  """Compiles a `train_step_setup` step ahead of time and times it with `time_calls`: compile_s (lower +
  compile), step_s and step_cpu_s (medians, wall and CPU), timed_steps."""
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    step_s, cpu_s, n = time_calls(lambda s, d: compiled(s, d)[1], state, data, budget_s=budget_s)
  return {"compile_s": compile_s, "step_s": step_s, "step_cpu_s": cpu_s, "timed_steps": n}


def param_count(params) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def tree_bytes(tree) -> int:
  """Bytes of every array (or ShapeDtypeStruct) leaf of a pytree."""
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
