r"""Evaluates a trained run on the memory benchmark suite: MQAR, needle in a haystack, passkey, BABILong.

  python -m experiments.evaluate --workdir runs/x --tasks mqar,niah,passkey,babilong --lengths 1k,4k,16k

Loads `<workdir>/config.json` and the latest checkpoint's parameters. For every task, length and depth it
generates `--num_examples` held-out examples, prefills each prompt in one call (batched) and decodes the answer
greedily (`prefill` + `decode_step`); accuracy is the exact match of the whole answer. MQAR is scored as in
Zoology: the prefill's argmax at every query position (accuracy per query), per (length, kv pairs) setting.

  mqar      the run's MQAR eval settings plus (T, T/4) per length; needs a model trained on MQAR (its vocabulary)
  passkey   a model on the byte vocabulary: the text passkey ("The grass is green. ..."); a model trained on the
            token passkey: that task in its own vocabulary
  niah      RULER S-NIAH "noise"; "text" and "text_uuid" with --haystack_file (or the run's data.qa.haystack_file)
  babilong  qa1, qa2, qa3 (facts hidden in generated filler; real text with --haystack_file); stories with the
            number of facts the run was trained with when it was trained on BABILong (data.qa.num_facts), else
            each task's default
A variant alone is a task too: niah_noise, niah_text, niah_text_uuid, passkey_text, babilong_qa1, babilong_qa2,
babilong_qa3 (e.g. --tasks babilong_qa1 for a run trained on qa1).

Writes `<workdir>/eval/results.json` (one row per task/length/depth or setting: accuracy, examples, whether the
length is beyond the training length ("extrapolation"), or "skipped" with the reason) and PNGs: a length x depth
heatmap per needle task, accuracy against length for passkey and BABILong, accuracy per setting for MQAR.
A length the model cannot hold (learned positions or an attention cache beyond its limit) and a task in
another vocabulary are skipped with the reason; the rest still runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memarch.data import babilong, niah, passkey, qa, synthetic
# load_config / load_run live in memarch.train (library code loads trained runs too: memarch.knn).
from memarch.train import load_config, load_run  # noqa: F401 - part of this module's interface

TASKS = ("mqar", "niah", "passkey", "babilong")
# The variants of each text task; a variant's name is a task of its own (only that variant).
VARIANTS = {"passkey": ("passkey_text",), "niah": ("niah_noise", "niah_text", "niah_text_uuid"),
            "babilong": ("babilong_qa1", "babilong_qa2", "babilong_qa3")}
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def parse_lengths(text: str) -> list[int]:
  """"1k,4k,512" -> [1024, 4096, 512]."""
  out = []
  for item in filter(None, (s.strip().lower() for s in text.split(","))):
    mult = 1024 if item.endswith("k") else 1
    try:
      out.append(int(float(item[:-1] if item.endswith("k") else item) * mult))
    except ValueError:
      raise ValueError(f"--lengths: {item!r} is not a length like 512, 1k or 16k.") from None
  if not out or min(out) < 1:
    raise ValueError(f"--lengths {text!r}: give positive lengths like 1k,4k,16k.")
  return out


# ----------------------------------------------------------------------------------------------------
# Model calls


def cache_problem(model, length: int) -> str | None:
  """Why the model cannot decode a sequence of `length` tokens (None if it can)."""
  try:
    jax.eval_shape(lambda: model.init_cache(1, length))
  except ValueError as e:
    return str(e)
  return None


@functools.partial(jax.jit, static_argnames=("model", "new_tokens", "cache_len"))
def greedy_answers(model, params, prompt, *, new_tokens: int, cache_len: int):
  """[B, new_tokens] greedy continuation of prompt [B, P]: one prefill, then new_tokens - 1 decode steps."""
  cache = model.init_cache(prompt.shape[0], cache_len)
  logits, cache = model.apply({"params": params}, prompt, cache, method=model.prefill)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

  def step(carry, _):
    token, cache = carry
    logits, cache = model.apply({"params": params}, token, cache, method=model.decode_step)
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return (nxt, cache), nxt

  if new_tokens == 1:
    return first[:, None]
  _, rest = jax.lax.scan(step, (first, cache), None, length=new_tokens - 1)
  return jnp.concatenate([first[:, None], rest.T], axis=1)


@functools.partial(jax.jit, static_argnames=("model",))
def prefill_predictions(model, params, inputs):
  """[B, T] argmax of the prefill's logits over inputs [B, T] (one call with a cache of T)."""
  cache = model.init_cache(inputs.shape[0], inputs.shape[1])
  logits, _ = model.apply({"params": params}, inputs, cache, method=model.prefill)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def answer_accuracy(model, params, rows: Sequence[dict[str, np.ndarray]], batch_size: int) -> float:
  """Exact-match accuracy of greedy answers: rows grouped by prompt length, each group in batches."""
  groups: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
  for r in rows:
    prompt, answer = qa.prompt_and_answer(r["inputs"], r["targets"], r["loss_mask"])
    groups.setdefault(len(prompt), []).append((prompt, answer))
  correct = 0
  for plen, items in groups.items():
    n = len(items[0][1])
    for i in range(0, len(items), batch_size):
      chunk = items[i:i + batch_size]
      prompts = np.stack([p for p, _ in chunk] + [chunk[0][0]] * (batch_size - len(chunk)))  # full batches
      out = np.asarray(greedy_answers(model, params, jnp.asarray(prompts), new_tokens=n, cache_len=plen + n - 1))
      correct += sum(int(np.array_equal(out[j], a)) for j, (_, a) in enumerate(chunk))
  return correct / len(rows)


def mqar_accuracy(model, params, arrays: dict[str, np.ndarray], batch_size: int) -> float:
  """Zoology's MQAR accuracy: the share of query positions whose prefill argmax is the value."""
  hits = total = 0.0
  n = len(arrays["inputs"])
  for i in range(0, n, batch_size):
    sl = slice(i, min(i + batch_size, n))
    inputs, targets, mask = arrays["inputs"][sl], arrays["targets"][sl], arrays["loss_mask"][sl]
    pad = batch_size - len(inputs)
    if pad:
      inputs = np.concatenate([inputs, np.repeat(inputs[:1], pad, 0)])
    pred = np.asarray(prefill_predictions(model, params, jnp.asarray(inputs, jnp.int32)))[:len(targets)]
    hits += float(((pred == targets) * mask).sum())
    total += float(mask.sum())
  return hits / max(total, 1.0)


# ----------------------------------------------------------------------------------------------------
# The cells of an evaluation


def _example_rng(seed: int, *parts) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, 9, *[qa.task_id(str(p)) for p in parts]]))


def plan(config, tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float], haystack_file: str,
         num_examples: int, seed: int) -> list[dict[str, Any]]:
  """The cells to evaluate: dicts with task, length, depth / kv_pairs, and either `make` (a function returning
  the rows, or for MQAR the arrays) or `skip` (the reason)."""
  from memarch import data as data_lib  # noqa: PLC0415

  info = data_lib.data_info(config.data)
  name = str(config.data.name)
  byte_vocab = info.kind == "text"
  cells = []
  vocab_reason = (f"the run was trained on data.name={name!r} (vocabulary {info.vocab_size}); the text tasks need a "
                  "model trained on the byte vocabulary (259 ids, e.g. data.name='text', 'niah' or 'babilong')")
  for task in tasks:
    known = TASKS + tuple(v for vs in VARIANTS.values() for v in vs)
    if task not in known:
      raise ValueError(f"--tasks: unknown task {task!r}; known: {', '.join(known)}.")
    if task == "mqar":
      if name != "mqar":
        cells.append(dict(task="mqar", length=None, skip=f"the run was trained on data.name={name!r}, not MQAR: "
                          "MQAR is evaluated in the vocabulary of a model trained on it"))
        continue
      q, vocab = config.data.mqar, int(config.data.vocab_size)
      settings = [tuple(map(int, s)) for s in q.eval_settings]
      settings += [(t, t // 4) for t in lengths if (t, t // 4) not in settings]
      for t, k in settings:
        cell = dict(task="mqar", length=t, kv_pairs=k)
        try:
          synthetic.validate_mqar_setting(vocab_size=vocab, seq_len=t, num_kv_pairs=k, power_a=float(q.power_a))
        except ValueError as e:
          cell["skip"] = str(e)
        else:
          cell["make"] = functools.partial(
              synthetic.mqar_mixture, seed=seed, split="eval", vocab_size=vocab, settings=[(t, k)],
              num_examples_per_setting=num_examples, seq_len=t, power_a=float(q.power_a))
        cells.append(cell)
      continue
    if task == "passkey" and name == "passkey":  # the token passkey, in its own vocabulary
      p = config.data.passkey
      sentence = passkey.filler_sentence(int(config.data.seed), int(config.data.vocab_size), int(p.filler_period))
      for t in lengths:
        for d in depths:
          def make(t=t, d=d):
            rng = _example_rng(seed, "passkey", t, d)
            return [passkey.passkey_example(rng, seq_len=t, vocab_size=int(config.data.vocab_size),
                                            key_digits=int(p.key_digits), filler=str(p.filler), sentence=sentence,
                                            depth=d) for _ in range(num_examples)]
          cells.append(dict(task="passkey", length=t, depth=d, make=make))
      continue
    variants = VARIANTS.get(task, (task,))
    # A run trained on BABILong is evaluated on stories of the size it was trained on.
    num_facts = int(config.data.qa.get("num_facts", 0)) if name == "babilong" else 0
    for variant in variants:
      if not byte_vocab:
        cells.append(dict(task=variant, length=None, skip=vocab_reason))
        continue
      if variant in ("niah_text", "niah_text_uuid") and not haystack_file:
        cells.append(dict(task=variant, length=None, skip="no real text: give --haystack_file (a local text file, "
                          "e.g. ../shared/data/tinyshakespeare.txt)"))
        continue
      for t in lengths:
        for d in (depths if not variant.startswith("babilong") else (None,)):
          cell = dict(task=variant, length=t, depth=d)
          if variant.startswith("babilong"):
            src = babilong.babilong_source(task=variant.split("_")[1], num_examples=num_examples, lengths=(t,),
                                           seed=seed, split="eval", num_facts=num_facts, haystack_file=haystack_file)
          elif variant == "passkey_text":
            src = niah.passkey_text_source(num_examples=num_examples, lengths=(t,), seed=seed, split="eval", depth=d)
          else:
            src = niah.niah_source(flavour=variant[len("niah_"):], num_examples=num_examples, lengths=(t,),
                                   seed=seed, split="eval", depth=d, haystack_file=haystack_file)
          cell["make"] = lambda src=src: [src[i] for i in range(len(src))]
          cells.append(cell)
  return cells


def run_cells(model, params, cells: list[dict[str, Any]], *, train_length: int, batch_size: int,
              progress: bool = True) -> list[dict[str, Any]]:
  """Evaluates every cell (with a tqdm bar); returns one result row per cell."""
  from tqdm import tqdm  # noqa: PLC0415

  rows = []
  held: dict[int, str | None] = {}
  for cell in tqdm(cells, desc="evaluate", disable=not progress, file=sys.stderr):
    row = {k: cell.get(k) for k in ("task", "length", "depth", "kv_pairs")}
    row.update(accuracy=None, num_examples=0, status="skipped", reason=cell.get("skip"),
               extrapolation=bool(cell.get("length") and cell["length"] > train_length))
    if "make" in cell:
      t = cell["length"]
      if t not in held:
        held[t] = cache_problem(model, t)
      if held[t] is not None:
        row["reason"] = f"length {t} does not fit the model: {held[t]}"
      else:
        start = time.time()
        try:
          data = cell["make"]()
          if row["task"] == "mqar":
            acc, n = mqar_accuracy(model, params, data, batch_size), len(data["inputs"])
          else:
            acc, n = answer_accuracy(model, params, data, batch_size), len(data)
        except ValueError as e:  # a model that refuses the length at run time, a task that cannot be generated
          row["reason"] = str(e)
        else:
          row.update(accuracy=acc, num_examples=n, status="ok", reason=None, seconds=round(time.time() - start, 2))
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------------------------------
# Plots


def plot_results(rows: list[dict[str, Any]], out_dir: str) -> list[str]:
  """PNGs of the ok rows: a length x depth heatmap per needle task, accuracy vs length for passkey and BABILong,
  accuracy per setting for MQAR. Returns the paths."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  ok = [r for r in rows if r["status"] == "ok"]
  paths = []
  for task in sorted({r["task"] for r in ok if r["depth"] is not None}):
    sub = [r for r in ok if r["task"] == task]
    lengths = sorted({r["length"] for r in sub})
    depths = sorted({r["depth"] for r in sub})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in sub:
      grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.5 * len(depths) + 2))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(t) for t in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{task}: exact-match accuracy")
    for (i, j), v in np.ndenumerate(grid):
      if not np.isnan(v):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{task}_heatmap.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  for group in ("passkey", "babilong"):
    tasks = sorted({r["task"] for r in ok if r["task"].startswith(group)})
    if not tasks:
      continue
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for task in tasks:
      by_len: dict[int, list[float]] = {}
      for r in ok:
        if r["task"] == task:
          by_len.setdefault(r["length"], []).append(r["accuracy"])
      xs = sorted(by_len)
      ax.plot(xs, [np.mean(by_len[x]) for x in xs], marker="o", label=task)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("accuracy (mean over depths)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{group}_vs_length.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  mq = [r for r in ok if r["task"] == "mqar"]
  if mq:
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(mq) + 2), 3.5))
    ax.bar(range(len(mq)), [r["accuracy"] for r in mq])
    ax.set_xticks(range(len(mq)), [f"T{r['length']}\nkv{r['kv_pairs']}" for r in mq], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy per query")
    ax.set_title("MQAR")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "mqar_settings.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  return paths


# ----------------------------------------------------------------------------------------------------


def evaluate(workdir: str, *, tasks: Sequence[str] = TASKS, lengths: Sequence[int] = (1024, 4096, 16384),
             depths: Sequence[float] = DEPTHS, num_examples: int = 16, batch_size: int = 8, haystack_file: str = "",
             seed: int = 1234, progress: bool = True, step: int | None = None) -> dict[str, Any]:
  """Evaluates the run in `workdir` at its latest checkpoint (or at `step`); writes <workdir>/eval/results.json
  and PNGs; returns the results dict."""
  if num_examples < 1 or batch_size < 1:
    raise ValueError(f"num_examples ({num_examples}) and batch_size ({batch_size}) must be >= 1.")
  config, model, params, step = load_run(workdir, step)
  if not haystack_file and "qa" in config.data:
    haystack_file = str(config.data.qa.get("haystack_file", ""))
  train_length = int(config.model.get("max_len", config.data.seq_len))
  cells = plan(config, tasks, lengths, depths, haystack_file, num_examples, seed)
  rows = run_cells(model, params, cells, train_length=train_length, batch_size=batch_size, progress=progress)
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  results = {"workdir": os.path.abspath(workdir), "step": int(step), "model": str(config.model.name),
             "data": str(config.data.name), "train_length": train_length, "tasks": list(tasks),
             "lengths": list(lengths), "depths": list(depths), "num_examples": num_examples, "seed": seed,
             "haystack_file": haystack_file, "results": rows}
  results["plots"] = [os.path.basename(p) for p in plot_results(rows, out_dir)]
  # results.json is the latest evaluation (what compare reads); results_step<N>.json keeps each step's.
  for path in (os.path.join(out_dir, "results.json"), kept_path(workdir, step)):
    with open(path, "w") as f:
      json.dump(results, f, indent=1)
  return results


def kept_path(workdir: str, step: int) -> str:
  """Where the evaluation of checkpoint `step` of a run is kept."""
  return os.path.join(workdir, "eval", f"results_step{step}.json")


def covering(workdir: str, step: int, tasks: Sequence[str] = (), lengths: Sequence[int] = ()) -> str | None:
  """The file of an evaluation of checkpoint `step` of `workdir` that covers `tasks` at `lengths` (when given):
  the latest one (results.json) or the one kept for that step; None when there is none."""
  covers = lambda r: (r.get("step") == step and set(tasks) <= set(r.get("tasks", ()))
                      and set(lengths) <= set(r.get("lengths", ())))
  for path in (os.path.join(workdir, "eval", "results.json"), kept_path(workdir, step)):
    if os.path.exists(path):
      with open(path) as f:
        if covers(json.load(f)):
          return path
  return None


def reuse(workdir: str, step: int, tasks: Sequence[str] = (), lengths: Sequence[int] = ()) -> bool:
  """Whether `workdir` has an evaluation of checkpoint `step` (covering `tasks` at `lengths`, when given); if
  it is not the latest one written, it becomes results.json again (plots redrawn), so that compare reads it.
  A zoo re-run evaluates nothing twice."""
  out_dir = os.path.join(workdir, "eval")
  current, found = os.path.join(out_dir, "results.json"), covering(workdir, step, tasks, lengths)
  if found in (None, current):
    return found is not None
  with open(found) as f:
    results = json.load(f)
  results["plots"] = [os.path.basename(p) for p in plot_results(results["results"], out_dir)]
  with open(current, "w") as f:
    json.dump(results, f, indent=1)
  return True


def format_table(rows: list[dict[str, Any]]) -> str:
  lines = ["| task | length | depth / kv | accuracy | note |", "|---|---|---|---|---|"]
  for r in rows:
    where = (f"{r['depth']:.0%}" if r.get("depth") is not None else
             f"kv {r['kv_pairs']}" if r.get("kv_pairs") is not None else "")
    acc = f"{r['accuracy']:.3f}" if r["accuracy"] is not None else "-"
    note = ("skipped: " + (r["reason"] or "").splitlines()[0][:120]) if r["status"] == "skipped" else (
        "extrapolation" if r["extrapolation"] else "")
    lines.append(f"| {r['task']} | {r['length'] or ''} | {where} | {acc} | {note} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ",".join(TASKS))
  parser.add_argument("--lengths", default="1k,4k,16k", help="e.g. 1k,4k,16k")
  parser.add_argument("--depths", default=",".join(map(str, DEPTHS)), help="needle depths in [0, 1]")
  parser.add_argument("--num_examples", type=int, default=16, help="per task, length and depth")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--haystack_file", default="", help="real text for niah text/text_uuid and BABILong filler")
  parser.add_argument("--seed", type=int, default=1234)
  parser.add_argument("--no_progress", action="store_true")
  parser.add_argument("--step", type=int, default=None, help="the checkpoint to evaluate (default: the latest)")
  args = parser.parse_args(argv)
  depths = [float(d) for d in args.depths.split(",") if d.strip()]
  if any(not 0 <= d <= 1 for d in depths):
    parser.error(f"--depths must be in [0, 1], got {depths}.")
  results = evaluate(args.workdir, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
                     lengths=parse_lengths(args.lengths), depths=depths, num_examples=args.num_examples,
                     batch_size=args.batch_size, haystack_file=args.haystack_file, seed=args.seed,
                     progress=not args.no_progress, step=args.step)
  print(format_table(results["results"]))
  print(f"wrote {os.path.join(args.workdir, 'eval', 'results.json')} and {len(results['plots'])} plots")
  return results


if __name__ == "__main__":
  main()
