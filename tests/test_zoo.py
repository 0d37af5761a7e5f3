"""experiments.zoo end to end on one tiny model: stage by stage, each stage trained, evaluated and compared."""

import json
import os

import pytest

from experiments import zoo

pytestmark = pytest.mark.timeout(240)


def test_zoo_writes_a_table_per_stage_and_resumes(tmp_path, monkeypatch):
  cfg = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "configs", "transformer.py"))
  monkeypatch.setattr(zoo, "ZOO", {"transformer": f"{cfg}:size=tiny"})
  monkeypatch.chdir(tmp_path)
  args = ["--tasks", "mqar256", "--stages", "2,3", "--lrs", "3e-3", "--lengths", "64", "--num_examples", "2",
          "--set", "train.batch_size=2", "--set", "optim.warmup_steps=1", "--set", "eval.max_batches=1",
          "--set", "data.mqar.num_train_examples=64", "--set", "data.mqar.num_eval_examples=4",
          "--set", "data.mqar.use_tfds=False"]
  zoo.main(args)
  run = os.path.join("runs", "sweep_mqar256", "transformer", "lr0.003")
  with open(os.path.join(run, "eval", "results.json")) as f:
    assert json.load(f)["step"] == 3  # evaluated again after the last stage
  assert os.path.exists(os.path.join("bench_results", "zoo_mqar256.md"))
  mtime = os.path.getmtime(os.path.join(run, "eval", "results.json"))
  zoo.main(args)  # everything done: nothing retrained, nothing re-evaluated
  assert os.path.getmtime(os.path.join(run, "eval", "results.json")) == mtime
  # A protocol change is refused for the existing run directories, naming the difference.
  with pytest.raises(ValueError, match="train.batch_size"):
    zoo.main([*args, "--set", "train.batch_size=4", "--stages", "4"])
