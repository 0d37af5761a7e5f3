"""Checkpoints with orbax's CheckpointManager: train state, data-iterator position and a manifest.

Each step directory holds three items: `state` (the sharded TrainState, StandardSave), `data` (the grain
iterator's state, JSON) and `manifest` (model config and parameter shapes, JSON). Before restoring
the state, the manifest is compared with the current model, so a checkpoint from a different model or
shape is refused with a message that names what differs, before any array is read.

Faults, and what happens (tests/test_reliability.py inflicts each):
- A save cut short (kill, crash) leaves orbax's `<step>.orbax-checkpoint-tmp` directory, which orbax never
  lists as a step (atomic finalization): the run resumes from the last finished checkpoint. Old checkpoints
  are deleted only after a newer one has finished, so the last good one is never lost.
- A damaged checkpoint (a file truncated, changed or removed after it was written): every finished step's file
  sizes and CRC32s are recorded in `<dir>.integrity/<step>.json`; `restore_latest` checks them first, names
  the step and the file, moves that step to `<dir>.damaged/` and falls back to the previous good step (an
  error naming every damaged step when none is left).
- Out of disk: the save is refused before it starts when the free space cannot hold the state, and a save
  that fails for lack of space is an error that names the step and the previous (intact) checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import zlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """The checkpoint was written by a different model (config or parameter shapes differ)."""


class CheckpointDamagedError(ValueError):
  """A checkpoint's files are missing, truncated or unreadable."""


def file_crc32(path: str, chunk: int = 1 << 22) -> int:
  crc = 0
  with open(path, "rb") as f:
    while block := f.read(chunk):
      crc = zlib.crc32(block, crc)
  return crc


def directory_record(root: str) -> dict[str, list[int]]:
  """{relative path: [size in bytes, crc32]} for every file under root."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      out[os.path.relpath(path, root)] = [os.path.getsize(path), file_crc32(path)]
  return out


def record_problems(root: str, record: dict[str, list[int]]) -> list[str]:
  """What differs between the files under root and their record (empty: intact)."""
  problems = []
  for rel, (size, crc) in sorted(record.items()):
    path = os.path.join(root, rel)
    if not os.path.exists(path):
      problems.append(f"file {path} is missing")
    elif os.path.getsize(path) != size:
      problems.append(f"file {path} has {os.path.getsize(path)} bytes, {size} when written (truncated or changed)")
    elif file_crc32(path) != crc:
      problems.append(f"file {path} does not match its checksum (changed since it was written)")
  return problems


def param_shapes(params) -> dict[str, list]:
  """`{"block_0_attention/wq": [shape, dtype], ...}` for a parameter tree (arrays or ShapeDtypeStructs)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {
      "/".join(str(getattr(k, "key", k)) for k in path): [list(x.shape), str(x.dtype)] for path, x in flat
  }


def restore_params(directory: str, abstract_params, step: int | None = None):
  """The parameters of the latest (or `step`'s) checkpoint in `directory` (a run's `<workdir>/checkpoints`), read
  onto the shardings of `abstract_params` (see `Checkpointer.restore_params`)."""
  checkpointer = Checkpointer(directory, keep=1_000_000, async_save=False)
  try:
    return checkpointer.restore_params(abstract_params, step)[1]
  finally:
    checkpointer.close()


def make_manifest(model_config: dict, params) -> dict[str, Any]:
  # JSON round trip so tuples and lists compare equal after loading.
  return json.loads(json.dumps({"model": model_config, "params": param_shapes(params)}))


# Model keys added after checkpoints were written, each with the value that reproduces the behaviour of
# the code before it existed: a checkpoint without the key is compatible with a config holding that value.
ADDED_MODEL_KEYS = {
    "memory_objective_window": 1,  # ATLAS' Omega rule; 1 is the Titans update
    "memory_optimizer": "momentum",
    "memory_feature_map": "identity",
    "memory_feature_degree": 2,  # unused with the identity map
}


def manifest_differences(saved: dict, current: dict) -> list[str]:
  """Human-readable differences between a saved manifest and the current one (empty: compatible)."""
  diffs = []
  sm, cm = saved.get("model", {}), current.get("model", {})
  for key in sorted(set(sm) | set(cm)):
    if key not in sm and key in ADDED_MODEL_KEYS and cm.get(key) == ADDED_MODEL_KEYS[key]:
      continue
    if sm.get(key) != cm.get(key):
      diffs.append(f"model.{key}: checkpoint has {sm.get(key)!r}, config has {cm.get(key)!r}")
  sp, cp = saved.get("params", {}), current.get("params", {})
  for key in sorted(set(sp) | set(cp)):
    if key not in sp:
      diffs.append(f"parameter {key} is not in the checkpoint")
    elif key not in cp:
      diffs.append(f"parameter {key} is in the checkpoint but not in the model")
    elif sp[key] != cp[key]:
      diffs.append(f"parameter {key}: checkpoint {sp[key]}, model {cp[key]}")
  return diffs


class Checkpointer:
  """A thin layer over `ocp.CheckpointManager` for the training loop, with integrity records (see above)."""

  def __init__(self, directory: str, *, keep: int, keep_period: int = 0, async_save: bool = True,
               verify: bool = True):
    directory = os.path.abspath(directory)  # orbax refuses relative paths in some save paths
    # keep_period: steps that are multiples of it outlive the `keep` most recent (a sweep's stage checkpoints).
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period or None, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "data", "manifest"))
    self.directory = directory
    self.verify = verify
    self.integrity_dir = directory + ".integrity"
    self.damaged_dir = directory + ".damaged"

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # -- integrity records ---------------------------------------------------------------------------------
  def _record_path(self, step: int) -> str:
    return os.path.join(self.integrity_dir, f"{step}.json")

  def _record_finished(self) -> None:
    """Records the files of every finished step that has no record yet; drops records of deleted steps."""
    if not self.verify or jax.process_index() != 0:
      return
    os.makedirs(self.integrity_dir, exist_ok=True)
    steps = set(self.manager.all_steps())
    for step in steps:
      path = self._record_path(step)
      if not os.path.exists(path) and os.path.isdir(self.step_dir(step)):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
          json.dump(directory_record(self.step_dir(step)), f)
        os.replace(tmp, path)  # atomic: a record is complete or absent
    for name in os.listdir(self.integrity_dir):
      stem = name.split(".")[0]
      if stem.isdigit() and int(stem) not in steps:
        os.remove(os.path.join(self.integrity_dir, name))

  def problems(self, step: int) -> list[str]:
    """Missing, truncated or changed files of a finished step, against its record ([] if it has none)."""
    path = self._record_path(step)
    if not self.verify or not os.path.exists(path):
      return []
    with open(path) as f:
      return record_problems(self.step_dir(step), json.load(f))

  def _set_aside(self, step: int) -> None:
    """Moves a damaged step out of orbax's directory (kept for inspection), so that a new save of the same
    step number is possible and orbax never lists it again."""
    if jax.process_index() == 0:
      os.makedirs(self.damaged_dir, exist_ok=True)
      target = os.path.join(self.damaged_dir, str(step))
      if os.path.exists(target):
        shutil.rmtree(target)
      shutil.move(self.step_dir(step), target)
      if os.path.exists(self._record_path(step)):
        os.remove(self._record_path(step))
    self.manager.reload()

  # -- save ----------------------------------------------------------------------------------------------
  def _check_space(self, step: int, state) -> None:
    need = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    need = int(need * 1.05) + (1 << 20)  # the state's bytes plus room for metadata
    free = shutil.disk_usage(os.path.dirname(self.directory) or ".").free
    if free < need:
      raise OSError(errno.ENOSPC, self._no_space_message(step, f"it needs about {need / 2**20:.1f} MiB and "
                                                               f"{free / 2**20:.1f} MiB are free"))

  def _no_space_message(self, step: int | None, detail: str) -> str:
    previous = self.latest_step()
    kept = (f"the previous checkpoint (step {previous}) is intact and the run resumes from it"
            if previous is not None else "there is no earlier checkpoint")
    what = f"checkpoint step {step}" if step is not None else "a checkpoint"
    return (f"not enough disk space to save {what} in {self.directory}: {detail}. Nothing was "
            f"overwritten: {kept}. Free space (or lower train.keep_checkpoints) and run again.")

  def save(self, step: int, state, data_state: dict, manifest: dict, *, force: bool = False) -> bool:
    self.wait()  # orbax waits for the previous save anyway; finishing it here lets us record it
    self._check_space(step, state)
    try:
      return self.manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
              manifest=ocp.args.JsonSave(manifest),
          ),
          force=force,
      )
    except OSError as e:
      if e.errno == errno.ENOSPC:
        raise OSError(errno.ENOSPC, self._no_space_message(step, str(e))) from e
      raise

  def reached_preemption(self, step: int) -> bool:
    """orbax's multi-host preemption sync point (JAX's distributed runtime); False on a single process."""
    return jax.process_count() > 1 and self.manager.reached_preemption(step)

  # -- restore -------------------------------------------------------------------------------------------
  def restore(self, step: int, abstract_state, manifest: dict):
    """Returns (state, data_state) at `step`.

    CheckpointDamagedError if its files are missing, truncated or unreadable; CheckpointMismatchError if it
    was written by a different model.
    """
    problems = self.problems(step)
    if problems:
      raise CheckpointDamagedError(f"checkpoint step {step} in {self.directory} is damaged: " + "; ".join(problems))
    try:
      saved = self.manager.restore(step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))["manifest"]
    except Exception as e:  # noqa: BLE001 - any failure to read means the checkpoint is unusable
      raise CheckpointDamagedError(f"checkpoint step {step} in {self.directory} is missing or damaged ({e}).") from e
    diffs = manifest_differences(saved, manifest)
    if diffs:
      raise CheckpointMismatchError(
          f"the checkpoint at step {step} in {self.directory} was written by a different model:\n  "
          + "\n  ".join(diffs)
          + "\nUse a new --workdir, or restore the config that wrote it."
      )
    try:
      out = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
      )
    except Exception as e:  # noqa: BLE001
      raise CheckpointDamagedError(f"checkpoint step {step} in {self.directory} could not be restored ({e}).") from e
    return out["state"], out["data"]

  def restore_latest(self, abstract_state, manifest: dict, log=None):
    """(step, state, data_state) of the newest usable checkpoint, or None when there is none.

    A damaged step is reported (through `log`, default stderr), moved to `<dir>.damaged/`, and the previous
    step is tried; if every step is damaged, CheckpointDamagedError lists them all.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    damaged = []
    for step in reversed(self.all_steps()):
      try:
        state, data_state = self.restore(step, abstract_state, manifest)
      except CheckpointDamagedError as e:
        damaged.append(str(e))
        log(f"WARNING: {e}\n  Moving it to {self.damaged_dir} and trying the previous checkpoint.")
        self._set_aside(step)
        continue
      return step, state, data_state
    if damaged:
      raise CheckpointDamagedError(
          f"no usable checkpoint left in {self.directory}; damaged (now in {self.damaged_dir}):\n  "
          + "\n  ".join(damaged) + "\nRun again to start from step 0, or restore the files."
      )
    return None

  def restore_params(self, abstract_params, step: int | None = None):
    """The parameters alone of checkpoint `step` (default: the latest), each read straight onto the sharding of
    its abstract leaf (`jax.ShapeDtypeStruct(shape, dtype, sharding=...)`): a checkpoint written on one mesh
    (or number of hosts) loads onto another, and the optimizer state is not read. Returns (step, params).

    CheckpointDamagedError if the step is damaged (or there is none), CheckpointMismatchError if its parameter
    shapes differ from `abstract_params`.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointDamagedError(f"no checkpoint in {self.directory}.")
    problems = self.problems(step)
    if problems:
      raise CheckpointDamagedError(f"checkpoint step {step} in {self.directory} is damaged: " + "; ".join(problems))
    saved = self.manager.restore(step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))["manifest"]
    diffs = manifest_differences({"params": saved.get("params", {})},
                                 json.loads(json.dumps({"params": param_shapes(abstract_params)})))
    if diffs:
      raise CheckpointMismatchError(f"the parameters of checkpoint step {step} in {self.directory} differ from the "
                                    "model's:\n  " + "\n  ".join(diffs))
    # The state item is an orbax PyTree; a partial restore reads only the "params" subtree.
    target = {"params": abstract_params}
    out = ocp.PyTreeCheckpointer().restore(
        os.path.join(self.step_dir(step), "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                    partial_restore=True),
    )
    return step, out["params"]

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except OSError as e:
      if e.errno == errno.ENOSPC:
        raise OSError(errno.ENOSPC, self._no_space_message(None, str(e))) from e
      raise
    self._record_finished()

  def close(self) -> None:
    self.manager.close()
