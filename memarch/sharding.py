"""Device meshes, logical-to-mesh rules, parameter and batch placement, and kernels under shard_map.

Parameters and activations carry logical axis names; `config.mesh.rules` maps them to the mesh axes
`data`, `fsdp`, `tensor`, `sequence` (configs/base.py DEFAULT_RULES): weights are sharded over `fsdp` along
`embed`, heads / MLP hidden / vocabulary over `tensor`; the batch is split over data x fsdp and, with a
`sequence` axis > 1, the time axis of every batch array over `sequence`.

Every spec is fitted to the array's shape (`fit_spec`): a mesh axis that does not divide its dimension is
dropped (that dimension is replicated over it), so any model runs on any mesh without an error, e.g. 2
heads on a tensor axis of 4. With `mesh.fsdp_fallback`, a parameter whose `embed` dimension cannot take the
fsdp axes (none, or it does not divide) is sharded over them along its largest dimension that divides
instead (ZeRO-3: fsdp shards storage, the partitioner all-gathers a weight where it is used).

Pallas kernels are custom calls the partitioner cannot split: `attention` and `linear_scan` below call
`kernels.attention` / `kernels.linear_scan` inside `jax.shard_map` over batch and heads when the impl
resolves to a Pallas kernel and a mesh of more than one device is active; the layers call them instead of
the `kernels` functions. On CPU ("xla") they are the plain kernels.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import kernels
from kernels.dispatch import resolve_impl

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")
SEQUENCE_AXIS = "sequence"


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
  """A mesh over all devices (or `devices`) with axes MESH_AXES in Auto (partitioner-driven) mode.

  Devices keep jax's order (process by process), so on several hosts the outer `data` axis spans the hosts
  and each host's devices hold contiguous batch rows: the rows it loaded (`place_batch`).
  """
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_rules(mesh_config) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in mesh_config.rules)


# ----------------------------------------------------------------------------------------------------------
# Specs fitted to shapes


def _axes_tuple(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: Sequence[str]):
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def fit_spec(shape: Sequence[int], spec: P | Sequence[Any], axis_sizes: dict[str, int]) -> P:
  """`spec` with every mesh axis that does not divide its dimension dropped (replicated there), and axes of
  size 1 (which split nothing) left out, so the spec says how the array is really split.

  Axes are taken in order: for a dimension mapped to ("data", "fsdp"), "data" is kept if it divides the
  dimension, then "fsdp" if it divides what remains. Entries past the array's rank are an error.
  """
  spec = tuple(spec)
  if len(spec) > len(shape):
    raise ValueError(f"partition spec {spec} has more entries than the array has dimensions {tuple(shape)}.")
  out = []
  for dim, entry in zip(shape, spec + (None,) * (len(shape) - len(spec))):
    kept, n = [], 1
    for axis in _axes_tuple(entry):
      if axis_sizes[axis] > 1 and dim % (n * axis_sizes[axis]) == 0:
        kept.append(axis)
        n *= axis_sizes[axis]
    out.append(_entry(kept))
  return P(*out)


def logical_spec(shape: Sequence[int], names: Sequence[str | None], axis_sizes: dict[str, int], rules=None) -> P:
  """The mesh spec of an array with logical axis `names` under `rules` (default: the flax rules in
  context), fitted to `shape`."""
  return fit_spec(shape, nn.logical_to_mesh_axes(tuple(names), rules), axis_sizes)


def _fsdp_fallback(shape, spec: P, axis_sizes: dict[str, int], fsdp_axes: tuple[str, ...]) -> P:
  """Places the fsdp mesh axes that `spec` leaves unused on the largest unsharded dimension they divide."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  used = {a for e in entries for a in _axes_tuple(e)}
  free = tuple(a for a in fsdp_axes if a not in used and axis_sizes[a] > 1)
  if not free:
    return spec
  n = math.prod(axis_sizes[a] for a in free)
  candidates = [i for i, (d, e) in enumerate(zip(shape, entries)) if e is None and d % n == 0]
  if not candidates:
    return spec
  best = max(candidates, key=lambda i: (shape[i], -i))
  entries[best] = _entry(free)
  return P(*entries)


def param_spec(shape, names, axis_sizes: dict[str, int], rules, *, fsdp_fallback: bool = True) -> P:
  """The mesh spec of a parameter: its logical axes under `rules`, fitted to its shape, and with
  `fsdp_fallback` the `embed` rule's mesh axes placed on another dimension when `embed` could not take them."""
  spec = logical_spec(shape, names, axis_sizes, rules)
  if fsdp_fallback:
    fsdp_axes = next((_axes_tuple(axes) for name, axes in rules if name == "embed"), ())
    spec = _fsdp_fallback(shape, spec, axis_sizes, fsdp_axes)
  return spec


def tree_shardings(boxed_abstract_tree, mesh: Mesh, rules, *, fsdp_fallback: bool = True) -> Any:
  """NamedShardings for a parameter tree whose leaves may carry logical axis metadata (`nn.Partitioned`,
  from `jax.eval_shape` of a flax init); leaves without it are replicated (sharded over fsdp with
  `fsdp_fallback`). Returns the unboxed tree's structure."""
  sizes = dict(mesh.shape)

  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      shape, names = leaf.value.shape, leaf.names
    else:
      shape, names = np.shape(leaf), (None,) * len(np.shape(leaf))
    return NamedSharding(mesh, param_spec(shape, names, sizes, rules, fsdp_fallback=fsdp_fallback))

  return jax.tree.map(one, boxed_abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _context_axis_sizes() -> dict[str, int] | None:
  """Axis sizes of the mesh set with `jax.set_mesh` (None without one, or with a single device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  return dict(mesh.shape)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names (flax rules in context), fitted to x's shape: a no-op
  without a multi-device mesh in context (`jax.set_mesh`)."""
  sizes = _context_axis_sizes()
  if sizes is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(x.shape, names, sizes))


def sequence_axis_size() -> int:
  """Devices along the `sequence` mesh axis of the mesh in context (`jax.set_mesh`), 1 without one.

  Layers call it at trace time to choose context parallelism (ring attention, sequence-parallel scans,
  `kernels.sequence_parallel`) when it is > 1, and their single-device code otherwise.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
    return 1
  return int(mesh.shape[SEQUENCE_AXIS])


# ----------------------------------------------------------------------------------------------------------
# Batches


def batch_spec(shape: Sequence[int], axis_sizes: dict[str, int]) -> P:
  """Rows over data x fsdp, and the time axis (dimension 1) over `sequence` when the array has one."""
  spec = (BATCH_AXES, SEQUENCE_AXIS) if len(shape) >= 2 else (BATCH_AXES,)
  return fit_spec(shape, spec, axis_sizes)


def batch_sharding(mesh: Mesh, shape: Sequence[int] | None = None) -> NamedSharding:
  """The sharding of a global batch array of `shape` (None: rows only, over data x fsdp)."""
  if shape is None:
    return NamedSharding(mesh, P(BATCH_AXES))
  return NamedSharding(mesh, batch_spec(shape, dict(mesh.shape)))


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
  if dp % hosts:
    # Each host loads its own rows (place_batch); with fewer row groups than hosts, a host's devices would
    # need rows that another host loaded.
    raise ValueError(
        f"config.mesh: data x fsdp = {dp} must be a multiple of the number of hosts ({hosts}): every host loads "
        "its own rows of the batch. Put more devices on the data or fsdp axes.")
  return global_batch // hosts


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's local batch rows into global arrays (rows over data x fsdp, time over
  `sequence`). Host i's rows become global rows [i * B_host, (i + 1) * B_host)."""
  out = {}
  for key, local in batch.items():
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, global_shape), local, global_shape)
  return out


# ----------------------------------------------------------------------------------------------------------
# Kernels under shard_map

BATCH_NAME, HEADS_NAME = "act_batch", "act_heads"


def kernel_axis_sizes(impl: str, op: str) -> dict[str, int] | None:
  """The context mesh's axis sizes when `impl` resolves to a Pallas kernel and a mesh of more than one
  device is active (the kernel must then run under shard_map), else None (call it directly)."""
  if not resolve_impl(impl, op).startswith("pallas"):
    return None
  return _context_axis_sizes()


def _dims_spec(sizes: dict[str, int], name: str, *dims: int):
  """The mesh axes of logical `name` (flax rules in context) that divide every one of `dims`."""
  axes = _axes_tuple(nn.logical_to_mesh_axes((name,))[0])
  kept, n = [], 1
  for axis in axes:
    if sizes[axis] > 1 and all(d % (n * sizes[axis]) == 0 for d in dims):
      kept.append(axis)
      n *= sizes[axis]
  return _entry(kept)


def shard_kernel(fn: Callable, arrays: dict[str, Any], in_specs: dict[str, Any], out_specs, **static) -> Any:
  """`fn(**arrays, **static)` inside `jax.shard_map` over the context mesh: every device runs the kernel
  on its block of `arrays` (partitioned by `in_specs`, a matching tree of PartitionSpecs); the outputs are
  assembled by `out_specs`. Dimensions a spec leaves unsharded are all-gathered first (e.g. a time axis
  sharded over `sequence`)."""
  call = lambda a: fn(**a, **static)
  return jax.shard_map(call, in_specs=(in_specs,), out_specs=out_specs, check_vma=False)(arrays)


def _row_spec(x, b):
  """The spec of a per-row kernel argument: None (absent), a Python scalar (static), a 0-d array
  (replicated) or an array whose first axis is the batch."""
  return P() if np.ndim(x) == 0 else P(b, *([None] * (np.ndim(x) - 1)))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, **kwargs):
  """`kernels.attention` (same arguments), under shard_map over batch and heads for a Pallas impl on a
  multi-device mesh. Heads are split only where the mesh axes divide both q's heads and k's (GQA groups
  stay whole on a device); rows where they divide the batch."""
  sizes = kernel_axis_sizes(kwargs.get("impl", "auto"), "attention")
  if sizes is None:
    return kernels.attention(q, k, v, **kwargs)
  b = _dims_spec(sizes, BATCH_NAME, q.shape[0])
  h = _dims_spec(sizes, HEADS_NAME, q.shape[2], k.shape[2])
  arrays = {"q": q, "k": k, "v": v}
  specs = {name: P(b, None, h, None) for name in arrays}
  for name in ("kv_lengths", "q_offset", "k_offset", "segment_ids"):
    x = kwargs.pop(name, None)
    if x is None or isinstance(x, (int, np.integer)):
      if x is not None:
        kwargs[name] = x
      continue
    arrays[name] = x
    specs[name] = jax.tree.map(lambda a: _row_spec(a, b), x)
  out = P(b, None, h, None)
  out_specs = (out, P(b, None, h)) if kwargs.get("return_lse") else out
  return shard_kernel(kernels.attention, arrays, specs, out_specs, **kwargs)


def linear_scan(q: jax.Array, k: jax.Array, v: jax.Array, **kwargs):
  """`kernels.linear_scan` (same arguments), under shard_map over batch and heads for a Pallas impl on a
  multi-device mesh: each device scans its rows and heads (the recurrence is independent across both)."""
  sizes = kernel_axis_sizes(kwargs.get("impl", "auto"), "linear_scan")
  if sizes is None:
    return kernels.linear_scan(q, k, v, **kwargs)
  b = _dims_spec(sizes, BATCH_NAME, q.shape[0])
  h = _dims_spec(sizes, HEADS_NAME, q.shape[2])
  arrays = {"q": q, "k": k, "v": v}
  specs = {name: P(b, None, h, None) for name in arrays}
  for name, spec in (("g", P(b, None, h)), ("beta", P(b, None, h)), ("initial_state", P(b, h, None, None))):
    if kwargs.get(name) is not None:
      arrays[name] = kwargs.pop(name)
      specs[name] = spec
  return shard_kernel(kernels.linear_scan, arrays, specs, (P(b, None, h, None), P(b, h, None, None)), **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Multi-host


def _cluster_detected() -> bool:
  """Whether JAX's cluster auto-detection (SLURM, Open MPI, Cloud TPU, Kubernetes) finds an environment.
  Uses jax's internal cluster registry (no public API for the question); False if it is unavailable."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  for env in getattr(clusters.ClusterEnv, "_cluster_types", ()):
    try:
      if not env.opt_in_only_method and env.is_env_present():
        return True
    except Exception:  # noqa: BLE001 - a broken detector means "not this cluster"
      continue
  return False


def initialize_distributed(dist_config) -> bool:
  """Joins the multi-process JAX runtime when the config or the environment names one; call it before any
  other JAX call (experiments/run.py does). Returns True when running as one of several processes.

  Order: `dist_config.coordinator_address` (with num_processes / process_id, or else what JAX detects);
  else the environment variable JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID, or the
  config's values); else a cluster JAX detects by itself (SLURM, Open MPI, Cloud TPU pods, Kubernetes);
  else nothing (a single process). On CPU, cross-process collectives need `dist_config.cpu_collectives`
  ("gloo"), set before the backend starts.
  """
  import os  # pylint: disable=g-import-not-at-top

  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  address = dist_config.get("coordinator_address", "") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if not address and not _cluster_detected():
    return False
  num = int(dist_config.get("num_processes", 0)) or int(os.environ.get("JAX_NUM_PROCESSES", 0)) or None
  pid = int(dist_config.get("process_id", -1))
  if pid < 0 and "JAX_PROCESS_ID" in os.environ:
    pid = int(os.environ["JAX_PROCESS_ID"])
  if num is not None and pid >= 0 and not 0 <= pid < num:
    raise ValueError(f"config.distributed: process_id={pid} must be in [0, num_processes={num}).")
  ids = dist_config.get("local_device_ids", "")
  collectives = dist_config.get("cpu_collectives", "gloo")
  if collectives and collectives != "none":
    jax.config.update("jax_cpu_collectives_implementation", collectives)
  jax.distributed.initialize(
      coordinator_address=address or None, num_processes=num, process_id=pid if pid >= 0 else None,
      local_device_ids=[int(i) for i in ids.split(",")] if ids else None,
      initialization_timeout=int(dist_config.get("initialization_timeout", 300)),
  )
  return jax.process_count() > 1
