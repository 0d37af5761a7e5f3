r"""Summary of the MoM results sweep (issue #6): accuracy per MQAR setting against recurrent state size.

  python -m experiments.mom_results.summarize runs/sweep_mom_mqar256

For every model directory under the sweep's workdir (`<label>/lr<lr>/`), the best lr by mean eval accuracy,
its accuracy per eval set, the steady-state training tokens/s (median over the logged intervals after the
first, from the differences of the cumulative rates that the loop logs: the first interval holds the
compilation), and the decoding state bytes per sequence computed from the run's config
(`jax.eval_shape` of `init_cache(1, seq_len)`: memories' states and conv caches; attention's KV cache at the
training length).
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import ml_collections
import numpy as np


def interval_tokens_per_sec(metrics_path: str) -> float | None:
  rows = [json.loads(line) for line in open(metrics_path)]
  train = [r for r in rows if r["split"] == "train" and r.get("steps_per_sec")]
  # The loop logs cumulative rates since its start: elapsed_i = step_i / steps_per_sec_i.
  ends = [(r["step"], r["step"] / r["steps_per_sec"], r["tokens_per_sec"] / r["steps_per_sec"]) for r in train]
  rates = [(s1 - s0) * tok / (t1 - t0) for (s0, t0, tok), (s1, t1, _) in zip(ends, ends[1:]) if t1 > t0]
  return float(np.median(rates)) if rates else None


def state_bytes(config_path: str) -> int:
  from memarch.models import build_model  # noqa: PLC0415

  config = json.load(open(config_path))
  model = build_model(ml_collections.FrozenConfigDict(config["model"]))
  cache = jax.eval_shape(lambda: model.init_cache(1, config["data"]["seq_len"]))
  return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache)))


def main(root: str) -> None:
  rows = []
  for label in sorted(os.listdir(root)):
    runs = []
    for lr_dir in sorted(os.listdir(os.path.join(root, label))):
      d = os.path.join(root, label, lr_dir)
      if not os.path.exists(os.path.join(d, "final_metrics.json")):
        continue
      ev = json.load(open(os.path.join(d, "final_metrics.json")))["eval"]
      accs = {k.rsplit("/", 1)[0]: v for k, v in ev.items() if k.endswith("/accuracy")}
      runs.append((np.mean(list(accs.values())), lr_dir, accs, d))
    if not runs:
      continue
    mean, lr_dir, accs, d = max(runs)
    rows.append({"model": label, "best": lr_dir, **{k: round(v, 4) for k, v in sorted(accs.items())},
                 "mean": round(float(mean), 4), "train_tok/s": round(interval_tokens_per_sec(os.path.join(d, "metrics.jsonl")) or 0),
                 "state_bytes": state_bytes(os.path.join(d, "config.json")),
                 "all_lrs": " ".join(f"{r[1]}:{r[0]:.4f}" for r in sorted(runs, key=lambda r: r[1]))})
  keys = list(rows[0])
  print(" | ".join(keys))
  for r in rows:
    print(" | ".join(str(r.get(k, "")) for k in keys))


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "runs/sweep_mom_mqar256")
