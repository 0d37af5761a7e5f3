r"""Whole-model benchmarks: training throughput, time per token against length, decoding, roofline, compile.

  python -m experiments.benchmark models --what throughput,scaling,decode,roofline,compile [--models a,b] [--quick]

Run it pinned to one core (`taskset -c 1 python -m experiments.benchmark models ...`): XLA's CPU thread pool
then has one thread, and the matmul peak of the roofline is measured under the same setting (the JSON records
the cores the process may use). Every model is a config of its family at `size=small` (the shapes of
configs/*.py; `--quick` takes `size=tiny` and short lengths instead), MQAR's vocabulary (8192), float32,
random tokens; the train step is `memarch.train.make_train_step` (forward, backward, AdamW), jitted and
compiled ahead of time (compile time measured separately). Times: runs after compilation while they fit the
time budget per measurement (--budget-s), at least two, the first (which allocates the step's buffers) dropped,
then the median; only a step longer than 10x the budget is timed once. Each step reports its wall time and this process's CPU time: pinned to one core the CPU time is the
computation's own time even when other jobs share the core (the wall time then includes waiting for it), so
ratios (roofline fractions, time per token against length, crossovers) use CPU time; on a quiet machine the
two agree.

Parts (`--what`, comma-separated; each prints a table and writes bench_results/models_<part>.json):
  throughput  tokens/s of a train step of every model at seq 2048, batch 1 (a step takes ~1-4 s on one core
              for the small models; `--batch` to change), all in one run.
  roofline    analytic train FLOPs per step (memarch.flops; its conventions) / step CPU time, as a fraction of
              this machine's float32 matmul throughput (a 2048^3 matmul timed in the same run, best of 5, per CPU
              second; the wall-time fraction next to it). Aims:
              >= 30% for transformer and gdn, >= 20% for the Titans models. Shares the throughput runs.
  compile     compile time of every model's train step (from the throughput runs), and compile time against
              depth (2, 4, 8 layers) of transformer and gdn with model.scan_layers off and on.
  scaling     time per token of a train step at seq 1k, 2k, 4k, 8k, 16k for transformer, lmm, mac, mag, mal,
              gdn, mom, hmt: batch max(1, 4096 // seq) (4096 tokens per step up to 4k, batch 1 beyond). Flags a
              memory model whose time per token at 16k exceeds 1.3x its 2k. PNG: time per token against length
              (log x), with the length where each memory model becomes cheaper per token than full attention.
  decode      per-token latency of decode_step (batch 1, `--decode-steps` chained steps after the context) and
              the decoding state's bytes for contexts 1k..64k, every model. The context is a real prefill of
              the first min(context, 1024) tokens; beyond that the attention KV caches are filled by tiling the
              prefilled keys and values up to the context (a step's cost does not depend on their values) and
              the fixed-size memory states keep the prefilled state, with the position set to the context
              (HMT keeps its streaming state: its per-token cost does not depend on the position). One cache of
              capacity max(context) + steps per model (the attention kernel visits only the key blocks below
              the current length); attention caches larger than --decode-max-cache-gib are skipped with the
              reason. Memory models must be flat in both columns.

Bounded runtime: the full run (every part, 12 models) is about 40-50 min on one quiet core, dominated by XLA's
compilation (20-60 s per program; scaling compiles 40 programs); `--quick` (tiny configs, seq <= 1024) takes a
few minutes. Timings on a loaded machine are noisy: compare ratios measured within one run.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import harness as H
from memarch import flops as flops_lib

# label -> (config spec at size=small, overrides). `--quick` replaces size=small by size=tiny.
MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "transformer": ("configs/transformer.py:size=small", ()),
    "swa": ("configs/transformer.py:size=small", ("model.window=512",)),  # sliding window 512
    "gdn": ("configs/gated_deltanet.py:size=small", ()),
    "linear": ("configs/linear_attention.py:rule=linear,size=small", ()),
    "based": ("configs/based.py:size=small", ()),
    "mom": ("configs/mom.py:size=small", ()),
    "lmm": ("configs/titans.py:variant=lmm,size=small", ()),
    "mac": ("configs/titans.py:variant=mac,size=small", ()),
    "mag": ("configs/titans.py:variant=mag,size=small", ()),
    "mal": ("configs/titans.py:variant=mal,size=small", ()),
    "atlas": ("configs/titans.py:variant=atlas,size=small", ()),
    # HMT over the small Transformer++: segments of 256 tokens with 32 sensory tokens (a long-context setting;
    # the config's default segment of 16 is for the tiny MQAR task).
    "hmt": ("configs/hmt.py:size=small,segment=256,sensory=32", ()),
}
SCALING_MODELS = ("transformer", "lmm", "mac", "mag", "mal", "gdn", "mom", "hmt")
ATTENTION_MODELS = ("transformer",)  # full attention: the reference line of the scaling plot
ROOFLINE_AIMS = {"transformer": 0.30, "gdn": 0.30, "lmm": 0.20, "mac": 0.20, "mag": 0.20, "mal": 0.20,
                 "atlas": 0.20}
PARTS = ("throughput", "roofline", "compile", "scaling", "decode")


class Settings:
  """Lengths and budgets of a run (full or --quick)."""

  def __init__(self, quick: bool, args):
    self.quick = quick
    self.size = "tiny" if quick else "small"
    self.seq = args.seq or (256 if quick else 2048)
    self.batch = args.batch
    self.scaling_seqs = (256, 512, 1024) if quick else (1024, 2048, 4096, 8192, 16384)
    self.scaling_tokens = 1024 if quick else 4096
    self.decode_contexts = (256, 1024, 4096) if quick else tuple(2**i * 1024 for i in range(7))
    self.decode_prefill = 256 if quick else 1024
    self.decode_steps = args.decode_steps
    self.decode_max_cache_bytes = int(args.decode_max_cache_gib * 2**30)
    self.depths = (1, 2) if quick else (2, 4, 8)
    self.budget_s = 4.0 if quick else args.budget_s


def spec_for(label: str, settings: Settings) -> tuple[str, tuple[str, ...]]:
  if label not in MODELS:
    raise ValueError(f"unknown model {label!r}; known: {', '.join(MODELS)}.")
  spec, overrides = MODELS[label]
  return spec.replace("size=small", f"size={settings.size}"), overrides


def _with(config, overrides: dict[str, Any]):
  """A copy of a model section (frozen) with keys replaced or added (e.g. scan_layers)."""
  import ml_collections  # noqa: PLC0415

  d = config.to_dict()
  d.update(overrides)
  return ml_collections.FrozenConfigDict(d)


_TRAIN_CACHE: dict[tuple, dict[str, Any]] = {}


def measure_train(label: str, settings: Settings, *, seq: int, batch: int,
                  model_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """Compile and time one train step; memoized (throughput, roofline and compile share the runs)."""
  key = (label, seq, batch, tuple(sorted((model_overrides or {}).items())))
  if key in _TRAIN_CACHE:
    return _TRAIN_CACHE[key]
  spec, overrides = spec_for(label, settings)
  model_cfg, config = H.model_config(spec, overrides)
  if model_overrides:
    model_cfg = _with(model_cfg, model_overrides)
  step, state, data, mesh = H.train_step_setup(model_cfg, config, batch=batch, seq=seq)
  t = H.time_train_step(step, state, data, mesh, budget_s=settings.budget_s)
  step_s, cpu_s = t["step_s"], t["step_cpu_s"]
  row = {"model": label, "seq": seq, "batch": batch, **t, "tokens_per_s": batch * seq / step_s,
         "tokens_per_cpu_s": batch * seq / cpu_s, "us_per_token": 1e6 * cpu_s / (batch * seq)}
  try:
    fl = flops_lib.model_flops(model_cfg, seq)
    row["train_flops_per_token"] = fl["per_token_train"]
    row["train_gflops_per_s"] = fl["per_token_train"] * batch * seq / step_s / 1e9
    row["train_gflops_per_cpu_s"] = fl["per_token_train"] * batch * seq / cpu_s / 1e9
  except NotImplementedError as e:
    row["train_flops_per_token"] = None
    row["flops_note"] = str(e).split(":")[0]
  row["params"] = H.param_count(state.params)
  del state, step
  _TRAIN_CACHE[key] = row
  return row


def _print_row(rows: list[dict[str, Any]], row: dict[str, Any], columns: list[str]) -> None:
  lines = H.format_table([row], columns).splitlines()
  print("\n".join(lines if len(rows) == 1 else lines[-1:]), flush=True)


# ---------------------------------------------------------------------------------------------------- parts


def part_throughput(labels, settings: Settings, matmul: dict[str, float]) -> dict[str, Any]:
  cols = ["model", "params", "seq", "batch", "step_s", "step_cpu_s", "tokens_per_s", "tokens_per_cpu_s", "compile_s"]
  rows = []
  print(f"\n== throughput: train step (fwd+bwd+AdamW), seq {settings.seq}, batch {settings.batch}, "
        f"size={settings.size}")
  for label in labels:
    rows.append(measure_train(label, settings, seq=settings.seq, batch=settings.batch))
    _print_row(rows, rows[-1], cols)
  return {"rows": rows, "columns": cols}


def part_roofline(labels, settings: Settings, matmul: dict[str, float]) -> dict[str, Any]:
  peak, peak_cpu = matmul["gflops"], matmul["gflops_cpu"]
  cols = ["model", "train_gflop_per_step", "step_cpu_s", "gflops_per_cpu_s", "fraction_of_matmul", "fraction_wall",
          "aim", "met"]
  rows = []
  print(f"\n== roofline: analytic train FLOPs / step CPU time vs the float32 matmul ({peak_cpu:.1f} GFLOP per CPU s, "
        f"{peak:.1f} GFLOP/s wall; {matmul['n']}^3, best of {matmul['iters']}), seq {settings.seq}, batch "
        f"{settings.batch}; fraction_wall: the same with wall times")
  for label in labels:
    r = measure_train(label, settings, seq=settings.seq, batch=settings.batch)
    row = {"model": label, "step_s": r["step_s"], "step_cpu_s": r["step_cpu_s"]}
    if r.get("train_flops_per_token") is None:
      row.update(note=r.get("flops_note"))
    else:
      row["train_gflop_per_step"] = r["train_flops_per_token"] * r["batch"] * r["seq"] / 1e9
      row["gflops_per_cpu_s"] = r["train_gflops_per_cpu_s"]
      row["fraction_of_matmul"] = r["train_gflops_per_cpu_s"] / peak_cpu
      row["fraction_wall"] = r["train_gflops_per_s"] / peak
      if label in ROOFLINE_AIMS:
        row["aim"] = ROOFLINE_AIMS[label]
        row["met"] = bool(row["fraction_of_matmul"] >= ROOFLINE_AIMS[label])
    rows.append(row)
    _print_row(rows, row, cols)
  return {"rows": rows, "columns": cols, "matmul": matmul}


def part_compile(labels, settings: Settings, matmul: dict[str, float]) -> dict[str, Any]:
  cols = ["model", "compile_s"]
  rows = []
  print(f"\n== compile: train step compile time (lower + compile), seq {settings.seq}, batch {settings.batch}")
  for label in labels:
    r = measure_train(label, settings, seq=settings.seq, batch=settings.batch)
    rows.append({"model": label, "compile_s": r["compile_s"]})
    _print_row(rows, rows[-1], cols)
  depth_rows = []
  dcols = ["model", "num_layers", "scan_layers", "compile_s"]
  seq = min(settings.seq, 512)
  print(f"\n-- compile time against depth (seq {seq}, compile only)")
  for label in [m for m in ("transformer", "gdn") if m in labels] or ["transformer"]:
    for depth in settings.depths:
      for scan in (False, True):
        spec, overrides = spec_for(label, settings)
        model_cfg, config = H.model_config(spec, overrides)
        model_cfg = _with(model_cfg, {"num_layers": depth, "scan_layers": scan})
        step, state, data, mesh = H.train_step_setup(model_cfg, config, batch=1, seq=seq)
        with jax.set_mesh(mesh):
          t0 = time.perf_counter()
          step.lower(state, data).compile()
          row = {"model": label, "num_layers": depth, "scan_layers": scan, "compile_s": time.perf_counter() - t0}
        depth_rows.append(row)
        _print_row(depth_rows, row, dcols)
  return {"rows": rows, "columns": cols, "depth_rows": depth_rows, "depth_columns": dcols}


def part_scaling(labels, settings: Settings, matmul: dict[str, float], out_dir: str) -> dict[str, Any]:
  labels = [m for m in labels if m in SCALING_MODELS]
  cols = ["model", "seq", "batch", "step_s", "step_cpu_s", "us_per_token", "vs_ref"]
  rows = []
  ref_seq = settings.scaling_seqs[1]
  print(f"\n== scaling: train step time per token (CPU time, us), batch max(1, {settings.scaling_tokens} // seq); "
        f"vs_ref: time per token / that at {ref_seq}")
  for label in labels:
    for seq in settings.scaling_seqs:
      batch = max(1, settings.scaling_tokens // seq)
      r = dict(measure_train(label, settings, seq=seq, batch=batch))
      base = next((x for x in rows if x["model"] == label and x["seq"] == ref_seq), None)
      r["vs_ref"] = r["us_per_token"] / base["us_per_token"] if base else (1.0 if seq == ref_seq else None)
      rows.append(r)
      _print_row(rows, r, cols)
  flags, crossovers = [], {}
  longest = settings.scaling_seqs[-1]
  for label in labels:
    if label in ATTENTION_MODELS:
      continue
    last = next((r for r in rows if r["model"] == label and r["seq"] == longest), None)
    if last and last["vs_ref"] is not None and last["vs_ref"] > 1.3:
      flags.append({"model": label, "ratio_longest_vs_ref": last["vs_ref"],
                    "note": f"time per token at {longest} is {last['vs_ref']:.2f}x that at {ref_seq} (> 1.3x)"})
    crossovers[label] = crossover(rows, label, ATTENTION_MODELS[0])
  for f in flags:
    print(f"FLAG {f['model']}: {f['note']}")
  for label, x in crossovers.items():
    print(f"{label}: " + ("cheaper per token than full attention from about %d tokens" % x if x else
                          "not cheaper than full attention at any measured length"))
  png = os.path.join(out_dir, "models_scaling.png")
  plot_scaling(rows, labels, crossovers, png)
  return {"rows": rows, "columns": cols, "flags": flags, "crossover_tokens": crossovers, "png": png}


def crossover(rows, label: str, ref: str) -> float | None:
  """The length (log-interpolated) from which `label`'s time per token is below `ref`'s, or None."""
  a = {r["seq"]: r["us_per_token"] for r in rows if r["model"] == label}
  b = {r["seq"]: r["us_per_token"] for r in rows if r["model"] == ref}
  seqs = sorted(set(a) & set(b))
  if not seqs:
    return None
  diff = [a[s] - b[s] for s in seqs]
  if diff[0] < 0:
    return float(seqs[0])
  for (s0, d0), (s1, d1) in zip(zip(seqs, diff), zip(seqs[1:], diff[1:])):
    if d0 >= 0 > d1:
      f = d0 / (d0 - d1)
      return float(math.exp(math.log(s0) + f * (math.log(s1) - math.log(s0))))
  return None


def plot_scaling(rows, labels, crossovers, path: str) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for label in labels:
    pts = sorted((r["seq"], r["us_per_token"]) for r in rows if r["model"] == label)
    style = dict(color="black", linewidth=2.2) if label in ATTENTION_MODELS else {}
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, **style)
    x = crossovers.get(label)
    if x:
      ax.axvline(x, linestyle=":", linewidth=0.8, color=ax.lines[-1].get_color())
  ax.set_xscale("log", base=2)
  ax.set_xlabel("sequence length (tokens)")
  ax.set_ylabel("train step CPU time per token (us)")
  ax.set_title("Time per token vs length (dotted: where a memory model overtakes full attention)", fontsize=8)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"wrote {path}")


def _extend_cache(cache, prefilled: int, context: int):
  """A DecoderLM cache holding `prefilled` real tokens, made to look like `context` tokens: attention KV caches
  ({"k", "v"} of shape [b, capacity, ...]) get their first `prefilled` slots tiled up to `context`; the index is
  set to `context`. Fixed-size states are kept as they are."""
  reps = -(-context // prefilled)

  def fill(x):
    tiled = jnp.concatenate([x[:, :prefilled]] * reps, axis=1)[:, :context]
    return jax.lax.dynamic_update_slice_in_dim(x, tiled, 0, axis=1)

  layers = [dict(c, k=fill(c["k"]), v=fill(c["v"])) if isinstance(c, dict) and "k" in c else c
            for c in cache["layers"]]
  return {"index": jnp.asarray(context, jnp.int32), "layers": layers}


def part_decode(labels, settings: Settings, matmul: dict[str, float]) -> dict[str, Any]:
  from memarch.models import build_model  # noqa: PLC0415

  cols = ["model", "context", "ms_per_token", "wall_ms_per_token", "state_bytes", "note"]
  rows = []
  contexts = settings.decode_contexts
  print(f"\n== decode: decode_step latency (CPU ms per token, and wall; batch 1, {settings.decode_steps} chained "
        f"steps) and state bytes; real "
        f"prefill of min(context, {settings.decode_prefill}) tokens")
  for label in labels:
    spec, overrides = spec_for(label, settings)
    model_cfg, _ = H.model_config(spec, overrides)
    model = build_model(model_cfg)
    state_bytes = {c: H.tree_bytes(jax.eval_shape(lambda c=c: model.init_cache(1, c + settings.decode_steps)))
                   for c in contexts}
    fits = [c for c in contexts if state_bytes[c] <= settings.decode_max_cache_bytes]
    skipped = [c for c in contexts if c not in fits]
    for c in skipped:
      row = {"model": label, "context": c, "state_bytes": state_bytes[c],
             "note": f"skipped: the cache needs {state_bytes[c] / 2**30:.2f} GiB > --decode-max-cache-gib "
                     f"{settings.decode_max_cache_bytes / 2**30:.2f}"}
      rows.append(row)
      _print_row(rows, row, cols)
    if not fits:
      continue
    capacity = max(fits) + settings.decode_steps
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, model_cfg.vocab_size, (1, settings.decode_prefill)),
                         jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens[:, :8])
    cache0 = model.init_cache(1, capacity)
    prefill = jax.jit(lambda p, t, c: model.apply(p, t, c, method=model.prefill))
    decode = jax.jit(lambda p, t, c: model.apply(p, t, c, method=model.decode_step), donate_argnums=(2,))
    is_lm = isinstance(cache0, dict) and "layers" in cache0 and "index" in cache0
    prefilled = {}
    for c in fits:
      n_real = min(c, settings.decode_prefill)
      if n_real not in prefilled:
        prefilled[n_real] = prefill(params, tokens[:, :n_real], cache0)[1]
      cache = jax.tree.map(jnp.copy, prefilled[n_real])  # decode donates its cache: keep the prefilled one
      note = ""
      if c > n_real:
        if is_lm:
          cache = _extend_cache(cache, n_real, c)
          note = "context beyond the prefill simulated"
        else:
          note = f"streaming state after {n_real} tokens (per-token cost independent of position)"
      tok = tokens[:, -1]
      _, cache = decode(params, tok, cache)  # compile (once per model: the cache shapes do not change)
      jax.block_until_ready(cache)
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(settings.decode_steps):
        logits, cache = decode(params, tok, cache)
      jax.block_until_ready(logits)
      dt = (time.perf_counter() - t0) / settings.decode_steps
      dc = (time.process_time() - c0) / settings.decode_steps
      row = {"model": label, "context": c, "ms_per_token": 1e3 * dc, "wall_ms_per_token": 1e3 * dt,
             "state_bytes": state_bytes[c], "note": note}
      rows.append(row)
      _print_row(rows, row, cols)
  flat = {}
  for label in labels:
    got = [r for r in rows if r["model"] == label and r.get("ms_per_token") is not None]
    if len(got) >= 2:
      flat[label] = {"state_bytes_constant": len({r["state_bytes"] for r in got}) == 1,
                     "latency_longest_vs_shortest": got[-1]["ms_per_token"] / got[0]["ms_per_token"]}
  return {"rows": rows, "columns": cols, "flatness": flat}


# ----------------------------------------------------------------------------------------------------- main


def measure_matmul(n: int = 2048, iters: int = 5) -> dict[str, Any]:
  """Best-of-`iters` float32 n x n x n matmul throughput (GFLOP/s) in this process."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x).lower(a).compile()
  jax.block_until_ready(f(a))
  best, best_cpu = math.inf, math.inf
  for _ in range(iters):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(f(a))
    best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
  return {"n": n, "iters": iters, "seconds": best, "gflops": 2 * n**3 / best / 1e9,
          "cpu_seconds": best_cpu, "gflops_cpu": 2 * n**3 / max(best_cpu, 1e-9) / 1e9}


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(prog="python -m experiments.benchmark models", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--what", default=",".join(PARTS), help="comma-separated parts: " + ", ".join(PARTS))
  p.add_argument("--models", default="", help="comma-separated subset of: " + ", ".join(MODELS))
  p.add_argument("--quick", action="store_true", help="tiny configs, short lengths: a few minutes")
  p.add_argument("--seq", type=int, default=0, help="throughput/roofline length (default 2048; quick 256)")
  p.add_argument("--batch", type=int, default=1, help="throughput/roofline batch")
  p.add_argument("--budget-s", type=float, default=10.0, help="timing budget per measurement (after compile)")
  p.add_argument("--decode-steps", type=int, default=16)
  p.add_argument("--decode-max-cache-gib", type=float, default=4.0)
  p.add_argument("--out-dir", default="bench_results")
  args = p.parse_args(argv)
  what = [w for w in args.what.split(",") if w]
  for w in what:
    if w not in PARTS:
      raise SystemExit(f"unknown part {w!r}; choose from {', '.join(PARTS)}.")
  labels = [m for m in args.models.split(",") if m] or list(MODELS)
  for m in labels:
    if m not in MODELS:
      raise SystemExit(f"unknown model {m!r}; choose from {', '.join(MODELS)}.")
  settings = Settings(args.quick, args)
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  print(f"models benchmark on {jax.default_backend()}, {cores} core(s) usable by this process, "
        f"{'quick (tiny configs)' if args.quick else 'full (small configs)'}", flush=True)
  start = time.perf_counter()
  matmul = measure_matmul(512 if args.quick else 2048)
  print(f"float32 matmul {matmul['n']}^3: {matmul['gflops']:.1f} GFLOP/s wall, {matmul['gflops_cpu']:.1f} GFLOP per "
        f"CPU second (best of {matmul['iters']})")
  common = {"settings": {"quick": args.quick, "size": settings.size, "seq": settings.seq, "batch": settings.batch,
                         "cores": cores, "budget_s": settings.budget_s}, "matmul": matmul}
  for part in what:
    t0 = time.perf_counter()
    if part == "scaling":
      result = part_scaling(labels, settings, matmul, args.out_dir)
    else:
      result = globals()[f"part_{part}"](labels, settings, matmul)
    result["part_wall_s"] = time.perf_counter() - t0
    H.write_json(os.path.join(args.out_dir, f"models_{part}{'_quick' if args.quick else ''}.json"),
                 {**common, **result})
  print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")
