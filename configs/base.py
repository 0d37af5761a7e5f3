"""The optim, train, mesh, distributed and eval sections, the `:arg` parser, and the assembly of a full config.

Every family's `get_config(arg)` calls `assemble(model=..., data=...)`, which adds these sections and
locks the result: an override of a key that does not exist is an error that lists the valid keys.
"""

from __future__ import annotations

from typing import Any

import ml_collections

# Logical axis -> mesh axes. Parameters: `embed`, `mlp`, `heads`, `kv`, `vocab`, `layers`;
# activations: `act_*`. FSDP shards parameters (and their optimizer moments) along `embed`; tensor
# parallelism splits heads, MLP hidden and vocabulary; the batch spreads over data x fsdp and its time axis
# over `sequence` (context parallelism). Recurrent memory states ([batch, heads, ...]) follow act_batch and
# act_heads. A mesh axis that does not divide a dimension is dropped there (memarch.sharding.fit_spec).
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("act_batch", ("data", "fsdp")),
    ("act_length", "sequence"),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses big_vision-style `:arg` strings, e.g. "size=tiny,variant=mac", against typed defaults.

  Unknown keys are an error naming the known ones; values are converted to the default's type.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config arg {item!r} must look like key=value; known keys: {sorted(defaults)}.")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known keys: {sorted(defaults)}.")
    kind = type(defaults[key])
    out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return out


def optim_config(*, lr: float = 3e-3, warmup_steps: int = 100) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "adamw"  # "adamw" | "muon" (optax.contrib.muon on matrices, AdamW on the rest)
  c.lr = lr  # peak learning rate
  c.warmup_steps = warmup_steps  # linear warmup from 0 to lr
  c.schedule = "cosine"  # "cosine" (to min_lr_ratio * lr at the last step) | "constant"
  c.min_lr_ratio = 0.1
  c.weight_decay = 0.1  # decoupled; applied to matrices only (not norms, not embeddings)
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-8
  c.grad_clip = 1.0  # global-norm clipping (0 disables)
  return c


def train_config(*, steps: int = 1000, batch_size: int = 64) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.steps = steps  # total optimizer steps
  c.batch_size = batch_size  # global batch (split over hosts and the data x fsdp mesh axes)
  c.seed = 0  # parameter initialization
  c.log_every = 50  # steps between metric lines
  c.eval_every = 250  # steps between evaluations (0: only at the end)
  c.checkpoint_every = 500  # steps between checkpoints (0: only at the end)
  c.keep_checkpoints = 3  # how many recent checkpoints to keep
  c.keep_period = 0  # also keep every checkpoint whose step is a multiple of this (0: none), e.g. a zoo's stages
  c.async_checkpoint = True  # save in the background while training goes on
  # Record each finished checkpoint's file sizes and CRC32s, and check them before restoring: a truncated or
  # missing file is named, that step is set aside, and the run resumes from the previous good one.
  c.verify_checkpoints = True
  # SIGTERM / SIGINT (preemption, Ctrl-C): checkpoint at the current step, wait for the save, exit with a message.
  c.handle_signals = True
  # A step with a non-finite loss or gradient is skipped (not applied); this many in a row stop the run with an
  # error naming the step and the batch (saved to <workdir>/nonfinite_batch_step<N>.npz). 0: stop at the first.
  c.max_nonfinite_steps = 10
  c.progress = "auto"  # "auto" (a tqdm bar on a terminal, lines otherwise) | "bar" | "lines" | "none"
  c.tensorboard = True  # also write TensorBoard event files (tensorboardX)
  return c


def mesh_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Devices per mesh axis; one axis may be -1 (all remaining devices). Their product is the number of devices
  # over all hosts (jax.device_count()); a mismatch is an error before anything is compiled.
  c.data = -1  # pure data parallelism: batch rows, parameters replicated
  c.fsdp = 1  # batch rows too, and parameters + optimizer state sharded (along `embed`)
  c.tensor = 1  # heads, MLP hidden and vocabulary (Megatron-style tensor parallelism)
  c.sequence = 1  # the time axis of the batch (context parallelism)
  c.rules = DEFAULT_RULES  # logical axis -> mesh axes, as ((name, axis or tuple of axes or None), ...)
  # A parameter whose `embed` dimension cannot be split over fsdp (it has none, or fsdp does not divide it) is
  # split along its largest dimension that fsdp divides instead (storage only: it is gathered where used).
  c.fsdp_fallback = True
  return c


def distributed_config() -> ml_collections.ConfigDict:
  """Multi-host: `experiments/run.py` calls `jax.distributed.initialize` before any other JAX call when
  coordinator_address is set, or when the environment names a cluster (JAX's own detection: SLURM, Open MPI,
  Cloud TPU pods, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). Run the same command on
  every host; each loads its own rows of every batch."""
  c = ml_collections.ConfigDict()
  c.coordinator_address = ""  # "host:port" of process 0 ("": from the environment, or a single process)
  c.num_processes = 0  # total number of processes (0: from the environment)
  c.process_id = -1  # this process's index in [0, num_processes) (-1: from the environment)
  c.local_device_ids = ""  # comma-separated local device ids this process uses ("": all of them)
  # CPU collectives across processes ("gloo"; "none" keeps jax's default, which cannot run cross-process
  # computations on CPU). Ignored on TPU and GPU.
  c.cpu_collectives = "gloo"
  c.initialization_timeout = 300  # seconds to wait for every process to connect
  return c


def eval_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.batch_size = 64  # global eval batch
  c.max_batches = 0  # per eval set (0: all of it)
  return c


def assemble(*, model: ml_collections.ConfigDict, data: ml_collections.ConfigDict,
             optim: ml_collections.ConfigDict, train: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model
  config.data = data
  config.optim = optim
  config.train = train
  config.mesh = mesh_config()
  config.distributed = distributed_config()
  config.eval = eval_config()
  config.lock()
  return config
