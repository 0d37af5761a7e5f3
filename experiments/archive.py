"""A tracked copy of a training run's records, so that finished results outlive the run directory.

A zoo takes far longer than one working session, and `runs/` (checkpoints, TensorBoard events) is neither
tracked nor kept between machines. What a comparison needs of a finished run is small: its config, its metrics,
its stage results and its evaluations (a few kB). `save` copies those records of a run directory into an archive
directory (under version control: `results/zoo/...`); `restore` copies them back into an empty or partial run
directory, where the sweep sees the stage as finished, `experiments.evaluate.reuse` finds the evaluation and
`experiments.compare` builds its row, all without the checkpoints.

A restored run has no checkpoint: a later stage trains it again from step 0 (the run is fixed by its seed, and
the training loop resumes exactly, so this is the same run, only paid for twice).
"""

from __future__ import annotations

import datetime
import filecmp
import fnmatch
import json
import os
import shutil
import subprocess

# Relative paths (glob patterns) of the records of a run directory; never its checkpoints, events or plots.
RECORDS = ("config.json", "metrics.jsonl", "diverged.json", "result_step*.json", "eval/results_step*.json")
PROVENANCE = "provenance.json"


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
  provenance = {"commit": git_commit(os.path.dirname(os.path.abspath(__file__))),
                "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "from": os.path.abspath(workdir), "files": files}
  with open(os.path.join(archived, PROVENANCE), "w") as f:
    json.dump(provenance, f, indent=1)
  return changed


def restore(archived: str, workdir: str) -> list[str]:
  """Copies the archived records that `workdir` lacks into it (a file the run directory has is its own, newer
  record, and is kept). Returns the copied relative paths."""
  copied = []
  for rel in record_files(archived):
    dest = os.path.join(workdir, rel)
    if not os.path.exists(dest):
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.copyfile(os.path.join(archived, rel), dest)
      copied.append(rel)
  return copied
