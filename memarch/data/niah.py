"""Needle in a haystack (RULER's single-needle S-NIAH) and the classic text passkey, byte-tokenized.

S-NIAH (Hsieh et al., 2024, "RULER"), three flavours:
  "noise"      haystack of repeated noise sentences, key a word, value a 7-digit number  (RULER niah_single_1)
  "text"       haystack of real text (a local file), same needle                        (niah_single_2)
  "text_uuid"  real text, the value a UUID                                                (niah_single_3)

    ... haystack ... One of the special magic numbers for sour-apple is: 4817263. ... haystack ...
    Question: What is the special magic number for sour-apple? Answer: | 4817263.

Passkey (Mohtashami & Jaggi, 2023): "The grass is green. The sky is blue. ..." repeated, with
"The pass key is 51234. Remember it. 51234 is the pass key. " at a depth, then
"What is the pass key? The pass key is " | "51234.".

The answer (after "|") is the value and a period; the loss mask covers only it (memarch/data/qa.py gives the
layout: exact length T, prompt then answer). The needle is inserted at the sentence boundary of the haystack
nearest `depth * len(filler)`; the example's "depth" is where it actually starts, as a fraction of the filler.
"""

from __future__ import annotations

import uuid

import numpy as np

from memarch.data import qa

FLAVOURS = ("noise", "text", "text_uuid")
_ADJECTIVES = ("sour", "quiet", "brave", "round", "silver", "gentle", "rapid", "hollow", "bright", "frozen",
               "golden", "humble", "lucky", "misty", "narrow", "proud")
_NOUNS = ("apple", "river", "castle", "engine", "forest", "harbor", "island", "ladder", "meadow", "needle",
          "orchard", "pencil", "rocket", "saddle", "tunnel", "violin")


def eval_set_name(task: str, seq_len: int, depth: float) -> str:
  """The name of an eval set: "niah_noise_T1024_d50" (depth in percent)."""
  return f"{task}_T{seq_len}_d{int(round(depth * 100))}"


def _place(rng: np.random.Generator, *, seq_len: int, needle: str, question: str, answer: str, kind: str,
           corpus: np.ndarray | None, depth: float | None, what: str) -> dict:
  needle_ids, question_ids, answer_ids = (qa.TOKENIZER.encode(s) for s in (needle, question, answer))
  filler_len = seq_len + 1 - len(needle_ids) - len(question_ids) - len(answer_ids)
  if filler_len < 0:
    raise ValueError(f"{what}: seq_len={seq_len} is too short: the needle, question and answer alone take "
                     f"{seq_len - filler_len} tokens; use seq_len >= {seq_len - filler_len}.")
  filler, bounds = qa.haystack(rng, filler_len, kind, corpus)
  if depth is None:
    depth = float(rng.random())
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"{what}: depth must be in [0, 1], got {depth}.")
  pos = qa.nearest_boundary(bounds, depth * filler_len)
  hay, (start,) = qa.insert_pieces(filler, bounds, [needle_ids], [pos])
  ex = qa.assemble(np.concatenate([hay, question_ids]), answer_ids, seq_len)
  ex.update(answer=answer, needle_start=start, needle_len=len(needle_ids), depth=pos / max(filler_len, 1))
  return ex


def niah_example(rng: np.random.Generator, *, seq_len: int, flavour: str = "noise", corpus: np.ndarray | None = None,
                 depth: float | None = None) -> dict:
  """One S-NIAH example: inputs/targets [T] int32, loss_mask [T] float32, answer (str), key (str),
  needle_start (its offset in the stream), needle_len, depth (actual, fraction of the filler).

  corpus: [N] byte ids of real text (flavours "text", "text_uuid"). depth: None draws it uniformly.
  """
  if flavour not in FLAVOURS:
    raise ValueError(f"niah: flavour must be one of {FLAVOURS}, got {flavour!r}.")
  key = f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]}-{_NOUNS[rng.integers(len(_NOUNS))]}"
  if flavour == "text_uuid":
    value, noun = str(uuid.UUID(bytes=rng.bytes(16), version=4)), "uuid"
  else:
    value, noun = str(int(rng.integers(1_000_000, 10_000_000))), "number"
  ex = _place(rng, seq_len=seq_len, needle=f"One of the special magic {noun}s for {key} is: {value}. ",
              question=f"\nQuestion: What is the special magic {noun} for {key}? Answer: ", answer=f"{value}.",
              kind="noise" if flavour == "noise" else "text", corpus=corpus, depth=depth, what="niah")
  ex["key"] = key
  return ex


def passkey_text_example(rng: np.random.Generator, *, seq_len: int, key_digits: int = 5,
                         depth: float | None = None) -> dict:
  """One classic passkey example (the Landmark-attention filler): as niah_example, answer "<key>."."""
  if key_digits < 1:
    raise ValueError(f"passkey_text: key_digits must be >= 1, got {key_digits}.")
  key = str(int(rng.integers(10 ** (key_digits - 1), 10 ** key_digits)))
  return _place(rng, seq_len=seq_len, needle=f"The pass key is {key}. Remember it. {key} is the pass key. ",
                question="What is the pass key? The pass key is ", answer=f"{key}.", kind="noise", corpus=None,
                depth=depth, what="passkey_text")


def niah_source(*, flavour: str, num_examples: int, lengths, seed: int = 0, split: str = "train",
                depth: float | None = None, haystack_file: str = "") -> qa.QaSource:
  """A QaSource of S-NIAH examples (the real-text flavours read `haystack_file`)."""
  if flavour not in FLAVOURS:
    raise ValueError(f"niah: flavour must be one of {FLAVOURS}, got {flavour!r}.")
  corpus = None
  if flavour != "noise":
    if not haystack_file:
      raise ValueError(f"niah: flavour {flavour!r} needs real text: set data.niah.haystack_file to a local text "
                       "file (e.g. ../shared/data/tinyshakespeare.txt), or use flavour='noise'.")
    corpus = qa.load_corpus(haystack_file)

  def make(rng, t, d):
    return niah_example(rng, seq_len=t, flavour=flavour, corpus=corpus, depth=d)

  return qa.QaSource(make, task=f"niah_{flavour}", num_examples=num_examples, lengths=lengths, seed=seed, split=split,
                     depth=depth)


def passkey_text_source(*, num_examples: int, lengths, key_digits: int = 5, seed: int = 0, split: str = "train",
                        depth: float | None = None) -> qa.QaSource:
  """A QaSource of text passkey examples."""

  def make(rng, t, d):
    return passkey_text_example(rng, seq_len=t, key_digits=key_digits, depth=d)

  return qa.QaSource(make, task="passkey_text", num_examples=num_examples, lengths=lengths, seed=seed, split=split,
                     depth=depth)
