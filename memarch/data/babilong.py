"""BABILong-style reasoning in a haystack (Kuratov et al., 2024): bAbI stories from a small world simulator,
their fact sentences hidden among filler sentences up to a length budget, byte-tokenized.

The simulator has people (Mary, John, Daniel, Sandra), locations and objects. Each step is one fact:
  move  "Mary went to the kitchen."     the person's location changes; objects they carry go along
  pick  "Mary picked up the apple."     only where the person is known to be; the object is then there
  drop  "Mary dropped the apple."       the object stays where the person is
Tasks (the answer is read from the simulator's state after the last fact, never from a template):
  qa1  one supporting fact   (moves only)            "Where is Mary?"                       -> her location
  qa2  two supporting facts  (moves, picks, drops)   "Where is the apple?"                  -> its location
  qa3  three supporting facts                        "Where was the apple before the office?" -> the location
       it was in before it last arrived in the office (its location history, consecutive repeats merged)

    filler ... Mary went to the kitchen. filler ... John got the milk. ... filler
    Question: Where is Mary? Answer: | kitchen.

Facts go, in story order, at random sentence boundaries of the filler ("sentences": a bank of neutral sentences,
or "text": a local corpus); the total length is exact (memarch/data/qa.py gives the layout).
"""

from __future__ import annotations

import numpy as np

from memarch.data import qa

TASKS = ("qa1", "qa2", "qa3")
PEOPLE = ("Mary", "John", "Daniel", "Sandra")
LOCATIONS = ("bathroom", "hallway", "kitchen", "garden", "office", "bedroom")
OBJECTS = ("apple", "football", "milk")
MOVE_VERBS = ("went to", "journeyed to", "travelled to", "moved to")
PICK_VERBS = ("picked up", "got", "grabbed", "took")
DROP_VERBS = ("dropped", "discarded", "put down", "left")
DEFAULT_FACTS = {"qa1": 6, "qa2": 8, "qa3": 10}
_MAX_TRIES = 1000


def eval_set_name(task: str, seq_len: int) -> str:
  """The name of an eval set: "babilong_qa1_T1024"."""
  return f"babilong_{task}_T{seq_len}"


class World:
  """The simulator's state: where each person is, who holds what, where each object has been."""

  def __init__(self):
    self.loc: dict[str, str | None] = {p: None for p in PEOPLE}
    self.holder: dict[str, str | None] = {o: None for o in OBJECTS}
    self.obj_hist: dict[str, list[str]] = {o: [] for o in OBJECTS}

  def obj_loc(self, obj: str) -> str | None:
    return self.obj_hist[obj][-1] if self.obj_hist[obj] else None

  def _place_obj(self, obj: str, where: str) -> None:
    if self.obj_loc(obj) != where:
      self.obj_hist[obj].append(where)

  def move(self, person: str, where: str) -> None:
    self.loc[person] = where
    for o, h in self.holder.items():
      if h == person:
        self._place_obj(o, where)

  def can_pick(self, person: str, obj: str) -> bool:
    return (self.loc[person] is not None and self.holder[obj] is None
            and self.obj_loc(obj) in (None, self.loc[person]))

  def pick(self, person: str, obj: str) -> None:
    assert self.can_pick(person, obj)
    self.holder[obj] = person
    self._place_obj(obj, self.loc[person])

  def drop(self, person: str, obj: str) -> None:
    assert self.holder[obj] == person
    self.holder[obj] = None


def simulate(rng: np.random.Generator, task: str, num_facts: int | None = None) -> dict:
  """A story: {"facts": [sentence, ...], "question": str, "answer": str}; exactly num_facts facts
  (default DEFAULT_FACTS[task]) and an answerable question. Retries (with the same generator) until the story
  supports the task's question."""
  if task not in TASKS:
    raise ValueError(f"babilong: task must be one of {TASKS}, got {task!r}.")
  n = DEFAULT_FACTS[task] if num_facts is None else int(num_facts)
  if n < (1 if task == "qa1" else 2 if task == "qa2" else 3):
    raise ValueError(f"babilong: {task} needs more facts than {n}.")
  for _ in range(_MAX_TRIES):
    w, facts = World(), []
    for _ in range(n):
      person = PEOPLE[rng.integers(len(PEOPLE))]
      held = [o for o in OBJECTS if w.holder[o] == person]
      pickable = [o for o in OBJECTS if w.can_pick(person, o)]
      r = rng.random()
      if task != "qa1" and held and r < 0.2:
        o = held[rng.integers(len(held))]
        w.drop(person, o)
        facts.append(f"{person} {DROP_VERBS[rng.integers(len(DROP_VERBS))]} the {o}.")
      elif task != "qa1" and pickable and r < 0.5:
        o = pickable[rng.integers(len(pickable))]
        w.pick(person, o)
        facts.append(f"{person} {PICK_VERBS[rng.integers(len(PICK_VERBS))]} the {o}.")
      else:
        where = [loc for loc in LOCATIONS if loc != w.loc[person]]
        dest = where[rng.integers(len(where))]
        w.move(person, dest)
        facts.append(f"{person} {MOVE_VERBS[rng.integers(len(MOVE_VERBS))]} the {dest}.")
    if task == "qa1":
      known = [p for p in PEOPLE if w.loc[p] is not None]
      p = known[rng.integers(len(known))]
      return {"facts": facts, "question": f"Where is {p}?", "answer": w.loc[p]}
    if task == "qa2":
      # Prefer objects carried to where they are (two supporting facts: the pick-up and the move).
      known = [o for o in OBJECTS if len(w.obj_hist[o]) >= 2] or [o for o in OBJECTS if w.obj_loc(o)]
      if not known:
        continue
      o = known[rng.integers(len(known))]
      return {"facts": facts, "question": f"Where is the {o}?", "answer": w.obj_loc(o)}
    known = [o for o in OBJECTS if len(w.obj_hist[o]) >= 2]
    if not known:
      continue
    o = known[rng.integers(len(known))]
    return {"facts": facts, "question": f"Where was the {o} before the {w.obj_hist[o][-1]}?",
            "answer": w.obj_hist[o][-2]}
  raise RuntimeError(f"babilong: no {task} story with {n} facts after {_MAX_TRIES} tries; use more facts.")


def babilong_example(rng: np.random.Generator, *, seq_len: int, task: str = "qa1", num_facts: int | None = None,
                     haystack: str = "sentences", corpus: np.ndarray | None = None) -> dict:
  """One example: inputs/targets [T] int32, loss_mask [T] float32, answer (str), facts, question,
  fact_starts (offsets of the facts in the stream)."""
  story = simulate(rng, task, num_facts)
  pieces = [qa.TOKENIZER.encode(f + " ") for f in story["facts"]]
  question_ids = qa.TOKENIZER.encode(f"\nQuestion: {story['question']} Answer: ")
  answer = story["answer"] + "."
  answer_ids = qa.TOKENIZER.encode(answer)
  used = sum(map(len, pieces)) + len(question_ids) + len(answer_ids)
  filler_len = seq_len + 1 - used
  if filler_len < 0:
    raise ValueError(f"babilong: seq_len={seq_len} is too short for a {task} story: its facts, question and answer "
                     f"take {used} tokens; use seq_len >= {used - 1} (e.g. 512) or fewer facts.")
  filler, bounds = qa.haystack(rng, filler_len, haystack, corpus)
  positions = np.sort(bounds[rng.integers(len(bounds), size=len(pieces))])
  hay, starts = qa.insert_pieces(filler, bounds, pieces, positions.tolist())
  ex = qa.assemble(np.concatenate([hay, question_ids]), answer_ids, seq_len)
  ex.update(answer=answer, facts=story["facts"], question=story["question"], fact_starts=starts)
  return ex


def babilong_source(*, task: str, num_examples: int, lengths, seed: int = 0, split: str = "train",
                    num_facts: int = 0, haystack_file: str = "") -> qa.QaSource:
  """A QaSource of BABILong examples (num_facts 0: the task's default; a haystack_file: real-text filler)."""
  if task not in TASKS:
    raise ValueError(f"babilong: task must be one of {TASKS}, got {task!r}.")
  corpus = qa.load_corpus(haystack_file) if haystack_file else None
  kind = "text" if haystack_file else "sentences"

  def make(rng, t, _depth):
    return babilong_example(rng, seq_len=t, task=task, num_facts=num_facts or None, haystack=kind, corpus=corpus)

  return qa.QaSource(make, task=f"babilong_{task}", num_examples=num_examples, lengths=lengths, seed=seed, split=split)
