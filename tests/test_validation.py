"""Input validation (issue #12): config errors before any compute, data errors with their position.

- `memarch.validate.validate_config` accepts every shipped config and refuses each bad value with a message
  naming the key, the value and why; mesh sizes against the device count.
- Unknown keys and wrong types are refused by the locked ConfigDict, through `experiments.run`'s
  `config_flags` overrides and through `experiments.sweep.apply_override`.
- Data: out-of-vocabulary token ids named by position, an empty corpus, a corpus or MQAR setting that cannot
  fill the sequence length.
"""

from __future__ import annotations

import importlib
import sys

import ml_collections
import numpy as np
import pytest

from memarch import validate
from memarch.data import pipeline, synthetic, text
from memarch.data.tokenizer import ByteTokenizer
from memarch.layers.blocks import BLOCKS
from memarch.models.lm import check_token_ids

pytestmark = pytest.mark.timeout(60)

SHIPPED = [
    "hmt:size=tiny", "hmt:backbone=titans,stage=1", "hmt:backbone=gated_deltanet,recall=prefix",
    "transformer:size=tiny", "transformer:size=small", "transformer:size=base", "gated_deltanet:size=tiny",
    "gated_deltanet:size=small,heads=8", "linear_attention:rule=delta", "linear_attention:rule=simple_gla",
    "based:size=tiny", "based:size=small", "mom:size=tiny", "mom:size=small,memory_rule=simple_gla",
    "mom:size=340m", "titans:variant=mac", "titans:variant=mag", "titans:variant=mal", "titans:variant=lmm",
    "titans:variant=mac,size=small", "titans:variant=atlas",
]


def get_config(spec: str) -> ml_collections.ConfigDict:
  family, arg = spec.split(":", 1)
  return importlib.import_module(f"configs.{family}").get_config(arg)


def with_overrides(spec: str, **overrides) -> ml_collections.ConfigDict:
  """The config of `spec` with "section__key"=value overrides applied (type-checked by the locked config)."""
  config = get_config(spec)
  for name, value in overrides.items():
    node = config
    *parents, leaf = name.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.mark.parametrize("spec", SHIPPED)
def test_shipped_configs_are_valid(spec):
  validate.validate_config(get_config(spec), num_devices=1)
  validate.validate_config(get_config(spec))  # without a device count: the mesh is not checked
  validate.validate_config(ml_collections.FrozenConfigDict(get_config(spec)), num_devices=1)


@pytest.mark.parametrize("data", ["mqar_data", "passkey_data", "niah_data", "passkey_text_data", "babilong_data"])
def test_every_data_section_is_valid(data):
  from configs import common

  config = get_config("transformer:size=tiny")
  with config.unlocked():
    config.data = getattr(common, data)()
    config.model.max_len = config.data.seq_len
  validate.validate_config(config, 1)


def test_text_config_with_files_is_valid(tmp_path):
  config = get_config("transformer:task=text")
  with pytest.raises(ValueError, match=r"config\.data\.files='' is empty"):
    validate.validate_config(config, 1)
  config.data.files = str(tmp_path / "*.txt")
  validate.validate_config(config, 1)


# (config spec, overrides, regex the message must match: the key, the value and why)
BAD = {
    "heads_do_not_divide_embed": ("transformer:size=tiny", dict(model__num_heads=3),
                                  r"config\.model\.num_heads=3 does not divide config\.model\.embed_dim=64 "
                                  r"\(head_dim would not be an integer\)"),
    "kv_heads_do_not_divide_heads": ("transformer:size=tiny", dict(model__num_kv_heads=3),
                                     r"config\.model\.num_kv_heads=3 does not divide config\.model\.num_heads=4"),
    "odd_rope_head_dim": ("transformer:size=tiny", dict(model__head_dim=7), r"config\.model\.head_dim=7 .*RoPE"),
    "zero_heads": ("transformer:size=tiny", dict(model__num_heads=0), r"config\.model\.num_heads=0 must be positive"),
    "negative_window": ("transformer:size=tiny", dict(model__window=-1), r"config\.model\.window=-1 must be >= 0"),
    "titans_window_zero": ("titans:variant=mag", dict(model__window=0),
                           r"config\.model\.window=0 must be positive for block type\(s\) \['mag'\]"),
    "mac_segment_zero": ("titans:variant=mac", dict(model__segment_len=0), r"config\.model\.segment_len=0 must be positive"),
    "mac_omega_window": ("titans:variant=mac", dict(model__memory_objective_window=4),
                         r"config\.model\.memory_objective_window=4 must be 1 with the 'mac' block"),
    "persistent_negative": ("titans:variant=mal", dict(model__num_persistent=-2), r"config\.model\.num_persistent=-2"),
    "scan_chunk_zero": ("gated_deltanet:size=tiny", dict(model__chunk_size=0),
                        r"config\.model\.chunk_size=0 must be positive \(tokens per chunk"),
    "mom_chunk_negative": ("mom:size=tiny", dict(model__chunk_size=-4), r"config\.model\.chunk_size=-4 must be positive"),
    "memory_chunk_zero": ("titans:variant=lmm", dict(model__memory_chunk_size=0),
                          r"config\.model\.memory_chunk_size=0 must be positive"),
    "memory_depth_zero": ("titans:variant=lmm", dict(model__memory_depth=0), r"config\.model\.memory_depth must be >= 1"),
    "top_k_over_memories": ("mom:size=tiny", dict(model__top_k=5),
                            r"config\.model\.top_k=5 is larger than config\.model\.num_memories=4"),
    "mom_dense_with_conv": ("mom:size=tiny", dict(model__mom_impl="dense"), r"config\.model\.conv_width=4 must be 0"),
    "unknown_memory_rule": ("gated_deltanet:size=tiny", dict(model__memory_rule="gated"),
                            r"config\.model\.memory_rule='gated' is not one of"),
    "unknown_block": ("transformer:size=tiny", dict(model__layer_blocks=("attention", "atention")),
                      r"config\.model\.layer_blocks=.* unregistered block type\(s\) \['atention'\]; registered "
                      r"block types .*'mlp'"),
    "no_blocks": ("transformer:size=tiny", dict(model__layer_blocks=()), r"config\.model\.layer_blocks=\(\) must be"),
    "bad_dtype": ("transformer:size=tiny", dict(model__compute_dtype="float64"), r"config\.model\.compute_dtype='float64'"),
    "bad_attention_impl": ("transformer:size=tiny", dict(model__attention_impl="flash"),
                           r"config\.model\.attention_impl='flash' is not one of"),
    "vocab_below_data": ("transformer:size=tiny", dict(model__vocab_size=100),
                         r"config\.model\.vocab_size=100 is smaller than the data's vocabulary \(256"),
    "steps_zero": ("transformer:size=tiny", dict(train__steps=0), r"config\.train\.steps=0 must be positive"),
    "batch_zero": ("transformer:size=tiny", dict(train__batch_size=0), r"config\.train\.batch_size=0 must be positive"),
    "log_every_zero": ("transformer:size=tiny", dict(train__log_every=0), r"config\.train\.log_every=0 must be positive"),
    "eval_every_negative": ("transformer:size=tiny", dict(train__eval_every=-1),
                            r"config\.train\.eval_every=-1 must be >= 0 \(0 evaluates only at the end\)"),
    "checkpoint_every_negative": ("transformer:size=tiny", dict(train__checkpoint_every=-5),
                                  r"config\.train\.checkpoint_every=-5 must be >= 0"),
    "bad_progress": ("transformer:size=tiny", dict(train__progress="tqdm"), r"config\.train\.progress='tqdm'"),
    "lr_zero": ("transformer:size=tiny", dict(optim__lr=0.0), r"config\.optim\.lr=0\.0 must be in \(0"),
    "lr_negative": ("transformer:size=tiny", dict(optim__lr=-1e-3), r"config\.optim\.lr=-0\.001"),
    "lr_nan": ("transformer:size=tiny", dict(optim__lr=float("nan")), r"config\.optim\.lr=nan"),
    "bad_optimizer": ("transformer:size=tiny", dict(optim__name="sgd"), r"config\.optim\.name='sgd' is not one of"),
    "b2_one": ("transformer:size=tiny", dict(optim__b2=1.0), r"config\.optim\.b2=1\.0 must be in \[0, 1\)"),
    "eval_batch_zero": ("transformer:size=tiny", dict(eval__batch_size=0), r"config\.eval\.batch_size=0 must be positive"),
    "seq_len_zero": ("transformer:size=tiny", dict(data__seq_len=0), r"config\.data\.seq_len=0 must be positive"),
    "unknown_data": ("transformer:size=tiny", dict(data__name="mqar2"),
                     r"config\.data\.name='mqar2' is not a known data set: .*valid choices: \"mqar\""),
    "mqar_setting_too_long": ("transformer:size=tiny", dict(data__seq_len=32),
                              r"setting \(seq_len=64, num_kv_pairs=4\) of config\.data\.mqar\.settings is longer "
                              r"than data\.seq_len=32"),
    "mqar_setting_too_many_pairs": ("transformer:size=tiny", dict(data__mqar__settings=((64, 4), (64, 20))),
                                    r"setting \(seq_len=64, num_kv_pairs=20\) of config\.data\.mqar\.settings "
                                    r"cannot be generated: seq_len=64 is too short"),
    "mqar_eval_vocab": ("transformer:size=tiny", dict(data__mqar__eval_settings=((64, 16),), data__vocab_size=32),
                        r"of config\.data\.mqar\.(eval_)?settings cannot be generated: vocab_size=32 is too small"),
    "nonfinite_negative": ("transformer:size=tiny", dict(train__max_nonfinite_steps=-1),
                           r"config\.train\.max_nonfinite_steps=-1 must be >= 0"),
    "unknown_model": ("transformer:size=tiny", dict(model__name="gpt"),
                      r"config\.model\.name='gpt' is not a registered model; registered .*'hmt'.*'transformer'"),
    "hmt_sensory_over_segment": ("hmt:size=tiny", dict(model__sensory_len=20),
                                 r"config\.model\.sensory_len=20 must be in \[0, segment_len=16\]"),
    "hmt_backbone_heads": ("hmt:size=tiny", dict(model__backbone__num_heads=3),
                           r"config\.model\.backbone\.num_heads=3 does not divide config\.model\.backbone\.embed_dim=64"),
    "hmt_backbone_memory_chunk": ("hmt:backbone=titans", dict(model__backbone__memory_chunk_size=0),
                                  r"config\.model\.backbone\.memory_chunk_size=0 must be positive"),
    "hmt_backbone_memory_depth": ("hmt:backbone=titans", dict(model__backbone__memory_depth=0),
                                  r"config\.model\.backbone\.memory_depth must be >= 1"),
    "hmt_backbone_block": ("hmt:backbone=gated_deltanet", dict(model__backbone__layer_blocks=("linear_memory", "x")),
                           r"config\.model\.backbone\.layer_blocks=.* unregistered block type\(s\) \['x'\]"),
    "learned_positions_too_short": ("transformer:size=tiny", dict(model__position_embedding="learned", model__max_len=32),
                                    r"config\.model\.max_len=32 is shorter than config\.data\.seq_len=64"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_value_is_named(name):
  spec, overrides, match = BAD[name]
  config = with_overrides(spec, **overrides)
  with pytest.raises(ValueError, match=match):
    validate.validate_config(config, num_devices=1)


def test_every_block_type_is_listed_for_an_unknown_one():
  config = with_overrides("transformer:size=tiny", model__layer_blocks=("nope",))
  with pytest.raises(ValueError) as info:
    validate.validate_config(config)
  for name in BLOCKS:
    assert repr(name) in str(info.value)


def test_keys_of_unused_blocks_are_not_checked():
  # A Transformer++ config carries no chunk_size; a gated DeltaNet config carries attention keys (for
  # hybrids) that its linear-memory blocks do not read: an odd kv-head count there is not an error ...
  config = with_overrides("gated_deltanet:size=tiny", model__num_kv_heads=3)
  validate.validate_config(config, 1)
  # ... until a hybrid adds an attention block.
  config.model.layer_blocks = ("linear_memory", "attention")
  with pytest.raises(ValueError, match=r"config\.model\.num_kv_heads=3 does not divide config\.model\.num_heads=2"):
    validate.validate_config(config, 1)


def test_wrong_type_in_an_unlocked_config():
  d = get_config("transformer:size=tiny").to_dict()
  d["train"]["steps"] = "1000"
  with pytest.raises(ValueError, match=r"config\.train\.steps='1000' must be an int, got str"):
    validate.validate_config(ml_collections.ConfigDict(d))
  d["train"]["steps"] = True
  with pytest.raises(ValueError, match=r"config\.train\.steps=True must be an int, got bool"):
    validate.validate_config(ml_collections.ConfigDict(d))
  d["train"]["steps"] = 10
  d["train"]["tensorboard"] = "yes"
  with pytest.raises(ValueError, match=r"config\.train\.tensorboard='yes' must be True or False"):
    validate.validate_config(ml_collections.ConfigDict(d))
  d["train"]["tensorboard"] = False
  d["optim"]["lr"] = "3e-3"
  with pytest.raises(ValueError, match=r"config\.optim\.lr='3e-3' must be a number, got str"):
    validate.validate_config(ml_collections.ConfigDict(d))
  d["optim"]["lr"] = 3e-3
  validate.validate_config(ml_collections.ConfigDict(d))


def test_missing_section():
  d = get_config("transformer:size=tiny").to_dict()
  del d["eval"]
  with pytest.raises(ValueError, match=r"no section\(s\) \['eval'\]"):
    validate.validate_config(ml_collections.ConfigDict(d))


# ----------------------------------------------------------------------------------------------------------
# mesh


@pytest.mark.parametrize("mesh,devices,match", [
    (dict(data=2, fsdp=1), 1, r"'data': 2, 'fsdp': 1, 'tensor': 1, 'sequence': 1\} needs 2 devices, but 1 are available"),
    (dict(data=-1, fsdp=3), 4, r"'fsdp': 3.*the fixed axes \(3 devices\) do not divide the 4 available devices"),
    (dict(data=-1, fsdp=-1), 4, r"at most one axis may be -1"),
    (dict(data=-1, tensor=0), 4, r"axis sizes must be positive or -1"),
    (dict(data=-1), 3, r"config\.train\.batch_size=64 is not divisible by the data x fsdp mesh size 3"),
    (dict(data=2, fsdp=-1), 8, None),
    (dict(data=-1, tensor=2), 2, None),
])
def test_mesh_against_device_count(mesh, devices, match):
  config = get_config("transformer:size=tiny")
  config.mesh.update(mesh)
  if match is None:
    validate.validate_config(config, num_devices=devices)
  else:
    with pytest.raises(ValueError, match=match):
      validate.validate_config(config, num_devices=devices)
  validate.validate_config(config)  # the mesh is checked only against a device count


# ----------------------------------------------------------------------------------------------------------
# Unknown keys and wrong types: refused by the locked config when the override is applied.


def _parse_run_flags(monkeypatch, *overrides: str) -> ml_collections.ConfigDict:
  """Parses a command line the way experiments/run.py does (config_flags on a locked config)."""
  from absl import flags
  from ml_collections import config_flags

  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "config", flag_values=values, lock_config=True)
  argv = ["run", "--config=configs/transformer.py:size=tiny", *overrides]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
  values(argv)
  return holder.value


def test_run_flags_refuse_unknown_key(monkeypatch):
  with pytest.raises(AttributeError, match=r"stepz[\s\S]*Did you mean \"steps\""):
    _parse_run_flags(monkeypatch, "--config.train.stepz=3")
  with pytest.raises((AttributeError, KeyError), match="nosuchsection"):
    _parse_run_flags(monkeypatch, "--config.nosuchsection.steps=3")


def test_run_flags_refuse_wrong_type(monkeypatch):
  from absl import flags

  with pytest.raises(flags.IllegalFlagValueError, match=r"config\.train\.steps=abc"):
    _parse_run_flags(monkeypatch, "--config.train.steps=abc")
  with pytest.raises(flags.IllegalFlagValueError, match=r"config\.train\.batch_size=1\.5"):
    _parse_run_flags(monkeypatch, "--config.train.batch_size=1.5")


def test_run_flags_then_validate(monkeypatch):
  """A well-typed override with a bad value passes the flag parser; validate_config refuses it."""
  config = _parse_run_flags(monkeypatch, "--config.train.steps=20", "--config.model.num_heads=3")
  assert config.train.steps == 20 and config.model.num_heads == 3
  with pytest.raises(ValueError, match=r"config\.model\.num_heads=3 does not divide"):
    validate.validate_config(config, 1)


def test_sweep_apply_override_refuses_unknown_keys_and_wrong_types():
  from experiments.sweep import apply_override

  config = get_config("transformer:size=tiny")
  with pytest.raises(KeyError, match=r"no key 'stepz'; valid: \[.*'steps'"):
    apply_override(config, "train.stepz=3")
  with pytest.raises(KeyError, match=r"no section 'trian'; valid: \[.*'train'"):
    apply_override(config, "trian.steps=3")
  with pytest.raises(TypeError):
    apply_override(config, "train.steps=abc")
  with pytest.raises(TypeError):
    apply_override(config, "model.layer_blocks=3")
  apply_override(config, "model.num_heads=3")  # well typed: validate_config refuses it
  with pytest.raises(ValueError, match=r"config\.model\.num_heads=3 does not divide"):
    validate.validate_config(config, 1)
  apply_override(config, "model.num_heads=4")
  apply_override(config, "optim.lr=1")  # an int for a float key is converted
  assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
  validate.validate_config(config, 1)


# ----------------------------------------------------------------------------------------------------------
# Data errors


def test_out_of_vocabulary_id_is_named_by_position():
  tokens = np.zeros((3, 10), np.int32)
  tokens[1, 7] = 300
  tokens[2, 2] = 400
  with pytest.raises(ValueError, match=r"first out-of-range id is 300 at batch row 1, column 7 \(2 of 30 ids"):
    check_token_ids(tokens, 256)
  tokens[0, 9] = -1
  with pytest.raises(ValueError, match=r"first out-of-range id is -1 at batch row 0, column 9"):
    check_token_ids(tokens, 256, what="batch['inputs'] token ids")
  with pytest.raises(ValueError, match=r"id is 5 at index \(2,\)"):
    check_token_ids(np.array([0, 1, 5]), 5)
  check_token_ids(np.array([[0, 4]]), 5)  # in range: no error
  check_token_ids(np.zeros((0, 4), np.int32), 5)


def test_out_of_vocabulary_id_through_the_model():
  import jax
  import jax.numpy as jnp

  from memarch.models.lm import DecoderLM

  m = get_config("transformer:size=tiny").model.to_dict()
  m.update(vocab_size=16, embed_dim=8, num_heads=2, num_kv_heads=1, num_layers=1, attention_impl="reference")
  model = DecoderLM(ml_collections.FrozenConfigDict(m))
  tokens = jnp.array([[1, 2, 3], [4, 16, 5]], jnp.int32)
  jax.eval_shape(model.init, jax.random.key(0), tokens)  # under tracing the ids are unknown: no check
  with pytest.raises(ValueError, match=r"first out-of-range id is 16 at batch row 1, column 1"):
    model.init(jax.random.key(0), tokens)


def _text_data(files: str, seq_len: int, val_fraction: float = 0.0) -> ml_collections.ConfigDict:
  config = get_config("transformer:task=text")
  config.data.files = files
  config.data.seq_len = seq_len
  config.data.val_fraction = val_fraction
  return config.data


def test_glob_matching_nothing(tmp_path):
  pattern = str(tmp_path / "nothing*.txt")
  with pytest.raises(ValueError, match=r"data\.files='.*nothing\*\.txt' matches no file"):
    pipeline.create_train_iterator(_text_data(pattern, 16), batch_size=1, seed=0)


def test_empty_corpus(tmp_path):
  for name in ("a.txt", "b.txt"):
    (tmp_path / name).write_bytes(b"")
  pattern = str(tmp_path / "*.txt")
  with pytest.raises(ValueError, match=r"data\.files='.*\*\.txt': the corpus is empty: the 2 matching file\(s\)"):
    pipeline.create_train_iterator(_text_data(pattern, 16), batch_size=1, seed=0)
  with pytest.raises(ValueError, match="the corpus is empty"):
    pipeline.create_eval_batches(_text_data(pattern, 16, 0.1), batch_size=1)


def test_corpus_shorter_than_a_row(tmp_path):
  (tmp_path / "a.txt").write_text("short text")  # 10 bytes + EOS = 11 tokens
  pattern = str(tmp_path / "*.txt")
  with pytest.raises(ValueError, match=r"the train split has 11 tokens, fewer than data\.seq_len \+ 1 = 17"):
    pipeline.create_train_iterator(_text_data(pattern, 16), batch_size=1, seed=0)
  train, _ = text.local_text_sources(pattern, seq_len=10, val_fraction=0.0, tokenizer=ByteTokenizer())
  assert len(train) == 1  # 11 tokens fill exactly one row of 10 + 1


def test_mqar_setting_that_does_not_fit_names_the_setting():
  with pytest.raises(ValueError, match=r"setting \(seq_len=32, num_kv_pairs=16\) of data\.mqar\.settings cannot be "
                                       r"generated: seq_len=32 is too short for num_kv_pairs=16"):
    synthetic.mqar_mixture(seed=0, split="train", vocab_size=256, settings=[(64, 4), (32, 16)],
                           num_examples_per_setting=2, seq_len=64)
  with pytest.raises(ValueError, match=r"setting \(seq_len=64, num_kv_pairs=4\) of data\.mqar\.eval_settings "
                                       r"cannot be generated: vocab_size=8 is too small"):
    synthetic.mqar_eval_sets(seed=0, vocab_size=8, eval_settings=[(64, 4)], num_examples=2, seq_len=64)
