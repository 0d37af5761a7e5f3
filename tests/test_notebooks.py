"""The Colab/TPU notebooks (notebooks/*.ipynb) run top to bottom at their small size, and are committed clean.

Each notebook is executed with nbclient in a fresh "python3" kernel (ipykernel's kernelspec, installed with the
`test` extra, started with this interpreter) at the values of its parameters cell; any cell error fails the test.
Figures go to $MEMARCH_NOTEBOOK_OUT and training runs to $MEMARCH_NOTEBOOK_WORKDIR, here tmp dirs; the PNGs
each notebook saves must exist.

The kernel gets XLA's fast-compile options (as tests/conftest.py sets them for this process): the notebooks'
CPU time is dominated by compiling tiny programs (measured on a Titans MAC training run: 118 s -> 76 s). The
kernels notebook's timing table is therefore of programs compiled without optimization here (CI checks that it
runs, not the numbers).
"""

from __future__ import annotations

import glob
import json
import os
import time

import pytest

from tests.conftest import REPO, clean_env

NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# notebook -> (PNG files it must save, timeout in seconds).
NOTEBOOKS = {
    "quickstart": (["quickstart_learning_curves.png", "quickstart_state_size.png"], 300),
    "kernels": (["kernels_time_vs_length.png"], 240),
    "long_context": (["long_context_heatmaps_Gated_DeltaNet.png", "long_context_heatmaps_Transformerpp.png",
                      "long_context_vs_length.png"], 300),
    "tpu_pretraining": (["tpu_pretraining_loss.png"], 240),
}


@pytest.mark.notebooks
@pytest.mark.timeout(30)
def test_every_notebook_is_tested():
  found = sorted(os.path.basename(p)[:-len(".ipynb")] for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
  assert found == sorted(NOTEBOOKS)


@pytest.mark.notebooks
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.timeout(t + 60)) for n, (_, t) in NOTEBOOKS.items()])
def test_notebook_runs(name, tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pngs, timeout = NOTEBOOKS[name]
  out = tmp_path / "figures"
  # The kernel is a subprocess of this one: a clean environment (no inherited XLA/JAX/pytest settings), CPU,
  # the fast-compile options and the figures' directory.
  work = tmp_path / "work"  # the notebooks' training runs (checkpoints), removed with tmp_path
  work.mkdir()
  env = clean_env(MEMARCH_NOTEBOOK_OUT=str(out), MEMARCH_NOTEBOOK_WORKDIR=str(work), XLA_FLAGS=FAST_COMPILE)
  for key in set(os.environ) - set(env):
    monkeypatch.delenv(key)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, f"{name}.ipynb"), as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=timeout,
                                   resources={"metadata": {"path": NOTEBOOK_DIR}})
  start = time.time()
  try:
    client.execute()  # raises CellExecutionError (with the cell and its traceback) on any error
  finally:
    print(f"{name}: {time.time() - start:.1f} s")
  missing = [p for p in pngs if not (out / p).is_file()]
  assert not missing, f"{name} did not save {missing}; saved {sorted(os.listdir(out)) if out.exists() else []}"


@pytest.mark.notebooks
@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_committed_without_outputs(name):
  with open(os.path.join(NOTEBOOK_DIR, f"{name}.ipynb")) as f:
    nb = json.load(f)
  dirty = [i for i, c in enumerate(nb["cells"])
           if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
  assert not dirty, f"notebooks/{name}.ipynb has outputs or execution counts in cells {dirty}: strip them " \
                    "(e.g. jupyter nbconvert --clear-output --inplace)"
