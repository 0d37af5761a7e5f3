"""Faults inflicted on the research loop (issue 12): preemption signals, SIGKILL, damaged checkpoints,
non-finite steps and a full disk. Each test checks that no finished work is lost and that the message says
what happened, where."""

import errno
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from memarch import checkpoint as ckpt_lib
from memarch import train as train_lib
from memarch.metrics import read_metrics
from memarch.preemption import Preempted
from memarch.train import train_and_evaluate
from tests.conftest import REPO, clean_env
from tests.test_train import small_config

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _tfds_dir(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("MEMARCH_TFDS_DIR", str(tmp_path_factory.getbasetemp() / "tfds"))


def config(**train):
  c = small_config(**train)
  c.data.mqar.use_tfds = False  # generated in memory: no TFDS build in these tests
  c.optim.schedule, c.optim.warmup_steps = "constant", 1  # the lr at a step does not depend on train.steps
  return c


def params_of(result):
  return jax.tree.leaves(jax.device_get(result.state.params))


class FaultyIterator:
  """Wraps the training iterator: `on_batch(index, batch)` may alter batch `index` (0-based) or send a signal."""

  def __init__(self, inner, on_batch, start: int = 0):
    self.inner, self.on_batch, self.index = inner, on_batch, start

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self.inner))
    self.on_batch(self.index, batch)
    self.index += 1
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def inject(monkeypatch, on_batch):
  original = train_lib.data_lib.create_train_iterator

  def create(*args, **kwargs):
    return FaultyIterator(original(*args, **kwargs), on_batch)

  monkeypatch.setattr(train_lib.data_lib, "create_train_iterator", create)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_at_the_current_step_and_resumes(tmp_path, monkeypatch, sig):
  workdir = str(tmp_path / "run")
  straight = train_and_evaluate(config(steps=8, checkpoint_every=0), str(tmp_path / "straight"))
  inject(monkeypatch, lambda i, b: os.kill(os.getpid(), sig) if i == 4 else None)  # during step 5's batch
  with pytest.raises(Preempted, match=f"{signal.Signals(sig).name} at step 5") as e:
    train_and_evaluate(config(steps=8, checkpoint_every=0), workdir)
  assert e.value.exit_code == 128 + sig
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3).latest_step() == 5
  monkeypatch.undo()
  resumed = train_and_evaluate(config(steps=8, checkpoint_every=0), workdir)
  assert resumed.step == 8
  for a, b in zip(params_of(resumed), params_of(straight)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.timeout(240)
def test_sigkill_then_resume_is_bit_identical_to_a_straight_run(tmp_path):
  """A run SIGKILLed at a random step after its first checkpoint, then resumed to N, equals a run trained
  straight to N: parameters and the metrics of every step after the checkpoint, bit for bit (data order
  included). Also: an unfinished (tmp) checkpoint directory, as a kill during a save leaves, is never taken
  for a checkpoint."""
  every, kill_at = 6, int(np.random.default_rng().integers(7, 11))
  flags = ["--config.model.embed_dim=32", "--config.model.mlp_dim=64", "--config.model.num_layers=1",
           "--config.data.mqar.num_train_examples=512", "--config.data.mqar.num_eval_examples=64",
           "--config.data.mqar.use_tfds=False", "--config.train.batch_size=16", "--config.eval.batch_size=32",
           "--config.train.steps=100000", "--config.train.log_every=1", "--config.train.eval_every=0",
           f"--config.train.checkpoint_every={every}", "--config.train.progress=lines",
           "--config.train.tensorboard=False", "--config.optim.schedule=constant", "--config.optim.warmup_steps=1"]
  workdir = tmp_path / "killed"
  ckpt_dir = workdir / "checkpoints"
  # Same XLA options as this process, so that the two runs compile the same programs.
  env = clean_env(XLA_FLAGS=os.environ.get("XLA_FLAGS", ""))
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.run", "--config", "configs/transformer.py:size=tiny",
       f"--workdir={workdir}", *flags], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  log = []
  for line in proc.stdout:
    log.append(line)
    # Kill once the first checkpoint has finished (saves are asynchronous) and the random step is reached.
    if (line.startswith("step") and int(line.split()[1].split("/")[0]) >= kill_at
        and os.path.isdir(ckpt_dir / str(every))):
      proc.kill()  # SIGKILL: no handler, no final save
      break
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, "".join(log)
  last = ckpt_lib.Checkpointer(str(ckpt_dir), keep=3).latest_step()
  assert last is not None and last % every == 0
  # A kill in the middle of a save leaves orbax's tmp directory; fake one at a later step to prove it is ignored.
  os.makedirs(ckpt_dir / f"{last + every}.orbax-checkpoint-tmp" / "state")
  (ckpt_dir / f"{last + every}.orbax-checkpoint-tmp" / "state" / "garbage").write_bytes(b"\0" * 10)
  assert ckpt_lib.Checkpointer(str(ckpt_dir), keep=3).latest_step() == last

  steps = last + every  # N: the resumed run trains from the last finished checkpoint to here
  c = config(steps=steps, checkpoint_every=every, log_every=1)
  resumed = train_and_evaluate(c, str(workdir))
  straight = train_and_evaluate(c, str(tmp_path / "straight"))
  for a, b in zip(params_of(resumed), params_of(straight)):
    np.testing.assert_array_equal(a, b)

  def last_train_metrics(path):
    rows = {}
    for m in read_metrics(str(path)):
      if m["split"] == "train" and last < m["step"] <= steps:
        rows[m["step"]] = {k: v for k, v in m.items() if k in ("loss", "accuracy", "grad_norm")}
    return rows

  assert len(last_train_metrics(workdir)) == every
  assert last_train_metrics(workdir) == last_train_metrics(tmp_path / "straight")
  assert resumed.eval_metrics == straight.eval_metrics


def test_damaged_checkpoint_is_named_and_the_previous_step_used(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  train_and_evaluate(config(steps=8, checkpoint_every=4), workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ckpt_dir, "8", "state")) for f in fs]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  result = train_and_evaluate(config(steps=10, checkpoint_every=4), workdir)
  err = capsys.readouterr().err
  assert "checkpoint step 8" in err and victim in err and "truncated" in err
  assert result.step == 10
  assert os.path.isdir(os.path.join(ckpt_dir + ".damaged", "8"))  # kept for inspection, out of orbax's way
  history = [m["step"] for m in read_metrics(workdir) if m["split"] == "train"]
  assert history.count(6) == 2  # steps 5..8 were trained again from step 4

  # Every checkpoint damaged (a file removed): a clear error that lists them, not a silent restart.
  for step in ckpt_lib.Checkpointer(ckpt_dir, keep=3).all_steps():
    manifest = os.path.join(ckpt_dir, str(step), "manifest")
    for name in os.listdir(manifest):
      os.remove(os.path.join(manifest, name))
  with pytest.raises(ckpt_lib.CheckpointDamagedError, match="no usable checkpoint.*\n.*step"):
    train_and_evaluate(config(steps=12, checkpoint_every=4), workdir)


def test_nonfinite_steps_are_skipped(tmp_path, monkeypatch):
  """Batches 2 and 3 carry a NaN loss mask: steps 3 and 4 are not applied, so 4 steps end where 2 did."""
  two = train_and_evaluate(config(steps=2, checkpoint_every=0), str(tmp_path / "two"))

  def poison(i, batch):
    if i in (2, 3):
      batch["loss_mask"] = np.full_like(batch["loss_mask"], np.nan)

  inject(monkeypatch, poison)
  four = train_and_evaluate(config(steps=4, checkpoint_every=0, log_every=4), str(tmp_path / "four"))
  for a, b in zip(params_of(four), params_of(two)):
    np.testing.assert_array_equal(a, b)
  logged = [m for m in read_metrics(str(tmp_path / "four")) if m["split"] == "train"][-1]
  assert logged["nonfinite_steps"] == 2 and np.isfinite(logged["loss"])


def test_too_many_nonfinite_steps_stop_the_run_naming_step_and_batch(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")

  def poison(i, batch):
    if i >= 4:
      batch["loss_mask"] = np.full_like(batch["loss_mask"], np.inf)

  inject(monkeypatch, poison)
  with pytest.raises(FloatingPointError, match=r"3 training steps in a row .*steps 5\.\.7.*batch 6") as e:
    train_and_evaluate(config(steps=20, checkpoint_every=4, max_nonfinite_steps=2), workdir)
  assert "last good checkpoint is step 4" in str(e.value)
  saved = np.load(os.path.join(workdir, "nonfinite_batch_step7.npz"))
  assert np.isinf(saved["loss_mask"]).all()
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3).latest_step() == 4
  # The tool the error names replays that batch at step 4: the model's outputs are finite, the loss is not.
  assert f"python -m experiments.nonfinite {workdir}" in str(e.value)
  from experiments import nonfinite

  replay = nonfinite.main([workdir])
  assert replay["step"] == 4 and replay["first"] is None and not np.isfinite(replay["loss"])


def test_out_of_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  train_and_evaluate(config(steps=4, checkpoint_every=4), workdir)
  usage = ckpt_lib.shutil.disk_usage
  monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", lambda p: usage(p)._replace(free=1000))
  with pytest.raises(OSError, match="not enough disk space to save checkpoint step 8.*step 4\\) is intact") as e:
    train_and_evaluate(config(steps=8, checkpoint_every=4), workdir)
  assert e.value.errno == errno.ENOSPC
  monkeypatch.undo()

  # The same message when the file system fills up during the save itself.
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
  monkeypatch.setattr(checkpointer.manager, "save", full)
  with pytest.raises(OSError, match="step 9.*step 4\\) is intact"):
    checkpointer.save(9, {"x": np.zeros(3)}, {}, {})
  monkeypatch.undo()
  result = train_and_evaluate(config(steps=8, checkpoint_every=4), workdir)  # resumes from the intact step 4
  assert result.step == 8


@pytest.mark.timeout(180)
def test_cli_sigterm_exits_with_a_message_and_resumes(tmp_path):
  """The real thing: `experiments.run` in its own process gets SIGTERM, checkpoints, exits 143; re-run resumes."""
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "experiments.run", "--config", "configs/transformer.py:size=tiny",
         f"--workdir={workdir}", "--config.model.embed_dim=32", "--config.model.num_layers=1",
         "--config.data.mqar.use_tfds=False", "--config.data.mqar.num_train_examples=512",
         "--config.data.mqar.num_eval_examples=64", "--config.train.batch_size=8", "--config.train.log_every=1",
         "--config.train.checkpoint_every=0", "--config.train.progress=lines", "--config.train.tensorboard=False"]
  proc = subprocess.Popen(cmd + ["--config.train.steps=100000"], cwd=REPO, env=clean_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  log = []
  for line in proc.stdout:
    log.append(line)
    if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 3:
      proc.send_signal(signal.SIGTERM)
      break
  out = proc.communicate(timeout=60)[0]
  assert proc.returncode == 128 + signal.SIGTERM, "".join(log) + out
  assert "stopped by SIGTERM at step" in out and "resume" in out
  saved = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), keep=3).latest_step()
  assert saved is not None and f"at step {saved}" in out
  again = subprocess.run(cmd + [f"--config.train.steps={saved + 2}"], cwd=REPO, env=clean_env(),
                         capture_output=True, text=True, timeout=120)
  assert again.returncode == 0, again.stdout + again.stderr
  assert f"steps {saved}->{saved + 2}" in again.stdout + again.stderr


def test_checkpoint_without_a_later_model_key_is_compatible_only_with_its_old_behaviour():
  from memarch import checkpoint as ckpt_lib

  old = {"model": {"name": "titans"}, "params": {}}
  same = {"model": {"name": "titans", "memory_optimizer": "momentum", "memory_objective_window": 1}, "params": {}}
  assert ckpt_lib.manifest_differences(old, same) == []
  changed = {"model": {"name": "titans", "memory_optimizer": "muon"}, "params": {}}
  assert ckpt_lib.manifest_differences(old, changed) == [
      "model.memory_optimizer: checkpoint has None, config has 'muon'"]
