"""experiments.zoo end to end on one tiny model: stage by stage, each stage trained, evaluated at its own
checkpoint and compared."""

import json
import os

import pytest

from experiments import zoo
from memarch.train import checkpoint_steps

pytestmark = pytest.mark.timeout(300)


def test_zoo_writes_a_table_per_stage_at_its_step_and_resumes(tmp_path, monkeypatch):
  cfg = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "configs", "transformer.py"))
  monkeypatch.setattr(zoo, "ZOO", {"transformer": f"{cfg}:size=tiny"})
  monkeypatch.chdir(tmp_path)
  # A checkpoint every step and only the latest kept: the stage checkpoints (2, 4) must outlive step 3.
  args = ["--tasks", "mqar256", "--stages", "2,4", "--lrs", "3e-3", "--lengths", "64", "--num_examples", "2",
          "--set", "train.batch_size=2", "--set", "optim.warmup_steps=1", "--set", "eval.max_batches=1",
          "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=1",
          "--set", "data.mqar.num_train_examples=64", "--set", "data.mqar.num_eval_examples=4",
          "--set", "data.mqar.use_tfds=False"]
  zoo.main(args)
  run = os.path.join("runs", "sweep_mqar256", "transformer", "lr0.003")
  assert checkpoint_steps(run) == [2, 4]
  for steps in (2, 4):
    with open(os.path.join("bench_results", f"zoo_mqar256_step{steps}.json")) as f:
      assert [r["step"] for r in json.load(f)["runs"]] == [steps]  # each stage's table at its own checkpoint
  with open(os.path.join("bench_results", "zoo_mqar256.json")) as f:
    assert [r["step"] for r in json.load(f)["runs"]] == [4]
  with open(os.path.join(run, "eval", "results.json")) as f:
    assert json.load(f)["step"] == 4
  # Everything done: nothing retrained, nothing re-evaluated (stage 2's evaluation is the kept one).
  kept = {s: os.path.getmtime(os.path.join(run, "eval", f"results_step{s}.json")) for s in (2, 4)}
  zoo.main(args)
  assert {s: os.path.getmtime(os.path.join(run, "eval", f"results_step{s}.json")) for s in (2, 4)} == kept
  assert checkpoint_steps(run) == [2, 4]
  # A protocol change is refused for the existing run directories, naming the difference.
  with pytest.raises(ValueError, match="train.batch_size"):
    zoo.main([*args, "--set", "train.batch_size=4", "--stages", "6"])


def test_stage_checkpoint_falls_back_to_the_earliest_after_the_stage(tmp_path, monkeypatch):
  monkeypatch.setattr("memarch.train.checkpoint_steps", lambda workdir: [900, 950, 1000])
  assert zoo.stage_checkpoint("run", 950) == 950
  assert zoo.stage_checkpoint("run", 250) == 900
  assert zoo.stage_checkpoint("run", 2000) == 1000


def test_zoos_run_with_only_share_their_tables(tmp_path, monkeypatch):
  """A zoo training one model (--only b) tabulates every model that has finished the stage (a, trained by
  another --only zoo), and trains nothing of it again."""
  cfg = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "configs", "transformer.py"))
  monkeypatch.setattr(zoo, "ZOO", {"a": f"{cfg}:size=tiny", "b": f"{cfg}:size=tiny,window=8"})
  monkeypatch.chdir(tmp_path)
  args = ["--tasks", "mqar256", "--stages", "1", "--lrs", "3e-3", "--lengths", "64", "--num_examples", "2",
          "--set", "train.batch_size=2", "--set", "optim.warmup_steps=1", "--set", "eval.max_batches=1",
          "--set", "data.mqar.num_train_examples=64", "--set", "data.mqar.num_eval_examples=4",
          "--set", "data.mqar.use_tfds=False"]
  zoo.main([*args, "--only", "a"])
  result = os.path.join("runs", "sweep_mqar256", "a", "lr0.003", "result_step1.json")
  mtime = os.path.getmtime(result)
  assert zoo.stage_finished("mqar256", "a", 1, [3e-3]) and not zoo.stage_finished("mqar256", "b", 1, [3e-3])
  zoo.main([*args, "--only", "b"])
  with open(os.path.join("bench_results", "zoo_mqar256_step1.json")) as f:
    assert [r["run"] for r in json.load(f)["runs"]] == ["a/lr0.003", "b/lr0.003"]
  assert os.path.getmtime(result) == mtime
