"""Whole models built from layers, and the registry (`build_model`)."""

from memarch.models.registry import MODELS, build_model

__all__ = ["MODELS", "build_model"]
