r"""Trains and evaluates a model from an ml-collections config.

  python -m experiments.run --config configs/transformer.py:size=tiny --workdir runs/tiny
  python -m experiments.run --config configs/transformer.py:size=tiny --workdir runs/tiny --config.train.steps=200

Multi-host: run the same command on every host with `--config.distributed.coordinator_address=HOST0:PORT
--config.distributed.num_processes=N --config.distributed.process_id=I` (or let JAX detect the cluster: SLURM,
Open MPI, Cloud TPU pods; or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); see configs/base.py
distributed_config and the README's "Scaling out".

Re-running with the same --workdir resumes from its latest checkpoint. SIGTERM or SIGINT (preemption, Ctrl-C)
saves a checkpoint at the current step and exits with status 128 + signal; running again resumes there. Metrics go to
<workdir>/metrics.jsonl and <workdir>/tensorboard; the resolved config to <workdir>/config.json.

A config with an `entry` key ("module:function", e.g. configs/mlp_memory.py's pipeline stages) is run by calling
that function with (config, workdir) instead of the training loop.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with :arg.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO; --verbosity=0 shows them
  from memarch.preemption import Preempted  # noqa: PLC0415 - keep --help fast
  from memarch.sharding import initialize_distributed  # noqa: PLC0415
  from memarch.train import train_and_evaluate  # noqa: PLC0415

  # Before any other JAX call: joins the multi-process runtime when the config or the environment names one.
  initialize_distributed(_CONFIG.value.get("distributed") or {})

  entry = _CONFIG.value.get("entry")
  if entry:  # a pipeline stage instead of training (configs/mlp_memory.py)
    import importlib  # noqa: PLC0415

    module, _, name = entry.partition(":")
    summary = getattr(importlib.import_module(module), name)(_CONFIG.value, _WORKDIR.value)
    print(json.dumps(summary, indent=1, default=str), flush=True)
    return
  try:
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except Preempted as e:  # SIGTERM / SIGINT: checkpointed; a scheduler re-running this command resumes
    print(f"memarch: {e}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  summary = "  ".join(f"{k} {v:.4f}" for k, v in result.eval_metrics.items())
  import jax  # noqa: PLC0415

  if jax.process_index() == 0:  # every process has the same metrics; one prints them
    print(f"final eval @ step {result.step}: {summary}", flush=True)


if __name__ == "__main__":
  app.run(main)
