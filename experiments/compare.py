r"""Compares evaluated runs: one table (Markdown and JSON) and one set of plots.

  python -m experiments.compare runs/a runs/b ... [--out bench_results/compare]

Each run must have been evaluated (`python -m experiments.evaluate --workdir runs/a ...`, which writes
`<run>/eval/results.json`). One row per run: accuracy per task and length (mean over depths; for MQAR over the
kv settings of that length), parameters, decoding-state bytes per sequence at the training length and at the
longest evaluated length (attention: its KV cache; memories: their state), and training tokens/s (median of
metrics.jsonl's train intervals after the first), and "tf acc": the training loop's teacher-forced token
accuracy at the evaluated step, averaged over its eval sets (it tells apart runs whose generated answers are all
wrong but some of whose answer tokens are right). Writes `<out>.md`, `<out>.json`, `<out>_accuracy.png`
(accuracy against length per task) and, when a run was evaluated on MQAR, `<out>_mqar_state.png` (Zoology's plot:
MQAR accuracy against state size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

import jax
import numpy as np

from experiments import evaluate as evaluate_lib
from experiments import sweep


def state_bytes(config, length: int) -> int | None:
  """Bytes of one sequence's decoding state at `length` (None if the model cannot hold that length)."""
  from memarch import data as data_lib  # noqa: PLC0415
  from memarch.models import build_model  # noqa: PLC0415
  from memarch.train import resolve_model_config  # noqa: PLC0415

  model = build_model(resolve_model_config(config, data_lib.data_info(config.data)))
  try:
    cache = jax.eval_shape(lambda: model.init_cache(1, length))
  except ValueError:
    return None
  return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache)))


def run_name(workdir: str) -> str:
  """The run's directory name; a sweep's `<label>/lr<lr>` directories are named with their model's label."""
  path = os.path.normpath(workdir)
  base = os.path.basename(path)
  return f"{os.path.basename(os.path.dirname(path))}/{base}" if base.startswith("lr") else base


def teacher_forced_accuracy(workdir: str, step: int) -> float | None:
  """The mean token accuracy over the training loop's eval sets at `step` (each answer token given the right
  previous ones; metrics.jsonl), or None when the run logged no evaluation at that step. It separates runs that
  exact match scores alike (every answer wrong, some digits right)."""
  from memarch.metrics import read_metrics  # noqa: PLC0415

  rows = [r for r in read_metrics(workdir) if r.get("split") == "eval" and r.get("step") == step]
  acc = sweep.mean_accuracy(rows[-1]) if rows else float("nan")
  return None if math.isnan(acc) else acc


def summarize(workdir: str) -> dict[str, Any]:
  """The comparison row of one evaluated run."""
  path = os.path.join(workdir, "eval", "results.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run `python -m experiments.evaluate --workdir {workdir}` first.")
  with open(path) as f:
    res = json.load(f)
  config = evaluate_lib.load_config(workdir)
  params, train_state = sweep.model_sizes(config)
  acc: dict[str, list[float]] = {}
  for r in res["results"]:
    if r["status"] == "ok":
      acc.setdefault(f"{r['task']}@{r['length']}", []).append(r["accuracy"])
  ok_lengths = [r["length"] for r in res["results"] if r["status"] == "ok" and r["length"]]
  longest = max(ok_lengths) if ok_lengths else None
  mqar = [r["accuracy"] for r in res["results"] if r["task"] == "mqar" and r["status"] == "ok"]
  # Every DecoderLM registers as "transformer": name its block types (as the run banner does).
  blocks = config.model.get("layer_blocks")
  model = f"{res['model']} [{', '.join(blocks)}]" if blocks else res["model"]
  return {
      "run": run_name(workdir), "workdir": os.path.abspath(workdir),
      "model": model, "data": res["data"], "step": res["step"], "train_length": res["train_length"],
      "params": params, "state_bytes_train_length": train_state, "longest_length": longest,
      "state_bytes_longest": state_bytes(config, longest) if longest else None,
      "train_tokens_per_sec": sweep.train_tokens_per_sec(workdir),
      "teacher_forced_accuracy": teacher_forced_accuracy(workdir, res["step"]),
      "accuracy": {k: float(np.mean(v)) for k, v in sorted(acc.items())},
      "mqar_accuracy": float(np.mean(mqar)) if mqar else None,
      "skipped": sorted({f"{r['task']}@{r['length']}" if r["length"] else r["task"]
                         for r in res["results"] if r["status"] == "skipped"}),
  }


def _sort_key(col: str):
  task, _, length = col.partition("@")
  return task, int(length)


def markdown(rows: list[dict[str, Any]]) -> str:
  cols = sorted({c for r in rows for c in r["accuracy"]}, key=_sort_key)
  head = ["run", "model", "step", "params", "state bytes (train len)", "state bytes (longest)", "train tok/s",
          "tf acc", *cols]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    tps = r["train_tokens_per_sec"]
    cells = [r["run"], r["model"], str(r["step"]), f"{r['params']:,}", f"{r['state_bytes_train_length']:,}",
             f"{r['state_bytes_longest']:,}" if r["state_bytes_longest"] else "-",
             f"{tps:,.0f}" if tps else "-"]
    tf = r.get("teacher_forced_accuracy")
    cells.append("-" if tf is None else f"{tf:.3f}")
    cells += [f"{r['accuracy'][c]:.3f}" if c in r["accuracy"] else "-" for c in cols]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: str) -> list[str]:
  """Accuracy against length per task (a panel each) and MQAR accuracy against state size."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  paths = []
  tasks = sorted({c.partition("@")[0] for r in rows for c in r["accuracy"]})
  if tasks:
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.3), squeeze=False)
    for ax, task in zip(axes[0], tasks):
      for r in rows:
        pts = sorted((int(c.partition("@")[2]), v) for c, v in r["accuracy"].items() if c.partition("@")[0] == task)
        if pts:
          ax.plot(*zip(*pts), marker="o", label=r["run"])
      ax.set_xscale("log", base=2)
      ax.set_ylim(-0.02, 1.02)
      ax.set_title(task)
      ax.set_xlabel("length")
      ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out + "_accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  if all(r["mqar_accuracy"] is None for r in rows):  # no MQAR evaluation: no Zoology plot
    return paths
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for r in rows:
    if r["mqar_accuracy"] is not None:
      ax.scatter(r["state_bytes_train_length"], r["mqar_accuracy"])
      ax.annotate(r["run"], (r["state_bytes_train_length"], r["mqar_accuracy"]), fontsize=7)
  ax.set_xscale("log")
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("decoding state bytes per sequence (training length)")
  ax.set_ylabel("MQAR accuracy")
  ax.set_title("MQAR accuracy vs state size")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.append(out + "_mqar_state.png")
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)
  return paths


def compare(workdirs: list[str], out: str) -> dict[str, Any]:
  """Builds the table and plots for `workdirs`; writes <out>.md, <out>.json and PNGs; returns the JSON."""
  if not workdirs:
    raise ValueError("compare: give at least one evaluated run directory.")
  rows = [summarize(w) for w in workdirs]
  names = [r["run"] for r in rows]
  for r, w in zip(rows, workdirs):  # runs of one name from different directories: name them by their parent too
    if names.count(r["run"]) > 1:
      r["run"] = os.path.join(os.path.basename(os.path.dirname(os.path.normpath(w))), r["run"])
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  table = markdown(rows)
  result = {"runs": rows, "plots": plot(rows, out)}
  with open(out + ".md", "w") as f:
    f.write(table + "\n")
  with open(out + ".json", "w") as f:
    json.dump(result, f, indent=1)
  return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--out", default="bench_results/compare", help="path prefix of the .md/.json/.png files")
  args = parser.parse_args(argv)
  result = compare(args.workdirs, args.out)
  with open(args.out + ".md") as f:
    print(f.read())
  print(f"wrote {args.out}.md, {args.out}.json and {len(result['plots'])} plots")
  return result


if __name__ == "__main__":
  main()
