"""The local TFDS builds of the text memory tasks serve exactly the on-demand examples."""

import os

import numpy as np
import pytest

from configs import common
from memarch.data import pipeline, tfds_qa

pytestmark = pytest.mark.timeout(120)


def _section(name, tmp_path, **kw):
  make = {"niah": common.niah_data, "passkey_text": common.passkey_text_data, "babilong": common.babilong_data}[name]
  seq_len = 512 if name == "babilong" else 256
  c = make(seq_len=seq_len, eval_lengths=(seq_len, 2 * seq_len), num_train_examples=12, num_eval_examples=3, **kw)
  if name != "babilong":
    c.qa.eval_depths = (0.0, 0.5)
  c.tfds_data_dir = str(tmp_path / "tfds")
  return c


def _equal(a, b):
  return set(a) == set(b) and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("name", ["niah", "passkey_text", "babilong"])
def test_tfds_build_equals_on_demand_examples(name, tmp_path):
  c = _section(name, tmp_path)
  on_demand = pipeline.create_eval_batches(c, batch_size=3)
  c.qa.use_tfds = True
  built = pipeline.create_eval_batches(c, batch_size=3)
  assert sorted(built) == sorted(on_demand)
  assert len(built) == (2 if name == "babilong" else 4)
  for split in on_demand:
    assert len(built[split]) == len(on_demand[split])
    for x, y in zip(built[split], on_demand[split]):
      assert _equal(x, y), split
  # Training batches: the same rows in the same order.
  c2 = _section(name, tmp_path)
  it_demand = pipeline.create_train_iterator(c2, batch_size=4, seed=1)
  c2.qa.use_tfds = True
  it_tfds = pipeline.create_train_iterator(c2, batch_size=4, seed=1)
  for _ in range(3):
    assert _equal(next(it_tfds), next(it_demand))
  # Built once: the second use read the same directory back.
  builds = os.listdir(tmp_path / "tfds" / "memarch_qa")
  assert len(builds) == 1, builds


def test_tfds_config_name_tracks_every_parameter(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("It was a bright cold day in April, and the clocks were striking thirteen. " * 40)
  c = _section("niah", tmp_path, flavour="text", haystack_file=str(corpus))
  name = tfds_qa.make_builder_config(c).name
  assert name.startswith("niah_text_L256_")
  assert tfds_qa.make_builder_config(c).name == name  # deterministic
  c.seed = 1
  assert tfds_qa.make_builder_config(c).name != name
  c.seed = 0
  corpus.write_text("Another text entirely, of a different length and with other words in it. " * 40)
  assert tfds_qa.make_builder_config(c).name != name  # the haystack file's bytes are part of the data


def test_tfds_build_refuses_when_the_disk_cannot_hold_it(tmp_path, monkeypatch):
  c = _section("passkey_text", tmp_path)
  c.qa.use_tfds = True
  monkeypatch.setattr(tfds_qa, "estimated_bytes", lambda _: 1 << 60)
  with pytest.raises(ValueError, match="num_train_examples"):
    pipeline.create_eval_batches(c, batch_size=3)
