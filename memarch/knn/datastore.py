"""A kNN-LM datastore: (key = base LM hidden state, value = next token) for every position of a corpus.

The training split of the corpus (a byte-level packed stream, memarch.data.text) is cut into rows of the base
LM's training length T, exactly as the base LM was trained (row r = stream[r*T : r*T + T + 1]; the trailing
tokens that fill no row are not in the datastore). Entry i is stream position i (< rows * T):

    key_i   = the normed input of the base LM's `key_layer`-th feed-forward block at position i
              (`DecoderLM(..., return_hidden=True, ffn_layer=key_layer)["ffn_input"]`), float32 or float16
    value_i = stream[i + 1], the next token

On disk (`<dir>/`): `keys_00000.npy` [rows, d], `values_00000.npy` [rows] int32, ... one pair per shard of
`shard_rows * T` entries; `shard_00000.json` records a finished shard's file sizes and CRC32s (written last, so a
shard without it, or whose files no longer match it, is rebuilt on the next run: the build is restartable);
`datastore.json` (the manifest) records size, dim, dtypes, corpus, split, base workdir and checkpoint step,
key layer and the shard list. `Datastore.open(dir)` memory-maps the shards (`head(n)` reads only the first n).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memarch.checkpoint import file_crc32, record_problems
from memarch.data import text
from memarch.data.tokenizer import ByteTokenizer

MANIFEST = "datastore.json"
KEY_DTYPES = ("float32", "float16")


def corpus_streams(files: str, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train, validation) uint16 byte-token streams of the text files matching `files` (memarch.data.text)."""
  stream = text.tokenize_stream(text.read_text_files(files), ByteTokenizer())
  return text.split_stream(stream, val_fraction)


def make_encoder(model, params, *, key_layer: int = -1):
  """A jitted `(inputs, segment_ids, positions) [b, T] -> (keys [b, T, d] f32, log p_LM(targets) needs targets)`.

  Returns `encode(batch) -> (keys [b, T, d] float32, lp [b, T] float32 log p_LM(batch["targets"]))`.
  """

  @jax.jit
  def encode(inputs, targets, segment_ids, positions):
    logits, hidden = model.apply({"params": params}, inputs, segment_ids=segment_ids, positions=positions,
                                 return_hidden=True, ffn_layer=key_layer)
    if hidden["ffn_input"] is None:
      raise ValueError("the base LM has no feed-forward ('mlp') block: its stack gives no datastore key.")
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp_t = jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
    return hidden["ffn_input"].astype(jnp.float32), lp_t

  return encode


def encode_rows(encode, source: text.PackedTextSource, start: int, stop: int, batch_size: int):
  """Keys, next tokens and log p_LM(next) of rows [start, stop) of a packed source, flattened to positions.

  Returns (keys [(stop-start)*T, d] float32, values [(stop-start)*T] int32, lp [(stop-start)*T] float32).
  """
  keys, values, lps = [], [], []
  for s in range(start, stop, batch_size):
    rows = list(range(s, min(s + batch_size, stop)))
    pad = batch_size - len(rows)
    b = source.__getitems__(rows + [rows[-1]] * pad)  # full batches: one compilation
    k, lp = encode(*(jnp.asarray(b[n]) for n in ("inputs", "targets", "segment_ids", "positions")))
    n = len(rows)
    keys.append(np.asarray(k)[:n].reshape(n * source.seq_len, -1))
    values.append(b["targets"][:n].reshape(-1).astype(np.int32))
    lps.append(np.asarray(lp)[:n].reshape(-1))
  return np.concatenate(keys), np.concatenate(values), np.concatenate(lps)


def _shard_name(i: int) -> str:
  return f"{i:05d}"


def _shard_ok(out_dir: str, i: int) -> bool:
  path = os.path.join(out_dir, f"shard_{_shard_name(i)}.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return not record_problems(out_dir, json.load(f)["files"])


def _save_npy(path: str, array: np.ndarray) -> None:
  tmp = path + ".tmp.npy"
  np.save(tmp, array)
  os.replace(tmp, path)  # a file is complete or absent


def build_datastore(model, params, out_dir: str, *, files: str, val_fraction: float, seq_len: int,
                    key_layer: int = -1, key_dtype: str = "float32", shard_rows: int = 512, batch_size: int = 16,
                    info: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
  """Builds (or finishes) the datastore of the training split in `out_dir`; returns the manifest.

  Finished shards (their record intact) are kept; missing, partial or damaged ones are rebuilt. A manifest
  from different settings (corpus, split, length, key layer, dtype, shard size, checkpoint) is an error.
  info: extra fields for the manifest (base workdir, checkpoint step).
  """
  from tqdm import tqdm  # noqa: PLC0415

  if key_dtype not in KEY_DTYPES:
    raise ValueError(f"datastore key_dtype must be one of {KEY_DTYPES}, got {key_dtype!r}.")
  if shard_rows < 1 or batch_size < 1:
    raise ValueError(f"shard_rows ({shard_rows}) and batch_size ({batch_size}) must be >= 1.")
  train, _ = corpus_streams(files, val_fraction)
  source = text.PackedTextSource(train, seq_len, ByteTokenizer.EOS)
  rows = len(source)
  if rows == 0:
    raise ValueError(f"the training split of {files!r} has {len(train)} tokens: fewer than seq_len + 1 = "
                     f"{seq_len + 1}, no datastore entry.")
  settings = {"corpus": files, "val_fraction": val_fraction, "seq_len": seq_len, "key_layer": key_layer,
              "key_dtype": key_dtype, "shard_rows": shard_rows, "corpus_tokens": int(len(train)), **(info or {})}
  os.makedirs(out_dir, exist_ok=True)
  settings_path = os.path.join(out_dir, "settings.json")
  if os.path.exists(settings_path):
    with open(settings_path) as f:
      old = json.load(f)
    diffs = [f"{k}: on disk {old.get(k)!r}, now {v!r}" for k, v in settings.items() if old.get(k) != v]
    if diffs:
      raise ValueError(f"the datastore in {out_dir} was built with other settings:\n  " + "\n  ".join(diffs)
                       + "\nUse a new workdir (or delete that directory) to build a new one.")
  else:
    with open(settings_path, "w") as f:
      json.dump(settings, f, indent=1)
  encode = make_encoder(model, params, key_layer=key_layer)
  num_shards = -(-rows // shard_rows)
  shards = []
  for i in tqdm(range(num_shards), desc="datastore shards", disable=not progress, file=sys.stderr):
    name = _shard_name(i)
    start, stop = i * shard_rows, min((i + 1) * shard_rows, rows)
    entry = {"keys": f"keys_{name}.npy", "values": f"values_{name}.npy", "start": start * seq_len,
             "count": (stop - start) * seq_len}
    shards.append(entry)
    if _shard_ok(out_dir, i):
      continue
    keys, values, _ = encode_rows(encode, source, start, stop, batch_size)
    _save_npy(os.path.join(out_dir, entry["keys"]), keys.astype(key_dtype))
    _save_npy(os.path.join(out_dir, entry["values"]), values)
    files_record = {}
    for fname in (entry["keys"], entry["values"]):
      fpath = os.path.join(out_dir, fname)
      files_record[fname] = [os.path.getsize(fpath), file_crc32(fpath)]
    tmp = os.path.join(out_dir, f"shard_{name}.json.tmp")
    with open(tmp, "w") as f:
      json.dump({"files": files_record, **entry}, f)
    os.replace(tmp, os.path.join(out_dir, f"shard_{name}.json"))
  dim = int(np.load(os.path.join(out_dir, shards[0]["keys"]), mmap_mode="r").shape[1])
  manifest = {**settings, "size": rows * seq_len, "dim": dim, "value_dtype": "int32", "shards": shards}
  tmp = os.path.join(out_dir, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(out_dir, MANIFEST))
  return manifest


class Datastore:
  """A finished datastore on disk, its shards memory-mapped (nothing is read until it is used).

  `manifest`: the datastore.json dict. `shard_keys` / `shard_values`: per-shard memmaps ([count, dim] float32 or
  float16, [count] int32). `head(n)` reads the first n entries (only the shards they fall in); `keys` and
  `values` are the whole arrays (the memmap itself for one shard, else read into memory once).
  """

  def __init__(self, manifest: dict[str, Any], shard_keys: list[np.ndarray], shard_values: list[np.ndarray]):
    self.manifest, self.shard_keys, self.shard_values = manifest, shard_keys, shard_values
    self._keys = self._values = None

  @classmethod
  def open(cls, directory: str, *, check: bool = True) -> "Datastore":
    """Opens a finished datastore (its manifest written); check: verify every shard against its record."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
      raise FileNotFoundError(f"no datastore in {directory} ({MANIFEST} missing): run the datastore stage first "
                              "(python -m experiments.run --config configs/mlp_memory.py:stage=datastore ...).")
    with open(path) as f:
      manifest = json.load(f)
    keys, values = [], []
    for i, s in enumerate(manifest["shards"]):
      if check and not _shard_ok(directory, i):
        raise ValueError(f"datastore shard {i} in {directory} is missing or damaged: run the datastore stage "
                         "again to rebuild it.")
      keys.append(np.load(os.path.join(directory, s["keys"]), mmap_mode="r"))
      values.append(np.load(os.path.join(directory, s["values"]), mmap_mode="r"))
      if keys[-1].shape != (s["count"], manifest["dim"]) or values[-1].shape != (s["count"],):
        raise ValueError(f"datastore shard {i} in {directory} holds keys {keys[-1].shape} and values "
                         f"{values[-1].shape}; its manifest says {s['count']} entries of dim {manifest['dim']}.")
    return cls(manifest, keys, values)

  @property
  def size(self) -> int:
    return int(self.manifest["size"])

  def head(self, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys [n, dim], values [n]) of the first n entries, reading only the shards they fall in."""
    if not 0 <= n <= self.size:
      raise ValueError(f"the datastore has {self.size} entries; {n} were asked for.")
    keys, values, got = [], [], 0
    for k, v in zip(self.shard_keys, self.shard_values):
      if got >= n:
        break
      take = min(len(k), n - got)
      keys.append(np.asarray(k[:take]))
      values.append(np.asarray(v[:take]))
      got += take
    if not keys:
      return np.zeros((0, self.manifest["dim"]), self.shard_keys[0].dtype), np.zeros((0,), np.int32)
    return np.concatenate(keys), np.concatenate(values)

  @property
  def keys(self) -> np.ndarray:
    if self._keys is None:
      self._keys = self.shard_keys[0] if len(self.shard_keys) == 1 else np.concatenate(self.shard_keys)
    return self._keys

  @property
  def values(self) -> np.ndarray:
    if self._values is None:
      self._values = self.shard_values[0] if len(self.shard_values) == 1 else np.concatenate(self.shard_values)
    return self._values
