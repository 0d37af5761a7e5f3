r"""What the zoo costs: every zoo model's train step on each zoo task's data, timed in one run, and the CPU time
of a zoo stage from it.

  taskset -c 1 python -m experiments.benchmark zoo [--tasks mqar256,passkey1k,niah1k] [--models lmm,atlas]
      [--batch 2] [--stage 250]

For each (task, model): the config the zoo trains (`experiments.zoo.ZOO`'s spec, the task's data section and
`experiments.zoo.PROTOCOL`: its vocabulary and length), its train step (`memarch.train.make_train_step`:
forward, backward, AdamW) on a real training batch of the task (packed rows with their segment ids, as in
training), compiled ahead of time, then timed as in `experiments.benchmark models` (median after the first
call; CPU time of this process, which on one pinned core is the computation's own time even when other jobs
share the core). `--batch` rows per step (the zoo trains at 16; time per token does not depend on it for these
models, and a smaller batch keeps the run short). From the tokens per CPU second: the CPU hours of one zoo stage,
`--stage` steps at the protocol's batch for each of the zoo's learning rates (evaluation not counted).

Prints a table per task and writes bench_results/zoo_cost.json. Ratios between models are those of one run.
"""

from __future__ import annotations

import argparse
import os

import jax

from experiments.benchmarks import harness as H


def measure(label: str, task: str, batch: int, budget_s: float) -> dict:
  from experiments import sweep, zoo  # noqa: PLC0415
  from memarch import data as data_lib  # noqa: PLC0415
  from memarch.train import resolve_model_config  # noqa: PLC0415

  config = sweep.prepare(zoo.ZOO[label], task, zoo.PROTOCOL, 1e-3)
  model_cfg = resolve_model_config(config, data_lib.data_info(config.data))
  seq = int(config.data.seq_len)
  it = data_lib.create_train_iterator(config.data, batch_size=batch, seed=0, process_index=0, process_count=1)
  step, state, data, mesh = H.train_step_setup(model_cfg, config, batch=batch, seq=seq, data=next(it))
  t = H.time_train_step(step, state, data, mesh, budget_s=budget_s)
  return {"task": task, "model": label, "seq": seq, "batch": batch, "params": H.param_count(state.params), **t,
          "tokens_per_cpu_s": batch * seq / t["step_cpu_s"], "protocol_batch": int(config.train.batch_size)}


def cpu_hours(row: dict, steps: int) -> float:
  """CPU hours of `steps` training steps at the protocol's batch, at the speed of a `measure` row."""
  return steps * row["protocol_batch"] * row["seq"] / row["tokens_per_cpu_s"] / 3600


def main(argv: list[str]) -> dict:
  from experiments import zoo  # noqa: PLC0415

  p = argparse.ArgumentParser(prog="python -m experiments.benchmark zoo", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tasks", default=",".join(zoo.EVAL_TASKS))
  p.add_argument("--models", default="", help="comma-separated labels of experiments.zoo.ZOO (default: all)")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--stage", type=int, default=250, help="steps of the stage whose cost is estimated")
  p.add_argument("--lrs", type=int, default=3, help="learning rates per model in the zoo's sweep")
  p.add_argument("--budget-s", type=float, default=4.0, help="timing budget per model (after compile)")
  p.add_argument("--out", default=os.path.join("bench_results", "zoo_cost.json"))
  args = p.parse_args(argv)
  labels = [m for m in args.models.split(",") if m] or list(zoo.available())
  tasks = [t for t in args.tasks.split(",") if t]
  for m in labels:
    if m not in zoo.ZOO:
      raise SystemExit(f"unknown model {m!r}; choose from {', '.join(zoo.ZOO)}.")
  for t in tasks:
    if t not in zoo.EVAL_TASKS:
      raise SystemExit(f"unknown task {t!r}; choose from {', '.join(zoo.EVAL_TASKS)}.")
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  print(f"zoo cost on {jax.default_backend()}, {cores} core(s) usable; batch {args.batch}; a stage of {args.stage} "
        f"steps x {args.lrs} lrs", flush=True)
  cols = ["model", "params", "seq", "step_cpu_s", "tokens_per_cpu_s", "vs_first", "stage_cpu_h", "compile_s"]
  rows = []
  for task in tasks:
    print(f"\n== {task}", flush=True)
    first = None
    for label in labels:
      row = measure(label, task, args.batch, args.budget_s)
      first = first or row["tokens_per_cpu_s"]
      row["vs_first"] = first / row["tokens_per_cpu_s"]  # how many times slower than the first model
      row["stage_cpu_h"] = cpu_hours(row, args.stage * args.lrs)
      rows.append(row)
      lines = H.format_table([row], cols).splitlines()
      print("\n".join(lines if label == labels[0] else lines[-1:]), flush=True)
    print(f"\n{task} (aligned):\n" + H.format_table([r for r in rows if r["task"] == task], cols), flush=True)
    total = sum(r["stage_cpu_h"] for r in rows if r["task"] == task)
    print(f"{task}: a stage of {args.stage} steps for these {len(labels)} models: {total:.1f} CPU hours", flush=True)
  H.write_json(args.out, {"settings": {"batch": args.batch, "stage": args.stage, "lrs": args.lrs, "cores": cores,
                                       "budget_s": args.budget_s}, "rows": rows, "columns": cols})
  return {"rows": rows}
