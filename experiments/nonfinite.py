"""Where a run's loss turned non-finite: replays the batch a stopped run saved, module by module.

  python -m experiments.nonfinite runs/sweep_mqar256/mag/lr0.001 [--step 1900] [--batch nonfinite_batch_step1920.npz]

A run stopped by `train.max_nonfinite_steps` (memarch.train.NonfiniteGuard) saves the offending batch to
<workdir>/nonfinite_batch_step<N>.npz and keeps its last good checkpoint. This applies the model of that
checkpoint (the latest unless --step) to the batch with every module's output captured, and prints, in the order
the modules ran, each output's count of non-finite values, the first non-finite time position (axis 1) and its
largest finite magnitude, then the rows of the batch whose logits are non-finite, the loss and how many gradient
tensors are non-finite. The first module with non-finite values is where to look (e.g. a memory whose inner update
diverged inside one head); when every output is finite but the loss is not, the batch's targets or loss mask are;
when only the gradient is not, the backward pass is. The last good checkpoint precedes the failing step by up to
`checkpoint_every` steps, so a batch that failed at step N may replay finite: then try other batches or a later
checkpoint.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from memarch import train


def module_outputs(model, params, batch: dict[str, Any]) -> tuple[jax.Array, list[dict[str, Any]]]:
  """The logits of `model` on `batch` and, for every captured module output in call order, a row: module (path),
  shape, nonfinite (count), first_bad_position (the first index on axis 1 with a non-finite value, or None),
  absmax (largest finite magnitude)."""
  logits, state = model.apply({"params": params}, batch["inputs"], **train._model_inputs(batch),
                              capture_intermediates=True)
  rows = []
  for path, value in traverse_util.flatten_dict(state["intermediates"]).items():
    for i, x in enumerate(jax.tree.leaves(value)):
      x = np.asarray(x, dtype=np.float32)
      finite = np.isfinite(x)
      bad_t = (~finite).reshape(x.shape[0], x.shape[1], -1).any(axis=(0, 2)) if x.ndim >= 2 else None
      name = "/".join(p for p in path if p != "__call__") or "(model output)"
      rows.append({"module": name + (f"[{i}]" if i else ""),
                   "shape": list(x.shape), "nonfinite": int((~finite).sum()),
                   "first_bad_position": int(np.argmax(bad_t)) if bad_t is not None and bad_t.any() else None,
                   "absmax": float(np.abs(np.where(finite, x, 0)).max()) if x.size else 0.0})
  return logits, rows


def first_nonfinite(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
  """The first module output (call order) with a non-finite value, or None."""
  return next((r for r in rows if r["nonfinite"]), None)


def saved_batch(workdir: str, path: str | None = None) -> tuple[str, dict[str, np.ndarray]]:
  """(path, arrays) of the batch a stopped run saved: `path`, else the latest nonfinite_batch_step<N>.npz."""
  if path is None:
    found = sorted(glob.glob(os.path.join(workdir, "nonfinite_batch_step*.npz")),
                   key=lambda p: int(re.search(r"step(\d+)\.npz$", p).group(1)))
    if not found:
      raise FileNotFoundError(f"{workdir} has no nonfinite_batch_step*.npz: only a run stopped by "
                              "train.max_nonfinite_steps saves one (pass --batch for another .npz of a batch).")
    path = found[-1]
  elif not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(workdir, path)
  with np.load(path) as f:
    return path, {k: f[k] for k in f.files}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdir")
  p.add_argument("--step", type=int, default=None, help="checkpoint to replay (default: the latest usable)")
  p.add_argument("--batch", default=None, help="the .npz batch (default: the run's latest nonfinite_batch_step*)")
  args = p.parse_args(argv)
  path, arrays = saved_batch(args.workdir, args.batch)
  config, model, params, step = train.load_run(args.workdir, args.step)
  batch = {k: jnp.asarray(v) for k, v in arrays.items()}
  train.check_batch(arrays, int(model.config.vocab_size))
  print(f"replaying {path} ({dict((k, v.shape) for k, v in arrays.items())}) at checkpoint {step} of "
        f"{args.workdir}", flush=True)
  logits, rows = module_outputs(model, params, batch)
  width = max(len(r["module"]) for r in rows)
  print(f"{'module':<{width}}  {'shape':<16} {'nonfinite':>9} {'first bad t':>11} {'absmax':>10}")
  for r in rows:
    t = "" if r["first_bad_position"] is None else str(r["first_bad_position"])
    print(f"{r['module']:<{width}}  {str(r['shape']):<16} {r['nonfinite']:>9} {t:>11} {r['absmax']:>10.4g}")
  bad_rows = [int(i) for i in np.flatnonzero(~np.isfinite(np.asarray(logits)).reshape(logits.shape[0], -1).all(1))]
  (loss, _), grads = jax.value_and_grad(lambda q: train.training_loss(model, q, batch), has_aux=True)(params)
  bad_grads = ["/".join(str(getattr(k, "key", k)) for k in path)
               for path, g in jax.tree_util.tree_flatten_with_path(grads)[0] if not np.isfinite(np.asarray(g)).all()]
  first = first_nonfinite(rows)
  print(f"\nrows with non-finite logits: {bad_rows or 'none'}; loss {float(loss):.5g}; "
        f"{len(bad_grads)} of {len(jax.tree.leaves(grads))} gradient tensors non-finite", flush=True)
  if first:
    print(f"first non-finite output: {first['module']} (from position {first['first_bad_position']})", flush=True)
  elif not np.isfinite(float(loss)):
    print("every output is finite but the loss is not: the batch's targets or loss_mask (or an auxiliary loss)",
          flush=True)
  elif bad_grads:
    print(f"every output is finite but the gradient is not (first: {bad_grads[0]}): the backward pass",
          flush=True)
  else:
    print(f"this batch replays finite at checkpoint {step}: the parameters that failed were later ones "
          "(try --step with a later checkpoint, if any)", flush=True)
  return {"step": step, "batch": path, "rows": rows, "bad_rows": bad_rows, "loss": float(loss),
          "nonfinite_grads": bad_grads, "first": first}


if __name__ == "__main__":
  main(sys.argv[1:])
