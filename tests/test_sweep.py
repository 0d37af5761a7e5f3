"""The sweep's config handling: shared task data, overrides on locked configs, protocol errors before training."""

import pytest

from experiments import sweep

pytestmark = pytest.mark.timeout(60)


def test_prepare_applies_task_overrides_and_lr():
  c = sweep.prepare("configs/transformer.py:size=tiny", "mqar256", ["train.steps=7", "train.batch_size=8"], 0.01)
  assert c.data.seq_len == 256 and c.model.max_len == 256
  assert c.data.mqar.settings == ((256, 16), (256, 32), (256, 64))
  assert (c.train.steps, c.train.batch_size, c.optim.lr) == (7, 8, 0.01)


def test_unknown_override_names_valid_keys():
  with pytest.raises(KeyError, match="valid"):
    sweep.prepare("configs/transformer.py:size=tiny", None, ["train.stepz=7"], 0.01)


def test_configs_must_share_the_protocol():
  with pytest.raises(ValueError, match="same protocol"):
    sweep.main(["--name", "x", "--lrs", "1e-3", "--configs", "a=configs/transformer.py:size=tiny",
                "b=configs/transformer.py:size=small"])


def test_model_sizes_counts_params_and_cache():
  c = sweep.prepare("configs/transformer.py:size=tiny", "mqar256", [], 0.01)
  params, state = sweep.model_sizes(c)
  # 2 attention layers, KV cache: 2 (k, v) x 256 slots x 2 kv heads x 16 dims x 4 bytes per layer, + the index.
  assert state == 2 * 2 * 256 * 2 * 16 * 4 + 4
  assert params > 0


def test_passkey_task_evaluates_beyond_the_training_length():
  c = sweep.prepare("configs/transformer.py:size=tiny", "passkey1k", [], 0.01)
  assert c.data.name == "passkey" and c.model.max_len == 1024
  assert tuple(c.data.passkey.eval_lengths) == (1024, 4096, 16384)
