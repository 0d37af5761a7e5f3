r"""Soak test of the research loop: a long run with a preemption in the middle, watched for leaks.

  python -m experiments.soak [--steps 2000] [--every 100] [--keep 3] [--workdir runs/soak]

Trains the tiny Transformer++ on MQAR with `experiments.run` in a child process for `--steps` steps, with an
evaluation and a checkpoint every `--every` steps (keeping `--keep`). Half-way it sends SIGTERM: the child must
checkpoint and exit with status 143; the same command is then run again and must resume from that step and
finish. Meanwhile the checkpoint directory is polled: the number of finished checkpoints, counted when each log line
appears (between saves), must never exceed `--keep`; while a save finishes, orbax holds `--keep` + 1 for a moment (it
deletes the oldest only once the new one is complete, so a crash never leaves fewer than `--keep` good ones), and the
polled maximum must not exceed that. Resident memory is logged by the loop every `--every` steps (`host_rss_mib`); after warm-up (the first
three logs of each process) it must stay within 10% of its first post-warm-up value. Prints a table, writes
bench_results/soak.json and a plot of resident memory against step. Not part of CI (minutes of training).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

from experiments.benchmarks.harness import format_table, write_json
from memarch.metrics import read_metrics

WARMUP_LOGS = 3
RSS_TOLERANCE = 0.10


def finished_checkpoints(directory: str) -> int:
  if not os.path.isdir(directory):
    return 0
  return sum(1 for name in os.listdir(directory) if name.isdigit())


def main(argv: list[str]) -> dict:
  p = argparse.ArgumentParser(prog="python -m experiments.soak", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--every", type=int, default=100, help="steps between eval, checkpoint and memory logs")
  p.add_argument("--keep", type=int, default=3, help="train.keep_checkpoints")
  p.add_argument("--workdir", default="runs/soak")
  p.add_argument("--out", default="bench_results/soak.json")
  args = p.parse_args(argv)
  workdir = os.path.abspath(args.workdir)
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, "-m", "experiments.run", "--config", "configs/transformer.py:size=tiny",
         f"--workdir={workdir}", f"--config.train.steps={args.steps}", f"--config.train.log_every={args.every}",
         f"--config.train.eval_every={args.every}", f"--config.train.checkpoint_every={args.every}",
         f"--config.train.keep_checkpoints={args.keep}", "--config.train.progress=lines"]

  ckpt_dir = os.path.join(workdir, "checkpoints")
  most_kept, watching, kept_at_logs = [0], [True], []

  def watch():
    while watching[0]:
      most_kept[0] = max(most_kept[0], finished_checkpoints(ckpt_dir))
      time.sleep(0.2)

  watcher = threading.Thread(target=watch, daemon=True)
  watcher.start()
  t0 = time.time()
  # First process: SIGTERM once it logs the half-way step.
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  output = []
  for line in proc.stdout:
    output.append(line)
    print(line, end="", flush=True)
    m = re.match(r"step\s+(\d+)/", line)
    if m:
      kept_at_logs.append(finished_checkpoints(ckpt_dir))
    if m and int(m.group(1)) >= args.steps // 2:
      proc.send_signal(signal.SIGTERM)
      break
  rest = proc.communicate(timeout=600)[0]
  print(rest, end="", flush=True)
  stopped = re.search(r"at step (\d+)", rest)
  if proc.returncode != 128 + signal.SIGTERM or not stopped:
    raise SystemExit(f"soak: the preempted run exited with {proc.returncode}, not 143:\n{''.join(output)}{rest}")
  preempted_at = int(stopped.group(1))
  # Second process: resume to the end.
  second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  second_out = []
  for line in second.stdout:
    second_out.append(line)
    print(line, end="", flush=True)
    if re.match(r"step\s+(\d+)/", line):
      kept_at_logs.append(finished_checkpoints(ckpt_dir))
  second.wait()
  watching[0] = False
  watcher.join()
  if second.returncode != 0:
    raise SystemExit(f"soak: the resumed run failed ({second.returncode}).")
  resumed_from = re.search(r"steps (\d+)->", "".join(second_out))

  train = [m for m in read_metrics(workdir) if m["split"] == "train"]
  segments = [[m for m in train if m["step"] <= preempted_at], [m for m in train if m["step"] > preempted_at]]
  rows, drifts = [], []
  for i, seg in enumerate(segments):
    after = seg[WARMUP_LOGS:]
    if after:
      base = after[0]["host_rss_mib"]
      drifts.append(max(abs(m["host_rss_mib"] - base) / base for m in after))
    for m in seg:
      rows.append({"process": i + 1, "step": m["step"], "rss_MiB": m["host_rss_mib"], "loss": m["loss"],
                   "steps/s": m["steps_per_sec"]})
  print(format_table(rows, list(rows[0])))
  final = [m for m in read_metrics(workdir) if m["split"] == "eval"][-1]
  summary = {
      "steps": args.steps, "every": args.every, "keep": args.keep, "preempted_at": preempted_at,
      "resumed_from": int(resumed_from.group(1)) if resumed_from else None,
      "max_checkpoints_between_saves": max(kept_at_logs, default=0), "max_checkpoints_polled": most_kept[0],
      "checkpoints_at_end": finished_checkpoints(ckpt_dir),
      "rss_drift_after_warmup": drifts, "rss_ok": all(d <= RSS_TOLERANCE for d in drifts),
      "checkpoints_ok": max(kept_at_logs, default=0) <= args.keep and most_kept[0] <= args.keep + 1, "final_eval": final, "wall_s": time.time() - t0, "rows": rows,
  }
  print(f"\nsoak: preempted at step {preempted_at}, resumed from {summary['resumed_from']}; checkpoints kept between "
        f"saves at most {summary['max_checkpoints_between_saves']} (limit {args.keep}), {most_kept[0]} while a save "
        f"finishes (limit {args.keep + 1}); resident memory drift after warm-up "
        + ", ".join(f"{d:.1%}" for d in drifts) + f" (limit {RSS_TOLERANCE:.0%}); wall {summary['wall_s']:.0f} s")
  write_json(args.out, summary)
  plot(rows, os.path.splitext(args.out)[0] + ".png", preempted_at)
  if not (summary["rss_ok"] and summary["checkpoints_ok"] and summary["resumed_from"] == preempted_at):
    raise SystemExit("soak: FAILED (see above)")
  return summary


def plot(rows, path: str, preempted_at: int) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6, 3.5))
  for proc in sorted({r["process"] for r in rows}):
    pts = [(r["step"], r["rss_MiB"]) for r in rows if r["process"] == proc]
    ax.plot(*zip(*pts), marker=".", label=f"process {proc}")
  ax.axvline(preempted_at, color="gray", ls="--", lw=1)
  ax.set_xlabel("step")
  ax.set_ylabel("resident memory (MiB)")
  ax.set_title("soak: resident memory (SIGTERM + resume at the dashed line)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"wrote {path}")


if __name__ == "__main__":
  main(sys.argv[1:])
