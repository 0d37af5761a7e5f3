r"""The model zoo on the memory benchmark suite: every tiny model, trained under one protocol, evaluated, compared.

  python -m experiments.zoo [--tasks mqar256,passkey1k,niah1k] [--lrs 1e-3,3e-3,1e-2] [--stages 250,500,1000,2000]
      [--lengths 1k,4k,16k] [--only transformer,gdn] [--set key=value ...]
  python -m experiments.zoo --status [--tasks ...] [--stages ...]   # how far it is, and the CPU hours left
      [--archive results/zoo]
  python -m experiments.zoo --park [--finished] [--tasks ...] [--only ...]  # keep runs' progress in the archive

For each training task it runs `experiments.sweep` over ZOO (every model, the learning rates, one seed; finished
runs are reused and unfinished ones resume: the sweep skips what is done) in runs/sweep_<task>, the directory the
Titans and MoM results sweeps use with the same protocol (PROTOCOL below, the same labels), so a run trained by
either is trained once; then `experiments.evaluate` on the best learning rate's run of every model at the
stage's checkpoint (the zoo keeps every checkpoint at a multiple of the stages' gcd; an evaluation already
written for that step is reused), and `experiments.compare` over those runs, written to
bench_results/zoo_<task>_step<N>.{md,json,png} and (the stage finished last) bench_results/zoo_<task>.*. It goes
stage by stage (every task to 250 steps, then every task to 500, ...), each stage ending in those tables:
stopping it at any point and running it again continues. A run trained past a stage before its stage checkpoints
were kept is evaluated at its earliest checkpoint after the stage (said, and in the table's step column). The
best lr is chosen by the sweep's selection metric (token accuracy for MQAR, exact match otherwise). Zoos can
run side by side, one per core, each `--only` some models: each trains its own, and its tables show every model
that has finished the stage. A run
directory trained under another protocol (e.g. another batch size) is refused by the sweep, naming the
differences: move it away.

The results outlive the run directories: every run that finishes a stage has its records (config, metrics, stage
result, evaluations; not its checkpoints) copied into the tracked archive (--archive, default results/zoo/<task>/
<label>/lr<lr>/, with the commit that produced them in provenance.json), and each stage's table is written there
too (results/zoo/zoo_<task>_step<N>.{md,json,png}, all of them in results/zoo/README.md). A zoo started where runs/ is missing or partial (a fresh
checkout) first restores the archived records whose protocol matches (experiments/archive.py), so what an earlier
session finished is neither trained nor evaluated again. Commit results/zoo after a stage to keep it. A run
stopped in the middle of a stage keeps its progress across checkouts only when parked: stop the zoo (SIGTERM
saves a checkpoint), then `python -m experiments.zoo --park [--tasks ...] [--only ...]` copies the latest checkpoint
of every such run into the archive (one per run, dropped once the run finishes the stage), and commit results/zoo.
With --finished it also parks the checkpoint of every run that has finished a stage before the last of --stages,
so that the next stage resumes there instead of training from step 0 again (worth its few MB per run for the slow
models; the stage's checkpoint is dropped from the archive once a later stage is archived), and of every run that
has finished the last stage while its model's evaluation of that stage is still to come (it needs the checkpoint).
Tasks: mqar256 (the Zoology MQAR mixture), passkey1k and niah1k (trained at 1k, evaluated to 16k); see
experiments/sweep.py.

This is a thin driver: it has not been run to completion here (to 2000 steps, about 100 CPU hours of training alone
from step 0 at the speeds of results/zoo/zoo_cost.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os

from experiments import archive, compare, evaluate, sweep

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
# Evaluation lengths per task (--lengths overrides them for every task). MQAR at length T adds the setting
# (T, T/4) to the run's own eval settings: (512, 128) is the extrapolation test that the zoo's vocabulary
# (512: 255 key ids) can hold; (1024, 256) needs 256 distinct keys, which it cannot.
EVAL_LENGTHS = {"mqar256": "512", "passkey1k": "1k,4k,16k", "niah1k": "1k,4k,16k"}


def available() -> dict[str, str]:
  """The ZOO entries whose config file exists."""
  return {label: spec for label, spec in ZOO.items() if os.path.isfile(spec.partition(":")[0])}


def stage_checkpoint(workdir: str, steps: int) -> int | None:
  """The checkpoint step at which to evaluate a run at stage `steps`: that step when the run has its checkpoint or
  its kept evaluation (a run trained past the stage since, whose stage checkpoint was not kept, or restored from
  the archive without checkpoints), else the earliest checkpoint after it (a run trained further before stage
  checkpoints were kept), else the latest."""
  if os.path.exists(evaluate.kept_path(workdir, steps)):
    return steps
  have = archive.checkpoint_steps(workdir)
  after = [s for s in have if s >= steps]
  return min(after) if after else (max(have) if have else steps)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tasks", default="mqar256,passkey1k,niah1k")
  p.add_argument("--lrs", default="1e-3,3e-3,1e-2")
  p.add_argument("--stages", default="250,500,1000,2000",
                 help="training steps at which every model is evaluated (the sweep's --stages); the last is final")
  p.add_argument("--lengths", default="", help="evaluation lengths for every task (default: EVAL_LENGTHS)")
  p.add_argument("--num_examples", type=int, default=32)
  p.add_argument("--only", default="", help="comma-separated labels of ZOO to train (default: all available); "
                 "the tables also show every other model whose runs have finished the stage")
  p.add_argument("--status", action="store_true",
                 help="train nothing: print how far every run is at each stage and the CPU hours left (from "
                      "bench_results/zoo_cost.json, `python -m experiments.benchmark zoo`, else the archive's "
                      "zoo_cost.json: `--out results/zoo/zoo_cost.json`); writes bench_results/zoo_status.json")
  p.add_argument("--archive", default=os.path.join("results", "zoo"),
                 help="tracked directory of the finished runs' records and the stage tables ('' for none): "
                      "restored from before anything runs, added to after every stage")
  p.add_argument("--park", action="store_true",
                 help="train nothing: copy the latest checkpoint of every run stopped in the middle of a stage (of "
                      "--tasks, --only, --lrs) into the archive, so that a fresh checkout resumes it there instead "
                      "of at step 0 (stop the zoo first: SIGTERM saves a checkpoint; then commit results/)")
  p.add_argument("--finished", action="store_true",
                 help="with --park: also park each run's checkpoint at a finished stage before the last of "
                      "--stages (a later stage then resumes there instead of at step 0), and at the last stage "
                      "while the model is not evaluated there yet")
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
  stages = sorted({int(x) for x in args.stages.split(",") if x})
  # Every stage's checkpoint outlives the training of the later ones, to be evaluated at its own step.
  args.keep_period = math.gcd(*stages)
  lrs = [float(x) for x in args.lrs.split(",") if x]
  if args.archive:
    restore_archived(tasks, models, lrs, args)
  if args.park:
    if not args.archive:
      raise ValueError("--park needs an --archive to park the checkpoints in.")
    park_unfinished(tasks, list(models), lrs, args.archive, finished_below=stages[-1] if args.finished else None)
    return
  if args.status:
    # The speeds measured here, else those archived with the results (measured on the machine that ran them).
    costs = [os.path.join("bench_results", "zoo_cost.json"), os.path.join(args.archive or "-", "zoo_cost.json")]
    report_status(status(tasks, stages, lrs, list(models), cost_path=next(filter(os.path.exists, costs), costs[0])))
    return
  for steps in stages:
    for task in tasks:
      run_task_stage(task, steps, models, args)


def stage_finished(task: str, label: str, steps: int, lrs: list[float]) -> bool:
  """Whether every lr's run of `label` on `task` has finished stage `steps` (or diverged)."""
  return all(sweep.finished(sweep.run_dir(sweep_root(task), label, lr), steps) for lr in lrs)


def sweep_root(task: str) -> str:
  return os.path.join("runs", f"sweep_{task}")


def protocol_overrides(args) -> list[str]:
  """The overrides every zoo run is trained under: PROTOCOL, the stage checkpoints kept, then --set."""
  keep = [f"train.keep_period={args.keep_period}"] if getattr(args, "keep_period", 0) else []
  return [*PROTOCOL, *keep, *args.overrides]


def restore_archived(tasks: list[str], models: dict[str, str], lrs: list[float], args) -> None:
  """Copies into runs/ the archived records of every (task, model, lr) run that runs/ lacks, when the archived
  run's protocol is this zoo's (an archived run of another protocol is named and left: it will be retrained)."""
  restored, resumable = 0, []
  for task in tasks:
    for label, spec in models.items():
      for lr in lrs:
        archived = sweep.run_dir(os.path.join(args.archive, task), label, lr)
        if not os.path.exists(os.path.join(archived, "config.json")):
          continue
        try:
          sweep.check_resumable(sweep.prepare(spec, task, protocol_overrides(args), lr), archived)
        except ValueError as e:
          print(f"zoo: not restoring {archived}: {e}", flush=True)
          continue
        copied = archive.restore(archived, sweep.run_dir(sweep_root(task), label, lr))
        restored += bool(copied)
        if any(rel.startswith(archive.CHECKPOINTS + os.sep) for rel in copied):
          resumable.append(f"{task}/{label}/lr{lr:g} at step {archive.parked_step(archived)}")
  if restored:
    print(f"zoo: restored the records of {restored} runs from {args.archive}", flush=True)
  if resumable:
    print(f"zoo: restored the parked checkpoints of {', '.join(resumable)}: they resume there", flush=True)


def stage_evaluated(task: str, label: str, steps: int, lrs: list[float]) -> bool:
  """Whether `label`'s stage `steps` on `task` was evaluated: the zoo evaluates the best lr's run, so any
  finished run with an evaluation at the stage's checkpoint means it was."""
  for lr in lrs:
    run = sweep.run_dir(sweep_root(task), label, lr)
    record = sweep.finished(run, steps)
    if (record and os.path.basename(record) != "diverged.json"
        and evaluate.covering(run, stage_checkpoint(run, steps), [EVAL_TASKS[task]])):
      return True
  return False


def park_unfinished(tasks: list[str], labels: list[str], lrs: list[float], archived: str,
                    finished_below: int | None = None) -> list[str]:
  """`archive.park` of every run of the zoo in runs/ stopped between stages, and with `finished_below` (the last
  stage of the zoo) of every run whose latest checkpoint is a finished stage before that step, or at that step
  while the model's stage is not evaluated yet (the evaluation needs the checkpoint: without it a fresh checkout
  would train the whole stage again to evaluate it); returns what was parked."""
  parked = []
  for task in tasks:
    for label in labels:
      below = finished_below
      if finished_below is not None and not stage_evaluated(task, label, finished_below, lrs):
        below = finished_below + 1
      for lr in lrs:
        workdir = sweep.run_dir(sweep_root(task), label, lr)
        kept = sweep.run_dir(os.path.join(archived, task), label, lr)
        if os.path.isdir(workdir) and (step := archive.park(workdir, kept, finished_below=below)) is not None:
          parked.append(f"{task}/{label}/lr{lr:g} at step {step}")
  print(f"zoo: parked the checkpoints of {', '.join(parked)} in {archived}" if parked else
        "zoo: no run stopped between stages: nothing to park", flush=True)
  return parked


def status(tasks: list[str], stages: list[int], lrs: list[float], labels: list[str],
           cost_path: str = os.path.join("bench_results", "zoo_cost.json")) -> dict:
  """How far the zoo is: for every (task, stage, model), each lr's run (trained to the stage, diverged, or the step
  it would resume from), whether the stage was evaluated, and the CPU hours of training left to finish the stage
  at the speeds measured by the zoo-cost benchmark (None for a model it did not measure). Stages are nested:
  a later stage's hours include the earlier ones'."""
  from experiments.benchmarks import zoo as zoo_cost  # noqa: PLC0415

  speed = {}
  if os.path.exists(cost_path):
    with open(cost_path) as f:
      speed = {(r["task"], r["model"]): r for r in json.load(f)["rows"]}
  rows = []
  for task in tasks:
    for steps in stages:
      for label in labels:
        runs, left = {}, 0
        for lr in lrs:
          workdir = sweep.run_dir(sweep_root(task), label, lr)
          record = sweep.finished(workdir, steps)
          have = archive.checkpoint_steps(workdir)
          if record and os.path.basename(record) == "diverged.json":
            runs[f"{lr:g}"] = "diverged"
          elif record:
            runs[f"{lr:g}"] = "done"
          else:
            at = max(have, default=0)
            runs[f"{lr:g}"] = f"at {at}"
            left += max(steps - at, 0)
        trained = all(v in ("done", "diverged") for v in runs.values())
        evaluated = trained and stage_evaluated(task, label, steps, lrs)
        cost = speed.get((task, label))
        hours = zoo_cost.cpu_hours(cost, left) if cost else None
        rows.append({"task": task, "stage": steps, "model": label, "runs": runs, "trained": trained,
                     "evaluated": evaluated, "steps_left": left,
                     "cpu_h_left": None if hours is None else round(hours, 2)})
  return {"lrs": lrs, "cost_file": cost_path if speed else None, "rows": rows}


def report_status(st: dict, out: str = os.path.join("bench_results", "zoo_status.json")) -> None:
  from experiments.benchmarks.harness import format_table, write_json  # noqa: PLC0415

  cols = ["task", "stage", "model", *[f"lr {lr:g}" for lr in st["lrs"]], "evaluated", "steps_left", "cpu_h_left"]
  table = [{**r, **{f"lr {k}": v for k, v in r["runs"].items()}, "evaluated": "yes" if r["evaluated"] else "no"}
           for r in st["rows"]]
  print(format_table(table, cols), flush=True)
  for (task, steps) in dict.fromkeys((r["task"], r["stage"]) for r in st["rows"]):
    mine = [r for r in st["rows"] if (r["task"], r["stage"]) == (task, steps)]
    hours = [r["cpu_h_left"] for r in mine if r["steps_left"]]
    done = sum(r["evaluated"] for r in mine)
    known = "" if all(h is not None for h in hours) else " (models without a zoo-cost row not counted)"
    print(f"{task} stage {steps}: {done}/{len(mine)} models evaluated; "
          f"{sum(h for h in hours if h is not None):.1f} CPU h of training left{known}", flush=True)
  if not st["cost_file"]:
    print("no bench_results/zoo_cost.json: run `python -m experiments.benchmark zoo` for the hours left", flush=True)
  write_json(out, st)


def run_task_stage(task: str, steps: int, models: dict[str, str], args) -> None:
  """Every model of `models` trained to `steps` on `task` (best of the lrs), its best run evaluated, compared
  with every other available model that has finished the stage (zoos run side by side with --only share tables).

  A model another zoo finishes while this one trains joins the table too, once its own zoo has evaluated it: this
  zoo evaluates only the models it was started with (two processes must never write one run directory)."""
  lrs = [float(x) for x in args.lrs.split(",") if x]
  started = {k: v for k, v in available().items() if k in models or stage_finished(task, k, steps, lrs)}
  summary = stage_sweep(task, steps, started, args)
  late = {k: v for k, v in available().items() if k not in started and stage_finished(task, k, steps, lrs)}
  if late:  # every run of the stage is finished now: this sweep trains nothing, it only gathers the results
    print(f"zoo {task}: {', '.join(late)} finished stage {steps} while this zoo ran", flush=True)
    summary = stage_sweep(task, steps, {**started, **late}, args)
  runs = []
  for m in summary["models"]:
    best = next(r for r in summary["runs"] if r["label"] == m["label"] and r["lr"] == m["best_lr"])
    if best["diverged"]:
      continue
    step = stage_checkpoint(best["workdir"], steps)
    if step != steps:
      print(f"  {best['workdir']}: no checkpoint at step {steps} (trained further before stages were kept); "
            f"evaluating step {step}", flush=True)
    lengths = evaluate.parse_lengths(args.lengths or EVAL_LENGTHS[task])
    if not evaluate.reuse(best["workdir"], step, [EVAL_TASKS[task]], lengths):
      if m["label"] in late:
        print(f"  {best['workdir']}: not evaluated yet (its own zoo evaluates it); left out of this table: "
              f"`python -m experiments.zoo --tasks {task} --stages {steps} --only none` rebuilds it", flush=True)
        continue
      evaluate.evaluate(best["workdir"], tasks=[EVAL_TASKS[task]], lengths=lengths, num_examples=args.num_examples,
                        step=step)
    runs.append(best["workdir"])
  archived = getattr(args, "archive", "")
  if archived:  # every finished run of the stage, each lr (the next session's sweep must find them all)
    for r in summary["runs"]:
      if sweep.finished(r["workdir"], steps):
        archive.save(r["workdir"], sweep.run_dir(os.path.join(archived, task), r["label"], r["lr"]))
  if runs:
    outs = [os.path.join("bench_results", f"zoo_{task}_step{steps}"), os.path.join("bench_results", f"zoo_{task}")]
    for out in outs + ([os.path.join(archived, f"zoo_{task}_step{steps}")] if archived else []):
      compare.compare(runs, out)
    if archived:
      write_index(archived, lrs)
    print(f"zoo {task} at step {steps}: bench_results/zoo_{task}_step{steps}.md"
          + (f", archived in {archived}" if archived else ""), flush=True)


def stage_sweep(task: str, steps: int, models: dict[str, str], args) -> dict:
  """`experiments.sweep` of `models` over the lrs to stage `steps` (finished runs reused); its summary."""
  sets = [x for item in protocol_overrides(args) for x in ("--set", item)]
  return sweep.main(["--name", f"zoo_{task}", "--task", task, "--lrs", args.lrs, "--stages", str(steps),
                     "--workdir", sweep_root(task), *sets,
                     "--configs", *[f"{k}={v}" for k, v in models.items()]])


def write_index(archived: str, lrs: list[float]) -> str:
  """`<archive>/README.md`: every archived stage table (task by task, stage by stage) under the protocol, so the
  zoo's results read in one page."""
  import re  # noqa: PLC0415

  tables = sorted((m.group(1), int(m.group(2)), name) for name in os.listdir(archived)
                  if (m := re.fullmatch(r"zoo_(\w+?)_step(\d+)\.md", name)))
  lines = ["# Zoo results", "",
           "Written by `python -m experiments.zoo` after every stage; do not edit. Protocol: "
           f"{', '.join(PROTOCOL)}; each model's best of lr {', '.join(f'{lr:g}' for lr in lrs)} (MQAR by token "
           "accuracy, the others by exact match, ties by token accuracy), evaluated at the stage's checkpoint "
           "(`experiments.evaluate`: prefill and greedy decoding, exact match; MQAR: token accuracy). "
           "'tf acc' is the teacher-forced token accuracy of the training loop's eval sets at that step; train "
           "tok/s was measured on the machine that trained the run, whose commit is in its provenance.json.", ""]
  for task, steps, name in tables:
    with open(os.path.join(archived, name)) as f:
      table = f.read().strip()
    lines += [f"## {task}, stage {steps} ({table.count(chr(10)) - 1} models)", "", table, "",
              f"Plots: [accuracy]({name[:-3]}_accuracy.png)"
              + (f", [MQAR vs state]({name[:-3]}_mqar_state.png)" if task.startswith("mqar") else ""), ""]
  path = os.path.join(archived, "README.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


if __name__ == "__main__":
  main()
