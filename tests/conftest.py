"""Test setup: CPU only, one device (multi-device tests run in their own subprocess)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
