"""Grain pipelines: what the training loop calls to get batches.

`data_info(config.data)` says what the model must know (vocabulary, pad and EOS ids).
`create_train_iterator(...)` is an infinite, checkpointable iterator of per-host batches;
`create_eval_batches(...)` is a fixed list of held-out batches per eval set.

Every batch is a dict of numpy arrays with static shapes:
  inputs [B, T] int32, targets [B, T] int32, loss_mask [B, T] float32,
  segment_ids [B, T] int32 (documents within a row, from 1; all ones for MQAR),
  positions [B, T] int32 (position within the document; arange(T) for MQAR).
B is the per-host batch size; T is data.seq_len.

How the train iterator is built (all in grain, over example *indices*, so that shuffling, the per-host
split and checkpointing are index arithmetic and each batch is read with one vectorized call):
  range(N) -> this host's slice -> shuffle(seed) -> repeat() (reshuffled every epoch)
  -> batch(B) -> map(read the batch's rows from the source) -> to_iter_dataset(ReadOptions).
Its state (`get_state()`) is a small JSON-serializable dict: the index of the next batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import grain
import numpy as np

from memarch.data import passkey, synthetic, text, text_tasks, tfds_mqar
from memarch.data.tokenizer import ByteTokenizer
from memarch.data.tfds_local import TfdsExampleSource

VALID_NAMES = ('"mqar"', '"text"', '"tfds:<name>"', '"passkey"', '"niah"', '"passkey_text"', '"babilong"')
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


class BatchSource(Protocol):
  """A random-access source whose `__getitems__(indices)` returns a dict of [len(indices), T] arrays."""

  def __len__(self) -> int:
    """Number of examples."""

  def __getitems__(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The examples at `indices`, stacked: each value `[len(indices), T]`."""


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What a model and the loop need to know about the data.

  vocab_size: number of token ids (embedding/output size). kind: "mqar", "passkey" or "text" (also the
  byte-level tasks "niah", "passkey_text", "babilong" of text_tasks.py).
  pad_id: the id of padding (0 for MQAR and passkey, ByteTokenizer.PAD for text). eos_id: end-of-document id
  (None for the synthetic tasks). tokenizer: the ByteTokenizer for text, None for the synthetic tasks.
  """

  vocab_size: int
  kind: Literal["mqar", "passkey", "text"]
  pad_id: int
  eos_id: int | None
  tokenizer: ByteTokenizer | None


def _kind(data_config: Any) -> tuple[str, str | None]:
  """("mqar" | "passkey" | "text" | "tfds", the TFDS name or None); a clear error for an unknown data.name."""
  name = str(data_config.name)
  if name in ("mqar", "passkey"):
    return name, None
  if name in text_tasks.NAMES:  # byte-level memory tasks (memarch/data/text_tasks.py)
    return name, None
  if name == "text":
    return "text", None
  if name.startswith("tfds:") and len(name) > len("tfds:"):
    return "tfds", name[len("tfds:"):]
  raise ValueError(f"Unknown data.name={name!r}; valid choices: {', '.join(VALID_NAMES)} "
                   '(e.g. "tfds:tiny_shakespeare").')


def data_info(data_config: Any) -> DataInfo:
  """The DataInfo of a data config section (see configs/common.py)."""
  kind, _ = _kind(data_config)
  if kind == "mqar":
    return DataInfo(vocab_size=int(data_config.vocab_size), kind="mqar", pad_id=synthetic.PAD_ID,
                    eos_id=None, tokenizer=None)
  if kind == "passkey":
    return DataInfo(vocab_size=int(data_config.vocab_size), kind="passkey", pad_id=passkey.PAD_ID,
                    eos_id=None, tokenizer=None)
  tok = ByteTokenizer()
  return DataInfo(vocab_size=tok.vocab_size, kind="text", pad_id=tok.PAD, eos_id=tok.EOS, tokenizer=tok)


# ----------------------------------------------------------------------------------------------------
# Sources


class ArraySource:
  """Random access to rows of equally long arrays held in memory: dict name -> [N, ...]."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
      raise ValueError(f"ArraySource: arrays of different lengths {lengths}.")
    self.arrays = dict(arrays)
    self._len = lengths.pop()
    if "inputs" in self.arrays and self.arrays["inputs"].ndim == 2:
      self.seq_len = int(self.arrays["inputs"].shape[1])  # an eval set may be longer than data.seq_len

  def __len__(self) -> int:
    return self._len

  def __getitems__(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    idx = np.asarray(indices, dtype=np.int64)
    return {name: value[idx] for name, value in self.arrays.items()}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {name: value[index] for name, value in self.arrays.items()}


def _mqar_builder_config(c: Any) -> tfds_mqar.MqarBuilderConfig:
  return tfds_mqar.make_builder_config(
      vocab_size=int(c.vocab_size), seq_len=int(c.seq_len), settings=c.mqar.settings,
      eval_settings=c.mqar.eval_settings, num_train_examples=int(c.mqar.num_train_examples),
      num_eval_examples=int(c.mqar.num_eval_examples), power_a=float(c.mqar.power_a), seed=int(c.seed))


def _mqar_train_source(c: Any) -> BatchSource:
  if c.mqar.use_tfds:
    sources = tfds_mqar.mqar_data_sources(_mqar_builder_config(c), tfds_mqar.default_data_dir(c.tfds_data_dir))
    return TfdsExampleSource(sources["train"])
  return ArraySource(synthetic.mqar_mixture(
      seed=int(c.seed), split="train", vocab_size=int(c.vocab_size), settings=c.mqar.settings,
      num_examples_per_setting=int(c.mqar.num_train_examples), seq_len=int(c.seq_len),
      power_a=float(c.mqar.power_a)))


def _mqar_eval_sources(c: Any) -> dict[str, BatchSource]:
  if c.mqar.use_tfds:
    sources = tfds_mqar.mqar_data_sources(_mqar_builder_config(c), tfds_mqar.default_data_dir(c.tfds_data_dir))
    return {synthetic.setting_name(int(t), int(k)): TfdsExampleSource(sources[synthetic.setting_name(int(t), int(k))])
            for t, k in c.mqar.eval_settings}
  sets = synthetic.mqar_eval_sets(
      seed=int(c.seed), vocab_size=int(c.vocab_size), eval_settings=c.mqar.eval_settings,
      num_examples=int(c.mqar.num_eval_examples), seq_len=int(c.seq_len), power_a=float(c.mqar.power_a))
  return {name: ArraySource(arrays) for name, arrays in sets.items()}


def _passkey_sources(c: Any) -> tuple[BatchSource, dict[str, BatchSource]]:
  p = c.passkey
  return passkey.passkey_sources(
      seed=int(c.seed), vocab_size=int(c.vocab_size), seq_len=int(c.seq_len), eval_lengths=p.eval_lengths,
      key_digits=int(p.key_digits), filler=str(p.filler), filler_period=int(p.filler_period),
      num_train_examples=int(p.num_train_examples), num_eval_examples=int(p.num_eval_examples))


def _text_sources(c: Any) -> tuple[BatchSource, BatchSource | None]:
  kind, tfds_name = _kind(c)
  tok = ByteTokenizer()
  if kind == "text":
    return text.local_text_sources(str(c.files), seq_len=int(c.seq_len), val_fraction=float(c.val_fraction),
                                   tokenizer=tok)
  return _cached_tfds_text_sources(tfds_name, tfds_mqar.default_data_dir(c.tfds_data_dir), str(c.text_key),
                                   int(c.seq_len), float(c.val_fraction))


@functools.lru_cache(maxsize=2)
def _cached_tfds_text_sources(name: str, data_dir: str, text_key: str, seq_len: int,
                              val_fraction: float) -> tuple[BatchSource, BatchSource | None]:
  # Tokenizing a TFDS corpus walks every document in Python: do it once for the train iterator and
  # the eval batches (a prepared TFDS version never changes, so the cache cannot go stale).
  return text.tfds_text_sources(name, data_dir=data_dir, text_key=text_key, seq_len=seq_len,
                                val_fraction=val_fraction, tokenizer=ByteTokenizer())


def _complete_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Adds segment_ids (ones) and positions (arange) where the source has none (MQAR); fixes dtypes."""
  inputs = batch["inputs"]
  out = {
      "inputs": inputs.astype(np.int32, copy=False),
      "targets": batch["targets"].astype(np.int32, copy=False),
      "loss_mask": batch["loss_mask"].astype(np.float32, copy=False),
  }
  if "segment_ids" in batch:
    out["segment_ids"] = batch["segment_ids"].astype(np.int32, copy=False)
    out["positions"] = batch["positions"].astype(np.int32, copy=False)
  else:
    out["segment_ids"] = np.ones(inputs.shape, np.int32)
    out["positions"] = np.broadcast_to(np.arange(inputs.shape[-1], dtype=np.int32), inputs.shape).copy()
  return out


def _read_batch(source: BatchSource, indices: np.ndarray) -> dict[str, np.ndarray]:
  return _complete_batch(source.__getitems__(np.asarray(indices).tolist()))


# ----------------------------------------------------------------------------------------------------
# Train


def _check_hosts(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")


def host_indices(num_examples: int, process_index: int, process_count: int) -> grain.MapDataset:
  """This host's example indices for training: a strided slice of range(N) truncated to a multiple of P.

  Hosts get disjoint, equally long slices (so they finish epochs together); the N mod P examples
  left over are not used (fewer than process_count).
  """
  _check_hosts(process_index, process_count)
  usable = (num_examples // process_count) * process_count
  return grain.MapDataset.range(usable)[process_index::process_count]


def _shuffle_seed(seed: int) -> int:
  # grain wants a seed in [0, 2**32); hashing keeps distinct (also negative or huge) seeds distinct.
  return int(np.random.SeedSequence(abs(int(seed)) * 2 + (seed < 0)).generate_state(1)[0])


def create_train_iterator(
    data_config: Any,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
  """An infinite iterator of this host's training batches (shuffled every epoch, repeated).

  Args:
    data_config: the config's `data` section (configs/common.py).
    batch_size: B, the per-host batch size (the global batch divided by process_count).
    seed: the shuffle seed (data.seed separately seeds MQAR generation).
    process_index, process_count: this host and the number of hosts; hosts read disjoint slices.

  Returns:
    A grain DatasetIterator of dicts with BATCH_KEYS, each [B, data.seq_len]. `get_state()` returns a
    JSON-serializable dict; `set_state(state)` on an iterator created with the same arguments makes it
    continue exactly where the saved one stopped.
  """
  kind, _ = _kind(data_config)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if kind == "mqar":
    source = _mqar_train_source(data_config)
  elif kind == "passkey":
    source = _passkey_sources(data_config)[0]
  elif kind in text_tasks.NAMES:
    source = text_tasks.text_task_sources(data_config)[0]
  else:
    source = _text_sources(data_config)[0]
  indices = host_indices(len(source), process_index, process_count)
  if len(indices) < batch_size:
    raise ValueError(
        f"The training set has {len(source)} examples, {len(indices)} per host, fewer than the per-host "
        f"batch size {batch_size}. Use more data (data.mqar.num_train_examples / more text) or a smaller batch.")
  ds = (indices.shuffle(seed=_shuffle_seed(seed))
        .repeat()
        .batch(batch_size, drop_remainder=True)
        .map(functools.partial(_read_batch, source)))
  read_options = grain.ReadOptions(
      num_threads=int(data_config.get("read_threads", 2)),
      prefetch_buffer_size=int(data_config.get("prefetch_batches", 4)))
  iter_ds = ds.to_iter_dataset(read_options)
  num_workers = int(data_config.get("num_workers", 0))
  if num_workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top

    # grain's worker processes read absl flags; outside an absl app (tests, notebooks) nobody parsed
    # them, so take their defaults (inside experiments/run.py they are already parsed: a no-op).
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(iter_ds)


# ----------------------------------------------------------------------------------------------------
# Eval


def _pad_rows(batch: dict[str, np.ndarray] | None, rows: int, pad_id: int, seq_len: int) -> dict[str, np.ndarray]:
  """Appends `rows` padding rows [rows, T] to `batch` (None: no rows yet): pad tokens, loss_mask 0,
  one segment, positions arange(T)."""
  pad = {
      "inputs": np.full((rows, seq_len), pad_id, np.int32),
      "targets": np.full((rows, seq_len), pad_id, np.int32),
      "loss_mask": np.zeros((rows, seq_len), np.float32),
      "segment_ids": np.ones((rows, seq_len), np.int32),
      "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
  }
  if batch is None:
    return pad
  return {name: np.concatenate([batch[name], pad[name]]) for name in BATCH_KEYS}


def _eval_batches(source: BatchSource, *, batch_size: int, seq_len: int, process_index: int,
                  process_count: int, pad_id: int, max_batches: int, row_multiple: int = 0
                  ) -> list[dict[str, np.ndarray]]:
  """This host's batches of a held-out set: every example once over all hosts, padded to full batches.

  Every host returns the same number of batches, ceil(ceil(N / P) / B) (at most max_batches if > 0),
  so a jitted multi-host eval step sees the same shapes and the same number of steps everywhere.
  row_multiple > 0: B is first lowered to ceil(N / P) rounded up to that multiple, when that is smaller.
  """
  n = len(source)
  mine = np.arange(process_index, n, process_count)
  per_host = -(-n // process_count)
  if row_multiple > 0:
    batch_size = min(batch_size, -(-per_host // row_multiple) * row_multiple)
  num_batches = max(1, -(-per_host // batch_size))
  if max_batches > 0:
    num_batches = min(num_batches, max_batches)
  batches = []
  for b in range(num_batches):
    idx = mine[b * batch_size:(b + 1) * batch_size]
    # A host that ran out of examples before the others gets batches of padding only.
    batch = _read_batch(source, idx) if len(idx) else _pad_rows(None, 0, pad_id, seq_len)
    batches.append(_pad_rows(batch, batch_size - len(idx), pad_id, seq_len))
  return batches


def create_eval_batches(
    data_config: Any,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_batches: int = 0,
    row_multiple: int = 0,
) -> dict[str, list[dict[str, np.ndarray]]]:
  """Held-out batches per eval set: MQAR one per eval setting ("mqar_T64_kv4", ...), passkey one per eval
  length ("passkey_T1024", ...; each set's batches have its own length), text "validation".

  Args:
    data_config: the config's `data` section.
    batch_size: B, per host. process_index, process_count: this host and the number of hosts.
    max_batches: if > 0, at most this many batches per eval set and host (the first ones), so a large
      validation split is not materialized whole; 0: all of it.
    row_multiple: if > 0, a set with fewer examples per host than B gets batches of its examples padded only to
      a multiple of this (the local data-parallel size), not to B: 16 needles at 16k tokens are one batch of
      16 rows, not 64 of which 48 are padding (a quarter of the eval's time and memory). 0: B rows always.

  Returns:
    {eval set name: [batch, ...]}, each batch a dict with BATCH_KEYS of [B, data.seq_len] arrays (passkey,
    and MQAR eval settings longer than data.seq_len: [B, that set's length]).
    Finite and deterministic: over all hosts every held-out example appears exactly once (host i takes
    examples i, i+P, ...); the last batches are filled with loss_mask-0 padding rows (pad tokens) so
    every batch of a set has the same shape and every host the same number of batches. Text with
    data.val_fraction == 0 (and no validation split) has no eval set: returns {}.
  """
  kind, _ = _kind(data_config)
  _check_hosts(process_index, process_count)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  info = data_info(data_config)
  if kind == "mqar":
    sources = _mqar_eval_sources(data_config)
  elif kind == "passkey":
    sources = _passkey_sources(data_config)[1]
  elif kind in text_tasks.NAMES:
    sources = text_tasks.text_task_sources(data_config)[1]
  else:
    val = _text_sources(data_config)[1]
    sources = {} if val is None else {"validation": val}
  # A passkey eval set has its own length (1x, 4x, 16x the training length): its padding rows take it.
  return {name: _eval_batches(src, batch_size=batch_size, seq_len=int(getattr(src, "seq_len", data_config.seq_len)),
                              process_index=process_index, process_count=process_count, pad_id=info.pad_id,
                              max_batches=max_batches, row_multiple=row_multiple)
          for name, src in sources.items()}
