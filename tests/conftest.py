"""Test setup: CPU only, one device (multi-device tests run in their own subprocess)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are dominated by XLA's CPU compile time on tiny shapes; these options cut it about 3x (measured:
# tests/test_model.py 161 s -> 48 s). Long real runs (the learning test) go to a subprocess without them.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if os.environ.get("MEMARCH_TEST_OPTIMIZED_XLA", "0") != "1":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clean_env(**extra: str) -> dict[str, str]:
  """The environment for a subprocess: no inherited XLA/JAX settings, the repo importable."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "PYTEST_"))}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  env.update(extra)
  return env


@pytest.fixture
def repo_dir() -> str:
  return REPO
