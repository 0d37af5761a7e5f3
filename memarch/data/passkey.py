"""Passkey retrieval (Mohtashami & Jaggi, 2023, "Landmark Attention"): find a key hidden in a long haystack.

An example of length T with a key of n digits:

    inputs:    f f f ... f  KEY d1 d2 .. dn  f f ... f  QUERY d1 .. d(n-1)
    targets:   f f f ... KEY d1 d2 ..  dn f  f f ... QUERY d1  d2 .. dn
    loss_mask: 0 0 0 ... 0  0   0  0  .. 0  0 0 ... 0   1     1  .. 1

The key block (the KEY marker and the n digits) starts at a uniformly random depth of the haystack; the
example ends with the QUERY marker followed by the key, and the loss (and token accuracy) covers only the
n answer digits: the target at QUERY is d1, at d1 it is d2, and so on. Inputs and targets are the token
stream shifted by one, as in MQAR (`memarch.data.synthetic`).

Vocabulary (`vocab_size` V >= FIRST_FILLER + 2): 0 pad, 1 the KEY marker, 2 the QUERY marker, 3..12 the
digits 0..9, and [13, V) filler. Filler is "repeat" (one fixed "sentence" of `filler_period` filler tokens,
drawn once from the data seed and tiled with a random phase per example: the original test repeats fixed
sentences) or "random" (independent uniform filler tokens: noise the memory must ignore).

Examples are generated on demand from (seed, split, T, index): `PasskeySource` is a random-access source
of any size that holds nothing in memory, and an example never changes when others are added.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD_ID = 0
KEY_ID = 1  # marks the start of the hidden key ("the pass key is")
QUERY_ID = 2  # asks for the key ("what is the pass key?")
FIRST_DIGIT = 3  # digits 0..9 are ids 3..12
FIRST_FILLER = FIRST_DIGIT + 10
FILLERS = ("repeat", "random")
_SPLIT_IDS = {"train": 0, "eval": 1}


def validate_passkey(*, vocab_size: int, seq_len: int, key_digits: int, filler: str = "repeat",
                     filler_period: int = 16) -> None:
  """Raises ValueError (saying what to change) if passkey examples cannot be generated."""
  if key_digits < 1:
    raise ValueError(f"passkey: key_digits must be >= 1, got {key_digits}.")
  if seq_len < 2 * key_digits + 2:
    raise ValueError(
        f"passkey: seq_len={seq_len} is too short for a {key_digits}-digit key: the key block (1 + "
        f"{key_digits} tokens) and the query with its answer ({key_digits} + 1 tokens) need seq_len >= "
        f"{2 * key_digits + 2}.")
  if vocab_size < FIRST_FILLER + 2:
    raise ValueError(
        f"passkey: vocab_size={vocab_size} leaves fewer than 2 filler tokens: ids 0..{FIRST_FILLER - 1} are pad, "
        f"markers and digits; need vocab_size >= {FIRST_FILLER + 2}.")
  if filler not in FILLERS:
    raise ValueError(f"passkey: filler must be one of {FILLERS}, got {filler!r}.")
  if filler_period < 1:
    raise ValueError(f"passkey: filler_period must be >= 1, got {filler_period}.")


def stack_rows(rows: Sequence[dict[str, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
  """Examples `{inputs, targets, loss_mask}` of length T stacked into a batch `[len(rows), T]` (empty rows: [0, T])."""
  if not rows:
    return {"inputs": np.zeros((0, seq_len), np.int32), "targets": np.zeros((0, seq_len), np.int32),
            "loss_mask": np.zeros((0, seq_len), np.float32)}
  return {name: np.stack([r[name] for r in rows]) for name in rows[0]}


def eval_set_name(seq_len: int) -> str:
  """The name of the eval set of length T: "passkey_T1024"."""
  return f"passkey_T{seq_len}"


def filler_sentence(seed: int, vocab_size: int, filler_period: int) -> np.ndarray:
  """The fixed filler "sentence" of the "repeat" filler: [filler_period] ids in [FIRST_FILLER, V)."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, 7, vocab_size, filler_period]))
  return rng.integers(FIRST_FILLER, vocab_size, size=filler_period)


def passkey_example(rng: np.random.Generator, *, seq_len: int, vocab_size: int, key_digits: int,
                    filler: str = "repeat", sentence: np.ndarray | None = None,
                    depth: float | None = None) -> dict[str, np.ndarray]:
  """One example: dict(inputs [T] int32, targets [T] int32, loss_mask [T] float32, key [n] int32 digits,
  depth float: the key block's start as a fraction of the positions it could take).

  `sentence` is the "repeat" filler's sentence (required for it); `depth` in [0, 1] fixes the key's depth
  (None: uniform).
  """
  t, n = seq_len, key_digits
  stream = np.empty(t + 1, np.int64)  # inputs = stream[:T], targets = stream[1:]
  hay = t - n  # stream[:hay] is the haystack, then QUERY and the n answer digits
  if filler == "repeat":
    if sentence is None:
      raise ValueError("passkey_example: the 'repeat' filler needs its sentence (filler_sentence(...)).")
    phase = int(rng.integers(len(sentence)))
    stream[:hay] = np.resize(np.roll(sentence, -phase), hay)
  else:
    stream[:hay] = rng.integers(FIRST_FILLER, vocab_size, size=hay)
  digits = rng.integers(0, 10, size=n)
  slots = hay - (n + 1)  # the key block (KEY + n digits) starts in [0, slots]
  if depth is None:
    start = int(rng.integers(slots + 1))
  else:
    if not 0.0 <= depth <= 1.0:
      raise ValueError(f"passkey_example: depth must be in [0, 1], got {depth}.")
    start = int(round(depth * slots))
  stream[start] = KEY_ID
  stream[start + 1:start + 1 + n] = digits + FIRST_DIGIT
  stream[hay] = QUERY_ID
  stream[hay + 1:] = digits + FIRST_DIGIT
  mask = np.zeros(t, np.float32)
  mask[t - n:] = 1.0  # targets at QUERY, d1, ..., d(n-1): the n digits
  return {"inputs": stream[:t].astype(np.int32), "targets": stream[1:].astype(np.int32), "loss_mask": mask,
          "key": digits.astype(np.int32), "depth": np.float32(start / max(slots, 1))}


class PasskeySource:
  """`num_examples` passkey examples of length `seq_len`, generated on demand (a BatchSource).

  Example i comes from its own generator seeded by (seed, split, seq_len, i): deterministic, independent of
  the other examples and of the batch it is read in.
  """

  def __init__(self, *, num_examples: int, seq_len: int, vocab_size: int, key_digits: int = 5,
               filler: str = "repeat", filler_period: int = 16, seed: int = 0, split: str = "train"):
    validate_passkey(vocab_size=vocab_size, seq_len=seq_len, key_digits=key_digits, filler=filler,
                     filler_period=filler_period)
    if split not in _SPLIT_IDS:
      raise ValueError(f"passkey: split must be one of {sorted(_SPLIT_IDS)}, got {split!r}.")
    if num_examples < 1:
      raise ValueError(f"passkey: num_examples must be >= 1, got {num_examples}.")
    self.num_examples, self.seq_len, self.vocab_size = num_examples, seq_len, vocab_size
    self.key_digits, self.filler, self.seed, self.split = key_digits, filler, seed, split
    self.sentence = filler_sentence(seed, vocab_size, filler_period)

  def __len__(self) -> int:
    return self.num_examples

  def example(self, index: int) -> dict[str, np.ndarray]:
    """Example `index` with its key and depth (see `passkey_example`)."""
    if not 0 <= index < self.num_examples:
      raise IndexError(f"passkey: index {index} out of range [0, {self.num_examples}).")
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, _SPLIT_IDS[self.split], self.seq_len, index]))
    return passkey_example(rng, seq_len=self.seq_len, vocab_size=self.vocab_size, key_digits=self.key_digits,
                           filler=self.filler, sentence=self.sentence)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    ex = self.example(int(index))
    return {name: ex[name] for name in ("inputs", "targets", "loss_mask")}

  def __getitems__(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    return stack_rows([self[int(i)] for i in indices], self.seq_len)


def passkey_sources(*, seed: int, vocab_size: int, seq_len: int, eval_lengths: Sequence[int], key_digits: int,
                    filler: str, filler_period: int, num_train_examples: int,
                    num_eval_examples: int) -> tuple[PasskeySource, dict[str, PasskeySource]]:
  """The training source (length seq_len) and one eval source per length, named `eval_set_name(T)`."""
  common = dict(vocab_size=vocab_size, key_digits=key_digits, filler=filler, filler_period=filler_period,
                seed=seed)
  train = PasskeySource(num_examples=num_train_examples, seq_len=seq_len, split="train", **common)
  lengths = [int(t) for t in eval_lengths]
  if not lengths:
    raise ValueError("passkey: data.passkey.eval_lengths is empty.")
  if len(set(lengths)) != len(lengths):
    raise ValueError(f"passkey: data.passkey.eval_lengths has duplicates: {tuple(lengths)}.")
  evals = {eval_set_name(t): PasskeySource(num_examples=num_eval_examples, seq_len=t, split="eval", **common)
           for t in lengths}
  return train, evals
