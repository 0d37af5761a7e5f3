"""Tests of memarch.data.passkey (passkey retrieval) and its hook in the data pipeline and the training loop."""

from __future__ import annotations

import numpy as np
import pytest

from configs import common, transformer
from memarch.data import passkey as P
from memarch.data import pipeline

pytestmark = pytest.mark.timeout(120)


def _check_rows(batch, *, seq_len, key_digits, vocab_size, filler, sentence=None):
  """Every structural property of a passkey row; returns the key depths (start / seq_len)."""
  inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]
  assert inputs.shape == targets.shape == mask.shape == (len(inputs), seq_len)
  assert inputs.dtype == np.int32 and targets.dtype == np.int32 and mask.dtype == np.float32
  n = key_digits
  depths = []
  for x, y, m in zip(inputs, targets, mask):
    np.testing.assert_array_equal(x[1:], y[:-1])  # next-token targets
    starts = np.flatnonzero(x == P.KEY_ID)
    assert len(starts) == 1  # one hidden key
    s = int(starts[0])
    key = x[s + 1:s + 1 + n]
    assert np.all((key >= P.FIRST_DIGIT) & (key < P.FIRST_FILLER))
    assert x[seq_len - n] == P.QUERY_ID and np.count_nonzero(x == P.QUERY_ID) == 1
    # The loss covers exactly the n answer positions, whose targets are the hidden key.
    np.testing.assert_array_equal(np.flatnonzero(m), np.arange(seq_len - n, seq_len))
    np.testing.assert_array_equal(y[m == 1], key)
    hay = np.ones(seq_len, bool)
    hay[s:s + 1 + n] = False
    hay[seq_len - n:] = False
    assert np.all((x[hay] >= P.FIRST_FILLER) & (x[hay] < vocab_size))
    if filler == "repeat":  # the haystack is the fixed sentence tiled with some phase (the key overwrites it)
      tilings = [np.resize(np.roll(sentence, -ph), seq_len) for ph in range(len(sentence))]
      assert any(np.array_equal(x[hay], t[hay]) for t in tilings)
    depths.append(s / seq_len)
  return np.asarray(depths)


@pytest.mark.parametrize("seq_len,key_digits,filler", [(64, 5, "repeat"), (37, 3, "random"), (12, 5, "random"),
                                                       (256, 1, "repeat")])
def test_structure(seq_len, key_digits, filler):
  src = P.PasskeySource(num_examples=300, seq_len=seq_len, vocab_size=40, key_digits=key_digits, filler=filler,
                        seed=3)
  batch = src.__getitems__(range(300))
  depths = _check_rows(batch, seq_len=seq_len, key_digits=key_digits, vocab_size=40, filler=filler,
                       sentence=src.sentence)
  if seq_len >= 64:  # the key's depth covers the haystack
    assert depths.min() < 0.1 and depths.max() > 0.7
  # Keys vary: the answer cannot be memorized.
  keys = {tuple(r) for r in batch["targets"][:, -key_digits:]}
  assert len(keys) > 100 or key_digits == 1


def test_deterministic_and_independent_of_batching():
  kw = dict(num_examples=50, seq_len=48, vocab_size=32, key_digits=4, seed=11)
  a, b = P.PasskeySource(**kw), P.PasskeySource(**kw)
  one = a.__getitems__([7, 3, 9])
  two = b.__getitems__([3])
  np.testing.assert_array_equal(one["inputs"][1], two["inputs"][0])
  np.testing.assert_array_equal(a[9]["targets"], one["targets"][2])
  other_seed = P.PasskeySource(**{**kw, "seed": 12})
  assert not np.array_equal(other_seed[3]["inputs"], a[3]["inputs"])
  evals = P.PasskeySource(**kw, split="eval")
  assert not np.array_equal(evals[3]["inputs"], a[3]["inputs"])  # held-out stream
  ex = P.passkey_example(np.random.default_rng(0), seq_len=48, vocab_size=32, key_digits=4, filler="random",
                         depth=0.0)
  assert ex["inputs"][0] == P.KEY_ID and ex["depth"] == 0.0
  ex = P.passkey_example(np.random.default_rng(0), seq_len=48, vocab_size=32, key_digits=4, filler="random",
                         depth=1.0)
  assert ex["inputs"][48 - 4 - 5] == P.KEY_ID  # the key block ends right before the query


def test_errors():
  with pytest.raises(ValueError, match="too short"):
    P.PasskeySource(num_examples=1, seq_len=9, vocab_size=32, key_digits=4)
  with pytest.raises(ValueError, match="vocab_size"):
    P.PasskeySource(num_examples=1, seq_len=64, vocab_size=14)
  with pytest.raises(ValueError, match="filler"):
    P.PasskeySource(num_examples=1, seq_len=64, vocab_size=32, filler="lorem")
  with pytest.raises(ValueError, match="duplicates"):
    P.passkey_sources(seed=0, vocab_size=32, seq_len=32, eval_lengths=(32, 32), key_digits=2, filler="repeat",
                      filler_period=4, num_train_examples=4, num_eval_examples=4)
  with pytest.raises(IndexError):
    P.PasskeySource(num_examples=2, seq_len=32, vocab_size=32)[2]


def _config(seq_len=32):
  c = transformer.get_config("size=tiny")
  c.data = common.passkey_data(seq_len=seq_len, eval_multiples=(1, 4), key_digits=3, num_eval_examples=10)
  c.model.max_len = seq_len
  return c


def test_pipeline_hook():
  c = _config()
  info = pipeline.data_info(c.data)
  assert info.kind == "passkey" and info.vocab_size == 64 and info.pad_id == 0
  it = pipeline.create_train_iterator(c.data, batch_size=4, seed=0)
  batch = next(it)
  assert set(batch) == set(pipeline.BATCH_KEYS) and batch["inputs"].shape == (4, 32)
  _check_rows(batch, seq_len=32, key_digits=3, vocab_size=64, filler="random")  # no sentence check
  evals = pipeline.create_eval_batches(c.data, batch_size=4)
  assert sorted(evals) == ["passkey_T128", "passkey_T32"]
  for name, t in (("passkey_T32", 32), ("passkey_T128", 128)):
    batches = evals[name]
    assert len(batches) == 3 and all(b["inputs"].shape == (4, t) for b in batches)  # 10 examples, padded to 12
    assert batches[-1]["loss_mask"][2:].sum() == 0 and batches[0]["loss_mask"].sum() == 4 * 3
  again = pipeline.create_eval_batches(c.data, batch_size=4)
  np.testing.assert_array_equal(again["passkey_T128"][1]["inputs"], evals["passkey_T128"][1]["inputs"])


def test_train_loop_evaluates_each_length(tmp_path):
  """A few steps of the loop on passkey: one accuracy per eval length (batches of different lengths)."""
  from memarch.train import train_and_evaluate  # noqa: PLC0415
  c = _config(seq_len=24)
  c.model.embed_dim, c.model.mlp_dim, c.model.num_layers = 32, 64, 1
  c.train.batch_size, c.eval.batch_size = 8, 8
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 2, 1, 0, 0
  c.train.progress, c.train.tensorboard = "none", False
  result = train_and_evaluate(c, str(tmp_path / "run"))
  for t in (24, 96):
    acc = result.eval_metrics[f"passkey_T{t}/accuracy"]
    assert 0.0 <= acc <= 1.0
