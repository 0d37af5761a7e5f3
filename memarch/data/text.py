"""Packed text: documents tokenized to bytes, concatenated with EOS as a GPT-style stream, cut into rows.

Stream: doc_1 EOS doc_2 EOS ... (each document followed by the end-of-document token). The last
`val_fraction` of the stream is the validation split, the rest the training split (disjoint tokens).

Row r of a split is the T+1 tokens `stream[r*T : r*T + T + 1]` (consecutive rows share one token, so
every next-token transition of the stream is trained on exactly once): inputs = row[:-1],
targets = row[1:]. Within a row, `segment_ids` number the documents from 1 (a token that follows an
EOS starts a new segment; the EOS belongs to the document it ends) and `positions` count from 0 at the
start of the row and after each EOS. Memory models carry their state across documents; attention
models mask with segment_ids (DESIGN.md, "data").

Sources here are random-access (`__len__`, `__getitem__`, `__getitems__`) so that grain can shuffle,
split per host and checkpoint by index. The stream is held in memory as uint16 (2 bytes a token).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence

import numpy as np

from memarch.data.tokenizer import ByteTokenizer


def read_text_files(pattern: str) -> list[bytes]:
  """The contents of the files matching `pattern` (sorted by path; one document each), as bytes.

  Raises ValueError if the glob matches no file or a matched file cannot be read.
  """
  if not pattern:
    raise ValueError('data.name="text" needs data.files, a glob of text files (one document per file), '
                     'e.g. --config.data.files="corpus/*.txt".')
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if not os.path.isdir(p))
  if not paths:
    raise ValueError(f"data.files={pattern!r} matches no file (relative to {os.getcwd()!r}). Check the glob.")
  docs = []
  for path in paths:
    try:
      with open(path, "rb") as f:
        docs.append(f.read())
    except OSError as e:
      raise ValueError(f"data.files: cannot read {path!r} ({e.strerror or e}).") from e
  return docs


def tokenize_stream(docs: Iterable[bytes | str], tokenizer: ByteTokenizer) -> np.ndarray:
  """[N] uint16: every document's byte ids followed by EOS, concatenated in order."""
  parts = []
  eos = np.array([tokenizer.EOS], np.uint16)
  for doc in docs:
    ids = tokenizer.encode_bytes(doc) if isinstance(doc, bytes) else tokenizer.encode(doc)
    parts.append(ids.astype(np.uint16))
    parts.append(eos)
  return np.concatenate(parts) if parts else np.zeros((0,), np.uint16)


def split_stream(stream: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train [N - n_val], validation [n_val]) with n_val = round(N * val_fraction): the stream's tail."""
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}.")
  n_val = int(round(len(stream) * val_fraction))
  return stream[: len(stream) - n_val], stream[len(stream) - n_val:]


def segments_and_positions(inputs: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """segment_ids and positions of rows of tokens.

  Args:
    inputs: [..., T] token ids.
  Returns:
    (segment_ids [..., T] int32 from 1, positions [..., T] int32 from 0): a new segment starts at the
    row start and after every EOS.
  """
  is_eos = inputs == eos_id
  starts = np.zeros(inputs.shape, dtype=bool)
  starts[..., 0] = True
  starts[..., 1:] = is_eos[..., :-1]
  segment_ids = np.cumsum(starts, axis=-1, dtype=np.int32)
  index = np.broadcast_to(np.arange(inputs.shape[-1], dtype=np.int32), inputs.shape)
  last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
  return segment_ids, (index - last_start).astype(np.int32)


class PackedTextSource:
  """Random access to the packed rows of one token stream (see the module docstring).

  Element: dict(inputs [T] int32, targets [T] int32, loss_mask [T] float32 (ones),
  segment_ids [T] int32, positions [T] int32). `__getitems__` returns the same keys with [B, T].
  """

  def __init__(self, stream: np.ndarray, seq_len: int, eos_id: int):
    if seq_len < 1:
      raise ValueError(f"data.seq_len must be >= 1, got {seq_len}.")
    self.stream = np.asarray(stream)
    self.seq_len = seq_len
    self.eos_id = eos_id
    self._num_rows = max(0, (len(self.stream) - 1) // seq_len)

  def __len__(self) -> int:
    return self._num_rows

  def __getitems__(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= self._num_rows):
      raise IndexError(f"row index out of range [0, {self._num_rows}): {idx.min()}..{idx.max()}")
    rows = self.stream[idx[:, None] * self.seq_len + np.arange(self.seq_len + 1)].astype(np.int32)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    segment_ids, positions = segments_and_positions(inputs, self.eos_id)
    return {
        "inputs": np.ascontiguousarray(inputs),
        "targets": np.ascontiguousarray(targets),
        "loss_mask": np.ones(inputs.shape, np.float32),
        "segment_ids": segment_ids,
        "positions": positions,
    }

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if index < 0:
      index += self._num_rows
    return {name: value[0] for name, value in self.__getitems__([index]).items()}

  def __repr__(self) -> str:
    return f"PackedTextSource(tokens={len(self.stream)}, seq_len={self.seq_len}, rows={self._num_rows})"


def _check_rows(source: PackedTextSource, what: str, origin: str) -> None:
  if len(source) == 0:
    raise ValueError(
        f"{origin}: the {what} split has {len(source.stream)} tokens, fewer than data.seq_len + 1 = "
        f"{source.seq_len + 1}, so it makes no row. Add text, lower data.seq_len or change data.val_fraction.")


def local_text_sources(
    pattern: str, *, seq_len: int, val_fraction: float, tokenizer: ByteTokenizer,
) -> tuple[PackedTextSource, PackedTextSource | None]:
  """(train, validation or None if val_fraction == 0) packed sources of the files matching `pattern`."""
  docs = read_text_files(pattern)
  origin = f"data.files={pattern!r}"
  if not any(docs):
    raise ValueError(f"{origin}: the corpus is empty: the {len(docs)} matching file(s) hold no text. "
                     "Point data.files at non-empty text files.")
  stream = tokenize_stream(docs, tokenizer)
  train, val = split_stream(stream, val_fraction)
  train_src = PackedTextSource(train, seq_len, tokenizer.EOS)
  _check_rows(train_src, "train", origin)
  if val_fraction == 0:
    return train_src, None
  val_src = PackedTextSource(val, seq_len, tokenizer.EOS)
  _check_rows(val_src, "validation", origin)
  return train_src, val_src


def _tfds_texts(source: Sequence[dict], text_key: str, origin: str) -> Iterable[bytes | str]:
  """The `text_key` feature of every example of a TFDS data source, in index order."""
  n = len(source)
  chunk = 1024
  for start in range(0, n, chunk):
    idx = list(range(start, min(n, start + chunk)))
    examples = source.__getitems__(idx) if hasattr(source, "__getitems__") else [source[i] for i in idx]
    for example in examples:
      if text_key not in example:
        raise ValueError(f"{origin}: examples have no feature {text_key!r} (data.text_key); features: "
                         f"{sorted(example)}.")
      text = example[text_key]
      if isinstance(text, np.ndarray):  # a scalar Text feature may come back as a 0-d array
        text = text.item()
      yield text


def tfds_text_sources(
    name: str, *, data_dir: str, text_key: str, seq_len: int, val_fraction: float, tokenizer: ByteTokenizer,
) -> tuple[PackedTextSource, PackedTextSource | None]:
  """(train, validation) packed sources of a TFDS text dataset read with `tfds.data_source`.

  The dataset's "validation" split is used for validation when it has one; otherwise the last
  `val_fraction` of the train stream is (as for local text). The whole split is tokenized into memory.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  origin = f'data.name="tfds:{name}"'
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises several types for an unknown or unloadable name
    raise ValueError(f"{origin}: TFDS cannot load dataset {name!r} from {data_dir!r}: {e}") from e
  try:
    builder.download_and_prepare(file_format="array_record")
  except ModuleNotFoundError as e:
    if e.name != "importlib_resources":
      raise
    # TFDS imports it lazily to locate a packaged builder's checksums file but does not depend on it.
    raise ModuleNotFoundError(
        f"{origin}: preparing this TFDS dataset needs the 'importlib_resources' package, which "
        "tensorflow-datasets uses without installing it: `pip install importlib_resources`.",
        name=e.name) from e
  splits = set(builder.info.splits)
  if "train" not in splits:
    raise ValueError(f"{origin}: the dataset has no 'train' split (splits: {sorted(splits)}).")
  # tfds.data_source re-finds the builder prepared above by name and reads it as array_record.
  train_ds = tfds.data_source(name, split="train", data_dir=data_dir, download=False)
  stream = tokenize_stream(_tfds_texts(train_ds, text_key, origin), tokenizer)
  if "validation" in splits:
    val_ds = tfds.data_source(name, split="validation", data_dir=data_dir, download=False)
    train, val = stream, tokenize_stream(_tfds_texts(val_ds, text_key, origin), tokenizer)
  else:
    train, val = split_stream(stream, val_fraction)
  train_src = PackedTextSource(train, seq_len, tokenizer.EOS)
  _check_rows(train_src, "train", origin)
  if "validation" not in splits and val_fraction == 0:
    return train_src, None
  val_src = PackedTextSource(val, seq_len, tokenizer.EOS)
  _check_rows(val_src, "validation", origin)
  return train_src, val_src
