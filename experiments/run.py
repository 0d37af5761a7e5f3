r"""Trains and evaluates a model from an ml-collections config.

  python -m experiments.run --config configs/transformer.py:size=tiny --workdir runs/tiny
  python -m experiments.run --config configs/transformer.py:size=tiny --workdir runs/tiny --config.train.steps=200

Re-running with the same --workdir resumes from its latest checkpoint. SIGTERM or SIGINT (preemption, Ctrl-C)
saves a checkpoint at the current step and exits with status 128 + signal; running again resumes there. Metrics go to
<workdir>/metrics.jsonl and <workdir>/tensorboard; the resolved config to <workdir>/config.json.
"""

from __future__ import annotations

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
  from memarch.train import train_and_evaluate  # noqa: PLC0415

  try:
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except Preempted as e:  # SIGTERM / SIGINT: checkpointed; a scheduler re-running this command resumes
    print(f"memarch: {e}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  summary = "  ".join(f"{k} {v:.4f}" for k, v in result.eval_metrics.items())
  print(f"final eval @ step {result.step}: {summary}", flush=True)


if __name__ == "__main__":
  app.run(main)
