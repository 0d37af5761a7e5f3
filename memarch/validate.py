"""Config validation before any compute: `validate_config(config, num_devices)`.

`memarch.train.train_and_evaluate` calls `validate_config(config, jax.device_count())` first thing, so that
a bad value is refused before the mesh, the data or the model are built. Every error is a `ValueError`
that names the key (`config.<section>.<key>`), its value and why it is refused.

Unknown keys and values of the wrong type are refused earlier, when the override is applied to the locked
ConfigDict (`--config.x.y=...` or `experiments.sweep.apply_override`); the checks here catch values that are
well-typed but invalid or inconsistent with each other. Each check is a small function over one section (or
one block type of the model section); the model checks run only for the block types that
`model.layer_blocks` names, since a family's config carries keys (e.g. `window`, `chunk_size`) that only some
block types read.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from memarch import sharding as shard_lib
from memarch.layers import blocks as blocks_lib
from memarch.layers.common import dtype_from_name

SECTIONS = ("model", "data", "optim", "train", "mesh", "eval")
KERNEL_IMPLS = ("auto", "pallas", "pallas_interpret", "xla", "reference")  # kernels.dispatch.IMPLS
MEMORY_RULES = ("linear", "simple_gla", "delta", "gated_delta")  # memarch.layers.linear_memory.MEMORY_RULES
OPTIMIZERS = ("adamw", "muon")  # memarch.optim.make_optimizer
SCHEDULES = ("cosine", "constant")  # memarch.optim.make_schedule
PROGRESS_MODES = ("auto", "bar", "lines", "none")  # memarch.metrics.Progress
ATTENTION_BLOCKS = ("attention", "window_attention", "mac", "mag")  # blocks with RoPE attention heads
NEURAL_MEMORY_BLOCKS = ("neural_memory", "mac", "mag")  # blocks built on memarch.layers.neural_memory


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _fail(section: str, key: str, value: Any, why: str) -> None:
  """Raises the ValueError every check uses: `config.<section>.<key>=<value> <why>`."""
  raise ValueError(f"config.{section}.{key}={value!r} {why}")


def _is_int(value: Any) -> bool:
  """True for a Python or numpy integer that is not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  """True for an int or a float (not a bool)."""
  return _is_int(value) or isinstance(value, float)


def _int(section: str, node: Any, key: str, *, minimum: int | None = None, why: str = "") -> int | None:
  """The integer `node[key]` (None if the section has no such key); an error if it is not an int or is
  below `minimum`. `why` explains the bound in the message."""
  if key not in node:
    return None
  value = node[key]
  if not _is_int(value):
    _fail(section, key, value, f"must be an int, got {type(value).__name__}.")
  if minimum is not None and value < minimum:
    bound = "positive" if minimum == 1 else f">= {minimum}"
    _fail(section, key, value, f"must be {bound}{' (' + why + ')' if why else ''}.")
  return int(value)


def _float(section: str, node: Any, key: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, why: str = "") -> float | None:
  """The number `node[key]` (None if absent); an error if it is not a number or lies outside the interval
  [low, high] (`low_open` / `high_open` exclude that end). NaN is always refused."""
  if key not in node:
    return None
  value = node[key]
  if not _is_number(value):
    _fail(section, key, value, f"must be a number, got {type(value).__name__}.")
  value = float(value)
  bad = value != value
  if low is not None:
    bad = bad or (value <= low if low_open else value < low)
  if high is not None:
    bad = bad or (value >= high if high_open else value > high)
  if bad:
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    interval = f"in {lo or '(-inf'}, {hi or 'inf)'}"
    _fail(section, key, node[key], f"must be {interval}{' (' + why + ')' if why else ''}.")
  return value


def _bool(section: str, node: Any, key: str) -> None:
  """An error if `node[key]` exists and is not a bool."""
  if key in node and not isinstance(node[key], bool):
    _fail(section, key, node[key], f"must be True or False, got {type(node[key]).__name__}.")


def _choice(section: str, node: Any, key: str, choices: Sequence[str]) -> str | None:
  """The string `node[key]` (None if absent); an error listing `choices` if it is not one of them."""
  if key not in node:
    return None
  value = node[key]
  if value not in choices:
    _fail(section, key, value, f"is not one of {tuple(choices)}.")
  return value


# ----------------------------------------------------------------------------------------------------------
# Model


def check_sections(config: Any) -> None:
  """Every section the training loop reads is present."""
  missing = [s for s in SECTIONS if s not in config]
  if missing:
    raise ValueError(f"config has no section(s) {missing}; a config has sections {list(SECTIONS)} "
                     "(see configs/base.py assemble()).")


def check_layer_blocks(m: Any, sec: str = "model") -> tuple[str, ...]:
  """model.layer_blocks is a non-empty sequence of registered block types (memarch.layers.blocks.BLOCKS).
  Returns the block names."""
  names = m.layer_blocks
  if isinstance(names, str) or not isinstance(names, Sequence) or not names:
    _fail(sec, "layer_blocks", names, "must be a non-empty tuple of block type names, e.g. "
          f"('attention', 'mlp'); registered: {sorted(blocks_lib.BLOCKS)}.")
  unknown = [n for n in names if n not in blocks_lib.BLOCKS]
  if unknown:
    _fail(sec, "layer_blocks", tuple(names), f"names unregistered block type(s) {unknown}; registered "
          f"block types (memarch.layers.blocks.BLOCKS): {sorted(blocks_lib.BLOCKS)}.")
  return tuple(names)


def check_model_core(m: Any, sec: str = "model") -> None:
  """Keys every decoder reads: sizes, heads, head_dim, vocabulary, dtype, position embedding.

  head_dim == 0 means embed_dim // num_heads, so embed_dim must then be a multiple of num_heads."""
  if "name" in m and not isinstance(m.name, str):
    _fail(sec, "name", m.name, "must be a string (a memarch.models.registry name).")
  _int(sec, m, "vocab_size", minimum=0, why="0 takes the data's vocabulary")
  embed = _int(sec, m, "embed_dim", minimum=1)
  _int(sec, m, "num_layers", minimum=1, why="repeats of layer_blocks")
  heads = _int(sec, m, "num_heads", minimum=1)
  head_dim = _int(sec, m, "head_dim", minimum=0, why="0 means embed_dim // num_heads")
  _int(sec, m, "max_len", minimum=1)
  if embed is not None and heads is not None and not head_dim and embed % heads:
    _fail(sec, "num_heads", heads,
          f"does not divide config.{sec}.embed_dim={embed} (head_dim would not be an integer); choose "
          f"num_heads dividing embed_dim or set config.{sec}.head_dim explicitly.")
  if "compute_dtype" in m:
    try:
      dtype_from_name(m.compute_dtype)
    except ValueError:
      _fail(sec, "compute_dtype", m.compute_dtype, "is not one of ('bfloat16', 'float16', 'float32').")
  _choice(sec, m, "position_embedding", ("none", "learned"))
  _float(sec, m, "norm_eps", low=0.0, low_open=True)


def _head_dim(m: Any) -> int:
  """The per-head dimension the attention and memory blocks use."""
  return m.head_dim or m.embed_dim // m.num_heads


def check_attention(m: Any, names: Sequence[str], sec: str = "model") -> None:
  """Attention blocks (attention, window_attention, mac, mag): GQA head counts, an even head_dim (RoPE
  rotates pairs), the window (>= 0; >= 1 for the Titans blocks, whose cache is the window), persistent
  tokens and MAC's segment length."""
  used = [n for n in names if n in ATTENTION_BLOCKS]
  if not used:
    return
  heads = m.num_heads
  kv = _int(sec, m, "num_kv_heads", minimum=0, why="0 means num_heads (no GQA)")
  if kv and heads % kv:
    _fail(sec, "num_kv_heads", kv, f"does not divide config.{sec}.num_heads={heads} (grouped-query "
          "attention shares each kv head among num_heads // num_kv_heads query heads).")
  if _head_dim(m) % 2:
    _fail(sec, "head_dim", m.head_dim, f"gives an odd attention head dim {_head_dim(m)} (embed_dim "
          f"{m.embed_dim} / num_heads {heads} when 0); RoPE needs an even head dim.")
  _choice(sec, m, "attention_impl", KERNEL_IMPLS)
  window = _int(sec, m, "window", minimum=0, why="0 is full causal attention, w > 0 a sliding window")
  titans = [n for n in used if n in ("window_attention", "mag", "mac")]
  if any(n in ("window_attention", "mag") for n in titans) and window is not None and window < 1:
    _fail(sec, "window", window, f"must be positive for block type(s) {titans} (their attention cache "
          "holds the last `window` keys).")
  if titans:
    _int(sec, m, "num_persistent", minimum=0)
  if "mac" in used:
    _int(sec, m, "segment_len", minimum=1, why="MAC's tokens per segment")


def check_mlp(m: Any, names: Sequence[str], sec: str = "model") -> None:
  """SwiGLU blocks: a positive hidden size."""
  if "mlp" in names:
    _int(sec, m, "mlp_dim", minimum=1, why="the SwiGLU hidden size")


def check_linear_memory(m: Any, names: Sequence[str], sec: str = "model") -> None:
  """Linear-memory blocks (linear_memory, based) and MoM: rule, dims, short convolution, scan chunk size."""
  users = [n for n in names if n in ("linear_memory", "based", "mom")]
  if not users:
    return
  if any(n in ("linear_memory", "mom") for n in users):
    _choice(sec, m, "memory_rule", MEMORY_RULES)
    _int(sec, m, "conv_width", minimum=0, why="0 disables the short convolution")
  _int(sec, m, "value_dim", minimum=0, why="0 means head_dim")
  _int(sec, m, "chunk_size", minimum=1, why="tokens per chunk of kernels.linear_scan")
  _choice(sec, m, "scan_impl", KERNEL_IMPLS)
  if "based" in users:
    _int(sec, m, "feature_dim", minimum=1, why="Based's q/k dim per head")


def check_mom(m: Any, names: Sequence[str], sec: str = "model") -> None:
  """Mixture-of-Memories: 1 <= top_k <= num_memories, capacity, implementation."""
  if "mom" not in names:
    return
  n = _int(sec, m, "num_memories", minimum=1)
  k = _int(sec, m, "top_k", minimum=1, why="memories each token is routed to")
  if n is not None and k is not None and k > n:
    _fail(sec, "top_k", k, f"is larger than config.{sec}.num_memories={n}: a token cannot be routed to "
          "more memories than there are.")
  _float(sec, m, "capacity_factor", low=0.0, why="0 means no capacity limit")
  _float(sec, m, "aux_loss_scale", low=0.0)
  impl = _choice(sec, m, "mom_impl", ("gather", "dense"))
  if impl == "dense" and m.get("conv_width", 0) > 0:
    _fail(sec, "conv_width", m.conv_width, f"must be 0 with config.{sec}.mom_impl='dense' (the dense form "
          "is exact only without the short convolution); or use mom_impl='gather'.")
  if impl == "dense" and m.get("capacity_factor", 0) > 0:
    _fail(sec, "capacity_factor", m.capacity_factor, f"must be 0 with config.{sec}.mom_impl='dense' "
          "(it drops no token).")


def check_neural_memory(m: Any, names: Sequence[str], sec: str = "model") -> None:
  """Titans' neural memory (neural_memory, mac, mag): the layer's own check_config, with the key named."""
  if not any(n in NEURAL_MEMORY_BLOCKS for n in names):
    return
  from memarch.layers import neural_memory  # pylint: disable=g-import-not-at-top

  _int(sec, m, "memory_chunk_size", minimum=1, why="tokens per chunk of the memory's parallel form; "
       "1 is the exact token recurrence")
  try:
    neural_memory.check_config(m)
  except ValueError as e:
    raise ValueError(f"config.{sec}.{str(e).removeprefix('model.')}") from None
  if "mac" in names and m.get("memory_objective_window", 1) != 1:
    _fail(sec, "memory_objective_window", m.memory_objective_window,
          "must be 1 with the 'mac' block (MAC does not carry the Omega rule's window across its segments; "
          "use the 'neural_memory' or 'mag' block for ATLAS-style windows)")


def check_decoder(m: Any, sec: str = "model") -> None:
  """A DecoderLM section (model.name "transformer"): the core keys, then the keys of each block type that
  layer_blocks uses."""
  names = check_layer_blocks(m, sec)
  check_model_core(m, sec)
  for check in (check_attention, check_mlp, check_linear_memory, check_mom, check_neural_memory):
    check(m, names, sec)


def check_hmt(m: Any, sec: str = "model") -> None:
  """An HMT section (model.name "hmt"): its own keys (memarch.models.hmt.check_config), then its backbone,
  a full model section of another registered model."""
  from memarch.models import hmt  # pylint: disable=g-import-not-at-top

  try:
    hmt.check_config(m)
  except ValueError as e:
    raise ValueError(str(e).replace("config.model.", f"config.{sec}.", 1)) from None
  _int(sec, m, "vocab_size", minimum=0, why="0 takes the data's vocabulary")
  if "backbone" not in m:
    raise ValueError(f"config.{sec} (an HMT) has no backbone section.")
  if m.backbone.get("name") == "hmt":
    _fail(f"{sec}.backbone", "name", "hmt", "is not allowed: the HMT's backbone must be another registered model.")
  check_model(m.backbone, f"{sec}.backbone")


MODEL_CHECKS = {"transformer": check_decoder, "hmt": check_hmt}  # model.name -> its check


def check_model(m: Any, sec: str = "model") -> None:
  """The model section, by model.name (memarch.models.registry): a name without a check here is accepted
  as long as it is registered."""
  from memarch.models import registry  # pylint: disable=g-import-not-at-top

  name = m.get("name", "transformer")
  if name not in registry.MODELS:
    _fail(sec, "name", name, f"is not a registered model; registered (memarch.models.registry): "
          f"{sorted(registry.MODELS)}.")
  if name in MODEL_CHECKS:
    MODEL_CHECKS[name](m, sec)


# ----------------------------------------------------------------------------------------------------------
# Data, optim, train, eval, mesh


def check_data(d: Any) -> None:
  """The data section: a known data.name, a positive seq_len, and what each task needs to fill it
  (MQAR settings that fit seq_len and the vocabulary, a passkey that fits, a text glob)."""
  from memarch.data import pipeline  # pylint: disable=g-import-not-at-top

  name = d.name
  if not isinstance(name, str):
    _fail("data", "name", name, "must be a string.")
  try:
    pipeline.data_info(d)  # the pipeline's own list of data names (no data is read)
  except ValueError as e:
    _fail("data", "name", name, f"is not a known data set: {e}")
  seq_len = _int("data", d, "seq_len", minimum=1, why="tokens per training row")
  for key in ("num_workers", "read_threads", "prefetch_batches"):
    _int("data", d, key, minimum=0)
  if "vocab_size" in d and name in ("mqar", "passkey"):
    _int("data", d, "vocab_size", minimum=1)
  if name == "mqar":
    from memarch.data import synthetic  # pylint: disable=g-import-not-at-top

    q = d.mqar
    _int("data", q, "num_train_examples", minimum=1)
    _int("data", q, "num_eval_examples", minimum=1)
    synthetic.validate_settings(q.settings, seq_len, int(d.vocab_size), float(q.power_a),
                                what="config.data.mqar.settings")
    # Eval settings may be longer than the training length (length generalization) when generated in memory;
    # the TFDS builder stores every row at data.seq_len.
    longer = [tuple(s) for s in q.eval_settings if int(s[0]) > seq_len]
    if longer and q.get("use_tfds", False):
      _fail("data", "mqar.eval_settings", tuple(map(tuple, q.eval_settings)),
            f"has settings {longer} longer than data.seq_len={seq_len}: the TFDS build stores every row at "
            "data.seq_len; set --config.data.mqar.use_tfds=False to generate them in memory at their own length.")
    synthetic.validate_settings(q.eval_settings, seq_len, int(d.vocab_size), float(q.power_a),
                                what="config.data.mqar.eval_settings", allow_longer=True)
  elif name == "passkey":
    from memarch.data import passkey  # pylint: disable=g-import-not-at-top

    p = d.passkey
    _int("data", p, "num_train_examples", minimum=1)
    _int("data", p, "num_eval_examples", minimum=1)
    lengths = tuple(p.eval_lengths)
    if not lengths or any(not _is_int(t) or t < 1 for t in lengths):
      _fail("data", "passkey.eval_lengths", lengths, "must be a non-empty tuple of positive lengths.")
    for t in (seq_len, *lengths):
      try:
        passkey.validate_passkey(vocab_size=int(d.vocab_size), seq_len=int(t), key_digits=int(p.key_digits),
                                 filler=str(p.filler), filler_period=int(p.filler_period))
      except ValueError as e:
        raise ValueError(f"config.data.passkey (length {t}): {e}") from None
  elif name == "text" and not d.get("files"):
    _fail("data", "files", d.get("files"), 'is empty: data.name="text" needs a glob of text files, e.g. '
          '--config.data.files="corpus/*.txt".')
  if name in ("text",) or name.startswith("tfds:"):
    _float("data", d, "val_fraction", low=0.0, high=1.0, high_open=True)


def check_optim(o: Any) -> None:
  """The optimizer section: name, a positive lr, warmup, schedule and AdamW's constants."""
  _choice("optim", o, "name", OPTIMIZERS)
  _float("optim", o, "lr", low=0.0, low_open=True, why="the peak learning rate")
  _int("optim", o, "warmup_steps", minimum=0)
  _choice("optim", o, "schedule", SCHEDULES)
  _float("optim", o, "min_lr_ratio", low=0.0, high=1.0)
  _float("optim", o, "weight_decay", low=0.0)
  _float("optim", o, "b1", low=0.0, high=1.0, high_open=True)
  _float("optim", o, "b2", low=0.0, high=1.0, high_open=True)
  _float("optim", o, "eps", low=0.0, low_open=True)
  _float("optim", o, "grad_clip", low=0.0, why="0 disables clipping")


def check_train(t: Any) -> None:
  """The train section: positive steps, batch and log interval; eval and checkpoint intervals >= 0."""
  _int("train", t, "steps", minimum=1, why="total optimizer steps")
  _int("train", t, "batch_size", minimum=1)
  _int("train", t, "seed")
  _int("train", t, "log_every", minimum=1, why="steps between metric lines")
  _int("train", t, "eval_every", minimum=0, why="0 evaluates only at the end")
  _int("train", t, "checkpoint_every", minimum=0, why="0 checkpoints only at the end")
  _int("train", t, "keep_checkpoints", minimum=1)
  _int("train", t, "max_nonfinite_steps", minimum=0, why="0 stops at the first non-finite step")
  _choice("train", t, "progress", PROGRESS_MODES)
  for key in ("async_checkpoint", "tensorboard", "verify_checkpoints", "handle_signals"):
    _bool("train", t, key)


def check_eval(e: Any) -> None:
  """The eval section: a positive batch, max_batches >= 0."""
  _int("eval", e, "batch_size", minimum=1)
  _int("eval", e, "max_batches", minimum=0, why="0 means every batch")


def check_mesh(config: Any, num_devices: int) -> None:
  """Mesh axis sizes against the device count (memarch.sharding.mesh_shape), and the train and eval
  batches against the data x fsdp axes they are split over."""
  if num_devices < 1:
    raise ValueError(f"validate_config: num_devices must be >= 1, got {num_devices}.")
  for axis in shard_lib.MESH_AXES:
    _int("mesh", config.mesh, axis, minimum=-1)
  sizes = dict(zip(shard_lib.MESH_AXES, shard_lib.mesh_shape(config.mesh, num_devices)))
  dp = sizes["data"] * sizes["fsdp"]
  for section in ("train", "eval"):
    batch = config[section].batch_size
    if batch % dp:
      _fail(section, "batch_size", batch, f"is not divisible by the data x fsdp mesh size {dp} (mesh {sizes} "
            f"over {num_devices} devices): every device must get the same number of rows.")


def check_consistency(config: Any) -> None:
  """Cross-section rules: the model's vocabulary covers the data's; learned positions cover seq_len."""
  m, d = config.model, config.data
  from memarch.data import pipeline  # pylint: disable=g-import-not-at-top

  data_vocab = pipeline.data_info(d).vocab_size
  if m.get("vocab_size", 0) and m.vocab_size < data_vocab:
    _fail("model", "vocab_size", m.vocab_size, f"is smaller than the data's vocabulary ({data_vocab}, "
          f"data.name={d.name!r}); set it to 0 to take the data's.")
  if m.get("position_embedding", "none") == "learned" and m.max_len < d.seq_len:
    _fail("model", "max_len", m.max_len, f"is shorter than config.data.seq_len={d.seq_len}: learned position "
          "embeddings cover only max_len positions.")


# ----------------------------------------------------------------------------------------------------------


def validate_config(config: Any, num_devices: int | None = None) -> None:
  """Checks a whole config (sections model, data, optim, train, mesh, eval) before anything is built.

  Args:
    config: a ConfigDict (or FrozenConfigDict) as returned by a `configs/<family>.py` `get_config`.
    num_devices: the number of devices the mesh spans (`jax.device_count()`); None skips the mesh checks.
  Raises:
    ValueError naming the first bad key, its value and why (`config.model.num_heads=3 does not divide
    config.model.embed_dim=64 ...`).
  """
  check_sections(config)
  check_model(config.model)
  check_data(config.data)
  check_train(config.train)
  check_optim(config.optim)
  check_eval(config.eval)
  check_consistency(config)
  if num_devices is not None:
    check_mesh(config, num_devices)
