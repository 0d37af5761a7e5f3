"""MLP Memory / Memory Decoder: the loss against a dense reference (values and gradients), the model, and the
whole pipeline end to end on generated text (base LM -> datastore -> targets -> memories -> eval)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import mlp_memory as mm_config
from memarch.knn import knn_lm, pipeline
from memarch.knn.datastore import Datastore
from memarch.models.mlp_memory import MLPMemory, memory_loss

pytestmark = pytest.mark.timeout(300)


def test_memory_loss_matches_dense_reference_with_gradients():
  rng = np.random.default_rng(0)
  q, k, vocab = 5, 6, 9
  dist = rng.uniform(0, 5, (q, k)).astype(np.float32)
  values = rng.integers(0, vocab, (q, k)).astype(np.int32)
  values[0, :3] = 4  # merged duplicates
  nxt = rng.integers(0, vocab, q).astype(np.int32)
  logits = jnp.asarray(rng.normal(size=(q, vocab)), jnp.float32)
  ids, probs = knn_lm.sparse_knn_targets(dist, values, 1.5)
  lp_knn = np.asarray(knn_lm.knn_log_probs(dist, values, vocab, 1.5), np.float64)

  def reference(logits):  # dense: sum over the vocabulary of p (log p - log q), p = 0 terms dropped
    logq = jax.nn.log_softmax(logits)
    p = jnp.exp(jnp.asarray(lp_knn, jnp.float32))
    kl = jnp.sum(jnp.where(p > 0, p * (jnp.asarray(np.where(np.isinf(lp_knn), 0, lp_knn), jnp.float32) - logq), 0.0), -1)
    ce = -logq[jnp.arange(q), nxt]
    return 0.3 * kl.mean() + 0.7 * ce.mean()

  got = memory_loss(logits, ids, probs, jnp.asarray(nxt), alpha=0.3)
  np.testing.assert_allclose(float(got["loss"]), float(reference(logits)), rtol=1e-5)
  assert float(got["kl"]) > 0
  g1 = jax.grad(lambda l: memory_loss(l, ids, probs, jnp.asarray(nxt), alpha=0.3)["loss"])(logits)
  g2 = jax.grad(reference)(logits)
  np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-5, atol=1e-7)
  # the KL vanishes when the memory reproduces p_kNN (up to the floor on unsupported tokens)
  exact = jnp.asarray(np.where(np.isinf(lp_knn), -60.0, lp_knn), jnp.float32)
  assert float(memory_loss(exact, ids, probs, jnp.asarray(nxt), alpha=1.0)["kl"]) < 1e-4
  with pytest.raises(ValueError, match="alpha"):
    memory_loss(logits, ids, probs, jnp.asarray(nxt), alpha=1.5)


def test_mlp_memory_shapes_and_key_check():
  c = ml_collections.FrozenConfigDict(dict(vocab_size=11, key_dim=8, width=16, depth=2, mlp_ratio=2,
                                           compute_dtype="float32"))
  model = MLPMemory(c)
  params = model.init(jax.random.key(0), jnp.zeros((3, 8)))
  assert model.apply(params, jnp.ones((2, 5, 8))).shape == (2, 5, 11)
  with pytest.raises(ValueError, match="key_dim"):
    model.apply(params, jnp.ones((2, 7)))


def _generated_text(path: str, n_bytes: int = 6000) -> None:
  """A few kilobytes of text with repeated phrases (a retriever has something to find)."""
  rng = np.random.default_rng(0)
  words = ["the", "king", "queen", "said", "to", "his", "her", "lord", "come", "go", "now", "and", "my", "sweet"]
  out = []
  while sum(map(len, out)) < n_bytes:
    out.append(" ".join(rng.choice(words, size=rng.integers(4, 9))) + ".\n")
  with open(path, "w") as f:
    f.write("".join(out))


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
  from memarch.train import train_and_evaluate  # noqa: PLC0415

  root = tmp_path_factory.mktemp("mm")
  corpus = str(root / "corpus.txt")
  _generated_text(corpus)
  base = mm_config.get_config(f"stage=base,files={corpus}")
  base.model.embed_dim, base.model.num_layers, base.model.mlp_dim = 32, 1, 64
  base.model.num_heads, base.model.num_kv_heads = 2, 1
  base.model.max_len = base.data.seq_len = 32
  base.train.steps, base.train.batch_size, base.train.eval_every, base.train.checkpoint_every = 8, 8, 0, 0
  base.train.progress, base.train.tensorboard, base.train.handle_signals = "none", False, False
  base.data.read_threads, base.data.prefetch_batches = 1, 1
  base.eval.batch_size, base.eval.max_batches = 8, 1
  train_and_evaluate(base, str(root / "base"))

  def config(stage, memory="mlp"):
    c = mm_config.get_config(f"stage={stage},memory={memory},base_workdir={root / 'base'}")
    c.progress = False
    c.datastore.shard_rows = 50  # several shards, the last one partial
    c.knn.k, c.knn.train_tokens, c.knn.val_tokens, c.knn.block_size, c.knn.query_batch = 8, 1024, 320, 1000, 256
    c.knn.temperatures = (1.0, 4.0)
    c.mlp.width, c.mlp.depth = 32, 2
    c.decoder.embed_dim, c.decoder.num_layers, c.decoder.mlp_dim, c.decoder.num_heads = 32, 1, 64, 2
    c.decoder.num_kv_heads = 1
    c.memory_train.steps, c.memory_train.batch_size, c.memory_train.log_every = 80, 256, 40
    c.memory_train.checkpoint_every, c.memory_train.eval_batch_size = 50, 512
    c.optim.lr, c.optim.warmup_steps = 3e-3, 10
    return c

  work = str(root / "mm")
  out = {"root": root, "work": work, "config": config}
  out["datastore"] = pipeline.run_stage(config("datastore"), work)
  out["targets"] = pipeline.run_stage(config("targets"), work)
  out["mlp"] = pipeline.run_stage(config("train", "mlp"), work)
  dec = config("train", "decoder")
  dec.memory_train.steps = 4
  out["decoder"] = pipeline.run_stage(dec, work)
  out["eval"] = pipeline.run_stage(config("eval"), work)
  return out


def test_pipeline_end_to_end(pipeline_run):
  r = pipeline_run
  work = r["work"]
  ds = Datastore.open(os.path.join(work, "datastore"))
  corpus_tokens = ds.manifest["corpus_tokens"]
  assert ds.manifest["size"] == (corpus_tokens - 1) // 32 * 32 and ds.keys.shape == (ds.manifest["size"], 32)
  assert len(ds.manifest["shards"]) == -(-(corpus_tokens - 1) // 32 // 50)
  # values are the next tokens of the training stream
  from memarch.knn.datastore import corpus_streams  # noqa: PLC0415

  train, _ = corpus_streams(ds.manifest["corpus"], 0.1)
  np.testing.assert_array_equal(ds.values, train[1:ds.manifest["size"] + 1])
  hk, hv = ds.head(2000)  # spans the first shards (50 rows x 32 = 1600 entries each)
  np.testing.assert_array_equal(hk, ds.keys[:2000])
  np.testing.assert_array_equal(hv, ds.values[:2000])
  tr = np.load(os.path.join(work, "targets", "train.npz"))
  assert tr["dist"].shape == (1024, 8)
  assert not (tr["idx"] == np.arange(1024)[:, None]).any()  # leave-one-out
  np.testing.assert_array_equal(tr["nbr_values"], ds.values[tr["idx"]])
  # the MLP memory learned to imitate p_kNN: its validation KL fell
  s = r["mlp"]
  assert s["val_final"]["kl"] < 0.8 * s["val_initial"]["kl"], s
  dec = r["decoder"]
  assert np.isfinite(dec["val_final"]["loss"])
  res = r["eval"]
  assert res["val_tokens"] == 320
  for name in ("knn_lm", "memory_mlp", "memory_decoder"):
    assert res[name]["perplexity"] <= res["base"]["perplexity"] * (1 + 1e-5)  # lambda = 0 is in the grid
    assert res[name]["lambda"] in res["lambdas"]
  with open(os.path.join(work, "eval", "results.json")) as f:
    assert json.load(f)["base"]["perplexity"] == res["base"]["perplexity"]


def test_restart_and_resume(pipeline_run):
  r = pipeline_run
  work, config = r["work"], r["config"]
  # a damaged shard is rebuilt, the others kept
  ds_dir = os.path.join(work, "datastore")
  before = np.load(os.path.join(ds_dir, "keys_00001.npy"))
  with open(os.path.join(ds_dir, "keys_00001.npy"), "r+b") as f:
    f.truncate(100)
  with pytest.raises(ValueError, match="shard 1"):
    Datastore.open(ds_dir)
  mtime0 = os.path.getmtime(os.path.join(ds_dir, "keys_00000.npy"))
  pipeline.run_stage(config("datastore"), work)
  np.testing.assert_array_equal(np.load(os.path.join(ds_dir, "keys_00001.npy")), before)
  assert os.path.getmtime(os.path.join(ds_dir, "keys_00000.npy")) == mtime0
  # different settings on an existing datastore are refused
  c = config("datastore")
  c.datastore.key_dtype = "float16"
  with pytest.raises(ValueError, match="other settings"):
    pipeline.run_stage(c, work)
  # a finished training run resumes at its last step (nothing to do)
  s = pipeline.run_stage(config("train", "mlp"), work)
  assert s["steps"] == 80


def test_missing_previous_stage_is_a_clear_error(tmp_path, pipeline_run):
  config = pipeline_run["config"]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pipeline.run_stage(config("targets"), str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="stage=datastore"):
    pipeline.run_stage(config("targets"), str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="stage=targets"):
    pipeline.run_stage(config("train"), str(tmp_path / "empty"))
  c = config("datastore")
  c.base_workdir = str(tmp_path / "no_base")
  with pytest.raises(FileNotFoundError, match="train the base LM"):
    pipeline.run_stage(c, str(tmp_path / "x"))
