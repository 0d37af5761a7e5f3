"""Multi-query associative recall (MQAR), as in the Zoology benchmark (Arora, Eyuboglu et al., 2023).

An example of length T with k key-value pairs and vocabulary V:

    position:  0   1   2   3  ... 2k-1 | 2k ...                                T-1
    inputs:    k1  v1  k2  v2 ... vk   | 0 0 k2 0 0 0 k1 0 ... (each key queried once, filler 0)
    targets:   0   0   0   0  ... 0    | 0 0 v2 0 0 0 v1 0 ...
    loss_mask: 0   0   0   0  ... 0    | 0 0 1  0 0 0 1  0 ...

Keys are distinct within an example and drawn uniformly from [1, V//2), values (not necessarily
distinct across examples, distinct within one) from [V//2, V); token 0 is the filler and the pad.
The query of pair i sits at position `2k + 2 * gap_i`, where the gaps are drawn without replacement
from {0, ..., (T - 2k)//2 - 1} with Zoology's power law p(gap) ~ power_a * (gap + 1)**(power_a - 1)
(small power_a: queries cluster right after the context; power_a = 1: uniform).

Next-token convention: at a query position p the input is the key and the target is its value, so a
causal model must recall the value from the context. Zoology writes the same thing as inputs/labels
shifted by one; unlike Zoology's default we keep filler tokens at 0 (its `random_non_queries=False`)
so that the loss mask, not a token id, marks the only positions that carry a label.

Everything is vectorized numpy: a whole split is generated in one call (no per-example Python loop),
deterministically from a `np.random.Generator` (or a seed for the mixture helpers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD_ID = 0  # filler inside an example and the pad of shorter mixture settings

# Bounds the float matrices of the vectorized samplers to about 32 MiB whatever the split size.
_MAX_CHUNK_ELEMENTS = 4 * 1024 * 1024


def validate_mqar_setting(*, vocab_size: int, seq_len: int, num_kv_pairs: int, power_a: float = 0.01) -> None:
  """Raises ValueError (saying what to change) if an MQAR setting cannot be generated."""
  if num_kv_pairs < 1:
    raise ValueError(f"MQAR: num_kv_pairs must be >= 1, got {num_kv_pairs}.")
  if seq_len < 4 * num_kv_pairs:
    # Zoology's requirement: the context takes 2k tokens and the query region needs k distinct
    # even slots, i.e. (T - 2k) // 2 >= k.
    raise ValueError(
        f"MQAR: seq_len={seq_len} is too short for num_kv_pairs={num_kv_pairs}: need seq_len >= "
        f"4 * num_kv_pairs = {4 * num_kv_pairs} (2k context tokens + k queries at distinct even "
        f"offsets). Use a longer seq_len or fewer kv pairs.")
  num_keys = vocab_size // 2 - 1  # keys live in [1, V//2): token 0 is reserved for filler/pad
  num_values = vocab_size - vocab_size // 2
  if num_keys < num_kv_pairs or num_values < num_kv_pairs:
    raise ValueError(
        f"MQAR: vocab_size={vocab_size} is too small for {num_kv_pairs} distinct keys and values "
        f"(keys come from [1, {vocab_size // 2}) = {max(num_keys, 0)} ids, values from "
        f"[{vocab_size // 2}, {vocab_size}) = {num_values} ids). Need vocab_size >= "
        f"{2 * num_kv_pairs + 2}.")
  if not power_a > 0:
    raise ValueError(f"MQAR: power_a must be > 0 (1.0 is uniform), got {power_a}.")


def _distinct_choice(rng: np.random.Generator, num_rows: int, k: int, low: int, high: int) -> np.ndarray:
  """[num_rows, k] int64: per row, k distinct ints from [low, high) in uniformly random order.

  Floyd's algorithm vectorized over rows (k steps, O(rows * k^2) comparisons, O(rows * k) memory),
  followed by a random permutation of each row: uniform over ordered k-subsets, and unlike an argsort
  of a [rows, high - low] random matrix its cost does not grow with the pool size (V/2 = 4096 by default).
  """
  pool = high - low
  out = np.empty((num_rows, k), dtype=np.int64)
  for step, j in enumerate(range(pool - k, pool)):
    t = rng.integers(0, j + 1, size=num_rows)
    taken = (out[:, :step] == t[:, None]).any(axis=1)
    out[:, step] = np.where(taken, j, t)
  order = np.argsort(rng.random((num_rows, k)), axis=1)
  return np.take_along_axis(out, order, axis=1) + low


def _power_law_gaps(rng: np.random.Generator, num_rows: int, k: int, space: int, power_a: float) -> np.ndarray:
  """[num_rows, k] int64: k distinct gaps in [0, space) per row, drawn like Zoology's power law.

  Zoology calls `np.random.choice(space, k, replace=False, p=p)` per row, i.e. successive sampling
  proportional to p. The Gumbel-top-k trick draws from exactly that distribution (the i-th largest
  perturbed log-probability is the i-th draw), vectorized over rows.
  """
  log_p = (power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
  out = np.empty((num_rows, k), dtype=np.int64)
  chunk = max(1, _MAX_CHUNK_ELEMENTS // max(space, 1))
  for start in range(0, num_rows, chunk):
    stop = min(start + chunk, num_rows)
    scores = log_p[None, :] + rng.gumbel(size=(stop - start, space))
    out[start:stop] = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return out


def mqar_batch(
    rng: np.random.Generator,
    *,
    num_examples: int,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    pad_to: int | None = None,
) -> dict[str, np.ndarray]:
  """Generates `num_examples` MQAR examples at once (vectorized).

  Args:
    rng: the only source of randomness; equal generator states give equal examples.
    num_examples: N, the number of examples (0 is allowed and gives empty arrays).
    vocab_size: V; keys from [1, V//2), values from [V//2, V), 0 is filler and pad.
    seq_len: T, the length of the example itself.
    num_kv_pairs: k, pairs per example; every key is queried exactly once.
    power_a: Zoology's power-law exponent for the query gaps (1.0: uniform).
    pad_to: L >= T: pad every row to this length with token 0 and loss_mask 0 (mixtures of
      settings share one training length). None: L = T.

  Returns:
    dict(inputs [N, L] int32, targets [N, L] int32, loss_mask [N, L] float32). loss_mask is 1 exactly
    at the k query positions per row, where inputs holds a key and targets the value stored for it.
  """
  validate_mqar_setting(vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=num_kv_pairs, power_a=power_a)
  length = seq_len if pad_to is None else pad_to
  if length < seq_len:
    raise ValueError(f"MQAR: pad_to={pad_to} is shorter than the example length seq_len={seq_len}.")
  if num_examples < 0:
    raise ValueError(f"MQAR: num_examples must be >= 0, got {num_examples}.")
  n, k = num_examples, num_kv_pairs
  keys = _distinct_choice(rng, n, k, 1, vocab_size // 2)
  values = _distinct_choice(rng, n, k, vocab_size // 2, vocab_size)
  context = 2 * k
  gaps = _power_law_gaps(rng, n, k, (seq_len - context) // 2, power_a)
  query_pos = context + 2 * gaps  # [n, k]; query i asks for key i

  inputs = np.zeros((n, length), dtype=np.int32)
  targets = np.zeros((n, length), dtype=np.int32)
  loss_mask = np.zeros((n, length), dtype=np.float32)
  inputs[:, 0:context:2] = keys
  inputs[:, 1:context:2] = values
  rows = np.arange(n)[:, None]
  inputs[rows, query_pos] = keys
  targets[rows, query_pos] = values
  loss_mask[rows, query_pos] = 1.0
  return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}


def mqar_example(
    rng: np.random.Generator,
    *,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
) -> dict[str, np.ndarray]:
  """One MQAR example: dict(inputs [T] int32, targets [T] int32, loss_mask [T] float32).

  Equal to `mqar_batch(rng, num_examples=1, ...)` row 0 (same generator consumption).
  """
  batch = mqar_batch(rng, num_examples=1, vocab_size=vocab_size, seq_len=seq_len,
                     num_kv_pairs=num_kv_pairs, power_a=power_a)
  return {name: value[0] for name, value in batch.items()}


def setting_name(seq_len: int, num_kv_pairs: int) -> str:
  """The name of an MQAR setting, used for eval sets and TFDS splits: "mqar_T64_kv4"."""
  return f"mqar_T{seq_len}_kv{num_kv_pairs}"


# Split ids mixed into the seed so that train and eval examples come from independent streams.
_SPLIT_IDS = {"train": 0, "eval": 1}


def setting_rng(seed: int, split: str, seq_len: int, num_kv_pairs: int) -> np.random.Generator:
  """The generator of one (split, setting): independent of the other settings in the mixture.

  Seeding from (seed, split, T, k) rather than from the setting's index keeps a setting's examples
  unchanged when settings are added to or removed from a mixture.
  """
  return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split], seq_len, num_kv_pairs]))


def validate_settings(settings: Sequence[Sequence[int]], seq_len: int, vocab_size: int, power_a: float, *,
                      what: str = "data.mqar.settings", allow_longer: bool = False) -> None:
  """Raises ValueError if any (T, k) of a mixture cannot be generated or is longer than seq_len (unless
  `allow_longer`: eval settings may exceed the training length, as passkey's eval lengths do).

  The message names `what` (the config key holding the settings) and the offending (T, k) setting."""
  if not settings:
    raise ValueError(f"MQAR: {what} (the list of (seq_len, num_kv_pairs) settings) is empty.")
  for setting in settings:
    if len(setting) != 2:
      raise ValueError(f"MQAR: each setting of {what} is a (seq_len, num_kv_pairs) pair, got {tuple(setting)}.")
    t, k = int(setting[0]), int(setting[1])
    if t > seq_len and not allow_longer:
      raise ValueError(
          f"MQAR: setting (seq_len={t}, num_kv_pairs={k}) of {what} is longer than data.seq_len={seq_len}; "
          f"raise data.seq_len to at least {t}.")
    try:
      validate_mqar_setting(vocab_size=vocab_size, seq_len=t, num_kv_pairs=k, power_a=power_a)
    except ValueError as e:
      raise ValueError(f"MQAR: setting (seq_len={t}, num_kv_pairs={k}) of {what} cannot be generated: "
                       f"{str(e).removeprefix('MQAR: ')}") from None


def mqar_mixture(
    *,
    seed: int,
    split: str,
    vocab_size: int,
    settings: Sequence[Sequence[int]],
    num_examples_per_setting: int,
    seq_len: int,
    power_a: float = 0.01,
) -> dict[str, np.ndarray]:
  """All examples of a mixture of settings, concatenated setting after setting (unshuffled).

  Args:
    seed: data seed; split: "train" or "eval" (independent streams).
    settings: (T_i, k_i) pairs; each contributes `num_examples_per_setting` examples.
    seq_len: L, the common padded length (>= every T_i).

  Returns:
    dict(inputs [N, L] int32, targets [N, L] int32, loss_mask [N, L] float32) with
    N = len(settings) * num_examples_per_setting; rows of shorter settings are padded with 0 and
    loss_mask 0.
  """
  if split not in _SPLIT_IDS:
    raise ValueError(f"MQAR: split must be one of {sorted(_SPLIT_IDS)}, got {split!r}.")
  validate_settings(settings, seq_len, vocab_size, power_a)
  parts = [
      mqar_batch(setting_rng(seed, split, int(t), int(k)), num_examples=num_examples_per_setting,
                 vocab_size=vocab_size, seq_len=int(t), num_kv_pairs=int(k), power_a=power_a, pad_to=seq_len)
      for t, k in settings
  ]
  return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}


def mqar_eval_sets(
    *,
    seed: int,
    vocab_size: int,
    eval_settings: Sequence[Sequence[int]],
    num_examples: int,
    seq_len: int,
    power_a: float = 0.01,
) -> dict[str, dict[str, np.ndarray]]:
  """One held-out set per eval setting, keyed by `setting_name(T, k)`; arrays [num_examples, max(T, seq_len)].

  A setting longer than the training length seq_len is kept at its own length T: it measures length
  generalization (train at 512, evaluate at 2048)."""
  validate_settings(eval_settings, seq_len, vocab_size, power_a, what="data.mqar.eval_settings", allow_longer=True)
  names = [setting_name(int(t), int(k)) for t, k in eval_settings]
  if len(set(names)) != len(names):
    raise ValueError(f"MQAR: the eval settings have duplicates: {tuple(map(tuple, eval_settings))}.")
  return {
      setting_name(int(t), int(k)): mqar_mixture(
          seed=seed, split="eval", vocab_size=vocab_size, settings=[(t, k)],
          num_examples_per_setting=num_examples, seq_len=max(int(t), seq_len), power_a=power_a)
      for t, k in eval_settings
  }
