"""The byte-level memory tasks as data sections: `data.name` "niah", "passkey_text" or "babilong"
(configs/common.py: niah_data, passkey_text_data, babilong_data).

`text_task_sources(data_config)` gives the training source (a mixture of `data.qa.train_lengths`, padded to
data.seq_len) and the eval sources: one per (length, depth) for the needle tasks ("niah_noise_T1024_d50",
"passkey_text_T1024_d50"), one per length for BABILong ("babilong_qa1_T1024"). Each eval set has its own
length. Examples are generated on demand (qa.QaSource), or read from the local TFDS build of the same examples
when `data.qa.use_tfds` is set (memarch/data/tfds_qa.py).
"""

from __future__ import annotations

from typing import Any

from memarch.data import babilong, niah, qa

NAMES = ("niah", "passkey_text", "babilong")


def validate_text_task(c: Any) -> None:
  """Raises ValueError naming the key if a text task's data section cannot be generated."""
  name = str(c.name)
  if name not in NAMES:
    raise ValueError(f"data.name={name!r} is not a text task ({NAMES}).")
  q = c.qa
  lengths = tuple(int(t) for t in q.train_lengths) or (int(c.seq_len),)
  if max(lengths) != int(c.seq_len):
    raise ValueError(f"config.data.qa.train_lengths={tuple(q.train_lengths)}: the longest must equal "
                     f"data.seq_len={int(c.seq_len)} (shorter ones are padded to it).")
  if not tuple(q.eval_lengths):
    raise ValueError("config.data.qa.eval_lengths is empty: give at least one evaluation length.")
  for d in q.eval_depths:
    if not 0.0 <= float(d) <= 1.0:
      raise ValueError(f"config.data.qa.eval_depths has {d}: depths are fractions in [0, 1].")
  if name == "niah" and str(q.flavour) not in niah.FLAVOURS:
    raise ValueError(f"config.data.qa.flavour={q.flavour!r}: choose one of {niah.FLAVOURS}.")
  if name == "babilong" and str(q.task) not in babilong.TASKS:
    raise ValueError(f"config.data.qa.task={q.task!r}: choose one of {babilong.TASKS}.")
  # Every length must hold the task's needle/story, question and answer: try one example of each, up front.
  for key, ts in (("train_lengths", lengths), ("eval_lengths", tuple(q.eval_lengths))):
    for t in ts:
      try:
        make_source(c, lengths=(int(t),), split="eval", num_examples=1).example(0)
      except ValueError as e:
        raise ValueError(f"config.data.qa.{key} (length {t}): {e}") from None


def _check_disk(needed: int, data_dir: str) -> None:
  import os, shutil  # pylint: disable=g-import-not-at-top,multiple-imports
  os.makedirs(data_dir, exist_ok=True)
  free = shutil.disk_usage(data_dir).free
  if needed > free:
    raise ValueError(f"data.qa.use_tfds: the build would write about {needed / 2**30:.1f} GiB to {data_dir!r}, "
                     f"which has {free / 2**30:.1f} GiB free; lower data.qa.num_train_examples or set "
                     "data.qa.use_tfds=False (examples are then generated on demand).")


def task_label(c: Any) -> str:
  """"niah_noise", "passkey_text" or "babilong_qa1": the eval-set prefix of a text task's data section."""
  name = str(c.name)
  if name == "niah":
    return f"niah_{c.qa.flavour}"
  if name == "babilong":
    return f"babilong_{c.qa.task}"
  return name


def make_source(c: Any, *, lengths, split: str, num_examples: int, depth: float | None = None) -> qa.QaSource:
  """A source of the data section's task at `lengths` (a mixture) and `depth` (None: random)."""
  q, seed = c.qa, int(c.seed)
  name = str(c.name)
  if name == "niah":
    return niah.niah_source(flavour=str(q.flavour), num_examples=num_examples, lengths=lengths, seed=seed,
                            split=split, depth=depth, haystack_file=str(q.haystack_file))
  if name == "passkey_text":
    return niah.passkey_text_source(num_examples=num_examples, lengths=lengths, key_digits=int(q.key_digits),
                                    seed=seed, split=split, depth=depth)
  return babilong.babilong_source(task=str(q.task), num_examples=num_examples, lengths=lengths, seed=seed,
                                  split=split, num_facts=int(q.num_facts), haystack_file=str(q.haystack_file))


def text_task_sources(c: Any) -> tuple[Any, dict[str, Any]]:
  """(training source, {eval set name: source}) of a text task's data section (qa.QaSource, or TFDS-backed
  sources of the same examples with `data.qa.use_tfds`); each has `seq_len`, its row length."""
  validate_text_task(c)
  train, evals = _on_demand_sources(c)  # lazy: nothing is generated until an example is read
  if not bool(c.qa.get("use_tfds", False)):
    return train, evals
  from memarch.data import tfds_local, tfds_qa  # pylint: disable=g-import-not-at-top  (tfds_qa imports this module)
  data_dir = tfds_local.default_data_dir(str(c.get("tfds_data_dir", "")))
  _check_disk(tfds_qa.estimated_bytes(c), data_dir)
  built = tfds_qa.qa_data_sources(c, data_dir)
  for name, source in built.items():
    source.seq_len = (train if name == "train" else evals[name]).seq_len
  return built.pop("train"), built


def _on_demand_sources(c: Any) -> tuple[qa.QaSource, dict[str, qa.QaSource]]:
  q = c.qa
  lengths = tuple(int(t) for t in q.train_lengths) or (int(c.seq_len),)
  train = make_source(c, lengths=lengths, split="train", num_examples=int(q.num_train_examples))
  label = task_label(c)
  evals = {}
  for t in q.eval_lengths:
    if str(c.name) == "babilong":
      evals[babilong.eval_set_name(str(q.task), int(t))] = make_source(
          c, lengths=(int(t),), split="eval", num_examples=int(q.num_eval_examples))
      continue
    for d in q.eval_depths:
      evals[niah.eval_set_name(label, int(t), float(d))] = make_source(
          c, lengths=(int(t),), split="eval", num_examples=int(q.num_eval_examples), depth=float(d))
  return train, evals
