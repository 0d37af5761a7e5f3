"""Maps `config.model.name` to a model constructor. Adding a model is one file in models/ and one line here."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from memarch.models.hmt import HMT
from memarch.models.lm import DecoderLM

MODELS: dict[str, Callable[[Any], nn.Module]] = {
    "transformer": DecoderLM,  # Transformer++ (and any stack of registered block types)
    "hmt": HMT,  # Hierarchical Memory Transformer over any registered backbone (config.model.backbone)
}


def build_model(model_config) -> nn.Module:
  """The model for a (frozen) model config section, whose vocab_size is already resolved."""
  name = model_config.name
  if name not in MODELS:
    raise ValueError(f"unknown model.name {name!r}; registered models: {sorted(MODELS)}.")
  return MODELS[name](model_config)
