"""experiments.nonfinite: replaying a saved batch names the first module whose output is non-finite."""

import numpy as np
import pytest

from experiments import nonfinite, sweep
from memarch import train

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  c = sweep.prepare("configs/transformer.py:size=tiny", "mqar256", [], 1e-3)
  for item in ["train.steps=2", "train.batch_size=2", "eval.max_batches=1", "model.embed_dim=32",
               "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1", "data.mqar.use_tfds=False",
               "data.mqar.num_train_examples=16", "data.mqar.num_eval_examples=4"]:
    sweep.apply_override(c, item)
  train.train_and_evaluate(c, workdir)
  return workdir


def _batch(seq_len=256, token=7, at=5):
  inputs = np.full((2, seq_len), 3, np.int32)
  inputs[0, at] = token
  return {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1), "loss_mask": np.ones_like(inputs, np.float32)}


def test_the_first_nonfinite_module_and_position_are_named(run):
  _, model, params, _ = train.load_run(run)
  batch = _batch()
  _, rows = nonfinite.module_outputs(model, params, batch)
  assert nonfinite.first_nonfinite(rows) is None and all(r["absmax"] > 0 for r in rows)
  poisoned = dict(params, embedding=params["embedding"].at[7].set(np.nan))  # token 7, at t = 5 of row 0
  logits, rows = nonfinite.module_outputs(model, poisoned, batch)
  first = nonfinite.first_nonfinite(rows)
  assert first["module"] == rows[0]["module"] and first["first_bad_position"] == 5, rows[:3]
  # The other row is untouched but for token 7's logit (the embedding is tied to the output layer).
  assert np.isfinite(np.delete(np.asarray(logits)[1], 7, axis=-1)).all()


def test_main_replays_the_saved_batch(run, capsys):
  with pytest.raises(FileNotFoundError, match="nonfinite_batch_step"):
    nonfinite.main([run])
  np.savez(f"{run}/nonfinite_batch_step2.npz", **_batch())
  out = nonfinite.main([run])
  assert out["first"] is None and out["bad_rows"] == [] and np.isfinite(out["loss"]) and not out["nonfinite_grads"]
  assert "replays finite at checkpoint 2" in capsys.readouterr().out
