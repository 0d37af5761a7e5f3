"""Sections shared by every config: data, optim, train, mesh, eval.

Each model family's config (`configs/<family>.py`) builds on these and fills in `model`. Every knob is
documented where it is set. `get_config` functions return a locked ConfigDict: overriding a key that
does not exist, or with a value of the wrong type, is an error.
"""

from __future__ import annotations

import ml_collections


def mqar_data(
    *,
    vocab_size: int = 8192,
    settings: tuple[tuple[int, int], ...] = ((64, 4),),
    eval_settings: tuple[tuple[int, int], ...] | None = None,
    num_train_examples: int = 100_000,
    num_eval_examples: int = 1_000,
) -> ml_collections.ConfigDict:
  """Multi-query associative recall (Zoology) as the data section."""
  c = ml_collections.ConfigDict()
  c.name = "mqar"  # "mqar" | "text" | "tfds:<name>"
  # Training length: every batch is [batch, seq_len]; shorter mixture settings are padded (loss-masked).
  c.seq_len = max(s for s, _ in settings)
  c.vocab_size = vocab_size  # MQAR's own vocabulary; keys from [1, V/2), values from [V/2, V); 0 pads.
  c.mqar = ml_collections.ConfigDict()
  c.mqar.settings = tuple(tuple(s) for s in settings)  # training mixture of (seq_len, num_kv_pairs)
  c.mqar.eval_settings = tuple(tuple(s) for s in (eval_settings or settings))
  c.mqar.num_train_examples = num_train_examples  # examples per setting in the TFDS train split
  c.mqar.num_eval_examples = num_eval_examples  # examples per eval setting
  c.mqar.power_a = 0.01  # power-law exponent of query positions (Zoology's default)
  c.mqar.use_tfds = True  # build/read the TFDS array_record builder (False: generate in memory)
  # Text (`name="text"`): a glob of local files, one document per file, byte tokenizer.
  c.files = ""
  c.val_fraction = 0.05  # the last fraction of the token stream is the validation split
  c.text_key = "text"  # feature holding the text in a TFDS dataset (`name="tfds:<name>"`)
  c.tfds_data_dir = ""  # where TFDS builds/reads; "" -> ~/.cache/memarch/tfds (or $MEMARCH_TFDS_DIR)
  c.num_workers = 0  # grain worker processes (0: in the main process)
  # Threads that read and assemble training batches in the background, and how many finished batches
  # they keep ahead of the loop. Small by default: on a 2-core laptop the model needs the cores.
  c.read_threads = 2
  c.prefetch_batches = 4
  c.seed = 0  # data order and MQAR generation
  return c


def _generated_loader(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the loader keys of a task generated on demand (passkey, the text tasks) to its data section."""
  c.num_workers = 0  # grain worker processes (0: in the main process)
  c.read_threads = 2  # background threads that generate training batches
  c.prefetch_batches = 4  # finished batches kept ahead of the loop
  c.seed = 0  # data order and generation
  return c


def passkey_data(
    *,
    seq_len: int = 1024,
    eval_multiples: tuple[int, ...] = (1, 4, 16),
    key_digits: int = 5,
    filler: str = "repeat",
    vocab_size: int = 64,
    num_train_examples: int = 1_000_000,
    num_eval_examples: int = 64,
) -> ml_collections.ConfigDict:
  """Passkey retrieval (memarch/data/passkey.py) as the data section: a key hidden in filler, asked for at the
  end; the loss and accuracy cover only the key's digits. Eval sets `passkey_T{len}` at each multiple of the
  training length (1x, 4x, 16x by default: length generalization)."""
  c = ml_collections.ConfigDict()
  c.name = "passkey"
  c.seq_len = seq_len  # training length; every training batch is [batch, seq_len]
  # The task's own vocabulary: 0 pad, 1 key marker, 2 query marker, 3..12 digits, the rest filler.
  c.vocab_size = vocab_size
  c.passkey = ml_collections.ConfigDict()
  c.passkey.key_digits = key_digits  # digits of the key (the answer: key_digits loss positions per example)
  c.passkey.filler = filler  # "repeat" (a fixed filler sentence, as in the original test) | "random" tokens
  c.passkey.filler_period = 16  # tokens of the repeated filler sentence
  c.passkey.eval_lengths = tuple(m * seq_len for m in eval_multiples)  # one eval set per length
  # Examples are generated on demand from (seed, split, length, index): a large train set costs nothing.
  c.passkey.num_train_examples = num_train_examples
  c.passkey.num_eval_examples = num_eval_examples  # per eval length
  return _generated_loader(c)


def _text_task_data(name: str, *, seq_len: int, train_lengths: tuple[int, ...] | None,
                    eval_lengths: tuple[int, ...] | None, eval_depths: tuple[float, ...],
                    num_train_examples: int, num_eval_examples: int) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = name  # "niah" | "passkey_text" | "babilong" (memarch/data/text_tasks.py); byte tokenizer (259 ids)
  c.seq_len = seq_len  # training length; every training batch is [batch, seq_len]
  c.qa = ml_collections.ConfigDict()
  # Training mixture of example lengths (like MQAR settings); the longest must be seq_len, shorter ones are
  # right-padded (loss-masked). () means (seq_len,).
  c.qa.train_lengths = tuple(train_lengths or (seq_len,))
  c.qa.eval_lengths = tuple(eval_lengths or (seq_len, 4 * seq_len))  # one eval set per length (and depth)
  c.qa.eval_depths = tuple(eval_depths)  # needle depths of the eval sets (fractions of the haystack)
  c.qa.flavour = "noise"  # niah: "noise" | "text" | "text_uuid" (RULER S-NIAH 1/2/3)
  c.qa.task = "qa1"  # babilong: "qa1" | "qa2" | "qa3"
  c.qa.key_digits = 5  # passkey_text: digits of the pass key
  c.qa.num_facts = 0  # babilong: facts per story (0: the task's default, 6/8/10)
  # Real-text haystack (niah "text"/"text_uuid"; babilong filler when set), a local file, e.g.
  # ../shared/data/tinyshakespeare.txt. "" : generated filler (noise / sentence bank).
  c.qa.haystack_file = ""
  # Examples are generated on demand from (seed, split, length, depth, index): a large train set costs nothing.
  c.qa.num_train_examples = num_train_examples
  c.qa.num_eval_examples = num_eval_examples  # per eval set
  # True: build (once) and read a local TFDS array_record dataset of exactly these examples (memarch/data/
  # tfds_qa.py; it materializes num_train_examples rows: lower it first). False: generate on demand.
  c.qa.use_tfds = False
  c.tfds_data_dir = ""  # where that build lives; "" -> ~/.cache/memarch/tfds (or $MEMARCH_TFDS_DIR)
  return _generated_loader(c)


def niah_data(*, flavour: str = "noise", seq_len: int = 1024, train_lengths: tuple[int, ...] | None = None,
              eval_lengths: tuple[int, ...] | None = None,
              eval_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0), haystack_file: str = "",
              num_train_examples: int = 1_000_000, num_eval_examples: int = 32) -> ml_collections.ConfigDict:
  """Single needle in a haystack (RULER S-NIAH; memarch/data/niah.py) as the data section: eval sets
  `niah_<flavour>_T<len>_d<depth%>`; the loss covers only the answer (the value and a period)."""
  c = _text_task_data("niah", seq_len=seq_len, train_lengths=train_lengths, eval_lengths=eval_lengths,
                      eval_depths=eval_depths, num_train_examples=num_train_examples,
                      num_eval_examples=num_eval_examples)
  c.qa.flavour = flavour
  c.qa.haystack_file = haystack_file
  return c


def passkey_text_data(*, seq_len: int = 1024, key_digits: int = 5, train_lengths: tuple[int, ...] | None = None,
                      eval_lengths: tuple[int, ...] | None = None,
                      eval_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
                      num_train_examples: int = 1_000_000, num_eval_examples: int = 32) -> ml_collections.ConfigDict:
  """The classic text passkey ("The grass is green. ..."; memarch/data/niah.py), byte-level: eval sets
  `passkey_text_T<len>_d<depth%>`."""
  c = _text_task_data("passkey_text", seq_len=seq_len, train_lengths=train_lengths, eval_lengths=eval_lengths,
                      eval_depths=eval_depths, num_train_examples=num_train_examples,
                      num_eval_examples=num_eval_examples)
  c.qa.key_digits = key_digits
  return c


def babilong_data(*, task: str = "qa1", seq_len: int = 1024, train_lengths: tuple[int, ...] | None = None,
                  eval_lengths: tuple[int, ...] | None = None, haystack_file: str = "",
                  num_train_examples: int = 1_000_000, num_eval_examples: int = 32) -> ml_collections.ConfigDict:
  """BABILong-style reasoning (bAbI qa1/qa2/qa3 stories hidden in filler; memarch/data/babilong.py): eval sets
  `babilong_<task>_T<len>` (facts at random depths)."""
  c = _text_task_data("babilong", seq_len=seq_len, train_lengths=train_lengths, eval_lengths=eval_lengths,
                      eval_depths=(), num_train_examples=num_train_examples, num_eval_examples=num_eval_examples)
  c.qa.task = task
  c.qa.haystack_file = haystack_file
  return c
