"""A TFDS builder over the byte-level memory tasks (NIAH, text passkey, BABILong), prepared locally in
array_record format (no download, no TensorFlow).

The builder config holds the task's whole data section (memarch/data/text_tasks.py) and, for a real-text
haystack, a checksum of the file's bytes; its name ends in a hash of all of that, so two configurations never
share a directory and one that was built before is read back. Splits: "train" (`data.qa.num_train_examples`
examples of the training mixture, padded to data.seq_len) and one split per eval set, named as the in-memory
eval sets ("niah_noise_T1024_d50", "babilong_qa1_T4096"), each at its own length.

The examples are exactly those of `text_tasks.text_task_sources(data)` in order, so the on-demand path
(`data.qa.use_tfds=False`, the default: a generated example costs less than reading one back) and this
builder serve identical data. The builder is for sharing a fixed benchmark set with other code: read it with
`tfds.data_source("memarch_qa/<config name>", split=..., data_dir=...)` from anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from memarch.data import qa, text_tasks, tfds_local

GENERATOR_VERSION = 1  # bump when a generator's output changes for the same parameters
_BYTES_PER_TOKEN = 9  # int32 inputs + int32 targets + a (compressed) float loss mask, about


def _file_checksum(path: str) -> int:
  with open(path, "rb") as f:
    return zlib.crc32(f.read())


@dataclasses.dataclass(eq=False)
class QaBuilderConfig(tfds.core.BuilderConfig):
  """One text task's data section, as JSON (see configs/common.py: niah_data, passkey_text_data, babilong_data)."""

  data_json: str = "{}"

  def data_config(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(self.data_json))


def make_builder_config(data_config: Any) -> QaBuilderConfig:
  """A config named "<task>_L<seq_len>_<hash of every generation parameter>"; validates the section first."""
  text_tasks.validate_text_task(data_config)
  q = data_config.qa
  params = {
      "generator_version": GENERATOR_VERSION,
      "name": str(data_config.name),
      "seq_len": int(data_config.seq_len),
      "seed": int(data_config.seed),
      "qa": {
          "train_lengths": [int(t) for t in q.train_lengths] or [int(data_config.seq_len)],
          "eval_lengths": [int(t) for t in q.eval_lengths],
          "eval_depths": [float(d) for d in q.eval_depths],
          "flavour": str(q.flavour), "task": str(q.task), "key_digits": int(q.key_digits),
          "num_facts": int(q.num_facts), "haystack_file": str(q.haystack_file),
          "num_train_examples": int(q.num_train_examples), "num_eval_examples": int(q.num_eval_examples),
      },
  }
  # The haystack file's bytes are part of the data: an edited file must not reuse an old build.
  params["haystack_crc32"] = _file_checksum(str(q.haystack_file)) if str(q.haystack_file) else None
  data_json = json.dumps(params, sort_keys=True)
  digest = hashlib.sha256(data_json.encode()).hexdigest()[:16]
  return QaBuilderConfig(name=f"{text_tasks.task_label(data_config)}_L{int(data_config.seq_len)}_{digest}",
                         description=data_json, data_json=data_json)


def estimated_bytes(data_config: Any) -> int:
  """About how many bytes a build writes (before compression): the train split dominates."""
  q = data_config.qa
  n_eval_sets = len(q.eval_lengths) * (1 if str(data_config.name) == "babilong" else max(1, len(q.eval_depths)))
  tokens = int(q.num_train_examples) * int(data_config.seq_len)
  tokens += n_eval_sets * int(q.num_eval_examples) * max(int(t) for t in q.eval_lengths)
  return tokens * _BYTES_PER_TOKEN


class MemarchQa(tfds.core.GeneratorBasedBuilder):
  """Byte-level memory tasks (S-NIAH, passkey, BABILong-style), generated locally from a seed."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS: list[QaBuilderConfig] = []  # made on the fly from the data config
  code_path = epath.Path(__file__)  # see tfds_mqar.MemarchMqar.code_path

  def _info(self) -> tfds.core.DatasetInfo:
    # Eval splits have their own lengths: the features are variable-length rows.
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "inputs": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "targets": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "loss_mask": tfds.features.Tensor(shape=(None,), dtype=np.float32),
        }),
        supervised_keys=None,
        disable_shuffling=True,  # index i of a split is example i of the on-demand source
        homepage="https://github.com/hsiehjackson/RULER",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[Any]]:
    del dl_manager  # nothing to download
    train, evals = text_tasks.text_task_sources(self.builder_config.data_config())  # on demand
    return {"train": self._generate_examples(train),
            **{name: self._generate_examples(source) for name, source in evals.items()}}

  def _generate_examples(self, source: qa.QaSource) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    for i in range(len(source)):
      yield i, source[i]


def qa_data_sources(data_config: Any, data_dir: str) -> dict[str, Any]:
  """Batch sources of every split ("train" and one per eval set) of a text task, built under data_dir if needed."""
  config = make_builder_config(data_config)
  builder = tfds_local.prepare(MemarchQa, config, data_dir)
  return {split: tfds_local.TfdsExampleSource(
              tfds.data_source(f"{builder.name}/{config.name}", split=split, data_dir=data_dir, download=False))
          for split in builder.info.splits}
