r"""Model comparison under one protocol: same data, steps, batch and length for every model; for each, the
best of a small learning-rate sweep; one seed, stated.

  python -m experiments.sweep --name mqar_linear --task mqar256 --lrs 1e-3,3e-3,1e-2 \
      --set train.steps=400 --set train.batch_size=32 \
      --configs transformer=configs/transformer.py:size=tiny gdn=configs/gated_deltanet.py:size=tiny

Every (config, lr) trains with `memarch.train.train_and_evaluate` in `<workdir>/<label>/lr<lr>` (default
workdir runs/sweep_<name>; re-running skips finished runs and resumes unfinished ones). The best lr per model
is the one with the highest mean over the eval sets of the task's selection metric (SELECTION_METRIC): token
accuracy for MQAR, where every query is a retrieval of its own; exact match of the whole answer (every answer
token right, teacher-forced: what greedy decoding would score) for passkey, NIAH and BABILong, whose answers'
formats make token accuracy high for a model that never answers. Prints a table (one row per model: best lr,
accuracy per eval set, tokens/s in training, parameters, decoding state bytes per sequence at the training
length) and writes `bench_results/sweep_<name>.json` and a plot of accuracy per eval set (and against state
size) next to it.

`--task` replaces every config's data section with a shared one (so all models see the same data):
  mqar256   MQAR (Zoology), trained on Zoology's mixture (64,4) (128,8) (256,16) (256,32) (256,64), evaluated
            at seq 256 with 16, 32 and 64 key-value pairs, vocabulary 512
  passkey1k passkey retrieval trained at 1024 tokens, evaluated at 1x, 4x and 16x that length
  niah1k    single needle in a haystack (RULER S-NIAH "noise": a key word and a 7-digit value among repeated
            noise sentences), bytes, trained at 1024 tokens, evaluated at 1x, 4x and 16x that length at depths 0,
            0.5 and 1 (16 examples each)
  passkey512 passkey retrieval trained at 512 tokens, evaluated at 512 and 2048 (HMT's results: 4x and 16x its
            128-token segment)
  mqar512far MQAR with uniformly placed queries (power_a 1: most queries several 128-token segments after their
            keys), trained on the mixture (128, 8) (512, 16), evaluated at (512, 16) and (2048, 16) (generated in
            memory: the 2048 set is longer than the training rows), vocabulary 512
  babilong_qa1, babilong_qa2
            BABILong-style reasoning (memarch/data/babilong.py), bytes: stories of 6 facts trained at 256 tokens
            (the facts fill most of it: qa1 takes about 220 tokens, qa2 about 200), evaluated at 256 and at 4x
            that, 1024 (the same stories' facts spread over filler); accuracy on the answer's tokens
  (none)    keep each config's own data section (then they must agree: checked)
`--set key=value` overrides apply to every config (values parsed as Python literals where possible).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from configs import common

TASKS = ("mqar256", "passkey1k", "niah1k", "passkey512", "mqar512far", "babilong_qa1", "babilong_qa2")
# The eval metric the best lr is chosen by (mean over the eval sets); "accuracy" for a sweep without --task.
SELECTION_METRIC = {"mqar256": "accuracy", "mqar512far": "accuracy", "passkey1k": "exact", "niah1k": "exact",
                    "passkey512": "exact", "babilong_qa1": "exact", "babilong_qa2": "exact"}


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/x.py:arg' -> get_config(arg) of that file."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found (from {spec!r}).")
  module_spec = importlib.util.spec_from_file_location(f"_sweep_cfg_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  """'a.b.c=value' on a locked config: an unknown key is an error naming the valid ones."""
  if "=" not in item:
    raise ValueError(f"--set {item!r} must look like section.key=value.")
  key, value = item.split("=", 1)
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    if p not in node:
      raise KeyError(f"--set {item!r}: no section {p!r}; valid: {sorted(node.keys())}.")
    node = node[p]
  if leaf not in node:
    raise KeyError(f"--set {item!r}: no key {leaf!r}; valid: {sorted(node.keys())}.")
  old = node[leaf]
  new = parse_value(value)
  if isinstance(old, float) and isinstance(new, int):
    new = float(new)
  if isinstance(old, tuple) and isinstance(new, list):
    new = tuple(new)
  node[leaf] = new


def task_data(task: str) -> ml_collections.ConfigDict:
  if task == "mqar256":
    # Zoology's training mixture: the short, sparse settings let the recall circuit form early (on the three
    # 256-token settings alone the tiny Transformer++ is at 0.02 accuracy after 300 steps); evaluation is on
    # the 256-token settings only.
    return common.mqar_data(vocab_size=512, settings=((64, 4), (128, 8), (256, 16), (256, 32), (256, 64)),
                            eval_settings=((256, 16), (256, 32), (256, 64)), num_train_examples=20_000,
                            num_eval_examples=256)
  if task == "passkey1k":
    return common.passkey_data(seq_len=1024, eval_multiples=(1, 4, 16))
  if task == "niah1k":
    return common.niah_data(flavour="noise", seq_len=1024, eval_lengths=(1024, 4096, 16384),
                            eval_depths=(0.0, 0.5, 1.0), num_eval_examples=16)
  if task == "passkey512":
    return common.passkey_data(seq_len=512, eval_multiples=(1, 4), num_eval_examples=32)
  if task == "mqar512far":
    c = common.mqar_data(vocab_size=512, settings=((128, 8), (512, 16)), eval_settings=((512, 16), (2048, 16)),
                         num_train_examples=20_000, num_eval_examples=64)
    c.mqar.power_a = 1.0  # uniform gaps: a query is on average a quarter of the sequence after the keys
    c.mqar.use_tfds = False  # the 2048 eval set is longer than the training rows (not storable in one TFDS build)
    return c
  if task in ("babilong_qa1", "babilong_qa2"):
    # qa2's default 8 facts take ~270 bytes; 6 fit the 256-token training rows of both tasks.
    c = common.babilong_data(task=task.rpartition("_")[2], seq_len=256, eval_lengths=(256, 1024),
                             num_eval_examples=64)
    c.qa.num_facts = 6
    return c
  raise ValueError(f"unknown --task {task!r}; known: {TASKS}.")


def prepare(spec: str, task: str | None, overrides: list[str], lr: float) -> ml_collections.ConfigDict:
  config = load_config(spec)
  with config.unlocked():
    if task:
      config.data = task_data(task)
      config.model.max_len = config.data.seq_len
    config.train.progress = "lines"
    config.train.checkpoint_every = 0  # only at the end: the sweep's runs are short
  for item in overrides:
    apply_override(config, item)
  config.optim.lr = lr
  return config


def model_sizes(config) -> tuple[int, int]:
  """(parameters, bytes of one sequence's decoding state at the training length (attention: its KV cache))."""
  from memarch import data as data_lib  # noqa: PLC0415
  from memarch.models import build_model  # noqa: PLC0415
  from memarch.train import resolve_model_config  # noqa: PLC0415

  model = build_model(resolve_model_config(config, data_lib.data_info(config.data)))
  cache = jax.eval_shape(lambda: model.init_cache(1, config.data.seq_len))
  tokens = jax.ShapeDtypeStruct((1, config.data.seq_len), jax.numpy.int32)
  params = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  return int(count), int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache)))


def train_tokens_per_sec(workdir: str) -> float | None:
  """Median training tokens/s over the logged intervals after the first (which includes compilation)."""
  from memarch.metrics import read_metrics  # noqa: PLC0415

  rates = [m["tokens_per_sec"] for m in read_metrics(workdir) if m["split"] == "train" and "tokens_per_sec" in m]
  rates = rates[1:] or rates
  return float(np.median(rates)) if rates else None


def run_dir(root: str, label: str, lr: float) -> str:
  """Where a sweep keeps the run of model `label` at learning rate `lr`."""
  return os.path.join(root, label, f"lr{lr:g}")


def result_path(workdir: str, steps: int) -> str:
  return os.path.join(workdir, f"result_step{steps}.json")


def diverged_path(workdir: str) -> str:
  return os.path.join(workdir, "diverged.json")


def finished(workdir: str, steps: int) -> str | None:
  """The record of a run that has finished stage `steps` or diverged (a diverged run stays diverged at every later
  stage), or None while it still has to train."""
  for path in (result_path(workdir, steps), diverged_path(workdir)):
    if os.path.exists(path):
      return path
  return None


def run_one(config, workdir: str) -> dict[str, Any]:
  """Trains one (model, lr) to config.train.steps, resuming its checkpoint; the result is kept per step count in
  `<workdir>/result_step<N>.json`, so re-running a sweep (or an earlier stage of it) retrains nothing."""
  steps = config.train.steps
  record, diverged = result_path(workdir, steps), diverged_path(workdir)
  if path := finished(workdir, steps):
    with open(path) as f:
      done = json.load(f)
    print(f"  {workdir}: {'diverged' if path == diverged else 'finished'} earlier, reusing its result", flush=True)
    return done
  from memarch.train import train_and_evaluate  # noqa: PLC0415

  check_resumable(config, workdir)
  try:
    result = train_and_evaluate(config, workdir)
  except FloatingPointError as e:  # a diverged lr is a result of the sweep, not the end of it
    print(f"  {workdir}: diverged ({e})", flush=True)
    done = {"step": None, "eval": {}, "train": {}, "diverged": str(e)}
    record = diverged
  else:
    done = {"step": result.step, "eval": result.eval_metrics, "train": result.train_metrics}
  with open(record, "w") as f:
    json.dump(done, f, indent=1)
  return done


# The sections that define a run's protocol: resuming a run under different values would silently mix two
# protocols in one run (the training loop itself checks only that the model matches its checkpoint).
PROTOCOL_SECTIONS = ("model", "data", "optim")
PROTOCOL_TRAIN_KEYS = ("batch_size", "seed")
# Model keys that change how the same math is computed, not the math: not part of the protocol.
LAYOUT_MODEL_KEYS = ("remat", "scan_layers")


def check_resumable(config, workdir: str) -> None:
  """Raises if `workdir` holds a run trained under another protocol than `config` (other than its step count),
  naming the differences, before any training: e.g. a run trained at batch 8 that a batch-16 sweep would
  otherwise extend."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  new = json.loads(config.to_json_best_effort())
  from memarch.checkpoint import manifest_differences  # noqa: PLC0415

  # The model section as the training loop compares a checkpoint's (keys added later with their old defaults
  # are the same model), less the layout keys; the rest of the protocol key by key.
  model = lambda c: {k: v for k, v in (c.get("model") or {}).items() if k not in LAYOUT_MODEL_KEYS}
  diffs = manifest_differences({"model": model(saved)}, {"model": model(new)})
  pick = lambda c: {**{s: c.get(s) for s in PROTOCOL_SECTIONS if s != "model"},
                    **{f"train.{k}": c.get("train", {}).get(k) for k in PROTOCOL_TRAIN_KEYS}}

  def diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
      return [d for k in sorted(set(a) | set(b)) for d in diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}: the run has {a!r}, this sweep {b!r}"]

  diffs += [d for key, value in pick(saved).items() for d in diff(value, pick(new)[key], f"{key}.")]
  if diffs:
    raise ValueError(f"{workdir} holds a run of another protocol; move it away (or use another --workdir) to "
                     "train this one:\n  " + "\n  ".join(diffs))


def mean_metric(eval_metrics: dict[str, float], metric: str = "accuracy") -> float:
  """Mean of `<set>/<metric>` over the eval sets (nan when there is none: a diverged run, or a result recorded
  before the metric existed)."""
  values = [v for k, v in eval_metrics.items() if k.endswith(f"/{metric}")]
  return float(np.mean(values)) if values else float("nan")


def mean_accuracy(eval_metrics: dict[str, float]) -> float:
  return mean_metric(eval_metrics, "accuracy")


def best_run(runs: list[dict[str, Any]], metric: str) -> tuple[dict[str, Any], str]:
  """The run of one model with the best mean `metric` (ties: the best token accuracy), and the metric used:
  token accuracy when some finished run has no `metric` recorded (its result predates exact match), so that
  all lrs are ranked by one metric."""
  finished = [r for r in runs if not r["diverged"]]
  if any(math.isnan(mean_metric(r["eval"], metric)) for r in finished):
    metric = "accuracy"
  # Ties (e.g. every lr at 0 exact match early in training) go to the better token accuracy.
  value = lambda r, m: -1.0 if math.isnan(mean_metric(r["eval"], m)) else mean_metric(r["eval"], m)
  return max(runs, key=lambda r: (value(r, metric), value(r, "accuracy"))), metric


def plot(summary: dict[str, Any], out: str) -> str:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  models = summary["models"]
  sets = summary["eval_sets"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  width = 0.8 / max(1, len(models))
  for i, m in enumerate(models):
    xs = np.arange(len(sets)) + i * width
    # A model whose every lr diverged has no accuracy (None): an empty bar, said in its label.
    heights = [np.nan if m["accuracy"].get(s) is None else m["accuracy"][s] for s in sets]
    label = f"{m['label']} (every lr diverged)" if m.get("diverged") else f"{m['label']} (lr {m['best_lr']:g})"
    axes[0].bar(xs, heights, width, label=label)
  axes[0].set_xticks(np.arange(len(sets)) + 0.4 - width / 2, sets, fontsize=8)
  axes[0].set_ylabel("eval token accuracy")
  axes[0].set_ylim(0, 1)
  axes[0].legend(fontsize=7)
  axes[0].set_title(f"{summary['name']}: best lr per model")
  for m in models:
    score = m.get("score", m["mean_accuracy"])
    axes[1].scatter(m["state_bytes"], score)
    axes[1].annotate(f"{m['label']} ({m.get('selected_by', 'accuracy')})", (m["state_bytes"], score), fontsize=8)
  axes[1].set_xscale("log")
  axes[1].set_xlabel("decoding state bytes per sequence (at the training length)")
  axes[1].set_ylabel("mean eval selection metric (in brackets)")
  axes[1].grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", required=True, help="name of the comparison (output files and default workdir)")
  p.add_argument("--configs", nargs="+", required=True, metavar="LABEL=CONFIG[:ARG]")
  p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="comma-separated learning rates tried for every model")
  p.add_argument("--task", choices=TASKS, default=None, help="shared data section (see above)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--workdir", default=None, help="default runs/sweep_<name>")
  p.add_argument("--out", default=None, help="default bench_results/sweep_<name>.json")
  p.add_argument("--stages", default="", metavar="STEPS,STEPS,...",
                 help="train every run to each of these step counts in turn (resuming from its checkpoint), with a "
                      "table per stage: a comparison at a common budget exists whenever the sweep is stopped. Use "
                      "optim.schedule=constant, so that a run extended to a later stage equals one trained straight.")
  args = p.parse_args(argv)
  lrs = [float(x) for x in args.lrs.split(",") if x]
  root = os.path.abspath(args.workdir or os.path.join("runs", f"sweep_{args.name}"))
  out = args.out or os.path.join("bench_results", f"sweep_{args.name}.json")
  specs = []
  for item in args.configs:
    label, sep, spec = item.partition("=")
    if not sep:
      raise ValueError(f"--configs entry {item!r} must look like label=configs/x.py:arg.")
    specs.append((label, spec))

  # Build every config first: a typo in one fails before any training starts.
  configs = {(label, lr): prepare(spec, args.task, args.overrides, lr) for label, spec in specs for lr in lrs}
  protocols = {(json.dumps(c.data.to_dict(), sort_keys=True, default=str), c.train.steps, c.train.batch_size,
                c.train.seed) for c in configs.values()}
  if len(protocols) != 1:
    raise ValueError("the configs disagree on data, steps, batch, length or seed; use --task and --set so that "
                     "every model is trained under the same protocol.")
  first = next(iter(configs.values()))
  stages = sorted({int(x) for x in args.stages.split(",")}) if args.stages else [first.train.steps]
  print(f"sweep {args.name}: {len(specs)} models x lrs {lrs}; data {first.data.name} "
        f"(settings {first.data.get('mqar', {}).get('settings', '')}), steps {','.join(map(str, stages))}, batch "
        f"{first.train.batch_size}, seq {first.data.seq_len}, seed {first.train.seed}", flush=True)

  summary = None
  for steps in stages:
    for config in configs.values():
      config.train.steps = steps
    summary = run_stage(args, specs, configs, root, steps, lrs)
    stage_out = out if steps == stages[-1] else f"{os.path.splitext(out)[0]}_steps{steps}.json"
    report(summary, stage_out)
  if len(stages) > 1:
    print(f"wrote {plot_stages(args.name, stages, out)}")
  return summary


def run_stage(args, specs, configs, root: str, steps: int, lrs: list[float]) -> dict[str, Any]:
  """Brings every (model, lr) to `steps` (resuming from its last checkpoint) and returns the stage's summary."""
  first = next(iter(configs.values()))
  runs = []
  for (label, lr), config in configs.items():
    workdir = run_dir(root, label, lr)
    print(f"\n== {label} lr {lr:g} to step {steps} -> {workdir}", flush=True)
    t0 = time.time()
    done = run_one(config, workdir)
    runs.append({"label": label, "lr": lr, "workdir": workdir, "eval": done["eval"], "diverged": "diverged" in done,
                 "mean_accuracy": mean_accuracy(done["eval"]), "mean_exact": mean_metric(done["eval"], "exact"),
                 "tokens_per_sec": train_tokens_per_sec(workdir), "wall_s": time.time() - t0})

  eval_sets = sorted({k.rsplit("/", 1)[0] for r in runs for k in r["eval"] if k.endswith("/accuracy")})
  models = []
  for label, spec in specs:
    mine = [r for r in runs if r["label"] == label]
    best, selected_by = best_run(mine, SELECTION_METRIC.get(args.task, "accuracy"))
    config = configs[(label, best["lr"])]
    n_params, n_state = model_sizes(config)
    models.append({
        "label": label, "config": spec, "best_lr": best["lr"], "selected_by": selected_by,
        "diverged": all(r["diverged"] for r in mine),
        "score": mean_metric(best["eval"], selected_by), "mean_accuracy": best["mean_accuracy"],
        "mean_exact": best["mean_exact"], "accuracy": {s: best["eval"].get(f"{s}/accuracy") for s in eval_sets},
        "exact": {s: best["eval"].get(f"{s}/exact") for s in eval_sets},
        "all_lrs": {f"{r['lr']:g}": mean_metric(r["eval"], selected_by) for r in mine},
        "tokens_per_sec": best["tokens_per_sec"], "state_bytes": n_state, "params": n_params,
    })
  return {"name": args.name, "protocol": {"task": args.task, "steps": steps, "batch_size": first.train.batch_size,
                                          "seq_len": first.data.seq_len, "seed": first.train.seed, "lrs": lrs,
                                          "overrides": args.overrides},
          "eval_sets": eval_sets, "models": models, "runs": runs}


def report(summary: dict[str, Any], out: str) -> None:
  from experiments.benchmarks.harness import format_table, write_json  # noqa: PLC0415

  eval_sets = summary["eval_sets"]
  table = [{"model": m["label"], "best_lr": m["best_lr"], **{s: m["accuracy"][s] for s in eval_sets},
            "mean_acc": m["mean_accuracy"], "mean_exact": m.get("mean_exact", float("nan")),
            "by": m.get("selected_by", "accuracy"), "tokens/s": m["tokens_per_sec"], "params": m["params"],
            "state_KiB": m["state_bytes"] / 1024,
            "acc@lrs": " ".join(f"{k}:{v:.3f}" for k, v in m["all_lrs"].items())} for m in summary["models"]]
  # A diverged lr shows as nan in acc@lrs (its metric is nan) and is never the best.
  protocol = summary["protocol"]
  print(f"\nsweep {summary['name']} at step {protocol['steps']}: token accuracy per eval set of the best lr per "
        f"model, chosen by the mean of the metric `by` (acc@lrs: that metric at each lr) (batch "
        f"{protocol['batch_size']}, seq {protocol['seq_len']}, seed {protocol['seed']})")
  print(format_table(table, list(table[0])))
  write_json(out, summary)
  print(f"wrote {plot(summary, os.path.splitext(out)[0] + '.png')}")


def plot_stages(name: str, stages: list[int], out: str) -> str:
  """Mean eval accuracy of each model's best lr at every stage: the learning curves of the comparison."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  base = os.path.splitext(out)[0]
  curves: dict[str, list[tuple[int, float]]] = {}
  for steps in stages:
    path = out if steps == stages[-1] else f"{base}_steps{steps}.json"
    with open(path) as f:
      for m in json.load(f)["models"]:
        curves.setdefault(m["label"], []).append((steps, m.get("score", m["mean_accuracy"])))
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, pts in curves.items():
    ax.plot(*zip(*pts), marker="o", label=label)
  ax.set_xscale("log")
  ax.set_xlabel("training steps")
  ax.set_ylabel("mean eval selection metric (best lr at that step)")
  ax.set_title(f"{name}: accuracy against training steps")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  path = f"{base}_stages.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


if __name__ == "__main__":
  main(sys.argv[1:])
