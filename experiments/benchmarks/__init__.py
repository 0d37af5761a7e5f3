"""Benchmarks run by `python -m experiments.benchmark NAME`; each module has `main(argv) -> dict`."""
