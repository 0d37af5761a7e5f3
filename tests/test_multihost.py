"""Two processes on localhost, 4 simulated CPU devices each, form one JAX runtime (gloo collectives) and train a
tiny Transformer++ on a (data 2, fsdp 2, tensor 2) mesh through `python -m experiments.run`; the losses equal a
single-process run on 8 devices fed the same global batches (host 0's rows, then host 1's), and the
checkpoint both processes wrote restores there with the same parameters.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from memarch.metrics import read_metrics
from tests.conftest import REPO, clean_env
from tests.test_sharding import FAST_COMPILE, run_worker

pytestmark = pytest.mark.timeout(400)

CONFIG_FILE = '''
from tests.sharding_worker import multihost_config


def get_config(arg=None):
  return multihost_config()
'''


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  config_file = tmp_path / "multihost_config.py"
  config_file.write_text(CONFIG_FILE)
  workdir = tmp_path / "run"
  port = free_port()
  env = clean_env(XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}")
  procs = [
      subprocess.Popen(
          [sys.executable, "-m", "experiments.run", f"--config={config_file}", f"--workdir={workdir}",
           f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
           f"--config.distributed.process_id={i}", "--config.distributed.initialization_timeout=120"],
          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)
  ]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=300)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} failed ({p.returncode}):\n{out[-4000:]}"
  # Logging from process 0 only; both processes ran the 8-device mesh.
  assert "final eval @ step 4" in outs[0] and "final eval" not in outs[1], outs[1][-2000:]
  train = [r for r in read_metrics(str(workdir)) if r.get("split") == "train"]
  assert [r["step"] for r in train] == [1, 2, 3, 4]  # written once (process 0), not once per process
  ref = run_worker("hostref", {"checkpoint": str(workdir / "checkpoints")})
  np.testing.assert_allclose([r["loss"] for r in train], [ref["losses"][str(s)] for s in range(1, 5)], rtol=1e-5)
  assert ref["param_err"] < 1e-5  # the checkpoint saved by both processes, restored on one process
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["distributed"]["num_processes"] == 2 and (saved["mesh"]["data"], saved["mesh"]["fsdp"]) == (2, 2)
