"""Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, then the special tokens PAD, BOS, EOS.

No vocabulary file and no training: every string round-trips exactly, any corpus is in-vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; PAD = 256, BOS = 257, EOS = 258 (end of document); vocab_size = 259."""

  NUM_BYTES = 256
  PAD = 256
  BOS = 257
  EOS = 258

  @property
  def vocab_size(self) -> int:
    """Number of ids (bytes + specials): the size of a model's embedding and output layers."""
    return self.NUM_BYTES + 3

  @property
  def pad_id(self) -> int:
    return self.PAD

  @property
  def bos_id(self) -> int:
    return self.BOS

  @property
  def eos_id(self) -> int:
    return self.EOS

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """[len(text.encode("utf-8")) (+1 per special)] int32 ids of `text`."""
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    parts = ([np.array([self.BOS], np.int32)] if add_bos else []) + [ids]
    if add_eos:
      parts.append(np.array([self.EOS], np.int32))
    return np.concatenate(parts) if len(parts) > 1 else ids

  def encode_bytes(self, data: bytes) -> np.ndarray:
    """[len(data)] int32 ids of raw bytes (files are read as bytes: no decoding step can fail)."""
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """The text of `ids` (any shape, flattened): specials are dropped, invalid UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
      raise ValueError(f"ByteTokenizer.decode: id {int(bad)} is outside [0, {self.vocab_size}).")
    data = ids[ids < self.NUM_BYTES].astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return f"ByteTokenizer(vocab_size={self.vocab_size}, pad={self.PAD}, bos={self.BOS}, eos={self.EOS})"
