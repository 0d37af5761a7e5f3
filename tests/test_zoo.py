"""experiments.zoo end to end on one tiny model: stage by stage, each stage trained, evaluated at its own
checkpoint and compared."""

import json
import os
import shutil
import subprocess

import pytest

from experiments import archive, zoo
from memarch.train import checkpoint_steps

pytestmark = pytest.mark.timeout(300)


def tiny_zoo_args(stages: str, lrs: str, *extra: str) -> list[str]:
  """A zoo on MQAR small enough for a test: tiny batches, data and evaluation, generated in memory."""
  return ["--tasks", "mqar256", "--stages", stages, "--lrs", lrs, "--lengths", "64", "--num_examples", "2",
          "--set", "train.batch_size=2", "--set", "optim.warmup_steps=1", "--set", "eval.max_batches=1", *extra,
          "--set", "data.mqar.num_train_examples=64", "--set", "data.mqar.num_eval_examples=4",
          "--set", "data.mqar.use_tfds=False"]


def test_zoo_writes_a_table_per_stage_at_its_step_and_resumes(tmp_path, monkeypatch):
  cfg = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "configs", "transformer.py"))
  monkeypatch.setattr(zoo, "ZOO", {"transformer": f"{cfg}:size=tiny"})
  monkeypatch.chdir(tmp_path)
  # A checkpoint every step and only the latest kept: the stage checkpoints (2, 4) must outlive step 3.
  args = tiny_zoo_args("2,4", "3e-3", "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=1")
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
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  run = str(tmp_path / "run")
  assert zoo.stage_checkpoint(run, 950) == 950
  assert zoo.stage_checkpoint(run, 250) == 900
  assert zoo.stage_checkpoint(run, 2000) == 1000
  # A run restored from the archive has no checkpoints: its stage's own step (where its evaluation was kept).
  assert zoo.stage_checkpoint(str(tmp_path / "restored"), 250) == 250
  # Trained past a stage evaluated before (its checkpoint gone): the stage is its kept evaluation's step, so a
  # zoo re-run over every stage reuses it instead of evaluating a later checkpoint as that stage.
  (tmp_path / "run" / "eval").mkdir()
  (tmp_path / "run" / "eval" / "results_step250.json").write_text("{}")
  assert zoo.stage_checkpoint(run, 250) == 250 and zoo.stage_checkpoint(run, 500) == 900


def test_zoos_run_with_only_share_their_tables(tmp_path, monkeypatch):
  """A zoo training one model (--only b) tabulates every model that has finished the stage (a, trained by
  another --only zoo), and trains nothing of it again."""
  cfg = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "configs", "transformer.py"))
  monkeypatch.setattr(zoo, "ZOO", {"a": f"{cfg}:size=tiny", "b": f"{cfg}:size=tiny,window=8"})
  monkeypatch.chdir(tmp_path)
  args = tiny_zoo_args("1", "3e-3")
  zoo.main([*args, "--only", "a"])
  result = os.path.join("runs", "sweep_mqar256", "a", "lr0.003", "result_step1.json")
  mtime = os.path.getmtime(result)
  assert zoo.stage_finished("mqar256", "a", 1, [3e-3]) and not zoo.stage_finished("mqar256", "b", 1, [3e-3])
  zoo.main([*args, "--only", "b"])
  with open(os.path.join("bench_results", "zoo_mqar256_step1.json")) as f:
    assert [r["run"] for r in json.load(f)["runs"]] == ["a/lr0.003", "b/lr0.003"]
  assert os.path.getmtime(result) == mtime


def test_a_model_another_zoo_finishes_meanwhile_joins_the_table(tmp_path, monkeypatch):
  """Zoos finishing out of order: zoo A (--only a) starts, zoo B (--only b) trains and evaluates b while A trains;
  A's table shows both, and A evaluates only a."""
  cfg = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "configs", "transformer.py"))
  monkeypatch.setattr(zoo, "ZOO", {"a": f"{cfg}:size=tiny", "b": f"{cfg}:size=tiny,window=8"})
  monkeypatch.chdir(tmp_path)
  args = tiny_zoo_args("1", "3e-3")
  stage_sweep, evaluate = zoo.stage_sweep, zoo.evaluate.evaluate
  evaluated = []

  def zoo_b_runs_meanwhile(task, steps, models, a):
    if list(models) == ["a"] and not evaluated:  # zoo A's first sweep: zoo B runs to its end beside it
      zoo.main([*args, "--only", "b"])
      assert evaluated == ["b"]
    return stage_sweep(task, steps, models, a)

  monkeypatch.setattr(zoo, "stage_sweep", zoo_b_runs_meanwhile)
  monkeypatch.setattr(zoo.evaluate, "evaluate",
                      lambda workdir, **k: (evaluated.append(workdir.split(os.sep)[-2]), evaluate(workdir, **k)))
  zoo.main([*args, "--only", "a"])
  assert evaluated == ["b", "a"]
  with open(os.path.join("bench_results", "zoo_mqar256_step1.json")) as f:
    assert [r["run"] for r in json.load(f)["runs"]] == ["a/lr0.003", "b/lr0.003"]


def test_status_counts_each_lr_and_the_hours_left(tmp_path, monkeypatch, capsys):
  """--status from the run directories alone: finished, diverged and resumable runs, evaluated stages, and the
  CPU hours left at the zoo-cost benchmark's speed."""
  monkeypatch.chdir(tmp_path)
  root = tmp_path / "runs" / "sweep_passkey1k"
  for lr, name in (("0.001", "result_step250.json"), ("0.01", "diverged.json")):
    (root / "a" / f"lr{lr}").mkdir(parents=True)
    (root / "a" / f"lr{lr}" / name).write_text("{}")
  (root / "a" / "lr0.001" / "checkpoints").mkdir()
  (root / "b" / "lr0.001" / "checkpoints").mkdir(parents=True)
  (root / "a" / "lr0.001" / "eval").mkdir()
  (root / "a" / "lr0.001" / "eval" / "results_step250.json").write_text(
      json.dumps({"step": 250, "tasks": ["passkey"], "lengths": [1024]}))
  steps = {str(root / "a" / "lr0.001"): [50, 250], str(root / "b" / "lr0.001"): [50, 100]}
  monkeypatch.setattr("memarch.train.checkpoint_steps", lambda w: steps[os.path.abspath(w)])
  cost = tmp_path / "cost.json"
  cost.write_text(json.dumps({"rows": [{"task": "passkey1k", "model": "b", "seq": 1024, "protocol_batch": 16,
                                        "tokens_per_cpu_s": 1024 * 16 / 3.6}]}))
  st = zoo.status(["passkey1k"], [250, 500], [1e-3, 1e-2], ["a", "b"], cost_path=str(cost))
  rows = {(r["stage"], r["model"]): r for r in st["rows"]}
  a250, b250, a500 = rows[(250, "a")], rows[(250, "b")], rows[(500, "a")]
  assert a250["runs"] == {"0.001": "done", "0.01": "diverged"} and a250["evaluated"] and a250["steps_left"] == 0
  # b: lr 1e-3 resumes from 100, lr 1e-2 has not started; 3.6 CPU s a step.
  assert b250["runs"] == {"0.001": "at 100", "0.01": "at 0"} and not b250["evaluated"]
  assert b250["steps_left"] == 150 + 250 and b250["cpu_h_left"] == pytest.approx(400 * 3.6 / 3600)
  # a at 500: the diverged lr stays diverged, the finished one resumes from its step-250 checkpoint; no cost row.
  assert a500["runs"] == {"0.001": "at 250", "0.01": "diverged"} and a500["cpu_h_left"] is None
  zoo.report_status(st, out=str(tmp_path / "status.json"))
  assert "passkey1k stage 250: 1/2 models evaluated; 0.4 CPU h of training left" in capsys.readouterr().out
  assert json.load(open(tmp_path / "status.json"))["rows"][0]["model"] == "a"


def test_a_fresh_checkout_restores_the_archived_stage_and_trains_nothing(tmp_path, monkeypatch, capsys):
  """The records of every finished run and the stage table go to the tracked archive; with runs/ gone (a new
  machine), the zoo restores them and neither trains nor evaluates again; an archived run of another protocol
  is not restored."""
  cfg = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "configs", "transformer.py"))
  monkeypatch.setattr(zoo, "ZOO", {"transformer": f"{cfg}:size=tiny"})
  monkeypatch.chdir(tmp_path)
  args = tiny_zoo_args("2", "3e-3,1e-2")
  zoo.main(args)
  kept = os.path.join("results", "zoo", "mqar256", "transformer")
  with open(os.path.join("bench_results", "zoo_mqar256_step2.json")) as f:
    before = json.load(f)["runs"]
  best = before[0]["run"].split("/")[1]
  assert sorted(os.listdir(os.path.join(kept, best))) == ["config.json", "eval", "metrics.jsonl", "provenance.json",
                                                          "result_step2.json"]  # no checkpoints or events
  assert os.listdir(os.path.join(kept, best, "eval")) == ["results_step2.json"]
  other = {"lr0.003", "lr0.01"} - {best}
  assert "result_step2.json" in os.listdir(os.path.join(kept, other.pop()))  # every lr, not only the best
  with open(os.path.join(kept, best, "provenance.json")) as f:
    assert "commit" in json.load(f)
  with open(os.path.join("results", "zoo", "zoo_mqar256_step2.json")) as f:
    assert [r["run"] for r in json.load(f)["runs"]] == [r["run"] for r in before]
  with open(os.path.join("results", "zoo", "README.md")) as f:  # the index of every archived stage table
    index = f.read()
  assert "## mqar256, stage 2 (1 models)" in index and f"| {before[0]['run']} |" in index

  shutil.rmtree("runs")
  shutil.rmtree("bench_results")

  def refuse(*a, **k):
    raise AssertionError("a restored stage was trained or evaluated again")

  monkeypatch.setattr("memarch.train.train_and_evaluate", refuse)
  monkeypatch.setattr(zoo.evaluate, "evaluate", refuse)
  zoo.main(args)
  assert "restored the records of 2 runs" in capsys.readouterr().out
  with open(os.path.join("bench_results", "zoo_mqar256_step2.json")) as f:
    after = json.load(f)["runs"]
  for key in ("run", "step", "accuracy", "teacher_forced_accuracy", "train_tokens_per_sec", "params"):
    assert [r[key] for r in after] == [r[key] for r in before], key
  st = zoo.status(["mqar256"], [2], [3e-3, 1e-2], ["transformer"])
  assert st["rows"][0]["evaluated"] and st["rows"][0]["steps_left"] == 0

  # Another protocol (batch 4): the archived runs are not restored, and say why.
  shutil.rmtree("runs")
  zoo.main([*args, "--set", "train.batch_size=4", "--status"])
  out = capsys.readouterr().out
  assert "not restoring" in out and "train.batch_size" in out and not os.path.exists("runs")


def test_a_parked_run_resumes_in_a_fresh_checkout_and_is_dropped_once_finished(tmp_path, monkeypatch, capsys):
  """A zoo stopped in the middle of a stage (here after 3 of 4 steps), parked: a fresh checkout restores the
  checkpoint and trains only the last step; the archive drops the parked checkpoint once the stage is archived.
  `--park --finished` keeps a finished stage's checkpoint for the next stage."""
  import memarch.train

  cfg = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "configs", "transformer.py"))
  monkeypatch.setattr(zoo, "ZOO", {"transformer": f"{cfg}:size=tiny"})
  monkeypatch.chdir(tmp_path)
  args = tiny_zoo_args("4", "3e-3")
  real = memarch.train.train_and_evaluate
  started = []

  def stopped_after_3(config, workdir, **k):  # the session ends: a checkpoint at step 3, then the process is gone
    real(config, workdir, stop_after=3)
    raise KeyboardInterrupt

  monkeypatch.setattr(memarch.train, "train_and_evaluate", stopped_after_3)
  with pytest.raises(KeyboardInterrupt):
    zoo.main(args)
  run = os.path.join("runs", "sweep_mqar256", "transformer", "lr0.003")
  kept = os.path.join("results", "zoo", "mqar256", "transformer", "lr0.003")
  assert checkpoint_steps(run)[-1] == 3 and not os.path.exists(kept)
  zoo.main([*args, "--park"])
  assert "parked the checkpoints of mqar256/transformer/lr0.003 at step 3" in capsys.readouterr().out
  assert archive.parked_step(kept) == 3 and os.path.exists(os.path.join(kept, "config.json"))
  zoo.main([*args, "--park"])  # parked already: nothing changes
  assert archive.parked_step(kept) == 3
  with open(os.path.join(run, "metrics.jsonl"), "a") as f:  # a record written since (e.g. an evaluation's)
    f.write('{"step": 3, "split": "eval"}\n')
  zoo.main([*args, "--park"])  # the same step parked again: the new records are archived all the same
  with open(os.path.join(run, "metrics.jsonl")) as f, open(os.path.join(kept, "metrics.jsonl")) as g:
    assert f.read() == g.read()

  shutil.rmtree("runs")  # a fresh checkout

  def resumed(config, workdir, **k):
    started.append(checkpoint_steps(workdir))
    return real(config, workdir, **k)

  monkeypatch.setattr(memarch.train, "train_and_evaluate", resumed)
  zoo.main(args)
  assert "restored the parked checkpoints of mqar256/transformer/lr0.003 at step 3" in capsys.readouterr().out
  assert started == [[3]]  # resumed at step 3, not 0
  assert os.path.exists(os.path.join(kept, "result_step4.json")) and archive.parked_step(kept) is None
  assert not os.path.exists(os.path.join(kept, archive.INTEGRITY))
  zoo.main([*args, "--park"])  # a finished stage is not parked by default
  assert "nothing to park" in capsys.readouterr().out and archive.parked_step(kept) is None
  zoo.main([*args, "--park", "--finished"])  # nor with --finished when it is the last stage, evaluated
  assert "nothing to park" in capsys.readouterr().out and archive.parked_step(kept) is None

  # Trained to the last stage but stopped before its evaluation: --finished parks that checkpoint (the evaluation
  # needs it), and a fresh checkout evaluates the stage there without training it again.
  for d in (run, kept):
    shutil.rmtree(os.path.join(d, "eval"))
  zoo.main([*args, "--park"])
  assert "nothing to park" in capsys.readouterr().out
  zoo.main([*args, "--park", "--finished"])
  assert "parked the checkpoints of mqar256/transformer/lr0.003 at step 4" in capsys.readouterr().out
  assert archive.parked_step(kept) == 4
  shutil.rmtree("runs")

  def refuse(*a, **k):
    raise AssertionError("a finished stage was trained again")

  monkeypatch.setattr(memarch.train, "train_and_evaluate", refuse)
  zoo.main(args)
  assert "restored the parked checkpoints of mqar256/transformer/lr0.003 at step 4" in capsys.readouterr().out
  assert os.path.exists(os.path.join(kept, "eval", "results_step4.json"))
  assert zoo.stage_evaluated("mqar256", "transformer", 4, [3e-3])
  monkeypatch.setattr(memarch.train, "train_and_evaluate", resumed)

  # With a later stage to go, --finished parks the finished stage's checkpoint: re-archiving the stage keeps it,
  # a fresh checkout resumes the next stage there, and it is dropped once that stage is archived.
  later = [*args, "--stages", "4,6"]
  zoo.main([*later, "--park", "--finished"])
  assert "parked the checkpoints of mqar256/transformer/lr0.003 at step 4" in capsys.readouterr().out
  assert archive.parked_step(kept) == 4
  archive.save(run, kept)
  assert archive.parked_step(kept) == 4
  shutil.rmtree("runs")
  started.clear()
  zoo.main(later)
  assert "restored the parked checkpoints of mqar256/transformer/lr0.003 at step 4" in capsys.readouterr().out
  assert started == [[4]]  # stage 6 resumed at step 4, not trained again from step 0
  assert os.path.exists(os.path.join(kept, "result_step6.json")) and archive.parked_step(kept) is None


def test_archive_copies_records_only_and_restore_keeps_the_runs_own(tmp_path):
  run, kept = tmp_path / "run", tmp_path / "kept"
  for rel in ("config.json", "metrics.jsonl", "result_step4.json", "eval/results_step4.json", "eval/results.json",
              "eval/mqar.png", "checkpoints/4/state", "tensorboard/events.out"):
    (run / rel).parent.mkdir(parents=True, exist_ok=True)
    (run / rel).write_text(rel)
  assert archive.save(str(run), str(kept)) == ["config.json", "eval/results_step4.json", "metrics.jsonl",
                                               "result_step4.json"]
  assert not (kept / "checkpoints").exists() and (kept / "provenance.json").exists()
  # Saved again unchanged: nothing copied, the provenance (its time) left as it was; a grown record is copied.
  provenance = (kept / "provenance.json").read_text()
  (kept / "provenance.json").write_text(provenance.replace('"saved"', '"kept"'))
  assert archive.save(str(run), str(kept)) == [] and '"kept"' in (kept / "provenance.json").read_text()
  (run / "metrics.jsonl").write_text("metrics.jsonl\nmore")
  assert archive.save(str(run), str(kept)) == ["metrics.jsonl"] and '"saved"' in (kept / "provenance.json").read_text()
  (run / "metrics.jsonl").write_text("metrics.jsonl")
  fresh = tmp_path / "fresh"
  (fresh / "eval").mkdir(parents=True)
  (fresh / "metrics.jsonl").write_text("newer")
  assert archive.restore(str(kept), str(fresh)) == ["config.json", "eval/results_step4.json", "result_step4.json"]
  assert (fresh / "metrics.jsonl").read_text() == "newer" and (fresh / "result_step4.json").read_text() == \
      "result_step4.json"
  with pytest.raises(FileNotFoundError, match="no run records"):
    archive.save(str(tmp_path / "empty"), str(tmp_path / "x"))


def test_provenance_commit_is_dirty_only_when_code_changed(tmp_path):
  git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)
  git("init", "-q")
  (tmp_path / "model.py").write_text("x = 1\n")
  (tmp_path / "result.json").write_text("{}")
  git("add", ".")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
  head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
  (tmp_path / "result.json").write_text('{"step": 2}')  # a tracked record the zoo rewrote
  assert archive.git_commit(str(tmp_path)) == head.strip()
  (tmp_path / "model.py").write_text("x = 2\n")
  assert archive.git_commit(str(tmp_path)) == head.strip() + "+dirty"
  assert archive.git_commit(str(tmp_path / "nowhere")) is None
