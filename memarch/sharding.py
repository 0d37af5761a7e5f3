"""Device meshes, logical-to-mesh rules and batch placement.

Parameters and activations carry logical axis names; `config.mesh.rules` maps them to the mesh axes
`data`, `fsdp`, `tensor`, `sequence`. The batch is split over data x fsdp.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Sizes of MESH_AXES, with one -1 resolved; a clear error if they do not multiply to num_devices."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"config.mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not divide "
          f"the {num_devices} available devices."
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but {num_devices} are "
        "available. Set one axis to -1 to use the rest."
    )
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A mesh over all devices (or `devices`) with axes MESH_AXES in Auto (partitioner-driven) mode."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_rules(mesh_config) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in mesh_config.rules)


def tree_shardings(boxed_abstract_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree whose leaves may carry logical axis metadata (replicated otherwise)."""
  specs = nn.get_partition_spec(boxed_abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(global_batch: int, mesh: Mesh) -> int:
  """Returns the per-host batch; a clear error if the global batch cannot be split evenly."""
  dp, hosts = data_parallel_size(mesh), jax.process_count()
  if global_batch % dp or global_batch % hosts:
    raise ValueError(
        f"batch size {global_batch} must be divisible by the data x fsdp mesh size ({dp}) and by the number "
        f"of hosts ({hosts})."
    )
  return global_batch // hosts


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's local batch rows into global arrays sharded over data x fsdp."""
  sharding = batch_sharding(mesh)
  out = {}
  for key, local in batch.items():
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out


SEQUENCE_AXIS = "sequence"


def sequence_axis_size() -> int:
  """Devices along the `sequence` mesh axis of the mesh in context (`jax.set_mesh`), 1 without one.

  Layers call it at trace time to choose context parallelism (ring attention, sequence-parallel scans,
  `kernels.sequence_parallel`) when it is > 1, and their single-device code otherwise.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
    return 1
  return int(mesh.shape[SEQUENCE_AXIS])
