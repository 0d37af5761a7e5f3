r"""Plots a run's curves (train loss, eval metrics against steps) from its metrics.jsonl.

  python -m experiments.plot runs/mqar_tiny [runs/other ...] --out curves.png

Several workdirs are drawn on the same axes, labelled by their directory name.
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from memarch.metrics import read_metrics  # noqa: E402


def plot_runs(workdirs: list[str], out: str) -> str:
  """Writes a PNG with one panel for the train loss and one per eval metric; returns its path."""
  runs = {os.path.basename(os.path.normpath(w)): read_metrics(w) for w in workdirs}
  for name, rows in runs.items():
    if not rows:
      raise ValueError(f"no metrics.jsonl (or an empty one) in the workdir of {name!r}.")
  eval_keys = sorted({k for rows in runs.values() for m in rows if m["split"] == "eval" for k in m
                      if k.endswith(("accuracy", "loss")) and k not in ("step", "split")})
  panels = ["train/loss"] + eval_keys
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
  for ax, panel in zip(axes[0], panels):
    split, key = ("train", "loss") if panel == "train/loss" else ("eval", panel)
    for name, rows in runs.items():
      pts = [(m["step"], m[key]) for m in rows if m["split"] == split and key in m]
      if pts:
        ax.plot(*zip(*pts), marker="." if split == "eval" else None, label=name)
    ax.set_title(panel)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--out", default="curves.png")
  args = parser.parse_args()
  print(f"wrote {plot_runs(args.workdirs, args.out)}")


if __name__ == "__main__":
  main()
