"""Preparing memarch's locally generated TFDS datasets (array_record, no download, no TensorFlow).

The builders (tfds_mqar.MemarchMqar, tfds_qa.MemarchQa) take their configs on the fly from a data config,
named by a hash of every generation parameter; `prepare` builds one under a file lock so that processes
sharing a data_dir build it once, and reads it back when it is already there.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

try:
  import fcntl  # pylint: disable=g-import-not-at-top
except ImportError:  # not POSIX
  fcntl = None


def default_data_dir(tfds_data_dir: str = "") -> str:
  """Resolves data.tfds_data_dir: "" -> $MEMARCH_TFDS_DIR, else ~/.cache/memarch/tfds."""
  if tfds_data_dir:
    return os.path.expanduser(tfds_data_dir)
  return os.environ.get("MEMARCH_TFDS_DIR") or os.path.expanduser("~/.cache/memarch/tfds")


class _DropCustomConfigWarning(logging.Filter):
  """Drops TFDS' "Using custom data configuration" warning: custom configs are how these builders work."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "Using custom data configuration" not in record.getMessage()


@contextlib.contextmanager
def _build_lock(data_dir: str, lock_name: str) -> Iterator[None]:
  """An exclusive file lock per config: processes sharing a data_dir (hosts on one file system, or
  several processes of one machine) build a dataset once; the others wait and then reuse it."""
  os.makedirs(data_dir, exist_ok=True)
  if fcntl is None:  # no POSIX locks (Windows): concurrent first builds are not protected
    yield
    return
  with open(os.path.join(data_dir, f".{lock_name}.lock"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(builder_cls: type[tfds.core.GeneratorBasedBuilder], config: tfds.core.BuilderConfig, data_dir: str,
            *, progress_bar: bool = False) -> tfds.core.GeneratorBasedBuilder:
  """Prepares `builder_cls(config)` under data_dir (a no-op when it is already there); returns the builder."""
  absl_logger = logging.getLogger("absl")
  quiet = _DropCustomConfigWarning()
  absl_logger.addFilter(quiet)
  # Small builds take seconds: TFDS' per-split progress bars would only clutter the training output.
  progress = getattr(tqdm_utils, "_active", True)
  tqdm_utils.display_progress_bar(progress_bar)
  try:
    with _build_lock(data_dir, f"{builder_cls.name}_{config.name}"):
      builder = builder_cls(config=config, data_dir=data_dir, file_format="array_record")
      builder.download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(try_download_gcs=False),
      )
  finally:
    tqdm_utils.display_progress_bar(progress)
    absl_logger.removeFilter(quiet)
  return builder


class TfdsExampleSource:
  """Adapts a TFDS data source (one dict per example) to a BatchSource (dict of stacked arrays)."""

  def __init__(self, source: Sequence[dict[str, np.ndarray]]):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitems__(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    examples = self.source.__getitems__(list(map(int, indices)))
    return {name: np.stack([np.asarray(e[name]) for e in examples]) for name in examples[0]}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in self.source[int(index)].items()}
