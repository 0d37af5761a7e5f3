"""Benchmarks: `python -m experiments.benchmark NAME [options]`; each prints a table and writes JSON.

Names: attention (kernels.attention), scan (kernels.linear_scan / decay_scan), models (whole models: train
throughput, scaling with length, decoding, roofline, compile time), plan (what a config needs on a device mesh),
zoo (the zoo's models on its tasks: train speed and the CPU time of a zoo stage).
`python -m experiments.benchmark NAME --help` lists a benchmark's options.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "attention": "experiments.benchmarks.attention",
    "scan": "experiments.benchmarks.scan",
    "titans": "experiments.benchmarks.titans",  # one Titans NeuralMemory layer: tokens/s, time vs seq
    "mlp_memory": "experiments.benchmarks.mlp_memory",  # kNN-LM / MLP Memory / Memory Decoder perplexity + cost
    # whole models: train throughput, time per token vs length, decoding, roofline, compile time
    "models": "experiments.benchmarks.models",
    # launch planner: parameters, FLOPs, per-device memory, communication and step time on a mesh, without running
    "plan": "experiments.benchmarks.plan",
    # the zoo's models on the zoo's tasks: train tokens per CPU second, and the CPU hours of a zoo stage
    "zoo": "experiments.benchmarks.zoo",
}


def main(argv: list[str]) -> None:
  if not argv or argv[0] not in BENCHMARKS:
    sys.exit(f"usage: python -m experiments.benchmark {{{'|'.join(BENCHMARKS)}}} [options]")
  importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
  main(sys.argv[1:])
