r"""Training throughput of the MoM results' models, measured one after another under the same conditions.

  python -m experiments.mom_results.throughput --batch 16 --steps 5

The sweep's tokens/s come from runs that shared the machine with each other (several at a time), so they do
not compare; this times the jitted train step (forward, backward, AdamW update) of each model on the sweep's
data shape (MQAR, seq 256) after compilation, sequentially, and prints tokens/s.
"""

from __future__ import annotations

import argparse
import time

import jax

from experiments import sweep
from experiments.benchmarks import harness
from memarch import data as data_lib
from memarch.train import resolve_model_config

MODELS = {
    "mom": "configs/mom.py:size=tiny",
    "gdn": "configs/gated_deltanet.py:size=tiny",
    "gdn_x4": "configs/gated_deltanet.py:size=tiny,heads=8",
    "based": "configs/based.py:size=tiny",
    "transformer": "configs/transformer.py:size=tiny",
    "mac": "configs/titans.py:variant=mac",
    "mag": "configs/titans.py:variant=mag",
    "mal": "configs/titans.py:variant=mal",
    "lmm": "configs/titans.py:variant=lmm",
}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
  args = p.parse_args()
  for label in args.models.split(","):
    spec = MODELS[label]
    config = sweep.prepare(spec, "mqar256", [f"train.batch_size={args.batch}"], 3e-3)
    model_cfg = resolve_model_config(config, data_lib.data_info(config.data))
    t = config.data.seq_len
    # The train step (forward, backward, AdamW) on random tokens: experiments.benchmarks.harness.
    step, state, batch, mesh = harness.train_step_setup(model_cfg, config, batch=args.batch, seq=t)
    with jax.set_mesh(mesh):
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      compile_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, m = step(state, batch)
      jax.block_until_ready(m)
      dt = (time.perf_counter() - t0) / args.steps
    print(f"{label:12s} {dt * 1000:8.0f} ms/step  {args.batch * t / dt:8.0f} tokens/s  (compile+1st step {compile_s:.0f} s)",
          flush=True)


if __name__ == "__main__":
  main()
