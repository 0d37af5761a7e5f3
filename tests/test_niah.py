"""Needle in a haystack and the text passkey: determinism, exact lengths, the needle at its depth, an oracle."""

import re

import numpy as np
import pytest

from configs import common
from memarch.data import niah, pipeline, qa

pytestmark = pytest.mark.timeout(60)

TEXT = ("It was a bright cold day in April. The clocks were striking thirteen.\n"
        "Winston slipped quickly through the glass doors. A gritty dust entered along with him. ") * 20


@pytest.fixture
def corpus_file(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text(TEXT)
  return str(path)


def _decode(ids):
  return qa.TOKENIZER.decode(ids)


def _oracle(text):
  """Reads the needle's value back from the prompt (regex over the haystack), knowing only the key asked for."""
  m = re.search(r"Question: What is the special magic (number|uuid) for ([a-z-]+)\? Answer: $", text)
  assert m, text[-120:]
  found = re.findall(rf"special magic {m.group(1)}s for {m.group(2)} is: ([0-9a-f-]+)\. ", text)
  assert len(found) == 1
  return found[0] + "."


@pytest.mark.parametrize("flavour", niah.FLAVOURS)
@pytest.mark.parametrize("seq_len", [200, 777])
def test_niah_exact_length_oracle_and_depth(flavour, seq_len, corpus_file):
  src = niah.niah_source(flavour=flavour, num_examples=6, lengths=(seq_len,), split="eval", depth=None,
                         haystack_file=corpus_file)
  for i in range(len(src)):
    ex = src.example(i)
    assert ex["inputs"].shape == ex["targets"].shape == ex["loss_mask"].shape == (seq_len,)
    np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])  # one stream shifted by one
    prompt, answer = qa.prompt_and_answer(ex["inputs"], ex["targets"], ex["loss_mask"])
    assert _decode(answer) == ex["answer"] and ex["loss_mask"].sum() == len(answer)
    assert _oracle(_decode(prompt)) == ex["answer"]
    if flavour == "text_uuid":
      assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}\.", ex["answer"])
    else:
      assert re.fullmatch(r"[1-9][0-9]{6}\.", ex["answer"])
    text = _decode(prompt)
    hay = text[:text.index("\nQuestion:")]
    needle = text[ex["needle_start"]:ex["needle_start"] + ex["needle_len"]]
    assert needle.startswith("One of the special magic") and ex["answer"][:-1] in needle
    filler = hay.replace(needle, "")
    if flavour != "noise":  # the haystack is a slice of the corpus (wrapping around)
      assert filler in TEXT * 3


def test_needle_at_requested_depth():
  sentence = max(len(s) for s in qa.NOISE.split(". ")) + 2
  for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
    ex = niah.niah_example(np.random.default_rng(3), seq_len=2000, flavour="noise", depth=depth)
    prompt, _ = qa.prompt_and_answer(ex["inputs"], ex["targets"], ex["loss_mask"])
    text = _decode(prompt)
    hay_len = text.index("\nQuestion:") - ex["needle_len"]
    assert text[ex["needle_start"]:].startswith("One of the special magic numbers")
    assert abs(ex["needle_start"] / hay_len - depth) <= sentence / hay_len
    assert ex["depth"] == pytest.approx(ex["needle_start"] / hay_len)


def test_passkey_text_example():
  for depth in (0.0, 0.5, 1.0):
    ex = niah.passkey_text_example(np.random.default_rng(1), seq_len=512, key_digits=5, depth=depth)
    prompt, answer = qa.prompt_and_answer(ex["inputs"], ex["targets"], ex["loss_mask"])
    text = _decode(prompt)
    assert len(ex["inputs"]) == 512 and text.endswith("What is the pass key? The pass key is ")
    key = re.search(r"The pass key is (\d{5})\. Remember it\.", text).group(1)
    assert _decode(answer) == key + "."
    assert "The grass is green. The sky is blue." in text
    hay = text.index("What is the pass key?") - ex["needle_len"]
    assert abs(ex["needle_start"] / hay - depth) < 0.1


def test_sources_are_deterministic_and_independent_of_batching():
  a = niah.niah_source(flavour="noise", num_examples=8, lengths=(256, 300), seed=5)
  b = niah.niah_source(flavour="noise", num_examples=8, lengths=(256, 300), seed=5)
  batch = a.__getitems__([3, 1, 2])
  np.testing.assert_array_equal(batch["inputs"][1], b[1]["inputs"])
  assert batch["inputs"].shape == (3, 300)  # the mixture is padded to the longest length
  assert (b[0]["loss_mask"][256:] == 0).all() and (b[0]["inputs"][256:] == qa.PAD_ID).all()
  c = niah.niah_source(flavour="noise", num_examples=8, lengths=(256, 300), seed=6)
  assert not np.array_equal(c[1]["inputs"], b[1]["inputs"])
  e = niah.niah_source(flavour="noise", num_examples=8, lengths=(256, 300), seed=5, split="eval")
  assert not np.array_equal(e[1]["inputs"], b[1]["inputs"])


def test_pipeline_and_config_errors(corpus_file):
  c = common.niah_data(flavour="text", seq_len=256, eval_lengths=(256, 512), eval_depths=(0.0, 1.0),
                       haystack_file=corpus_file, num_eval_examples=3)
  assert pipeline.data_info(c).vocab_size == qa.TOKENIZER.vocab_size
  batches = pipeline.create_eval_batches(c, batch_size=2)
  assert sorted(batches) == ["niah_text_T256_d0", "niah_text_T256_d100", "niah_text_T512_d0", "niah_text_T512_d100"]
  assert batches["niah_text_T512_d0"][0]["inputs"].shape == (2, 512) and len(batches["niah_text_T512_d0"]) == 2
  it = pipeline.create_train_iterator(c, batch_size=2, seed=0)
  assert next(it)["inputs"].shape == (2, 256)
  c.qa.haystack_file = ""
  with pytest.raises(ValueError, match="haystack_file"):
    pipeline.create_eval_batches(c, batch_size=2)
  short = common.passkey_text_data(seq_len=32)
  with pytest.raises(ValueError, match="too short"):
    pipeline.create_train_iterator(short, batch_size=2, seed=0)
