"""Checkpoints with orbax's CheckpointManager: train state, data-iterator position and a manifest.

Each step directory holds three items: `state` (the sharded TrainState, StandardSave), `data` (the grain
iterator's state, JSON) and `manifest` (model config and parameter shapes, JSON). Before restoring
the state, the manifest is compared with the current model, so a checkpoint from a different model or
shape is refused with a message that names what differs, before any array is read.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def param_shapes(params) -> dict[str, list]:
  """`{"block_0_attention/wq": [shape, dtype], ...}` for a parameter tree (arrays or ShapeDtypeStructs)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {
      "/".join(str(getattr(k, "key", k)) for k in path): [list(x.shape), str(x.dtype)] for path, x in flat
  }


def make_manifest(model_config: dict, params) -> dict[str, Any]:
  # JSON round trip so tuples and lists compare equal after loading.
  return json.loads(json.dumps({"model": model_config, "params": param_shapes(params)}))


def manifest_differences(saved: dict, current: dict) -> list[str]:
  """Human-readable differences between a saved manifest and the current one (empty: compatible)."""
  diffs = []
  sm, cm = saved.get("model", {}), current.get("model", {})
  for key in sorted(set(sm) | set(cm)):
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
  """A thin layer over `ocp.CheckpointManager` for the training loop."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    directory = os.path.abspath(directory)  # orbax refuses relative paths in some save paths
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "data", "manifest"))
    self.directory = directory

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, manifest: dict, *, force: bool = False) -> bool:
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            manifest=ocp.args.JsonSave(manifest),
        ),
        force=force,
    )

  def restore(self, step: int, abstract_state, manifest: dict):
    """Returns (state, data_state) at `step`; ValueError if the checkpoint does not fit the model."""
    try:
      saved = self.manager.restore(step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))["manifest"]
    except Exception as e:  # noqa: BLE001 - any failure to read means the checkpoint is unusable
      raise ValueError(f"checkpoint step {step} in {self.directory} is missing or damaged ({e}).") from e
    diffs = manifest_differences(saved, manifest)
    if diffs:
      raise ValueError(
          f"the checkpoint at step {step} in {self.directory} was written by a different model:\n  "
          + "\n  ".join(diffs)
          + "\nUse a new --workdir, or restore the config that wrote it."
      )
    try:
      out = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
      )
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"checkpoint step {step} in {self.directory} could not be restored ({e}).") from e
    return out["state"], out["data"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
