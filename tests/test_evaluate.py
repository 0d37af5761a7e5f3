"""experiments.evaluate and experiments.compare end to end on tiny checkpoints trained here (a few steps)."""

import json
import os

import pytest

from configs import common
from experiments import compare, evaluate, sweep

pytestmark = pytest.mark.timeout(180)

TINY = ["train.steps=2", "train.batch_size=2", "eval.max_batches=1", "model.embed_dim=32", "model.num_layers=1",
        "model.num_heads=2", "model.num_kv_heads=1"]


def _train(workdir, data, extra=()):
  from memarch.train import train_and_evaluate

  c = sweep.prepare("configs/transformer.py:size=tiny", None, [], 1e-3)
  with c.unlocked():
    if data is not None:
      c.data = data
      c.model.max_len = data.seq_len
  for item in [*TINY, *extra]:
    sweep.apply_override(c, item)
  train_and_evaluate(c, str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  text = _train(root / "bytes", common.passkey_text_data(seq_len=160, eval_lengths=(160,), eval_depths=(0.5,),
                                                          num_eval_examples=2),
                ["model.position_embedding=learned"])
  mqar = _train(root / "mqar", None, ["data.mqar.num_train_examples=16", "data.mqar.num_eval_examples=4",
                                      "data.mqar.use_tfds=False"])
  return text, mqar


def test_parse_lengths():
  assert evaluate.parse_lengths("1k,4k,512") == [1024, 4096, 512]
  with pytest.raises(ValueError, match="length"):
    evaluate.parse_lengths("1q")


def test_evaluate_byte_model_skips_what_it_cannot_hold(runs):
  text, _ = runs
  res = evaluate.main(["--workdir", text, "--tasks", "mqar,niah,passkey,babilong", "--lengths", "160,320",
                       "--depths", "0,1", "--num_examples", "2", "--batch_size", "2", "--no_progress"])
  assert os.path.exists(os.path.join(text, "eval", "results.json"))
  with open(os.path.join(text, "eval", "results.json")) as f:
    saved = json.load(f)
  assert saved["results"] == json.loads(json.dumps(res["results"]))
  rows = {(r["task"], r["length"], r["depth"]): r for r in res["results"]}
  ok = rows[("niah_noise", 160, 0.0)]
  assert ok["status"] == "ok" and 0 <= ok["accuracy"] <= 1 and ok["num_examples"] == 2 and not ok["extrapolation"]
  assert rows[("passkey_text", 160, 1.0)]["status"] == "ok"
  # Learned positions cover 160 tokens: 320 is skipped with the reason, the rest still ran.
  long = rows[("niah_noise", 320, 0.0)]
  assert long["status"] == "skipped" and "learned position" in long["reason"] and long["extrapolation"]
  assert rows[("mqar", None, None)]["status"] == "skipped" and "MQAR" in rows[("mqar", None, None)]["reason"]
  assert "haystack_file" in rows[("niah_text", None, None)]["reason"]
  assert rows[("babilong_qa3", 160, None)]["status"] == "skipped"  # a qa3 story does not fit in 160 bytes
  for png in ("niah_noise_heatmap.png", "passkey_vs_length.png"):
    assert os.path.getsize(os.path.join(text, "eval", png)) > 0


def test_evaluate_mqar_and_compare(runs, tmp_path):
  text, mqar = runs
  res = evaluate.evaluate(mqar, tasks=["mqar", "niah"], lengths=[64, 128], num_examples=2, batch_size=2,
                          progress=False)
  mq = [r for r in res["results"] if r["task"] == "mqar"]
  assert {(r["length"], r["kv_pairs"]) for r in mq} >= {(64, 16), (128, 32)}
  assert all(r["status"] == "ok" for r in mq) and [r["extrapolation"] for r in mq if r["length"] == 128] == [True]
  assert all(r["status"] == "skipped" and "byte vocabulary" in r["reason"] for r in res["results"]
             if r["task"].startswith("niah"))
  assert os.path.exists(os.path.join(mqar, "eval", "mqar_settings.png"))
  if not os.path.exists(os.path.join(text, "eval", "results.json")):
    evaluate.evaluate(text, tasks=["niah"], lengths=[160], depths=[0.5], num_examples=1, batch_size=1,
                      progress=False)
  out = str(tmp_path / "cmp")
  result = compare.main([text, mqar, "--out", out])
  assert [r["run"] for r in result["runs"]] == ["bytes", "mqar"]
  for r in result["runs"]:
    assert r["params"] > 0 and r["state_bytes_train_length"] > 0 and r["accuracy"]
  assert result["runs"][1]["mqar_accuracy"] is not None
  # tf acc: the training loop's own evaluation at the evaluated step (final_metrics.json holds the same numbers).
  for r, w in zip(result["runs"], (text, mqar)):
    with open(os.path.join(w, "final_metrics.json")) as f:
      final = json.load(f)["eval"]
    accs = [v for k, v in final.items() if k.endswith("/accuracy")]
    assert r["teacher_forced_accuracy"] == pytest.approx(sum(accs) / len(accs))
  assert compare.teacher_forced_accuracy(mqar, 999) is None
  for suffix in (".md", ".json", "_accuracy.png", "_mqar_state.png"):
    assert os.path.getsize(out + suffix) > 0
  with open(out + ".md") as f:
    table = f.read()
  assert "mqar@64" in table and "tf acc" in table


def test_babilong_runs_are_evaluated_on_stories_of_their_training_size():
  """A run trained on 6-fact qa2 stories at 256 bytes is evaluated on 6-fact stories (qa2's default 8 facts do
  not fit 256 bytes); a variant alone is a task."""
  c = sweep.prepare("configs/titans.py:variant=lmm,size=tiny", "babilong_qa2", [], 1e-3)
  cells = evaluate.plan(c, ["babilong_qa2"], [256, 1024], [], "", 2, 0)
  assert [(x["task"], x["length"]) for x in cells] == [("babilong_qa2", 256), ("babilong_qa2", 1024)]
  assert all("skip" not in x for x in cells)
  assert len(cells[0]["make"]()) == 2
  with c.unlocked():
    c.data.qa.num_facts = 0  # the default 8 facts
  with pytest.raises(ValueError, match="too short"):  # reported as skipped by run_cells
    evaluate.plan(c, ["babilong_qa2"], [256], [], "", 2, 0)[0]["make"]()
  with pytest.raises(ValueError, match="babilong_qa1"):
    evaluate.plan(c, ["babilong_qa9"], [256], [], "", 2, 0)


def test_an_evaluation_per_step_is_kept_and_reused(runs, tmp_path):
  """evaluate keeps results_step<N>.json; reuse() makes an earlier step's results.json again without running."""
  import shutil
  src = runs[1]  # the MQAR run
  run = str(tmp_path / "run")
  shutil.copytree(src, run)
  first = evaluate.evaluate(run, tasks=["mqar"], lengths=[64], num_examples=2, progress=False)
  step = first["step"]
  assert evaluate.reuse(run, step) and not evaluate.reuse(run, step + 1)
  assert evaluate.reuse(run, step, ["mqar"], [64]) and not evaluate.reuse(run, step, ["mqar"], [128])
  assert not evaluate.reuse(run, step, ["passkey"])
  with open(os.path.join(run, "eval", "results.json"), "w") as f:
    json.dump({"step": step + 1}, f)  # a later step's evaluation written since
  assert evaluate.reuse(run, step)
  with open(os.path.join(run, "eval", "results.json")) as f:
    assert json.load(f)["results"] == first["results"]
  with pytest.raises(FileNotFoundError, match="no checkpoint at step"):
    evaluate.evaluate(run, tasks=["mqar"], lengths=[64], num_examples=2, progress=False, step=step + 1)


def test_sweep_runs_are_named_by_their_model_label():
  assert compare.run_name("runs/sweep_passkey1k/hmt/lr0.001") == "hmt/lr0.001"
  assert compare.run_name("runs/mqar/") == "mqar"
