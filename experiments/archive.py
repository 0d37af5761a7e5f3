"""A tracked copy of a training run's records, so that finished results outlive the run directory.

A zoo takes far longer than one working session, and `runs/` (checkpoints, TensorBoard events) is neither
tracked nor kept between machines. What a comparison needs of a finished run is small: its config, its metrics,
its stage results and its evaluations (a few kB). `save` copies those records of a run directory into an archive
directory (under version control: `results/zoo/...`); `restore` copies them back into an empty or partial run
directory, where the sweep sees the stage as finished, `experiments.evaluate.reuse` finds the evaluation and
`experiments.compare` builds its row, all without the checkpoints.

A restored run has no checkpoint: a later stage trains it again from step 0 (the run is fixed by its seed, and
the training loop resumes exactly, so this is the same run, only paid for twice). A run stopped in the middle of
a stage (the end of a working session) would lose everything since step 0 the same way, which for the slow
models is more than a session can train; `park` copies its latest checkpoint into the archive as well (a tiny
model's checkpoint, parameters, optimizer state and data position, is a few MB), and `restore` puts it back, so
the run resumes from there. A parked checkpoint is dropped from the archive once the run's records have passed
it (a later `save` of a stage finished after its step): only unfinished work is kept, one checkpoint per run.
`park(..., finished_below=N)` parks a finished stage's checkpoint before step N too, for a run that will go on to
a later stage: a slow model's stage costs CPU hours to train again (ATLAS: about one per 250 steps and learning
rate), its checkpoint a few MB of the archive.
"""

from __future__ import annotations

import datetime
import filecmp
import fnmatch
import json
import os
import re
import shutil
import subprocess

# Relative paths (glob patterns) of the records of a run directory; never its checkpoints, events or plots.
RECORDS = ("config.json", "metrics.jsonl", "diverged.json", "result_step*.json", "eval/results_step*.json")
PROVENANCE = "provenance.json"
# A parked checkpoint keeps the run directory's layout (memarch.checkpoint.Checkpointer): the orbax step directory
# and its integrity record.
CHECKPOINTS, INTEGRITY = "checkpoints", "checkpoints.integrity"


def record_files(workdir: str) -> list[str]:
  """The records of `workdir` (paths relative to it), sorted."""
  found = []
  for sub in ("", "eval"):
    folder = os.path.join(workdir, sub)
    if not os.path.isdir(folder):
      continue
    for name in os.listdir(folder):
      rel = os.path.join(sub, name) if sub else name
      if os.path.isfile(os.path.join(workdir, rel)) and any(fnmatch.fnmatch(rel, p) for p in RECORDS):
        found.append(rel)
  return sorted(found)


def git_commit(path: str = ".") -> str | None:
  """The commit checked out at `path` (with '+dirty' when tracked Python files, the code and configs, differ from
  it; the archive's own tracked records change with every stage), or None outside git."""
  try:
    run = lambda *a: subprocess.run(["git", "-C", path, *a], capture_output=True, text=True, timeout=30, check=True)
    commit = run("rev-parse", "HEAD").stdout.strip()
    dirty = bool(run("status", "--porcelain", "--untracked-files=no", "--", "*.py").stdout.strip())
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("+dirty" if dirty else "")


def save(workdir: str, archived: str) -> list[str]:
  """Copies the records of run `workdir` that are new or changed into `archived` (replacing older copies: a run's
  records only grow) and, when any was, writes `provenance.json` there (the commit, the time). Returns the copied
  relative paths: none for a run archived before and unchanged since, whose archive is left as it was (a zoo
  re-saves every run of its table, and the history of results/ should show only what changed)."""
  files = record_files(workdir)
  if not files:
    raise FileNotFoundError(f"{workdir} holds no run records ({', '.join(RECORDS)}): nothing to archive.")
  changed = [rel for rel in files if not os.path.exists(os.path.join(archived, rel))
             or not filecmp.cmp(os.path.join(workdir, rel), os.path.join(archived, rel), shallow=False)]
  if not changed and os.path.exists(os.path.join(archived, PROVENANCE)):
    return []
  for rel in changed:
    os.makedirs(os.path.dirname(os.path.join(archived, rel)) or archived, exist_ok=True)
    shutil.copyfile(os.path.join(workdir, rel), os.path.join(archived, rel))
  _drop_passed_checkpoint(archived)
  provenance = {"commit": git_commit(os.path.dirname(os.path.abspath(__file__))),
                "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "from": os.path.abspath(workdir), "files": files}
  with open(os.path.join(archived, PROVENANCE), "w") as f:
    json.dump(provenance, f, indent=1)
  return changed


def restore(archived: str, workdir: str) -> list[str]:
  """Copies the archived records that `workdir` lacks into it (a file the run directory has is its own, newer
  record, and is kept), and the parked checkpoint when `workdir` has none at or after its step. Returns the copied
  relative paths (a checkpoint as its step directory, e.g. "checkpoints/184")."""
  copied = []
  for rel in record_files(archived):
    dest = os.path.join(workdir, rel)
    if not os.path.exists(dest):
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.copyfile(os.path.join(archived, rel), dest)
      copied.append(rel)
  step = parked_step(archived)
  if step is not None and all(s < step for s in checkpoint_steps(workdir)):
    _copy_checkpoint(archived, workdir, step)
    copied.append(os.path.join(CHECKPOINTS, str(step)))
  return copied


def checkpoint_steps(directory: str) -> list[int]:
  """The checkpoint steps of a run directory or of an archived run (the same layout), ascending; [] without a
  checkpoint folder (`memarch.train.checkpoint_steps` would create one: not in the tracked archive)."""
  if not os.path.isdir(os.path.join(directory, CHECKPOINTS)):
    return []
  from memarch.train import checkpoint_steps as steps  # noqa: PLC0415 - jax and orbax only when there is one

  return steps(directory)


def parked_step(archived: str) -> int | None:
  """The step of the checkpoint parked in `archived`, or None."""
  steps = checkpoint_steps(archived)
  return steps[-1] if steps else None


def _copy_checkpoint(src: str, dest: str, step: int) -> None:
  """Copies checkpoint `step` (its orbax directory, and its integrity record when there is one) from run or archive
  directory `src` to `dest`, replacing what `dest` had at that step; written beside and renamed, so that an
  interrupted copy never leaves a partial step where orbax would list it."""
  target = os.path.join(dest, CHECKPOINTS, str(step))
  tmp = os.path.join(dest, CHECKPOINTS, f".{step}.partial")
  os.makedirs(os.path.dirname(target), exist_ok=True)
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(os.path.join(src, CHECKPOINTS, str(step)), tmp)
  shutil.rmtree(target, ignore_errors=True)
  os.replace(tmp, target)
  record = os.path.join(src, INTEGRITY, f"{step}.json")
  if os.path.exists(record):
    os.makedirs(os.path.join(dest, INTEGRITY), exist_ok=True)
    shutil.copyfile(record, os.path.join(dest, INTEGRITY, f"{step}.json"))


def _remove_parked(archived: str) -> None:
  for sub in (CHECKPOINTS, INTEGRITY):
    shutil.rmtree(os.path.join(archived, sub), ignore_errors=True)


def _drop_passed_checkpoint(archived: str) -> None:
  """Removes the parked checkpoint once a stage finished after its step is archived: the run has moved past it
  (resuming there would train, and log, those steps twice). A checkpoint at a finished stage's own step stays: it
  is where the next stage resumes."""
  step = parked_step(archived)
  if step is None:
    return
  done = [int(m.group(1)) for name in os.listdir(archived) if (m := re.fullmatch(r"result_step(\d+)\.json", name))]
  if any(d > step for d in done) or os.path.exists(os.path.join(archived, "diverged.json")):
    _remove_parked(archived)


def park(workdir: str, archived: str, *, finished_below: int | None = None) -> int | None:
  """Archives the records of run `workdir` and its latest checkpoint, replacing the checkpoint parked there before,
  so that a fresh checkout resumes the run from that step (`restore`). Returns the parked step, or None when the
  run has no checkpoint, diverged, or its latest checkpoint is a finished stage not before `finished_below` (None:
  no finished stage is parked; the records keep that stage's results, only a later stage would train it again
  from step 0).

  Run it on a stopped run (a zoo stopped by SIGTERM or Ctrl-C saves a checkpoint first). A step orbax is still
  writing lives in a temporary directory until it is complete, so only finished steps are seen here."""
  steps = checkpoint_steps(workdir)
  if not steps or os.path.exists(os.path.join(workdir, "diverged.json")):
    return None
  step = steps[-1]
  goes_on = finished_below is not None and step < finished_below
  if not goes_on and os.path.exists(os.path.join(workdir, f"result_step{step}.json")):
    return None
  save(workdir, archived)  # the records even when the step is parked already (e.g. its evaluation finished since)
  if parked_step(archived) == step:
    return step
  _remove_parked(archived)
  _copy_checkpoint(workdir, archived, step)
  return step
