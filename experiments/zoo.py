r"""The model zoo on the memory benchmark suite: every tiny model, trained under one protocol, evaluated, compared.

  python -m experiments.zoo [--tasks mqar256,passkey1k] [--lrs 1e-3,3e-3,1e-2] [--stages 250,500,1000,2000]
      [--lengths 1k,4k,16k] [--only transformer,gdn]

For each training task it runs `experiments.sweep` over ZOO (every model, the learning rates, one seed; finished
runs are reused and unfinished ones resume: the sweep skips what is done) in runs/sweep_<task>, the directory the
Titans and MoM results sweeps use with the same protocol (PROTOCOL below, the same labels), so a run trained by
either is trained once; then `experiments.evaluate` on the
best learning rate's run of every model (an evaluation already written for that checkpoint step is reused), and
finally `experiments.compare` over those runs, written to bench_results/zoo_<task>.{md,json,png}. Stopping it
at any point and running it again continues; the table is rebuilt from whatever runs exist.

This is a thin driver: it has not been run to completion here (it takes hours on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os

from experiments import compare, evaluate, sweep

# label -> config spec (the labels of the Titans and MoM results sweeps, whose runs the zoo shares).
ZOO = {
    "transformer": "configs/transformer.py:size=tiny",
    "swa": "configs/transformer.py:size=tiny,window=128",
    "gdn": "configs/gated_deltanet.py:size=tiny",
    "based": "configs/based.py:size=tiny",
    "mom": "configs/mom.py:size=tiny",
    "mac": "configs/titans.py:variant=mac,size=tiny",
    "mag": "configs/titans.py:variant=mag,size=tiny",
    "mal": "configs/titans.py:variant=mal,size=tiny",
    "lmm": "configs/titans.py:variant=lmm,size=tiny",
    "hmt": "configs/hmt.py:size=tiny",
    "atlas": "configs/titans.py:variant=atlas,size=tiny",
}
# The results protocol (Titans issue): the same data, steps, batch and length for every model, a constant
# learning rate after a short warmup, one seed.
PROTOCOL = ["train.batch_size=16", "optim.schedule=constant", "optim.warmup_steps=50", "train.log_every=50",
            "train.eval_every=0", "train.checkpoint_every=50", "train.seed=0"]
EVAL_TASKS = {"mqar256": "mqar", "passkey1k": "passkey"}


def available() -> dict[str, str]:
  """The ZOO entries whose config file exists."""
  return {label: spec for label, spec in ZOO.items() if os.path.isfile(spec.partition(":")[0])}


def evaluated_at(workdir: str, step: int | None) -> bool:
  path = os.path.join(workdir, "eval", "results.json")
  if not os.path.exists(path) or step is None:
    return False
  with open(path) as f:
    return json.load(f).get("step") == step


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tasks", default="mqar256,passkey1k")
  p.add_argument("--lrs", default="1e-3,3e-3,1e-2")
  p.add_argument("--stages", default="250,500,1000,2000",
                 help="training steps at which every model is evaluated (the sweep's --stages); the last is final")
  p.add_argument("--lengths", default="1k,4k,16k")
  p.add_argument("--num_examples", type=int, default=32)
  p.add_argument("--only", default="", help="comma-separated labels of ZOO to run (default: all available)")
  args = p.parse_args(argv)
  models = available()
  if args.only:
    models = {k: v for k, v in models.items() if k in args.only.split(",")}
  for task in [t for t in args.tasks.split(",") if t]:
    if task not in EVAL_TASKS:
      raise ValueError(f"--tasks: {task!r} is not one of {sorted(EVAL_TASKS)}.")
    sets = [x for item in PROTOCOL for x in ("--set", item)]
    summary = sweep.main(["--name", f"zoo_{task}", "--task", task, "--lrs", args.lrs, "--stages", args.stages,
                          "--workdir", os.path.join("runs", f"sweep_{task}"), *sets,
                          "--configs", *[f"{k}={v}" for k, v in models.items()]])
    runs = []
    for m in summary["models"]:
      best = next(r for r in summary["runs"] if r["label"] == m["label"] and r["lr"] == m["best_lr"])
      if best["diverged"]:
        continue
      if not evaluated_at(best["workdir"], summary["protocol"]["steps"]):
        evaluate.evaluate(best["workdir"], tasks=[EVAL_TASKS[task]], lengths=evaluate.parse_lengths(args.lengths),
                          num_examples=args.num_examples)
      runs.append(best["workdir"])
    if runs:
      compare.compare(runs, os.path.join("bench_results", f"zoo_{task}"))


if __name__ == "__main__":
  main()
