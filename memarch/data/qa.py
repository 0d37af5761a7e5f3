"""Prompt + answer examples of an exact length, for the text memory tasks (NIAH, text passkey, BABILong).

Every example is a byte stream of T + 1 tokens, `prompt (T + 1 - n tokens) | answer (n tokens)`:

    inputs    = stream[:T]        [T] int32
    targets   = stream[1:]        [T] int32
    loss_mask = 1 on the last n target positions (the answer's tokens), 0 elsewhere   [T] float32

so a model that reads `inputs[:T + 1 - n]` (the prompt) and decodes n tokens greedily reproduces the answer if
it solves the task: `prompt_and_answer(example)` splits a row that way (the same holds for the token passkey).

The prompt is a haystack of filler with the task's pieces (a needle, story facts) inserted at sentence
boundaries, then the question. A haystack is "noise" (fixed sentences repeated, RULER/Landmark style),
"sentences" (sentences drawn at random from a small bank) or "text" (a slice of a local corpus at a random
offset, wrapping around). Examples are generated on demand from (seed, task, split, length, depth, index):
`QaSource` is a random-access source of any size that holds nothing but the corpus in memory.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from memarch.data.passkey import stack_rows
from memarch.data.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
PAD_ID = ByteTokenizer.PAD
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
SENTENCE_BANK = (
    "The weather was mild that day. ", "A bird sang somewhere far away. ", "The river ran slowly past the hill. ",
    "Nobody said anything for a while. ", "The old clock ticked on the wall. ", "It had rained during the night. ",
    "The road wound through the fields. ", "Somewhere a dog barked twice. ", "The lamp flickered and steadied. ",
    "The bread was still warm. ", "Clouds drifted over the town. ", "The letter had not arrived yet. ",
    "A cold wind came from the north. ", "The market opened early. ", "Leaves covered the path. ",
    "The ship waited in the harbor. ", "Two cats slept in the sun. ", "The bells rang at noon. ",
)
_SPLIT_IDS = {"train": 0, "eval": 1}


def task_id(name: str) -> int:
  """A stable integer for a task name (seeds differ per task)."""
  return zlib.crc32(name.encode("utf-8"))


@functools.lru_cache(maxsize=4)
def load_corpus(path: str) -> np.ndarray:
  """[N] int32 byte ids of a local text file (cached). A clear error if it is missing or too short."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f"haystack_file {path!r} cannot be read ({e}); give a local text file, e.g. "
                     "../shared/data/tinyshakespeare.txt, or use the noise haystack.") from None
  if len(data) < 64:
    raise ValueError(f"haystack_file {path!r} has {len(data)} bytes; a real-text haystack needs at least 64.")
  return TOKENIZER.encode_bytes(data)


def haystack(rng: np.random.Generator, length: int, kind: str, corpus: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """(ids [length] int32, boundaries [m] int64): filler of exactly `length` bytes and the sorted offsets where a
  sentence starts (always including 0 and `length`), where pieces may be inserted without cutting a sentence
  (the generated haystacks end with a whole sentence; only their first one may be cut).

  kind: "noise" (NOISE repeated from a random sentence), "sentences" (random SENTENCE_BANK sentences) or
  "text" (a slice of `corpus` at a random offset; boundaries after "\\n" and after ". ").
  """
  if length < 0:
    raise ValueError(f"haystack: length must be >= 0, got {length}.")
  if kind in ("noise", "sentences"):
    if kind == "noise":
      sentences = [s + ". " for s in NOISE.split(". ") if s.strip()]
      start = int(rng.integers(len(sentences)))
      reps = length // len(NOISE) + 2
      chosen = sentences[start:] + sentences * reps
    else:
      avg = sum(map(len, SENTENCE_BANK)) / len(SENTENCE_BANK)
      chosen = [SENTENCE_BANK[i] for i in rng.integers(len(SENTENCE_BANK), size=int(length / avg) + 8)]
    out, bounds, total = [], [0], 0
    for s in chosen:
      if total >= length:
        break
      out.append(s)
      total += len(s)
      bounds.append(total)
    while total < length:  # only if `chosen` ran short (never for the lengths above, kept for safety)
      out.append(chosen[len(out) % len(chosen)])
      total += len(out[-1])
      bounds.append(total)
    # Keep the last `length` bytes: the haystack ends with a whole sentence (only the first one may be cut).
    cut = total - length
    ids = TOKENIZER.encode("".join(out))[cut:]
    b = np.array([0] + [x - cut for x in bounds if x > cut], np.int64)
    return ids.astype(np.int32), np.unique(b)
  if kind == "text":
    if corpus is None:
      raise ValueError("haystack: the 'text' haystack needs a corpus (a haystack_file).")
    offset = int(rng.integers(len(corpus)))
    ids = np.resize(np.roll(corpus, -offset), length).astype(np.int32)
    prev = np.concatenate([[10], ids[:-1]]) if length else ids
    prev2 = np.concatenate([[0, 0], ids[:-2]])[:length] if length else ids
    starts = np.nonzero((prev == 10) | ((prev == 32) & (prev2 == 46)))[0]
    return ids, np.unique(np.concatenate([[0], starts, [length]]).astype(np.int64))
  raise ValueError(f"haystack: kind must be 'noise', 'sentences' or 'text', got {kind!r}.")


def insert_pieces(filler: np.ndarray, boundaries: np.ndarray, pieces: Sequence[np.ndarray],
                  positions: Sequence[int]) -> tuple[np.ndarray, list[int]]:
  """Inserts pieces[i] before filler offset positions[i] (non-decreasing boundary offsets), in order.

  Returns (ids [len(filler) + sum(len(pieces))], the start of each piece in the result)."""
  del boundaries  # positions are already chosen among them
  out, starts, prev, shift = [], [], 0, 0
  for piece, pos in zip(pieces, positions):
    out.append(filler[prev:pos])
    starts.append(pos + shift)
    out.append(piece)
    shift += len(piece)
    prev = pos
  out.append(filler[prev:])
  return np.concatenate(out).astype(np.int32), starts


def nearest_boundary(boundaries: np.ndarray, target: float) -> int:
  """The boundary offset closest to `target` (ties: the earlier one)."""
  return int(boundaries[int(np.argmin(np.abs(boundaries - target)))])


def assemble(prompt: np.ndarray, answer: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """inputs/targets [T] int32 and loss_mask [T] float32 from a prompt and answer of total length T + 1."""
  stream = np.concatenate([prompt, answer]).astype(np.int32)
  if len(stream) != seq_len + 1:
    raise AssertionError(f"assemble: prompt + answer have {len(stream)} tokens, expected {seq_len + 1}.")
  mask = np.zeros(seq_len, np.float32)
  mask[seq_len - len(answer):] = 1.0
  return {"inputs": stream[:seq_len], "targets": stream[1:], "loss_mask": mask}


def prompt_and_answer(inputs: np.ndarray, targets: np.ndarray, loss_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(prompt [T + 1 - n], answer [n]) of one row [T] whose loss_mask covers exactly its last n positions."""
  n = int(np.asarray(loss_mask).sum())
  t = len(inputs)
  if n < 1 or not np.all(np.asarray(loss_mask)[t - n:] == 1):
    raise ValueError("prompt_and_answer: the loss mask must cover a non-empty suffix of the row (the answer).")
  return np.asarray(inputs)[:t - n + 1], np.asarray(targets)[t - n:]


def pad_to(example: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """Right-pads a shorter example (a training-mixture length) to seq_len with PAD and loss_mask 0."""
  t = len(example["inputs"])
  if t == seq_len:
    return example
  pad = seq_len - t
  return {"inputs": np.concatenate([example["inputs"], np.full(pad, PAD_ID, np.int32)]),
          "targets": np.concatenate([example["targets"], np.full(pad, PAD_ID, np.int32)]),
          "loss_mask": np.concatenate([example["loss_mask"], np.zeros(pad, np.float32)])}


ExampleFn = Callable[[np.random.Generator, int, "float | None"], dict]


class QaSource:
  """`num_examples` examples of one task generated on demand (a BatchSource).

  make_example(rng, length, depth) -> dict with inputs/targets/loss_mask [length] (and metadata). Example i has
  length lengths[i % len(lengths)] (a training mixture; shorter ones right-padded to seq_len = max(lengths)) and
  comes from its own generator seeded by (seed, task, split, length, depth, i).
  """

  def __init__(self, make_example: ExampleFn, *, task: str, num_examples: int, lengths: Sequence[int],
               seed: int = 0, split: str = "train", depth: float | None = None):
    if split not in _SPLIT_IDS:
      raise ValueError(f"{task}: split must be one of {sorted(_SPLIT_IDS)}, got {split!r}.")
    if num_examples < 1:
      raise ValueError(f"{task}: num_examples must be >= 1, got {num_examples}.")
    if not lengths:
      raise ValueError(f"{task}: no lengths given.")
    self.make_example, self.task, self.num_examples = make_example, task, num_examples
    self.lengths = tuple(int(t) for t in lengths)
    self.seq_len = max(self.lengths)
    self.seed, self.split, self.depth = seed, split, depth

  def __len__(self) -> int:
    return self.num_examples

  def example(self, index: int) -> dict:
    """Example `index` with its metadata (unpadded)."""
    if not 0 <= index < self.num_examples:
      raise IndexError(f"{self.task}: index {index} out of range [0, {self.num_examples}).")
    t = self.lengths[index % len(self.lengths)]
    depth_code = -1 if self.depth is None else int(round(self.depth * 10_000))
    rng = np.random.default_rng(np.random.SeedSequence(
        [self.seed, task_id(self.task), _SPLIT_IDS[self.split], t, depth_code + 1, index]))
    return self.make_example(rng, t, self.depth)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    ex = self.example(int(index))
    return pad_to({k: ex[k] for k in ("inputs", "targets", "loss_mask")}, self.seq_len)

  def __getitems__(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    return stack_rows([self[int(i)] for i in indices], self.seq_len)
