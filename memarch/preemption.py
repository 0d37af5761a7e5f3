"""Preemption: SIGTERM or SIGINT during training becomes a checkpoint at the current step and a clean exit.

Schedulers (Cloud TPU, SLURM, Kubernetes) send SIGTERM some seconds before they kill a job; Ctrl-C sends
SIGINT. `SignalCheckpoint` records the signal instead of dying; the training loop checks it after every step,
saves a checkpoint at that step, waits for the (async) save to finish and raises `Preempted`, which
`experiments/run.py` turns into a message and exit status 128 + signal. Running again resumes from that step.
A second signal while the checkpoint is being written falls back to the default action (exit now); orbax's
atomic finalization then keeps the previous checkpoint as the latest. On several processes, orbax's preemption
sync point (`CheckpointManager.reached_preemption`, fed by JAX's distributed runtime) is checked as well, so
that every host saves at the same step.
"""

from __future__ import annotations

import signal
import threading


class Preempted(Exception):
  """Training stopped on a signal after checkpointing at `step`."""

  def __init__(self, step: int, signum: int | None, workdir: str):
    self.step, self.signum, self.workdir = step, signum, workdir
    name = signal.Signals(signum).name if signum else "a preemption notice"
    super().__init__(f"stopped by {name} at step {step}; a checkpoint was saved there. Run the same command "
                     f"again (same --workdir {workdir}) to resume.")

  @property
  def exit_code(self) -> int:
    return 128 + (self.signum or signal.SIGTERM)


class SignalCheckpoint:
  """Context manager: while active, SIGTERM/SIGINT set `signum` instead of ending the process.

  Only the main thread can install signal handlers; elsewhere (or with enabled=False) it does nothing.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, enabled: bool = True):
    self.enabled = enabled
    self.signum: int | None = None
    self._previous: dict[int, object] = {}

  def _handle(self, signum, frame):
    if self.signum is not None:  # a second signal: stop waiting for the checkpoint
      self._restore()
      signal.raise_signal(signum)
      return
    self.signum = signum

  def _restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def __enter__(self) -> "SignalCheckpoint":
    if self.enabled and threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    self._restore()
