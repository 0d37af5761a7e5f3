"""A TFDS builder over MQAR, prepared locally in array_record format (no download, no TensorFlow).

Every generation parameter (vocabulary, training mixture, eval settings, padded length, example counts,
power_a, seed) goes into the builder config, whose name ends in a hash of all of them: two
configurations never share a directory, and a configuration that was built before is read back
instead of being regenerated. Splits: "train" (the whole mixture) and one split per eval setting,
named `synthetic.setting_name(T, k)` (e.g. "mqar_T64_kv4").

The examples are exactly `synthetic.mqar_mixture(...)` / `synthetic.mqar_eval_sets(...)` in order,
so the in-memory path (`data.mqar.use_tfds=False`) and this builder serve identical data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from memarch.data import synthetic, tfds_local
from memarch.data.tfds_local import default_data_dir  # noqa: F401  (re-exported: pipeline.py uses it)

# Bump when the generator's output changes for the same parameters: old builds are then not reused.
GENERATOR_VERSION = 1


@dataclasses.dataclass(eq=False)
class MqarBuilderConfig(tfds.core.BuilderConfig):
  """The generation parameters of one MQAR dataset (see synthetic.mqar_mixture)."""

  vocab_size: int = 8192
  seq_len: int = 64
  settings: tuple[tuple[int, int], ...] = ((64, 4),)
  eval_settings: tuple[tuple[int, int], ...] = ((64, 4),)
  num_train_examples: int = 100_000  # per training setting
  num_eval_examples: int = 1_000  # per eval setting
  power_a: float = 0.01
  seed: int = 0

  def params(self) -> dict[str, Any]:
    """The parameters as plain JSON types (what the hash and the description are made of)."""
    return {
        "generator_version": GENERATOR_VERSION,
        "vocab_size": int(self.vocab_size),
        "seq_len": int(self.seq_len),
        "settings": [[int(t), int(k)] for t, k in self.settings],
        "eval_settings": [[int(t), int(k)] for t, k in self.eval_settings],
        "num_train_examples": int(self.num_train_examples),
        "num_eval_examples": int(self.num_eval_examples),
        "power_a": float(self.power_a),
        "seed": int(self.seed),
    }


def make_builder_config(
    *,
    vocab_size: int,
    seq_len: int,
    settings: Sequence[Sequence[int]],
    eval_settings: Sequence[Sequence[int]],
    num_train_examples: int,
    num_eval_examples: int,
    power_a: float,
    seed: int,
) -> MqarBuilderConfig:
  """A config named "v{V}_L{L}_<hash>": readable at a glance, unique through the hash of every parameter."""
  settings = tuple((int(t), int(k)) for t, k in settings)
  eval_settings = tuple((int(t), int(k)) for t, k in eval_settings)
  # Validate before anything touches the disk, so a bad config fails with the generator's message.
  synthetic.validate_settings(settings, seq_len, vocab_size, power_a)
  synthetic.validate_settings(eval_settings, seq_len, vocab_size, power_a, what="data.mqar.eval_settings")
  names = [synthetic.setting_name(t, k) for t, k in eval_settings]
  if len(set(names)) != len(names):
    raise ValueError(f"MQAR: data.mqar.eval_settings has duplicates: {eval_settings}.")
  probe = MqarBuilderConfig(
      name="probe", vocab_size=vocab_size, seq_len=seq_len, settings=settings, eval_settings=eval_settings,
      num_train_examples=num_train_examples, num_eval_examples=num_eval_examples, power_a=power_a, seed=seed)
  params = probe.params()
  digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
  return dataclasses.replace(
      probe, name=f"v{vocab_size}_L{seq_len}_{digest}", description=json.dumps(params, sort_keys=True))


class MemarchMqar(tfds.core.GeneratorBasedBuilder):
  """Multi-query associative recall (Zoology), generated locally from a seed."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # Configs are made on the fly from the data config (make_builder_config); none is predefined.
  BUILDER_CONFIGS: list[MqarBuilderConfig] = []
  # TFDS derives the code path of a builder inside a package through `importlib_resources`, which it
  # imports lazily and does not install; naming the file ourselves avoids that import (and the path
  # is only used to look for a checksums file, which a locally generated dataset does not have).
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    length = self.builder_config.seq_len
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "inputs": tfds.features.Tensor(shape=(length,), dtype=np.int32, encoding=tfds.features.Encoding.BYTES),
            "targets": tfds.features.Tensor(shape=(length,), dtype=np.int32, encoding=tfds.features.Encoding.BYTES),
            "loss_mask": tfds.features.Tensor(shape=(length,), dtype=np.float32, encoding=tfds.features.Encoding.BYTES),
        }),
        supervised_keys=None,
        # Keep the generation order (TFDS otherwise orders examples by a hash of their key), so
        # index i of a split is example i of synthetic.mqar_mixture, as on the in-memory path.
        disable_shuffling=True,
        homepage="https://github.com/HazyResearch/zoology",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[Any]]:
    del dl_manager  # nothing to download
    c = self.builder_config
    splits = {"train": self._generate_examples(synthetic.mqar_mixture(
        seed=c.seed, split="train", vocab_size=c.vocab_size, settings=c.settings,
        num_examples_per_setting=c.num_train_examples, seq_len=c.seq_len, power_a=c.power_a))}
    eval_sets = synthetic.mqar_eval_sets(
        seed=c.seed, vocab_size=c.vocab_size, eval_settings=c.eval_settings,
        num_examples=c.num_eval_examples, seq_len=c.seq_len, power_a=c.power_a)
    for name, arrays in eval_sets.items():
      splits[name] = self._generate_examples(arrays)
    return splits

  def _generate_examples(self, arrays: dict[str, np.ndarray]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    # The arrays were generated in bulk; yielding rows only serializes them (in key order, since
    # shuffling is disabled in _info).
    for i in range(arrays["inputs"].shape[0]):
      yield i, {name: value[i] for name, value in arrays.items()}


def build_mqar(config: MqarBuilderConfig, data_dir: str) -> MemarchMqar:
  """Prepares the dataset under data_dir (a no-op when it is already there) and returns its builder."""
  return tfds_local.prepare(MemarchMqar, config, data_dir)


def mqar_data_sources(config: MqarBuilderConfig, data_dir: str) -> dict[str, Sequence[dict[str, np.ndarray]]]:
  """Random-access sources of every split ("train" and one per eval setting), built if needed.

  Read with `tfds.data_source("memarch_mqar/<config name>", ...)`, as any prepared TFDS dataset
  (also from outside memarch: the config name is in the directory name).
  """
  builder = build_mqar(config, data_dir)
  return {
      split: tfds.data_source(f"{builder.name}/{config.name}", split=split, data_dir=data_dir, download=False)
      for split in builder.info.splits
  }
