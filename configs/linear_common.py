"""The model section and `get_config` shared by the linear-memory families (gated_deltanet, linear_attention,
based), and their sizes.

The model section extends Transformer++'s (`configs/transformer.py`), so every linear-memory config also
carries the attention and MLP keys: hybrids are a `layer_blocks` override that mixes "attention" (with
`window` for sliding-window attention) and "linear_memory" / "based", e.g.
`--config.model.layer_blocks='("linear_memory", "mlp", "attention", "mlp")'`.
Data, optimizer and training sections (and their per-size values) are the Transformer++ config's, so runs
of the families compare like with like.
"""

from __future__ import annotations

from typing import Callable

import ml_collections

from configs import base, transformer

SIZES = {
    #         embed layers heads head_dim (q/k dim per head; the state per head is head_dim x value_dim)
    "tiny": (64, 2, 2, 32),
    "small": (256, 4, 4, 64),
    "base": (768, 12, 6, 128),
}


def linear_model_config(size: str, max_len: int, *, rule: str = "gated_delta",
                        block: str = "linear_memory") -> ml_collections.ConfigDict:
  """The model section of a linear-memory LM: `block` ("linear_memory" or "based") in every layer, alone
  at size tiny (like the tiny Transformer++ on MQAR), followed by a SwiGLU MLP otherwise."""
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}.")
  embed, layers, heads, head_dim = SIZES[size]
  c = transformer.model_config(size, max_len)  # embedding, norms, attention and MLP keys (for hybrids)
  c.name = "transformer"  # memarch.models.lm.DecoderLM: any stack of registered block types
  c.embed_dim = embed
  c.num_layers = layers
  c.layer_blocks = (block,) if size == "tiny" else (block, "mlp")
  c.num_heads = heads  # heads of the memory (and of attention blocks in hybrids)
  c.num_kv_heads = 0  # attention blocks in hybrids: 0 = num_heads (no GQA)
  c.head_dim = head_dim  # q/k dim per head (Based: the value dim per head); 0: embed_dim // num_heads
  # Linear-memory keys (memarch.layers.linear_memory.LinearMemory).
  c.memory_rule = rule  # linear | simple_gla | delta | gated_delta (see the layer's docstring)
  c.value_dim = 0  # v dim per head; 0: head_dim. The recurrent state is num_heads x head_dim x value_dim floats
  c.conv_width = 4  # short causal depthwise convolution on q, k, v (0: none, SiLU only)
  c.chunk_size = 64  # tokens per chunk of kernels.linear_scan's chunked form (any sequence length works)
  c.scan_impl = "auto"  # kernels.linear_scan impl: auto | xla | pallas | pallas_interpret | reference
  # Based (memarch.layers.linear_memory.BasedAttention): q/k dim per head before the Taylor feature map
  # (state per head: (1 + f + f^2) x (head_dim + 1) floats).
  c.feature_dim = 16
  return c


def get_linear_config(arg: str | None, *, block: str = "linear_memory", rules: tuple[str, ...] = ("gated_delta",),
                      customize: Callable[[ml_collections.ConfigDict, str], None] | None = None
                      ) -> ml_collections.ConfigDict:
  """A family's full, locked config.

  `:arg` keys: size (tiny | small | base), task (mqar | text), heads (0: the size's; n: n memory heads of the
  same shape, i.e. n / default times the recurrent state) and, when `rules` names more than one memory
  rule, rule (default: the first). Data, optim and train are the Transformer++ config's for that size and
  task (tiny: MQAR with 64 tokens and 4, 8, 16 pairs, constant lr, no weight decay). `customize(model, size)`
  edits the model section in place (e.g. Based's block layout).
  """
  defaults = dict(size="tiny", task="mqar", heads=0)
  if len(rules) > 1:
    defaults["rule"] = rules[0]
  a = base.parse_arg(arg, **defaults)
  rule = a.rule if len(rules) > 1 else rules[0]
  if rule not in rules:
    raise ValueError(f"unknown rule {rule!r}; choose one of {rules}.")
  if a.size not in SIZES:
    raise ValueError(f"unknown size {a.size!r}; choose one of {sorted(SIZES)}.")
  ref = transformer.get_config(f"size={a.size},task={a.task}")
  model = linear_model_config(a.size, ref.model.max_len, rule=rule, block=block)
  if customize is not None:
    customize(model, a.size)
  if a.heads:  # e.g. a baseline with N times the recurrent state of another model (same head shapes)
    model.num_heads = a.heads
  return base.assemble(model=model, data=ref.data, optim=ref.optim, train=ref.train)
