r"""MLP Memory, Memory Decoder and kNN-LM on a byte-level corpus: validation perplexity and inference cost.

  python -m experiments.benchmark mlp_memory [--quick] [--workdir runs/mlp_memory_bench] \
      [--data ../shared/data/tinyshakespeare.txt] [--out bench_results/mlp_memory.json]

Runs the whole pipeline of configs/mlp_memory.py in `--workdir` (byte level, 90/10 split):
  base      the base LM (Transformer++ of width 128, 4 layers: 128-dimensional keys), trained from scratch
  datastore keys/values of the whole training split
  targets   exact kNN (k=32) of the first --train-tokens training positions (leave-one-out) and of the first
            --val-tokens validation positions
  train     MLP Memory and Memory Decoder on alpha * KL(p_kNN || p_mem) + (1 - alpha) * CE (alpha 0.5), with the
            kNN temperature that gives kNN-LM its best validation perplexity
  eval      validation perplexity (the same --val-tokens positions for every method) of the base LM,
            base + kNN-LM, base + MLP Memory, base + Memory Decoder, each at its best lambda
and then times, in one run on the same queries, the inference per token of MLP Memory (one forward on the base
LM's hidden state) against kNN-LM (exact search over the whole datastore + p_kNN). Prints a table, writes
--out (JSON, with each stage's wall time) and a plot of perplexity against lambda next to it.

Resumable: a finished stage (its summary in the workdir) is reused, an interrupted one resumes (the base LM and
the memories from their checkpoints, the datastore from its finished shards). --quick runs a reduced version
(the first 200 kB of the corpus, short trainings) in its own workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import mlp_memory as mm_config
from experiments.benchmarks.harness import format_table, time_fn, write_json
from memarch.knn import knn_lm, pipeline, search
from memarch.knn.datastore import Datastore

# Sized for one loaded CPU core (measured here: the base LM trains at ~1,700 tokens/s, the exact search runs
# ~40 queries/s against a million keys), so that the full run takes about an hour: kNN targets for 24k training
# tokens instead of the issue's ~200k (that search alone would take ~1.5 hours here; --train-tokens 200000 runs it),
# and validation on the first 8k validation tokens (the same ones for every method; --val-tokens 0: all 111k).
FULL = dict(workdir="runs/mlp_memory_bench", max_bytes=0, base_steps=400, train_tokens=24_576, val_tokens=8192,
            memory_steps=600, decoder_steps=300, batch_tokens=1024)
QUICK = dict(workdir="runs/mlp_memory_quick", max_bytes=200_000, base_steps=150, train_tokens=16_384,
             val_tokens=4096, memory_steps=300, decoder_steps=100, batch_tokens=1024)


def _log(msg: str) -> None:
  print(f"[mlp_memory {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _corpus(args) -> str:
  if not os.path.exists(args.data):
    raise FileNotFoundError(f"--data {args.data!r} not found (the benchmark needs a local text file, e.g. "
                            "../shared/data/tinyshakespeare.txt).")
  if not args.max_bytes:
    return os.path.abspath(args.data)
  path = os.path.join(args.workdir, "corpus.txt")
  if not os.path.exists(path):
    with open(args.data, "rb") as f:
      head = f.read(args.max_bytes)
    with open(path, "wb") as f:
      f.write(head)
  return os.path.abspath(path)


def train_base(args, files: str) -> dict:
  from memarch.train import train_and_evaluate  # noqa: PLC0415

  workdir = os.path.join(args.workdir, "base")
  done = os.path.join(workdir, "bench_summary.json")
  if os.path.exists(done):
    return json.load(open(done))
  config = mm_config.get_config(f"stage=base,files={files}")
  config.train.steps = args.base_steps
  config.train.eval_every = config.train.checkpoint_every = max(args.base_steps // 3, 1)
  start = time.time()
  result = train_and_evaluate(config, workdir)
  summary = {"seconds": time.time() - start, "steps": result.step, **result.eval_metrics}
  with open(done, "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def stage_config(args, stage: str, memory: str = "mlp", temperature: float | None = None):
  c = mm_config.get_config(f"stage={stage},memory={memory},base_workdir={os.path.join(args.workdir, 'base')}")
  c.knn.train_tokens, c.knn.val_tokens = args.train_tokens, args.val_tokens
  c.memory_train.steps = args.memory_steps if memory == "mlp" else args.decoder_steps
  c.memory_train.batch_size = args.batch_tokens
  c.memory_train.checkpoint_every = 200
  c.mlp.width, c.mlp.depth, c.mlp.mlp_ratio = 256, 2, 2  # ~0.6M parameters: a few minutes on one core
  if temperature is not None:
    c.knn.temperature = temperature
  return c


def run_stage(args, stage: str, subdir: str, memory: str = "mlp", temperature: float | None = None) -> dict:
  path = os.path.join(args.workdir, "pipeline", subdir, "summary.json")
  if os.path.exists(path):
    _log(f"{stage} {memory if stage == 'train' else ''}: reusing {path}")
    return json.load(open(path))
  _log(f"{stage} {memory if stage == 'train' else ''}: running")
  return pipeline.run_stage(stage_config(args, stage, memory, temperature), os.path.join(args.workdir, "pipeline"))


def best_temperature(args) -> tuple[float, dict]:
  """The kNN temperature with the best validation kNN-LM perplexity (over lambdas), as kNN-LM tunes it."""
  c = stage_config(args, "eval")
  va = np.load(os.path.join(args.workdir, "pipeline", "targets", "val.npz"))
  best, table = None, {}
  for t in c.knn.temperatures:
    lp = np.asarray(knn_lm.knn_target_log_prob(va["dist"], va["nbr_values"], va["next_tokens"], float(t)))
    ppl = float(knn_lm.perplexity_grid(va["lp_lm"], lp, c.knn.lambdas).min())
    table[str(t)] = ppl
    if best is None or ppl < best[1]:
      best = (float(t), ppl)
  return best[0], table


def time_inference(args, n_queries: int = 256) -> dict:
  """Per-token inference time of MLP Memory vs kNN-LM over the whole datastore, same queries, one run."""
  work = os.path.join(args.workdir, "pipeline")
  ds = Datastore.open(os.path.join(work, "datastore"), check=False)
  va = np.load(os.path.join(work, "targets", "val.npz"))
  c = stage_config(args, "eval")
  q = jnp.asarray(va["keys"][:n_queries])
  keys = jnp.asarray(np.asarray(ds.keys), jnp.float32)
  values = jnp.asarray(np.asarray(ds.values))
  padded, sq, block = search.prepare_keys(keys, int(c.knn.block_size))
  vocab = int(json.load(open(os.path.join(work, "memory_mlp", "model_config.json")))["vocab_size"])
  k, temp = int(c.knn.k), float(c.knn.temperature)

  # The datastore and the parameters are arguments, not closed-over constants (a 512 MB constant in a jitted
  # program is slow to compile).
  @jax.jit
  def knn_lm_probs(q, padded, sq, values):
    d, i = search.search_prepared(q, (padded, sq, block), k)
    return knn_lm.knn_log_probs(d, values[i], vocab, temp)

  model, params = pipeline.load_memory(work, "mlp")
  mlp_probs = jax.jit(lambda params, q: jax.nn.log_softmax(model.apply({"params": params}, q), -1))
  t_knn = time_fn(knn_lm_probs, q, padded, sq, values, warmup=1, iters=3, max_seconds=120)
  t_mlp = time_fn(mlp_probs, params, q, warmup=1, iters=10, max_seconds=30)
  return {"queries": n_queries, "datastore_size": int(ds.manifest["size"]), "k": k,
          "knn_lm_ms_per_token": 1e3 * t_knn / n_queries, "mlp_memory_ms_per_token": 1e3 * t_mlp / n_queries,
          "speedup_mlp_over_knn": t_knn / t_mlp}


def plot(results: dict, path: str) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  lams = results["lambdas"]
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for name, label in (("knn_lm", f"kNN-LM (T={results['knn_lm']['temperature']})"),
                      ("memory_mlp", "MLP Memory"), ("memory_decoder", "Memory Decoder")):
    if "curve" in results.get(name, {}):
      ax.plot(lams, results[name]["curve"], marker="o", label=label)
  ax.axhline(results["base"]["perplexity"], color="gray", ls="--", label="base LM")
  ax.set_xlabel("lambda (weight of the memory / kNN distribution)")
  ax.set_ylabel("validation perplexity (bytes)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str]) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="a reduced run (200 kB corpus, short trainings)")
  parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--out", default=None, help="JSON path (default bench_results/mlp_memory[_quick].json)")
  for key in FULL:
    if key != "workdir":
      parser.add_argument("--" + key.replace("_", "-"), type=int, default=None)
  args = parser.parse_args(argv)
  preset = QUICK if args.quick else FULL
  for key, value in preset.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.out = args.out or ("bench_results/mlp_memory_quick.json" if args.quick else "bench_results/mlp_memory.json")
  os.makedirs(args.workdir, exist_ok=True)
  files = _corpus(args)
  times = {}
  _log(f"base LM ({args.base_steps} steps) in {args.workdir}/base")
  times["base_lm_train"] = train_base(args, files)["seconds"]
  times["datastore"] = run_stage(args, "datastore", "datastore")["seconds"]
  targets = run_stage(args, "targets", "targets")
  times["targets (kNN search)"] = targets["seconds"]
  temp, temps = best_temperature(args)
  _log(f"kNN temperature {temp} (validation kNN-LM perplexity by temperature: {temps})")
  mlp = run_stage(args, "train", "memory_mlp", "mlp", temp)
  times["train MLP Memory"] = mlp["seconds"]
  dec = run_stage(args, "train", "memory_decoder", "decoder", temp)
  times["train Memory Decoder"] = dec["seconds"]
  t0 = time.time()
  results = pipeline.run_stage(stage_config(args, "eval", temperature=temp), os.path.join(args.workdir, "pipeline"))
  times["eval"] = time.time() - t0
  _log("timing inference: MLP Memory vs kNN-LM over the full datastore")
  timing = time_inference(args)

  rows = [{"method": "base LM", "perplexity": results["base"]["perplexity"], "lambda": "-"},
          {"method": f"base + kNN-LM (T={results['knn_lm']['temperature']})",
           "perplexity": results["knn_lm"]["perplexity"], "lambda": results["knn_lm"]["lambda"]}]
  for name, label in (("memory_mlp", "base + MLP Memory"), ("memory_decoder", "base + Memory Decoder")):
    r = results.get(name, {})
    rows.append({"method": label, "perplexity": r.get("perplexity"), "lambda": r.get("lambda"),
                 "memory alone": r.get("alone_perplexity")})
  print(f"\nvalidation perplexity ({results['val_tokens']} byte tokens; datastore {targets['datastore_size']} keys, "
        f"kNN targets for {targets['train_queries']} training tokens)")
  print(format_table(rows, ["method", "perplexity", "lambda", "memory alone"]))
  print("\nKL(p_kNN || p_mem) on validation: MLP Memory "
        f"{mlp['val_initial']['kl']:.3f} -> {mlp['val_final']['kl']:.3f}, Memory Decoder "
        f"{dec['val_initial']['kl']:.3f} -> {dec['val_final']['kl']:.3f}")
  print("\ninference per token (same queries, one run):")
  print(format_table([timing], ["queries", "datastore_size", "k", "knn_lm_ms_per_token", "mlp_memory_ms_per_token",
                                "speedup_mlp_over_knn"]))
  print("\nstage wall times (s):")
  print(format_table([{"stage": k, "seconds": float(v)} for k, v in times.items()], ["stage", "seconds"]))
  payload = {"args": vars(args), "perplexity": rows, "eval": results, "kl": {"mlp": mlp, "decoder": dec},
             "temperature_search": temps, "inference": timing, "stage_seconds": times, "targets": targets}
  write_json(args.out, payload)
  plot_path = os.path.splitext(args.out)[0] + "_lambda.png"
  plot(results, plot_path)
  print(f"wrote {plot_path}")
  return payload


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
