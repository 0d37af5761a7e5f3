"""Tests of memarch.data: MQAR, its TFDS builder, the byte tokenizer, packed text and the grain pipelines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from hypothesis import given, settings, strategies as st

from configs.common import mqar_data
from memarch import data as D
from memarch.data import pipeline, synthetic, text, tfds_mqar
from memarch.data.tokenizer import ByteTokenizer

# ----------------------------------------------------------------------------------------------------
# MQAR


def _check_mqar_rows(batch: dict[str, np.ndarray], vocab_size: int, seq_len: int, k: int) -> None:
  """Every structural property of MQAR rows of true length seq_len (maybe padded beyond)."""
  inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]
  assert inputs.dtype == np.int32 and targets.dtype == np.int32 and mask.dtype == np.float32
  half = vocab_size // 2
  for row in range(inputs.shape[0]):
    x, y, m = inputs[row], targets[row], mask[row]
    keys, values = x[0:2 * k:2], x[1:2 * k:2]
    assert np.all((keys >= 1) & (keys < half)), keys
    assert np.all((values >= half) & (values < vocab_size)), values
    assert len(set(keys.tolist())) == k and len(set(values.tolist())) == k
    stored = dict(zip(keys.tolist(), values.tolist()))
    pos = np.flatnonzero(m)
    assert len(pos) == k and set(np.unique(m).tolist()) <= {0.0, 1.0}
    assert np.all(pos >= 2 * k) and np.all((pos - 2 * k) % 2 == 0) and np.all(pos < seq_len)
    assert sorted(x[pos].tolist()) == sorted(keys.tolist())  # each key queried exactly once
    for p in pos:  # the answer is the value stored for the queried key
      assert y[p] == stored[int(x[p])]
    filler = np.ones(len(x), bool)
    filler[:2 * k] = False
    filler[pos] = False
    assert np.all(x[filler] == 0) and np.all(y[m == 0] == 0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("vocab_size,seq_len,k,power_a", [
    (8192, 64, 4, 0.01), (64, 32, 8, 0.01), (20, 17, 4, 1.0), (12, 16, 4, 0.5), (8192, 256, 16, 0.01)])
def test_mqar_structure(vocab_size, seq_len, k, power_a):
  batch = synthetic.mqar_batch(np.random.default_rng(3), num_examples=64, vocab_size=vocab_size,
                               seq_len=seq_len, num_kv_pairs=k, power_a=power_a)
  assert batch["inputs"].shape == (64, seq_len)
  _check_mqar_rows(batch, vocab_size, seq_len, k)


@pytest.mark.timeout(60)
@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 12), extra_len=st.integers(0, 40), extra_vocab=st.integers(0, 300),
       power_a=st.sampled_from([0.01, 0.3, 1.0]), seed=st.integers(0, 2**32 - 1))
def test_mqar_structure_property(k, extra_len, extra_vocab, power_a, seed):
  # Any valid setting, down to the smallest length (4k) and vocabulary (2k + 2).
  vocab_size, seq_len = 2 * k + 2 + extra_vocab, 4 * k + extra_len
  batch = synthetic.mqar_batch(np.random.default_rng(seed), num_examples=8, vocab_size=vocab_size,
                               seq_len=seq_len, num_kv_pairs=k, power_a=power_a)
  _check_mqar_rows(batch, vocab_size, seq_len, k)


@pytest.mark.timeout(30)
def test_mqar_deterministic_from_seed():
  kw = dict(num_examples=50, vocab_size=512, seq_len=64, num_kv_pairs=8)
  a = synthetic.mqar_batch(np.random.default_rng(7), **kw)
  b = synthetic.mqar_batch(np.random.default_rng(7), **kw)
  c = synthetic.mqar_batch(np.random.default_rng(8), **kw)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  assert not np.array_equal(a["inputs"], c["inputs"])
  one = synthetic.mqar_example(np.random.default_rng(7), vocab_size=512, seq_len=64, num_kv_pairs=8)
  first = synthetic.mqar_batch(np.random.default_rng(7), **{**kw, "num_examples": 1})
  for name in one:
    assert one[name].shape == (64,)
    np.testing.assert_array_equal(one[name], first[name][0])
  m1 = synthetic.mqar_mixture(seed=1, split="train", vocab_size=512, settings=[(64, 4)],
                              num_examples_per_setting=10, seq_len=64)
  m2 = synthetic.mqar_mixture(seed=1, split="train", vocab_size=512, settings=[(64, 4)],
                              num_examples_per_setting=10, seq_len=64)
  ev = synthetic.mqar_mixture(seed=1, split="eval", vocab_size=512, settings=[(64, 4)],
                              num_examples_per_setting=10, seq_len=64)
  np.testing.assert_array_equal(m1["inputs"], m2["inputs"])
  assert not np.array_equal(m1["inputs"], ev["inputs"])  # train and eval streams are independent


@pytest.mark.timeout(30)
def test_mqar_query_gaps_follow_power_law():
  # Zoology's p(gap) ~ a * (gap + 1)^(a - 1): with a = 0.01 the first slot after the context takes ~25%.
  k, seq_len, n = 1, 58, 40_000
  batch = synthetic.mqar_batch(np.random.default_rng(0), num_examples=n, vocab_size=64, seq_len=seq_len,
                               num_kv_pairs=k, power_a=0.01)
  gaps = (np.argmax(batch["loss_mask"], axis=1) - 2 * k) // 2
  space = (seq_len - 2 * k) // 2
  p = (np.arange(1, space + 1) ** (0.01 - 1.0))
  p /= p.sum()
  freq = np.bincount(gaps, minlength=space) / n
  np.testing.assert_allclose(freq[:4], p[:4], atol=0.01)
  uniform = synthetic.mqar_batch(np.random.default_rng(0), num_examples=n, vocab_size=64, seq_len=seq_len,
                                 num_kv_pairs=k, power_a=1.0)
  freq_u = np.bincount((np.argmax(uniform["loss_mask"], axis=1) - 2 * k) // 2, minlength=space) / n
  np.testing.assert_allclose(freq_u, 1.0 / space, atol=0.01)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kwargs,match", [
    (dict(vocab_size=8192, seq_len=15, num_kv_pairs=4), "seq_len >= 4 \\* num_kv_pairs"),
    (dict(vocab_size=16, seq_len=64, num_kv_pairs=8), "vocab_size=16 is too small"),
    (dict(vocab_size=8192, seq_len=64, num_kv_pairs=0), "num_kv_pairs must be >= 1"),
    (dict(vocab_size=8192, seq_len=64, num_kv_pairs=4, power_a=0.0), "power_a must be > 0"),
])
def test_mqar_bad_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    synthetic.mqar_example(np.random.default_rng(0), **kwargs)


@pytest.mark.timeout(30)
def test_mqar_bad_mixture_settings():
  with pytest.raises(ValueError, match="longer than data.seq_len"):
    synthetic.mqar_mixture(seed=0, split="train", vocab_size=64, settings=[(128, 4)],
                           num_examples_per_setting=2, seq_len=64)
  with pytest.raises(ValueError, match="empty"):
    synthetic.mqar_mixture(seed=0, split="train", vocab_size=64, settings=[], num_examples_per_setting=2,
                           seq_len=64)
  c = mqar_data(vocab_size=64, settings=((64, 4),), eval_settings=((64, 32),))
  with pytest.raises(ValueError, match="too short"):
    D.create_eval_batches(c, batch_size=4)


@pytest.mark.timeout(30)
def test_mqar_mixture_padding():
  settings = [(64, 8), (32, 4), (17, 2)]
  mix = synthetic.mqar_mixture(seed=0, split="train", vocab_size=128, settings=settings,
                               num_examples_per_setting=20, seq_len=64)
  assert mix["inputs"].shape == (60, 64)
  for i, (t, k) in enumerate(settings):
    rows = {name: value[20 * i:20 * (i + 1)] for name, value in mix.items()}
    _check_mqar_rows(rows, 128, t, k)
    assert np.all(rows["inputs"][:, t:] == 0) and np.all(rows["loss_mask"][:, t:] == 0)
    assert np.all(rows["loss_mask"].sum(axis=1) == k)
  # A setting's examples do not depend on the other settings of the mixture.
  alone = synthetic.mqar_mixture(seed=0, split="train", vocab_size=128, settings=[(32, 4)],
                                 num_examples_per_setting=20, seq_len=64)
  np.testing.assert_array_equal(alone["inputs"], mix["inputs"][20:40])


# ----------------------------------------------------------------------------------------------------
# TFDS builder


def _small_mqar_config(tmp_path, **overrides):
  c = mqar_data(vocab_size=256, settings=((64, 4), (32, 2)), eval_settings=((64, 4), (64, 8)),
                num_train_examples=600, num_eval_examples=70)
  c.tfds_data_dir = str(tmp_path / "tfds")
  for key, value in overrides.items():
    if key.startswith("mqar."):
      c.mqar[key[5:]] = value
    else:
      c[key] = value
  return c


@pytest.mark.timeout(60)
def test_tfds_builder_roundtrip_through_grain(tmp_path):
  import grain

  c = _small_mqar_config(tmp_path)
  cfg = pipeline._mqar_builder_config(c)
  sources = tfds_mqar.mqar_data_sources(cfg, c.tfds_data_dir)
  assert set(sources) == {"train", "mqar_T64_kv4", "mqar_T64_kv8"}
  expected = synthetic.mqar_mixture(seed=0, split="train", vocab_size=256, settings=((64, 4), (32, 2)),
                                    num_examples_per_setting=600, seq_len=64)
  got = list(grain.MapDataset.source(sources["train"]))
  assert len(got) == 1200
  for name in ("inputs", "targets", "loss_mask"):
    stacked = np.stack([ex[name] for ex in got])
    assert stacked.dtype == expected[name].dtype
    np.testing.assert_array_equal(stacked, expected[name])
  ev = synthetic.mqar_eval_sets(seed=0, vocab_size=256, eval_settings=((64, 4), (64, 8)), num_examples=70,
                                seq_len=64)
  np.testing.assert_array_equal(np.stack([sources["mqar_T64_kv8"][i]["targets"] for i in range(70)]),
                                ev["mqar_T64_kv8"]["targets"])

  # Reused when built: the files are not rewritten.
  data_path = epath.Path(tfds_mqar.build_mqar(cfg, c.tfds_data_dir).data_dir)
  record = next(p for p in data_path.iterdir() if "train.array_record" in p.name)
  mtime = os.stat(record).st_mtime_ns
  tfds_mqar.mqar_data_sources(cfg, c.tfds_data_dir)
  assert os.stat(record).st_mtime_ns == mtime
  # Any generation parameter changes the builder config (and so the directory).
  names = {cfg.name}
  for key, value in [("seed", 1), ("mqar.power_a", 0.5), ("mqar.num_train_examples", 601), ("vocab_size", 512),
                     ("mqar.settings", ((64, 4),))]:
    names.add(pipeline._mqar_builder_config(_small_mqar_config(tmp_path, **{key: value})).name)
  assert len(names) == 6


@pytest.mark.timeout(60)
@pytest.mark.parametrize("use_tfds", [False, True])
def test_tfds_and_in_memory_paths_agree(tmp_path, use_tfds):
  c = _small_mqar_config(tmp_path, **{"mqar.use_tfds": use_tfds})
  ref = _small_mqar_config(tmp_path, **{"mqar.use_tfds": not use_tfds})
  a = [next(it) for it in [D.create_train_iterator(c, batch_size=16, seed=5)] for _ in range(3)]
  b = [next(it) for it in [D.create_train_iterator(ref, batch_size=16, seed=5)] for _ in range(3)]
  for x, y in zip(a, b):
    for name in D.BATCH_KEYS:
      np.testing.assert_array_equal(x[name], y[name])
  ea, eb = D.create_eval_batches(c, batch_size=32), D.create_eval_batches(ref, batch_size=32)
  assert ea.keys() == eb.keys() == {"mqar_T64_kv4", "mqar_T64_kv8"}
  for name in ea:
    for x, y in zip(ea[name], eb[name]):
      np.testing.assert_array_equal(x["inputs"], y["inputs"])


# ----------------------------------------------------------------------------------------------------
# Pipelines


@pytest.mark.timeout(60)
@pytest.mark.parametrize("use_tfds", [False, True])
def test_train_iterator_batches_and_state_restore(tmp_path, use_tfds):
  c = _small_mqar_config(tmp_path, **{"mqar.use_tfds": use_tfds})
  it = D.create_train_iterator(c, batch_size=8, seed=0)
  first = next(it)
  assert set(first) == set(D.BATCH_KEYS)
  for name, dtype in [("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                      ("segment_ids", np.int32), ("positions", np.int32)]:
    assert first[name].shape == (8, 64) and first[name].dtype == dtype
  np.testing.assert_array_equal(first["segment_ids"], 1)
  np.testing.assert_array_equal(first["positions"], np.broadcast_to(np.arange(64), (8, 64)))
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = [next(it) for _ in range(4)]
  resumed = D.create_train_iterator(c, batch_size=8, seed=0)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for name in D.BATCH_KEYS:
      np.testing.assert_array_equal(got[name], want[name])
  other = next(D.create_train_iterator(c, batch_size=8, seed=1))
  assert not np.array_equal(other["inputs"], first["inputs"])


_MP_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import memarch.data as D
    from configs.common import mqar_data

    c = mqar_data(vocab_size=256, num_train_examples=400, num_eval_examples=10)
    c.mqar.use_tfds = False
    ref = D.create_train_iterator(c, batch_size=8, seed=0)
    want = [next(ref)["inputs"] for _ in range(6)]
    c.num_workers = 1
    it = D.create_train_iterator(c, batch_size=8, seed=0)
    got = [next(it)["inputs"] for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    again = D.create_train_iterator(c, batch_size=8, seed=0)
    again.set_state(state)
    got += [next(again)["inputs"] for _ in range(3)]
    again.close()
    ok = all(np.array_equal(a, b) for a, b in zip(want, got))
    print("MP_OK" if ok else "MP_MISMATCH", flush=True)
""")


@pytest.mark.timeout(120)
def test_train_iterator_with_worker_processes():
  # grain worker processes (data.num_workers > 0) give the same batches as the main process, and their
  # state restores too. In a subprocess: worker processes and shared memory stay out of this one.
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "PYTEST_"))}
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", _MP_SCRIPT], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=110)
  assert "MP_OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


def _row_keys(batch):
  return [r.tobytes() for r in batch["inputs"]]


@pytest.mark.timeout(60)
def test_train_iterator_epochs_and_host_slices(tmp_path):
  # 1200 examples, 3 hosts of 400 = 25 batches of 16 per epoch and host.
  c = _small_mqar_config(tmp_path, **{"mqar.use_tfds": False})
  all_rows = set(_row_keys(pipeline._mqar_train_source(c).arrays))
  assert len(all_rows) == 1200
  per_host = []
  for host in range(3):
    it = D.create_train_iterator(c, batch_size=16, seed=0, process_index=host, process_count=3)
    epoch0 = [k for _ in range(25) for k in _row_keys(next(it))]
    epoch1 = [k for _ in range(25) for k in _row_keys(next(it))]
    assert len(set(epoch0)) == 400 and set(epoch0) == set(epoch1)  # every example once per epoch
    assert epoch0 != epoch1  # reshuffled every epoch
    per_host.append(set(epoch0))
  assert not (per_host[0] & per_host[1]) and not (per_host[0] & per_host[2]) and not (per_host[1] & per_host[2])
  assert per_host[0] | per_host[1] | per_host[2] == all_rows
  # Uneven splits: equal-length disjoint slices, fewer than process_count examples unused.
  slices = [list(pipeline.host_indices(10, i, 4)) for i in range(4)]
  assert all(len(s) == 2 for s in slices) and len(set(sum(slices, []))) == 8
  with pytest.raises(ValueError, match="process_index"):
    D.create_train_iterator(c, batch_size=16, seed=0, process_index=3, process_count=3)
  with pytest.raises(ValueError, match="fewer than the per-host batch size"):
    D.create_train_iterator(c, batch_size=2000, seed=0)


@pytest.mark.timeout(60)
def test_eval_batches_mqar(tmp_path):
  c = _small_mqar_config(tmp_path, **{"mqar.use_tfds": False})
  ev = D.create_eval_batches(c, batch_size=32)
  assert list(ev) == ["mqar_T64_kv4", "mqar_T64_kv8"]
  for name, k in [("mqar_T64_kv4", 4), ("mqar_T64_kv8", 8)]:
    batches = ev[name]
    assert len(batches) == 3  # ceil(70 / 32)
    for b in batches:
      assert set(b) == set(D.BATCH_KEYS) and all(v.shape == (32, 64) for v in b.values())
    rows = np.concatenate([b["loss_mask"].sum(axis=1) for b in batches])
    assert np.all(rows[:70] == k) and np.all(rows[70:] == 0)
    _check_mqar_rows({n: np.concatenate([b[n] for b in batches])[:70] for n in b}, 256, 64, k)
  again = D.create_eval_batches(c, batch_size=32)
  np.testing.assert_array_equal(again["mqar_T64_kv8"][1]["inputs"], ev["mqar_T64_kv8"][1]["inputs"])
  # Hosts: disjoint, together every example once, and the same number of batches everywhere.
  hosts = [D.create_eval_batches(c, batch_size=8, process_index=i, process_count=3) for i in range(3)]
  assert {len(h["mqar_T64_kv4"]) for h in hosts} == {3}  # ceil(ceil(70 / 3) / 8)
  real = []
  for h in hosts:
    for b in h["mqar_T64_kv4"]:
      real += [r.tobytes() for r, m in zip(b["inputs"], b["loss_mask"]) if m.sum() > 0]
  full = [r.tobytes() for b in ev["mqar_T64_kv4"] for r, m in zip(b["inputs"], b["loss_mask"]) if m.sum() > 0]
  assert len(real) == 70 and sorted(real) == sorted(full)
  capped = D.create_eval_batches(c, batch_size=32, max_batches=2)
  assert [len(v) for v in capped.values()] == [2, 2]
  np.testing.assert_array_equal(capped["mqar_T64_kv4"][1]["inputs"], ev["mqar_T64_kv4"][1]["inputs"])
  # A set smaller than the batch: rows padded only to the devices' multiple, the same examples. 3 hosts: ceil(70 /
  # 3) = 24 rows on each (hosts 1 and 2 have 23 examples and a padding row), not 64.
  for i in range(3):
    trimmed = D.create_eval_batches(c, batch_size=64, process_index=i, process_count=3, row_multiple=2)
    assert len(trimmed["mqar_T64_kv4"]) == 1 and trimmed["mqar_T64_kv4"][0]["inputs"].shape == (24, 64)
    assert int((trimmed["mqar_T64_kv4"][0]["loss_mask"].sum(axis=1) > 0).sum()) == (24 if i == 0 else 23)
  one = D.create_eval_batches(c, batch_size=128, row_multiple=4)["mqar_T64_kv4"][0]
  assert one["inputs"].shape == (72, 64) and one["loss_mask"][70:].sum() == 0
  np.testing.assert_array_equal(one["inputs"][:32], ev["mqar_T64_kv4"][0]["inputs"])


@pytest.mark.timeout(30)
def test_data_info_and_unknown_name():
  c = mqar_data(vocab_size=1024)
  info = D.data_info(c)
  assert (info.vocab_size, info.kind, info.pad_id, info.eos_id, info.tokenizer) == (1024, "mqar", 0, None, None)
  c.name = "text"
  info = D.data_info(c)
  assert info.kind == "text" and info.vocab_size == 259 and info.eos_id == ByteTokenizer.EOS
  assert info.pad_id == ByteTokenizer.PAD and isinstance(info.tokenizer, ByteTokenizer)
  for bad in ("wikitext", "tfds:", "MQAR"):
    c.name = bad
    with pytest.raises(ValueError, match='valid choices: "mqar", "text", "tfds:<name>"'):
      D.data_info(c)
    with pytest.raises(ValueError, match="valid choices"):
      D.create_train_iterator(c, batch_size=2, seed=0)


# ----------------------------------------------------------------------------------------------------
# Tokenizer and text


@pytest.mark.timeout(60)
@settings(max_examples=50, deadline=None)
@given(st.text())
def test_tokenizer_roundtrip(s):
  tok = ByteTokenizer()
  ids = tok.encode(s)
  assert ids.dtype == np.int32 and np.all((ids >= 0) & (ids < 256))
  assert tok.decode(ids) == s
  assert tok.decode(tok.encode(s, add_bos=True, add_eos=True)) == s


@pytest.mark.timeout(30)
def test_tokenizer_specials_and_invalid_utf8():
  tok = ByteTokenizer()
  assert tok.vocab_size == 259 and len({tok.PAD, tok.BOS, tok.EOS}) == 3 and min(tok.PAD, tok.BOS, tok.EOS) >= 256
  ids = np.concatenate([tok.encode("héllo"), [tok.EOS, tok.PAD], tok.encode("!")])
  assert tok.decode(ids) == "héllo!"
  assert tok.decode([0xC3]) == "\ufffd"  # a truncated 2-byte sequence
  with pytest.raises(ValueError, match="outside"):
    tok.decode([300])


DOCS = ["The quick brown fox.", "Jumps over\nthe lazy dog — twice.", "x", "Memory " * 30, "ünïcödé ✓"]


def _write_docs(tmp_path, docs=DOCS):
  folder = tmp_path / "corpus"
  folder.mkdir()
  for i, doc in enumerate(docs):
    (folder / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
  return str(folder / "*.txt")


def _text_config(files, seq_len=16, val_fraction=0.25):
  c = mqar_data()
  c.name = "text"
  c.files = files
  c.seq_len = seq_len
  c.val_fraction = val_fraction
  return c


def _check_packed_rows(batch, seq_len):
  eos = ByteTokenizer.EOS
  for x, seg, pos in zip(batch["inputs"], batch["segment_ids"], batch["positions"]):
    assert seg[0] == 1 and pos[0] == 0
    for i in range(1, seq_len):
      if x[i - 1] == eos:  # a new document starts after an EOS
        assert seg[i] == seg[i - 1] + 1 and pos[i] == 0
      else:  # the EOS itself belongs to the document it ends
        assert seg[i] == seg[i - 1] and pos[i] == pos[i - 1] + 1


@pytest.mark.timeout(30)
def test_text_packing(tmp_path):
  tok = ByteTokenizer()
  pattern = _write_docs(tmp_path)
  stream = text.tokenize_stream(text.read_text_files(pattern), tok)
  expected = np.concatenate([np.append(tok.encode(d), tok.EOS) for d in DOCS])
  np.testing.assert_array_equal(stream, expected)
  train, val = text.local_text_sources(pattern, seq_len=16, val_fraction=0.25, tokenizer=tok)
  # The split is the stream's tail; train and validation tokens are disjoint and cover the stream.
  n_val = int(round(len(stream) * 0.25))
  np.testing.assert_array_equal(np.concatenate([train.stream, val.stream]), stream)
  assert len(val.stream) == n_val and len(train) == (len(stream) - n_val - 1) // 16
  rows = train.__getitems__(range(len(train)))
  assert rows["inputs"].shape == (len(train), 16)
  # Next-token targets, consecutive rows overlap by one token: the stream is recovered.
  np.testing.assert_array_equal(rows["targets"][:, :-1], rows["inputs"][:, 1:])
  np.testing.assert_array_equal(rows["inputs"][1:, 0], rows["targets"][:-1, -1])
  recon = np.concatenate([rows["inputs"].reshape(-1), rows["targets"][-1, -1:]])
  np.testing.assert_array_equal(recon, train.stream[:len(recon)])
  np.testing.assert_array_equal(rows["loss_mask"], 1.0)
  _check_packed_rows(rows, 16)
  # A row that spans a document boundary: known ids and positions.
  row = next(r for r in range(len(train)) if (rows["inputs"][r] == tok.EOS).any())
  x = rows["inputs"][row]
  e = int(np.flatnonzero(x == tok.EOS)[0])
  assert rows["segment_ids"][row][e] == 1 and (e + 1 >= 16 or rows["segment_ids"][row][e + 1] == 2)
  single = train[row]
  np.testing.assert_array_equal(single["positions"], rows["positions"][row])
  assert tok.decode(x) == tok.decode(x[x != tok.EOS])  # EOS is dropped by decode


@pytest.mark.timeout(30)
def test_text_errors(tmp_path):
  tok = ByteTokenizer()
  with pytest.raises(ValueError, match="matches no file"):
    text.read_text_files(str(tmp_path / "nothing" / "*.txt"))
  with pytest.raises(ValueError, match="needs data.files"):
    text.read_text_files("")
  folder = tmp_path / "broken"
  folder.mkdir()
  (folder / "a.txt").write_text("fine")
  os.symlink(folder / "missing.txt", folder / "b.txt")  # matched by the glob, cannot be opened
  with pytest.raises(ValueError, match="cannot read .*b.txt"):
    text.read_text_files(str(folder / "*.txt"))
  small = tmp_path / "small"
  small.mkdir()
  (small / "a.txt").write_text("tiny")
  with pytest.raises(ValueError, match="makes no row"):
    text.local_text_sources(str(small / "*.txt"), seq_len=64, val_fraction=0.1, tokenizer=tok)
  with pytest.raises(ValueError, match="val_fraction"):
    text.split_stream(np.zeros(10, np.uint16), 1.5)


@pytest.mark.timeout(60)
def test_text_pipeline(tmp_path):
  c = _text_config(_write_docs(tmp_path))
  it = D.create_train_iterator(c, batch_size=4, seed=0)
  batch = next(it)
  assert set(batch) == set(D.BATCH_KEYS) and all(v.shape == (4, 16) for v in batch.values())
  _check_packed_rows(batch, 16)
  state = json.loads(json.dumps(it.get_state()))
  want = next(it)
  again = D.create_train_iterator(c, batch_size=4, seed=0)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["inputs"], want["inputs"])
  ev = D.create_eval_batches(c, batch_size=4)
  assert list(ev) == ["validation"]
  train, val = text.local_text_sources(c.files, seq_len=16, val_fraction=0.25, tokenizer=ByteTokenizer())
  real = np.concatenate([b["loss_mask"].sum(axis=1) for b in ev["validation"]])
  assert (real == 16).sum() == len(val) and np.all(real[len(val):] == 0)
  pad_rows = ev["validation"][-1]["inputs"][ev["validation"][-1]["loss_mask"].sum(axis=1) == 0]
  assert np.all(pad_rows == ByteTokenizer.PAD)
  # The eval rows are the validation split's rows in order (its tokens are disjoint from training's,
  # see test_text_packing).
  got = np.concatenate([b["inputs"] for b in ev["validation"]])[:len(val)]
  np.testing.assert_array_equal(got, val.__getitems__(range(len(val)))["inputs"])
  c.val_fraction = 0.0
  assert D.create_eval_batches(c, batch_size=4) == {}


class MemarchTestTinyText(tfds.core.GeneratorBasedBuilder):
  """A tiny local text dataset standing in for a real TFDS text corpus."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = epath.Path(__file__)  # see tfds_mqar.MemarchMqar.code_path

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"content": tfds.features.Text(), "id": np.int32}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(DOCS * 3)}

  def _generate_examples(self, docs):
    for i, doc in enumerate(docs):
      yield i, {"content": doc, "id": i}


@pytest.mark.timeout(60)
def test_tfds_text_dataset(tmp_path):
  c = _text_config("", seq_len=16, val_fraction=0.2)
  c.name = "tfds:memarch_test_tiny_text"
  c.text_key = "content"
  c.tfds_data_dir = str(tmp_path / "tfds")
  tok = ByteTokenizer()
  train, val = text.tfds_text_sources("memarch_test_tiny_text", data_dir=c.tfds_data_dir, text_key="content",
                                      seq_len=16, val_fraction=0.2, tokenizer=tok)
  expected = np.concatenate([np.append(tok.encode(d), tok.EOS) for d in DOCS * 3])
  np.testing.assert_array_equal(np.concatenate([train.stream, val.stream]), expected)
  batch = next(D.create_train_iterator(c, batch_size=4, seed=0))
  assert all(v.shape == (4, 16) for v in batch.values())
  _check_packed_rows(batch, 16)
  assert list(D.create_eval_batches(c, batch_size=4)) == ["validation"]
  c.text_key = "body"
  with pytest.raises(ValueError, match="no feature 'body'"):
    D.create_train_iterator(c, batch_size=4, seed=0)


def test_mqar_eval_setting_longer_than_training_length():
  """Length generalization: train rows at data.seq_len, an eval set at its own longer length (generated in
  memory); the TFDS build, which stores every row at data.seq_len, refuses it with the fix in the message."""
  from memarch.validate import validate_config  # noqa: PLC0415
  from experiments.sweep import load_config  # noqa: PLC0415

  c = mqar_data(vocab_size=256, settings=((64, 4),), eval_settings=((64, 4), (256, 4)), num_eval_examples=6)
  c.mqar.power_a = 1.0  # uniform query gaps: queries far from their keys at 256
  c.mqar.use_tfds = False
  batches = pipeline.create_eval_batches(c, batch_size=4)
  assert batches["mqar_T64_kv4"][0]["inputs"].shape == (4, 64)
  assert batches["mqar_T256_kv4"][0]["inputs"].shape == (4, 256)
  long = synthetic.mqar_eval_sets(seed=0, vocab_size=256, eval_settings=((256, 4),), num_examples=6, seq_len=64,
                                      power_a=1.0)
  np.testing.assert_array_equal(np.concatenate([b["targets"] for b in batches["mqar_T256_kv4"]])[:6],
                                long["mqar_T256_kv4"]["targets"])
  assert long["mqar_T256_kv4"]["loss_mask"][:, 128:].sum() > 0  # some queries past the 64-token training length

  config = load_config("configs/transformer.py:size=tiny")
  with config.unlocked():
    config.data = c
  validate_config(config)
  config.data.mqar.use_tfds = True
  with pytest.raises(ValueError, match=r"longer than data\.seq_len=64: the TFDS build .*use_tfds=False"):
    validate_config(config)
