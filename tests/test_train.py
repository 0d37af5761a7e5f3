"""The research loop: configs, learning MQAR, exact resume, checkpoint checks, text data, the README command."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import base, transformer
from memarch import sharding
from memarch.metrics import read_metrics
from memarch.train import checkpoint_steps, load_run, make_eval_step, train_and_evaluate
from tests.conftest import REPO, clean_env


def small_config(**train):
  """A very small, fast variant of the tiny config (for loop mechanics, not learning)."""
  c = transformer.get_config("size=tiny")
  c.model.embed_dim, c.model.mlp_dim, c.model.num_layers = 32, 64, 1
  c.data.mqar.num_train_examples, c.data.mqar.num_eval_examples = 512, 64
  c.train.batch_size, c.eval.batch_size = 16, 32
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 8, 2, 0, 4
  c.train.progress, c.train.tensorboard = "none", False
  for k, v in train.items():
    c.train[k] = v
  return c


@pytest.fixture(autouse=True)
def _tfds_dir(tmp_path_factory, monkeypatch):
  # One TFDS build directory for the whole module (building is deterministic, so sharing is safe).
  monkeypatch.setenv("MEMARCH_TFDS_DIR", str(tmp_path_factory.getbasetemp() / "tfds"))


@pytest.mark.timeout(60)
def test_config_overrides_and_errors():
  c = transformer.get_config("size=tiny,task=mqar")
  c.train.steps = 5
  assert c.train.steps == 5
  with pytest.raises(AttributeError, match="steps"):
    c.train.stepz = 5  # locked: the error names the valid keys
  with pytest.raises(TypeError, match="steps"):
    c.train.steps = "many"
  with pytest.raises(ValueError, match="known keys"):
    transformer.get_config("sise=tiny")
  with pytest.raises(ValueError, match="unknown size"):
    transformer.get_config("size=huge")
  bad = base.mesh_config()
  bad.data, bad.tensor = 2, 2
  with pytest.raises(ValueError, match="needs 4 devices"):
    sharding.make_mesh(bad)
  bad.data = -1
  with pytest.raises(ValueError, match="do not divide"):
    sharding.mesh_shape(bad, 5)
  assert sharding.mesh_shape(base.mesh_config(), 8) == (8, 1, 1, 1)


@pytest.mark.timeout(60)
def test_mistyped_override_on_the_command_line_is_an_error(tmp_path):
  cmd = [sys.executable, "-m", "experiments.run", "--config", "configs/transformer.py:size=tiny",
         "--workdir", str(tmp_path), "--config.train.stepz=3"]
  r = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60)
  assert r.returncode != 0
  assert "stepz" in r.stderr and "steps" in r.stderr


@pytest.mark.timeout(420)
def test_tiny_transformer_learns_mqar(tmp_path):
  # A real training run of the default tiny config, in a subprocess with XLA's full optimizations (the
  # test process compiles with fast, unoptimized settings).
  cmd = [sys.executable, "-m", "experiments.run", "--config", "configs/transformer.py:size=tiny",
         "--workdir", str(tmp_path / "run"), "--config.train.eval_every=100", "--config.train.log_every=100"]
  r = subprocess.run(cmd, cwd=REPO, env=clean_env(MEMARCH_TFDS_DIR=str(tmp_path / "tfds")), capture_output=True,
                     text=True, timeout=410)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = read_metrics(str(tmp_path / "run"))
  curve = [(m["step"], round(m["mqar_T64_kv4/accuracy"], 3)) for m in rows if m["split"] == "eval"]
  print("MQAR (64 tokens, 4 pairs) accuracy curve (step, accuracy):", curve)
  final = json.load(open(tmp_path / "run" / "final_metrics.json"))
  assert final["step"] == 1000
  assert final["eval"]["mqar_T64_kv4/accuracy"] >= 0.9, curve


@pytest.mark.timeout(300)
def test_resume_gives_the_same_parameters(tmp_path):
  c = small_config(steps=8, checkpoint_every=3)
  straight = train_and_evaluate(c, str(tmp_path / "straight"))
  first = train_and_evaluate(c, str(tmp_path / "resumed"), stop_after=4)
  assert first.step == 4
  second = train_and_evaluate(c, str(tmp_path / "resumed"))
  assert second.step == 8
  for a, b in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(second.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A finished run restarted does no more steps and reports the restored model's evaluation.
  again = train_and_evaluate(c, str(tmp_path / "resumed"))
  assert again.step == 8 and again.eval_metrics == pytest.approx(second.eval_metrics)
  # A finished run loads at its latest checkpoint, or at a kept one by step; a missing step names those there.
  assert checkpoint_steps(str(tmp_path / "resumed")) == [4, 6, 8]
  *_, params8, step8 = load_run(str(tmp_path / "resumed"))
  *_, params6, step6 = load_run(str(tmp_path / "resumed"), step=6)
  assert (step8, step6) == (8, 6)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params6)))
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 5 .*\[4, 6, 8\]"):
    load_run(str(tmp_path / "resumed"), step=5)


@pytest.mark.timeout(120)
def test_final_checkpoint_is_saved_before_the_evaluation(tmp_path, monkeypatch, capsys):
  """A run stopped during its (long) final evaluation keeps its last steps; each eval set logs a line."""
  import memarch.train as train_lib

  c = small_config(steps=6, checkpoint_every=4, progress="lines")
  real = train_lib.evaluate

  def stopped(*args, **kwargs):
    raise KeyboardInterrupt("stopped during the evaluation")

  monkeypatch.setattr(train_lib, "evaluate", stopped)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(c, str(tmp_path / "run"))
  assert checkpoint_steps(str(tmp_path / "run")) == [4, 6]
  monkeypatch.setattr(train_lib, "evaluate", real)
  done = train_and_evaluate(c, str(tmp_path / "run"))  # nothing left to train: evaluates what was restored
  assert done.step == 6 and done.eval_metrics
  sets = sorted({k.rsplit("/", 1)[0] for k in done.eval_metrics})
  out = capsys.readouterr().out
  assert len(sets) >= 2 and all(f"eval @ 6: {name} (" in out for name in sets)


@pytest.mark.timeout(60)
def test_eval_step_counts_exact_rows():
  """Exact match: the rows whose every loss-masked token is right; rows without a masked token do not count."""

  class Fixed:  # a "model" whose logits predict token 1 everywhere
    def apply(self, variables, inputs, **_):
      return jax.nn.one_hot(np.ones(inputs.shape, np.int32), 4) * 5.0

  targets = np.array([[1, 1, 0, 1], [1, 0, 1, 1], [0, 0, 0, 0]], np.int32)
  mask = np.array([[1, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0]], np.float32)  # row 0 right, row 1 one wrong
  batch = {"inputs": np.zeros_like(targets), "targets": targets, "loss_mask": mask}
  sums = jax.device_get(make_eval_step(Fixed())(None, batch))
  assert (sums["correct_sum"], sums["count"], sums["exact_sum"], sums["rows"]) == (5, 6, 1, 2)


@pytest.mark.timeout(120)
def test_checkpoint_from_a_different_model_is_refused(tmp_path):
  c = small_config(steps=2)
  train_and_evaluate(c, str(tmp_path))
  c.model.embed_dim = 48
  with pytest.raises(ValueError, match=r"different model(.|\n)*model\.embed_dim: checkpoint has 32, config has 48"):
    train_and_evaluate(c, str(tmp_path))


@pytest.mark.timeout(120)
def test_text_training_and_muon(tmp_path):
  docs = tmp_path / "docs"
  docs.mkdir()
  rng = np.random.default_rng(0)
  words = ["memory", "state", "token", "recall", "attention", "gate", "write", "read"]
  for i in range(3):
    (docs / f"{i}.txt").write_text(" ".join(rng.choice(words, size=400)))
  c = transformer.get_config("size=tiny,task=text")
  c.data.files = str(docs / "*.txt")
  c.data.seq_len = c.model.max_len = 32
  c.data.val_fraction = 0.2
  c.model.embed_dim, c.model.mlp_dim, c.model.num_layers = 32, 64, 1
  c.optim.name = "muon"
  c.optim.lr = 0.02
  c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every = 30, 16, 10, 0
  c.train.progress, c.train.checkpoint_every = "lines", 0
  result = train_and_evaluate(c, str(tmp_path / "run"))
  train = [m for m in read_metrics(str(tmp_path / "run")) if m["split"] == "train"]
  assert train[-1]["loss"] < train[0]["loss"]
  assert result.eval_metrics["validation/perplexity"] < 259  # better than uniform over the byte vocabulary
  assert os.path.isdir(tmp_path / "run" / "tensorboard")
  assert os.path.exists(tmp_path / "run" / "config.json")


def readme_command(index: int) -> str:
  with open(os.path.join(REPO, "README.md")) as f:
    blocks = re.findall(r"```bash\n(.*?)\n```", f.read(), flags=re.S)
  return blocks[index].strip()


@pytest.mark.timeout(180)
def test_readme_main_command_runs(tmp_path):
  line = readme_command(0)
  run_part = line[line.index("python -m experiments.run") :]
  assert "pip install -e ." in line and "configs/transformer.py:size=tiny" in run_part
  run_part = run_part.replace("runs/mqar_tiny", str(tmp_path / "run"))
  args = run_part.split()[1:] + ["--config.train.steps=20", "--config.train.eval_every=10",
                                 "--config.train.log_every=10"]
  r = subprocess.run([sys.executable, *args], cwd=REPO, env=clean_env(MEMARCH_TFDS_DIR=str(tmp_path / "tfds")),
                     capture_output=True, text=True, timeout=170)
  assert r.returncode == 0, r.stderr[-3000:]
  assert re.search(r"final eval @ step 20: .*accuracy \d\.\d+", r.stdout), r.stdout[-2000:]
  assert "steps/s" in r.stdout and "tok/s" in r.stdout


def test_readme_test_command_is_what_ci_runs():
  with open(os.path.join(REPO, ".ci", "run")) as f:
    ci = f.read()
  line = readme_command(1)
  assert line.split("&& ", 2)[-1] in ci
