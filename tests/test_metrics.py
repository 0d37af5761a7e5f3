"""Metric files, progress output and the curve plot."""

import json
import os
import types

import pytest

from experiments.plot import plot_runs
from memarch.metrics import MetricWriter, Progress, read_metrics

pytestmark = pytest.mark.timeout(60)


def test_writer_progress_and_plot(tmp_path, capsys):
  w = MetricWriter(str(tmp_path), tensorboard=True)
  for step in (10, 20):
    w.write(step, "train", {"loss": 3.0 / step, "accuracy": step / 40})
  w.write(20, "eval", {"mqar_T64_kv4/accuracy": 0.5, "mqar_T64_kv4/loss": 1.0})
  w.close()
  rows = read_metrics(str(tmp_path))
  assert [r["split"] for r in rows] == ["train", "train", "eval"] and rows[1]["loss"] == pytest.approx(0.15)
  assert json.loads(open(tmp_path / "metrics.jsonl").readline())["step"] == 10
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))

  p = Progress(total=100, start=0, tokens_per_step=64, mode="lines")
  p.update(50, {"loss": 1.25, "accuracy": 0.5})
  out = capsys.readouterr().out
  assert "step     50/100" in out and "loss 1.2500" in out and "tok/s" in out and "eta" in out
  with pytest.raises(ValueError, match="train.progress"):
    Progress(total=1, start=0, tokens_per_step=1, mode="fancy")

  png = plot_runs([str(tmp_path)], str(tmp_path / "curves.png"))
  assert os.path.getsize(png) > 1000
  with pytest.raises(ValueError, match="no metrics"):
    plot_runs([str(tmp_path / "missing")], str(tmp_path / "x.png"))


def test_progress_rates_are_per_interval(monkeypatch):
  """A slow first interval (compilation) does not lower the later rates (a cumulative average would)."""
  clock = iter([0.0, 100.0, 100.0, 101.0, 103.0])
  monkeypatch.setattr("memarch.metrics.time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
  q = Progress(total=100, start=0, tokens_per_step=64, mode="none")  # t = 0
  assert q.rates(10)[0] == pytest.approx(0.1)  # t = 100: 10 steps in 100 s
  q.update(10, {})  # t = 100 (its own rates call), then the interval restarts at t = 101
  sps, tps, eta = q.rates(20)  # t = 103: 10 steps in 2 s
  assert (sps, tps, eta) == pytest.approx((5.0, 320.0, 16.0))
