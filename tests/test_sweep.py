"""The sweep's config handling: shared task data, overrides on locked configs, protocol errors before training."""

import json
import os

import pytest

from experiments import sweep
from memarch import data as data_lib

pytestmark = pytest.mark.timeout(60)


def test_prepare_applies_task_overrides_and_lr():
  c = sweep.prepare("configs/transformer.py:size=tiny", "mqar256", ["train.steps=7", "train.batch_size=8"], 0.01)
  assert c.data.seq_len == 256 and c.model.max_len == 256
  assert c.data.mqar.settings == ((64, 4), (128, 8), (256, 16), (256, 32), (256, 64))  # Zoology's mixture
  assert c.data.mqar.eval_settings == ((256, 16), (256, 32), (256, 64))
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


def test_a_run_of_another_protocol_is_not_resumed(tmp_path):
  """A run trained at batch 8 is not extended by a batch-16 sweep: the error names the difference."""
  from memarch.train import save_config
  old = sweep.prepare("configs/transformer.py:size=tiny", "mqar256", ["train.batch_size=8"], 0.01)
  save_config(old, str(tmp_path))
  same = sweep.prepare("configs/transformer.py:size=tiny", "mqar256", ["train.batch_size=8", "train.steps=99"], 0.01)
  sweep.check_resumable(same, str(tmp_path))  # only the step count differs: resumable
  new = sweep.prepare("configs/transformer.py:size=tiny", "mqar256", ["train.batch_size=16"], 0.01)
  with pytest.raises(ValueError, match=r"train\.batch_size: the run has 8, this sweep 16"):
    sweep.check_resumable(new, str(tmp_path))
  other_lr = sweep.prepare("configs/transformer.py:size=tiny", "mqar256", ["train.batch_size=8"], 0.003)
  with pytest.raises(ValueError, match=r"optim\.lr"):
    sweep.check_resumable(other_lr, str(tmp_path))
  # The model section as a checkpoint's: a layout key, or a key added later at its old default, is the same
  # run; another model is not.
  layout = sweep.prepare("configs/transformer.py:size=tiny", "mqar256", ["train.batch_size=8", "model.remat=True"],
                         0.01)
  sweep.check_resumable(layout, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  saved["model"].pop("memory_optimizer", None)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  added = sweep.prepare("configs/transformer.py:size=tiny", "mqar256", ["train.batch_size=8"], 0.01)
  with added.unlocked():
    added.model.memory_optimizer = "momentum"
  sweep.check_resumable(added, str(tmp_path))
  deeper = sweep.prepare("configs/transformer.py:size=tiny", "mqar256", ["train.batch_size=8", "model.num_layers=3"],
                         0.01)
  with pytest.raises(ValueError, match=r"model\.num_layers"):
    sweep.check_resumable(deeper, str(tmp_path))


def test_niah_task_evaluates_beyond_the_training_length():
  c = sweep.prepare("configs/transformer.py:size=tiny", "niah1k", [], 0.01)
  assert c.data.name == "niah" and c.data.qa.flavour == "noise" and c.model.max_len == 1024
  assert tuple(c.data.qa.eval_lengths) == (1024, 4096, 16384)


@pytest.mark.parametrize("task", ["babilong_qa1", "babilong_qa2"])
def test_babilong_tasks_fit_the_training_rows_and_evaluate_at_4x(task):
  c = sweep.prepare("configs/titans.py:variant=lmm,size=tiny", task, [], 0.01)
  assert c.data.name == "babilong" and c.data.qa.task == task[-3:] and c.model.max_len == 256
  assert tuple(c.data.qa.eval_lengths) == (256, 1024)
  batch = next(data_lib.create_train_iterator(c.data, batch_size=2, seed=0))
  assert batch["inputs"].shape == (2, 256) and batch["loss_mask"].sum() > 0
  evals = data_lib.create_eval_batches(c.data, batch_size=8, max_batches=1)
  assert sorted(evals) == [f"babilong_{task[-3:]}_T1024", f"babilong_{task[-3:]}_T256"]
  assert evals[f"babilong_{task[-3:]}_T1024"][0]["inputs"].shape == (8, 1024)


@pytest.mark.timeout(240)
def test_stages_extend_runs_and_match_a_straight_run(tmp_path, monkeypatch):
  """--stages 3,6 trains to step 3, then resumes every run to step 6: the stage-6 result equals that of a run
  trained straight to 6 (constant schedule, data position restored), and a re-run retrains nothing."""
  monkeypatch.chdir(tmp_path)
  cfg = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "transformer.py")
  common = ["--lrs", "3e-3", "--set", "train.batch_size=2", "--set", "optim.schedule=constant",
            "--set", "optim.warmup_steps=2", "--set", "eval.max_batches=1", "--set", "train.eval_every=0",
            "--set", "data.mqar.num_train_examples=64", "--set", "data.mqar.num_eval_examples=4",
            "--set", "data.mqar.use_tfds=False", "--task", "mqar256"]
  staged = sweep.main(["--name", "staged", "--stages", "3,6", "--configs", f"tf={cfg}:size=tiny", *common])
  straight = sweep.main(["--name", "straight", "--set", "train.steps=6", "--configs", f"tf={cfg}:size=tiny", *common])
  assert staged["protocol"]["steps"] == 6
  assert os.path.exists("bench_results/sweep_staged_steps3.json") and os.path.exists("bench_results/sweep_staged_stages.png")
  a, b = staged["runs"][0]["eval"], straight["runs"][0]["eval"]
  assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)
  with open(os.path.join(staged["runs"][0]["workdir"], "result_step3.json")) as f:
    assert json.load(f)["step"] == 3
  again = sweep.main(["--name", "staged", "--stages", "3,6", "--configs", f"tf={cfg}:size=tiny", *common])
  assert again["runs"][0]["eval"] == staged["runs"][0]["eval"]


def _run(lr, acc, exact=None, diverged=False):
  ev = {} if diverged else {"a/accuracy": acc, "b/accuracy": acc, **({"a/exact": exact, "b/exact": exact}
                                                                      if exact is not None else {})}
  return {"lr": lr, "eval": ev, "diverged": diverged}


def test_best_lr_is_chosen_by_the_task_metric():
  # Token accuracy and exact match disagree: a QA sweep picks by exact match, MQAR by token accuracy.
  runs = [_run(1e-3, 0.9, 0.0), _run(3e-3, 0.8, 0.5), _run(1e-2, None, diverged=True)]
  assert sweep.best_run(runs, "exact") == (runs[1], "exact")
  assert sweep.best_run(runs, "accuracy") == (runs[0], "accuracy")
  assert sweep.SELECTION_METRIC["passkey1k"] == "exact" and sweep.SELECTION_METRIC["mqar256"] == "accuracy"
  # A result recorded before exact match existed: every lr of that model is ranked by token accuracy.
  old = [_run(1e-3, 0.9), _run(3e-3, 0.8, 0.5)]
  assert sweep.best_run(old, "exact") == (old[0], "accuracy")
  tied = [_run(1e-3, 0.2, 0.0), _run(3e-3, 0.3, 0.0), _run(1e-2, 0.1, 0.0)]
  assert sweep.best_run(tied, "exact") == (tied[1], "exact")  # no lr answers yet: the best token accuracy


def test_report_of_a_model_whose_every_lr_diverged(tmp_path):
  """Such a model (MAG on MQAR at 2000 steps) has no accuracy: the table shows nan, the plot an empty bar."""
  def model(label, acc, diverged=False):
    return {"label": label, "config": label, "best_lr": 1e-3, "selected_by": "accuracy", "diverged": diverged,
            "score": float("nan") if diverged else acc, "mean_accuracy": float("nan") if diverged else acc,
            "mean_exact": float("nan"), "accuracy": {"a": None if diverged else acc}, "exact": {"a": None},
            "all_lrs": {"0.001": float("nan") if diverged else acc}, "tokens_per_sec": 1.0, "state_bytes": 64,
            "params": 10}

  summary = {"name": "t", "protocol": {"task": "mqar256", "steps": 4, "batch_size": 2, "seq_len": 8, "seed": 0,
                                       "lrs": [1e-3], "overrides": []},
             "eval_sets": ["a"], "models": [model("ok", 0.5), model("mag", None, diverged=True)], "runs": []}
  out = tmp_path / "sweep.json"
  sweep.report(summary, str(out))
  assert (tmp_path / "sweep.png").stat().st_size > 0
  with open(out) as f:
    assert [m["diverged"] for m in json.load(f)["models"]] == [False, True]
