r"""The model zoo on the memory benchmark suite: every tiny model, trained under one protocol, evaluated, compared.

  python -m experiments.zoo [--tasks mqar256,passkey1k,niah1k] [--lrs 1e-3,3e-3,1e-2] [--stages 250,500,1000,2000]
      [--lengths 1k,4k,16k] [--only transformer,gdn] [--set key=value ...]

For each training task it runs `experiments.sweep` over ZOO (every model, the learning rates, one seed; finished
runs are reused and unfinished ones resume: the sweep skips what is done) in runs/sweep_<task>, the directory the
Titans and MoM results sweeps use with the same protocol (PROTOCOL below, the same labels), so a run trained by
either is trained once; then `experiments.evaluate` on the best learning rate's run of every model (an
evaluation already written for that checkpoint step is reused), and `experiments.compare` over those runs,
written to bench_results/zoo_<task>.{md,json,png}. It goes stage by stage (every task to 250 steps, then every
task to 500, ...), each stage ending in those tables: stopping it at any point and running it again continues,
and the tables on disk are those of the last finished stage. A run directory trained under another protocol
(e.g. another batch size) is refused by the sweep, naming the differences: move it away.
Tasks: mqar256 (the Zoology MQAR mixture), passkey1k and niah1k (trained at 1k, evaluated to 16k); see
experiments/sweep.py.

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
EVAL_TASKS = {"mqar256": "mqar", "passkey1k": "passkey", "niah1k": "niah_noise"}


def available() -> dict[str, str]:
  """The ZOO entries whose config file exists."""
  return {label: spec for label, spec in ZOO.items() if os.path.isfile(spec.partition(":")[0])}


def latest_step(workdir: str) -> int | None:
  from memarch.checkpoint import Checkpointer  # noqa: PLC0415

  steps = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1_000_000, async_save=False).all_steps()
  return max(steps) if steps else None


def evaluated_at(workdir: str, step: int | None) -> bool:
  path = os.path.join(workdir, "eval", "results.json")
  if not os.path.exists(path) or step is None:
    return False
  with open(path) as f:
    return json.load(f).get("step") == step


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tasks", default="mqar256,passkey1k,niah1k")
  p.add_argument("--lrs", default="1e-3,3e-3,1e-2")
  p.add_argument("--stages", default="250,500,1000,2000",
                 help="training steps at which every model is evaluated (the sweep's --stages); the last is final")
  p.add_argument("--lengths", default="1k,4k,16k")
  p.add_argument("--num_examples", type=int, default=32)
  p.add_argument("--only", default="", help="comma-separated labels of ZOO to run (default: all available)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="extra overrides for every run after PROTOCOL (a changed protocol needs its own run "
                      "directories: the sweep refuses to extend runs of another one)")
  args = p.parse_args(argv)
  models = available()
  if args.only:
    models = {k: v for k, v in models.items() if k in args.only.split(",")}
  tasks = [t for t in args.tasks.split(",") if t]
  for task in tasks:
    if task not in EVAL_TASKS:
      raise ValueError(f"--tasks: {task!r} is not one of {sorted(EVAL_TASKS)}.")
  # Stage by stage across the tasks, each stage ending in a table: a zoo stopped at any point has the
  # comparison of its last finished stage on disk, for every task.
  for steps in sorted({int(x) for x in args.stages.split(",") if x}):
    for task in tasks:
      run_task_stage(task, steps, models, args)


def run_task_stage(task: str, steps: int, models: dict[str, str], args) -> None:
  """Every model of `models` trained to `steps` on `task` (best of the lrs), its best run evaluated, compared."""
  sets = [x for item in [*PROTOCOL, *args.overrides] for x in ("--set", item)]
  summary = sweep.main(["--name", f"zoo_{task}", "--task", task, "--lrs", args.lrs, "--stages", str(steps),
                        "--workdir", os.path.join("runs", f"sweep_{task}"), *sets,
                        "--configs", *[f"{k}={v}" for k, v in models.items()]])
  runs = []
  for m in summary["models"]:
    best = next(r for r in summary["runs"] if r["label"] == m["label"] and r["lr"] == m["best_lr"])
    if best["diverged"]:
      continue
    # The latest checkpoint may be past this stage when another sweep trained the run further: the
    # evaluation names the step it used (compare's table shows it).
    if not evaluated_at(best["workdir"], latest_step(best["workdir"])):
      evaluate.evaluate(best["workdir"], tasks=[EVAL_TASKS[task]], lengths=evaluate.parse_lengths(args.lengths),
                        num_examples=args.num_examples)
    runs.append(best["workdir"])
  if runs:
    compare.compare(runs, os.path.join("bench_results", f"zoo_{task}"))
    print(f"zoo {task} at step {steps}: bench_results/zoo_{task}.md", flush=True)

if __name__ == "__main__":
  main()
