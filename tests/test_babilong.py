"""BABILong-style tasks: answers agree with an independent replay of the story, exact lengths, determinism."""

import re

import numpy as np
import pytest

from configs import common
from memarch.data import babilong, pipeline, qa

pytestmark = pytest.mark.timeout(60)

MOVE = re.compile(r"^(\w+) (?:went|journeyed|travelled|moved) to the (\w+)\.$")
PICK = re.compile(r"^(\w+) (?:picked up|got|grabbed|took) the (\w+)\.$")
DROP = re.compile(r"^(\w+) (?:dropped|discarded|put down|left) the (\w+)\.$")


def replay(facts, question):
  """Answers the question from the fact sentences alone (written independently of the simulator)."""
  where, carrying, history = {}, {}, {}
  for fact in facts:
    if m := MOVE.match(fact):
      person, place = m.groups()
      where[person] = place
      for obj, who in carrying.items():
        if who == person and history[obj][-1] != place:
          history[obj].append(place)
    elif m := PICK.match(fact):
      person, obj = m.groups()
      carrying[obj] = person
      history.setdefault(obj, [])
      if not history[obj] or history[obj][-1] != where[person]:
        history[obj].append(where[person])
    elif m := DROP.match(fact):
      carrying.pop(m.group(2))
    else:
      raise AssertionError(f"unparsed fact {fact!r}")
  if m := re.fullmatch(r"Where is (\w+)\?", question):
    return where[m.group(1)]
  if m := re.fullmatch(r"Where is the (\w+)\?", question):
    return history[m.group(1)][-1]
  m = re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question)
  hist = history[m.group(1)]
  assert hist[-1] == m.group(2)
  return hist[-2]


@pytest.mark.parametrize("task", babilong.TASKS)
def test_answers_agree_with_a_replay_of_the_story(task):
  for i in range(60):
    story = babilong.simulate(np.random.default_rng(i), task)
    assert len(story["facts"]) == babilong.DEFAULT_FACTS[task]
    assert replay(story["facts"], story["question"]) == story["answer"]


@pytest.mark.parametrize("task", babilong.TASKS)
def test_examples_hide_the_facts_in_order_with_exact_length(task):
  src = babilong.babilong_source(task=task, num_examples=5, lengths=(1000,), split="eval")
  for i in range(len(src)):
    ex = src.example(i)
    assert ex["inputs"].shape == (1000,) and ex["loss_mask"].sum() == len(ex["answer"])
    prompt, answer = qa.prompt_and_answer(ex["inputs"], ex["targets"], ex["loss_mask"])
    text = qa.TOKENIZER.decode(prompt)
    assert qa.TOKENIZER.decode(answer) == ex["answer"]
    # An oracle that sees only the prompt: the fact sentences, in order, then the question.
    facts = [s.strip() for s in re.findall(r"[A-Z][a-z]+ [a-z ]+ the [a-z]+\.", text)
             if MOVE.match(s) or PICK.match(s) or DROP.match(s)]
    assert facts == ex["facts"]
    question = re.search(r"Question: (.*\?) Answer: $", text).group(1)
    assert replay(facts, question) + "." == ex["answer"]
    starts = ex["fact_starts"]
    assert starts == sorted(starts)
    for s, f in zip(starts, ex["facts"]):
      assert text[s:s + len(f)] == f


def test_deterministic_and_too_short_is_an_error():
  a = babilong.babilong_source(task="qa2", num_examples=4, lengths=(600,), seed=1)
  b = babilong.babilong_source(task="qa2", num_examples=4, lengths=(600,), seed=1)
  np.testing.assert_array_equal(a.__getitems__([0, 3])["inputs"], b.__getitems__([0, 3])["inputs"])
  c = common.babilong_data(task="qa3", seq_len=128)
  with pytest.raises(ValueError, match="too short"):
    pipeline.create_train_iterator(c, batch_size=2, seed=0)
  c = common.babilong_data(task="qa1", seq_len=512, eval_lengths=(512, 1024), num_eval_examples=2)
  assert sorted(pipeline.create_eval_batches(c, batch_size=2)) == ["babilong_qa1_T1024", "babilong_qa1_T512"]


def test_real_text_filler(tmp_path):
  path = tmp_path / "c.txt"
  path.write_text("Call me Ishmael. Some years ago I went to sea.\n" * 30)
  ex = babilong.babilong_example(np.random.default_rng(0), seq_len=700, task="qa1",
                                 corpus=qa.load_corpus(str(path)), haystack="text")
  text = qa.TOKENIZER.decode(ex["inputs"])
  assert "Ishmael" in text and all(f in text for f in ex["facts"])
