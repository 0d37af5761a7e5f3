"""Metrics: a JSON-lines file and TensorBoard events (tensorboardX) in the workdir, and progress output.

`metrics.jsonl` has one object per line: `{"step": int, "split": "train" | "eval", ...scalars}`. Read it
with `pandas.read_json(path, lines=True)` or `[json.loads(l) for l in open(path)]`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np


def host_rss_mib() -> float:
  """Resident memory of this process in MiB (Linux /proc; elsewhere the peak from getrusage)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  except (OSError, ValueError, IndexError):
    import resource  # noqa: PLC0415

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_free_memory() -> None:
  """Returns memory that the C allocator holds but no longer uses to the OS (glibc's malloc_trim).

  Evaluation and checkpoint saves allocate large host buffers from worker threads; glibc keeps the freed pages in
  per-thread arenas, so resident memory drifts upward over a long run although nothing leaks. The loop calls
  this before it measures resident memory at each log step. A no-op where glibc is absent.
  """
  global _LIBC
  if _LIBC is None:
    try:
      import ctypes  # noqa: PLC0415

      _LIBC = ctypes.CDLL("libc.so.6")
      _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
      _LIBC = False
  if _LIBC:
    _LIBC.malloc_trim(0)


_LIBC = None


class MetricWriter:
  """Appends scalars to `workdir/metrics.jsonl` and, optionally, TensorBoard event files."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # noqa: PLC0415 - optional at run time

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), "split": split, **clean}) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(f"{split}/{k}", v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
  """Progress output: a tqdm bar on a terminal, plain lines otherwise (logs, CI, notebooks' stdout).

  `update(step, scalars)` reports step, loss, steps/s, tokens/s and ETA. The rates are those of the interval
  since the previous update (the first interval includes compilation): a cumulative average would carry the
  compile time into every later figure, and a resumed run's into all of its.
  """

  def __init__(self, total: int, start: int, tokens_per_step: int, mode: str = "auto", enabled: bool = True):
    if mode not in ("auto", "bar", "lines", "none"):
      raise ValueError(f"train.progress must be auto, bar, lines or none; got {mode!r}.")
    if mode == "auto":
      mode = "bar" if sys.stderr.isatty() else "lines"
    self.mode = mode if enabled else "none"
    self.total, self.tokens_per_step = total, tokens_per_step
    self._t_last = time.perf_counter()
    self._bar = None
    if self.mode == "bar":
      from tqdm.auto import tqdm  # noqa: PLC0415

      self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
    self._last = start

  def rates(self, step: int) -> tuple[float, float, float]:
    """(steps/s, tokens/s, seconds left) over the interval since the last update."""
    elapsed = time.perf_counter() - self._t_last
    sps = (step - self._last) / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / sps if sps > 0 else float("nan")
    return sps, sps * self.tokens_per_step, eta

  def update(self, step: int, scalars: dict[str, float]) -> None:
    sps, tps, eta = self.rates(step)
    if self.mode == "bar":
      self._bar.update(step - self._last)
      self._bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}", tok_s=f"{tps:,.0f}")
    elif self.mode == "lines":
      extra = "  ".join(f"{k} {v:.4g}" for k, v in scalars.items() if k != "loss")
      eta_s = _fmt_time(eta) if np.isfinite(eta) else "?"
      print(
          f"step {step:>6}/{self.total}  loss {scalars.get('loss', float('nan')):.4f}  {sps:.2f} steps/s  "
          f"{tps:,.0f} tok/s  eta {eta_s}  {extra}",
          flush=True,
      )
    self._last, self._t_last = step, time.perf_counter()

  def message(self, text: str) -> None:
    if self.mode == "bar":
      self._bar.write(text)
    elif self.mode == "lines":
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
