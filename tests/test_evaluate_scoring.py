"""evaluate's scoring against models whose answers are known: an induction-head oracle (copies the token that
followed the earliest longest match of the current context) solves MQAR and the text passkey exactly, so it must
score 1.0 through the same prefill + greedy-decode path a trained model takes; a constant model must score 0."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from experiments import evaluate

pytestmark = pytest.mark.timeout(120)

MATCH = 8  # context tokens compared


class InductionOracle(nn.Module):
  """Predicts, at each position, the token that followed the earliest earlier position with the longest matching
  context (up to MATCH tokens, at least 1); token 0 when the current token never occurred before. Decoding
  interface of memarch models: init_cache / prefill / decode_step, cache = all tokens seen so far."""

  vocab_size: int
  constant: bool = False  # always predict token 0 (a model that is always wrong)

  def init_cache(self, batch, max_len):
    return {"tokens": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.zeros((), jnp.int32)}

  def _logits(self, tokens, length, positions):
    """Logits [b, len(positions), V] for the given query positions over tokens[:, :length]."""
    t_max = tokens.shape[1]
    j = jnp.arange(t_max)
    run = jnp.ones((tokens.shape[0], len(positions), t_max), bool)
    score = jnp.zeros(run.shape, jnp.int32)
    for k in range(MATCH):  # run length of matches ending at (position, j), up to MATCH
      a = jnp.take(tokens, jnp.clip(positions - k, 0), axis=1)[:, :, None]
      b = jnp.take(tokens, jnp.clip(j - k, 0), axis=1)[:, None, :]
      ok = (positions[:, None] - k >= 0) & (j[None, :] - k >= 0)
      run = run & (a == b) & ok[None]
      score = score + run
    valid = (j[None, :] < positions[:, None]) & (j[None, :] + 1 < length)
    score = jnp.where(valid[None] & (score > 0), score * t_max * 2 + (t_max - j), -1)  # longest, then earliest
    best = jnp.argmax(score, axis=-1)
    nxt = jnp.where(jnp.max(score, axis=-1) > 0, jnp.take_along_axis(tokens, best + 1, axis=1), 0)
    if self.constant:
      nxt = jnp.zeros_like(nxt)
    return nn.one_hot(nxt, self.vocab_size) * 10.0

  def prefill(self, tokens, cache):
    b, t = tokens.shape
    buf = cache["tokens"].at[:, :t].set(tokens)  # prompts start an empty cache in evaluate
    return self._logits(buf, t, jnp.arange(t)), {"tokens": buf, "index": cache["index"] + t}

  def decode_step(self, token, cache):
    i = cache["index"]
    buf = cache["tokens"].at[:, i].set(token)
    return self._logits(buf, i + 1, i[None])[:, 0], {"tokens": buf, "index": i + 1}

  def __call__(self, tokens):
    return self.prefill(tokens, self.init_cache(*tokens.shape))[0]


@pytest.mark.parametrize("constant", [False, True])
def test_mqar_and_text_passkey_scoring(constant):
  mqar = common.mqar_data(vocab_size=512, settings=((64, 8),), eval_settings=((64, 8),))
  text = common.passkey_text_data(seq_len=256)
  rows = []
  for data, tasks, length, vocab in ((mqar, ["mqar"], 64, 512), (text, ["passkey"], 256, 259)):
    cfg = common.ml_collections.ConfigDict({"data": data})
    cells = evaluate.plan(cfg, tasks, [length], [0.0, 0.5, 1.0], "", num_examples=3, seed=0)
    oracle = InductionOracle(vocab_size=vocab, constant=constant)
    rows += evaluate.run_cells(oracle, {}, cells, train_length=256, batch_size=2, progress=False)
  ok = [r for r in rows if r["status"] == "ok"]
  assert {r["task"] for r in ok} == {"mqar", "passkey_text"} and len(ok) == 5, rows
  for r in ok:
    assert r["accuracy"] == (0.0 if constant else 1.0), r
