"""A decoder language model assembled from the block types named in the config.

    tokens -> embedding -> [x = x + block(RMSNorm(x)) for block in stack] -> RMSNorm -> head -> logits

The stack is `config.model.layer_blocks` repeated `config.model.num_layers` times, so
`layer_blocks=("attention", "mlp")` is Transformer++ and hybrids mix recurrent and attention blocks.
Every model in memarch offers this interface (DESIGN.md, "memarch.layers and memarch.models").

`config.model.scan_layers` (default False; a config without the key has it off) runs the num_layers identical
groups of `layer_blocks` with `nn.scan`: XLA compiles one group instead of num_layers copies, so compile time
stays flat in depth. The parameters then live under `layers/` with a leading `[num_layers]` axis (logical axis
"layers"), and the decoding cache's "layers" is a tuple with one entry per block of the group, stacked over
the groups, instead of a list per block: `stack_layer_params` / `unstack_layer_params` convert parameters
(checkpoints) between the two layouts. `ffn_layer` can then name only a feed-forward block of the last group.

`config.model.remat` (default False) rematerializes every block (every group with scan_layers) in the backward
pass (`nn.remat`): the forward keeps only each block's input, at the cost of a second forward. The parameters
are the same, so checkpoints load either way.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memarch.layers.blocks import get_block
from memarch.layers.common import ACT, RMSNorm, constrain, dense, dtype_from_name


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_token_ids(tokens, vocab_size: int, what: str = "token ids") -> None:
  """Raises ValueError if concrete token ids fall outside [0, vocab_size) (no-op under tracing).

  The message names the first offending id in row-major order: its index (batch row and column for
  `[batch, seq]` ids), its value, how many ids are out of range, and the range of all ids.
  """
  if tokens is None or not _is_concrete(tokens):
    return
  ids = np.asarray(tokens)  # numpy, so the check itself is never traced
  if ids.size == 0:
    return
  bad = (ids < 0) | (ids >= vocab_size)
  if bad.any():
    first = np.unravel_index(int(np.argmax(bad.reshape(-1))), ids.shape)
    if ids.ndim == 2:
      where = f"batch row {int(first[0])}, column {int(first[1])}"
    else:
      where = f"index {tuple(int(i) for i in first)}"
    raise ValueError(
        f"{what} must be in [0, {vocab_size}) (the model's vocab_size); the first out-of-range id is "
        f"{int(ids[first])} at {where} ({int(bad.sum())} of {ids.size} ids out of range; min {int(ids.min())}, "
        f"max {int(ids.max())}). Check data.vocab_size / model.vocab_size."
    )


class DecoderLM(nn.Module):
  """Decoder LM. `config` is the (frozen) model section with vocab_size resolved.

  Shapes: tokens `[batch, seq]` int32 -> logits `[batch, seq, vocab]` float32.
  """

  config: Any

  def setup(self):
    c = self.config
    self.block_names = tuple(c.layer_blocks) * c.num_layers
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        (c.vocab_size, c.embed_dim), jnp.float32,
    )
    if c.get("position_embedding", "none") == "learned":
      self.pos_embedding = self.param(
          "pos_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
          (c.max_len, c.embed_dim), jnp.float32,
      )
    elif c.get("position_embedding", "none") != "none":
      raise ValueError(f"model.position_embedding must be 'none' or 'learned', got {c.position_embedding!r}.")
    if c.get("scan_layers", False):
      group = nn.remat(_LayerGroup, prevent_cse=False) if c.get("remat", False) else _LayerGroup
      scanned = nn.scan(
          group, variable_axes={"params": 0, "losses": 0, "metrics": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=c.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})
      self.layers = scanned(c, name="layers")
    else:
      wrap = nn.remat if c.get("remat", False) else (lambda cls: cls)  # same parameter names either way
      self.blocks = [wrap(get_block(n))(c, name=f"block_{i}_{n}") for i, n in enumerate(self.block_names)]
      self.norms = [RMSNorm(c.norm_eps, name=f"norm_{i}") for i in range(len(self.block_names))]
    self.final_norm = RMSNorm(c.norm_eps, name="final_norm")
    if not c.tie_embeddings:
      self.head = self.param(
          "head", nn.with_logical_partitioning(nn.initializers.normal(c.embed_dim**-0.5), ("embed", "vocab")),
          (c.embed_dim, c.vocab_size), jnp.float32,
      )

  def _embed(self, tokens, inputs_embeds, positions):
    dtype = dtype_from_name(self.config.compute_dtype)
    if inputs_embeds is not None:
      if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.embed_dim:
        raise ValueError(f"inputs_embeds must be [batch, seq, {self.config.embed_dim}], got {inputs_embeds.shape}.")
      x = inputs_embeds
    else:
      if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq] int, got shape {tokens.shape}.")
      check_token_ids(tokens, self.config.vocab_size)
      x = jnp.take(self.embedding, tokens, axis=0)
    if self.config.get("position_embedding", "none") == "learned":
      x = x + jnp.take(self.pos_embedding, positions, axis=0)
    return x.astype(dtype)

  def embed_tokens(self, tokens):
    """The token embedding `[batch, seq, embed]` float32 of `[batch, seq]` ids (no position embedding): what a
    wrapper (HMT) concatenates with its own embeddings and feeds back through `inputs_embeds`."""
    check_token_ids(tokens, self.config.vocab_size)
    return jnp.take(self.embedding, tokens, axis=0)

  def _check_length(self, length: int) -> None:
    c = self.config
    if c.get("position_embedding", "none") == "learned" and length > c.max_len:
      raise ValueError(
          f"learned position embeddings cover model.max_len={c.max_len} positions; {length} were asked for. "
          "Use position_embedding='none' (RoPE only) to run beyond the training length."
      )

  def _stack(self, x, *, positions, segment_ids, caches=None, cache_index=None, ffn_layer=-1):
    """Runs the blocks. Returns (h_final_normed, ffn_input of the `ffn_layer`-th "mlp" block, new_caches)."""
    if self.config.get("scan_layers", False):
      return self._scanned_stack(x, positions, segment_ids, caches, cache_index, ffn_layer)
    new_caches = []
    ffn_inputs = []
    for i, (name, block, norm) in enumerate(zip(self.block_names, self.blocks, self.norms)):
      h = norm(x)
      if name == "mlp":
        ffn_inputs.append(h)
      y, cache = block(
          h, positions=positions, segment_ids=segment_ids,
          cache=None if caches is None else caches[i], cache_index=cache_index,
      )
      x = constrain(x + y.astype(x.dtype), ACT)
      new_caches.append(cache)
    if ffn_inputs and not -len(ffn_inputs) <= ffn_layer < len(ffn_inputs):
      raise ValueError(f"ffn_layer={ffn_layer} names no feed-forward block: the stack has {len(ffn_inputs)} "
                       f"(valid: {-len(ffn_inputs)}..{len(ffn_inputs) - 1}, -1 is the last).")
    return self.final_norm(x), (ffn_inputs[ffn_layer] if ffn_inputs else None), new_caches

  def _scanned_stack(self, x, positions, segment_ids, caches, cache_index, ffn_layer):
    """`_stack` with scan_layers: the scan carries the residual stream and the group's feed-forward inputs."""
    c = self.config
    per_group = sum(n == "mlp" for n in c.layer_blocks)
    ffn0 = tuple(jnp.zeros_like(x) for _ in range(per_group))
    (x, ffn_inputs), new_caches = self.layers((x, ffn0), positions, segment_ids, caches, cache_index)
    ffn_input = None
    if per_group:
      total = per_group * c.num_layers
      if not -total <= ffn_layer < total:
        raise ValueError(f"ffn_layer={ffn_layer} names no feed-forward block: the stack has {total} "
                         f"(valid: {-total}..{total - 1}, -1 is the last).")
      j = ffn_layer % total - (total - per_group)
      if j < 0:
        raise NotImplementedError(
            f"ffn_layer={ffn_layer} with model.scan_layers: the scan keeps only the last layer's feed-forward "
            "inputs; turn scan_layers off to read an earlier one.")
      ffn_input = ffn_inputs[j]
    return self.final_norm(x), ffn_input, new_caches

  def _logits(self, h):
    w = self.embedding.T if self.config.tie_embeddings else self.head
    # Logits in float32: the softmax over a large vocabulary is where low precision hurts most.
    return dense(h.astype(jnp.float32), w)

  def __call__(self, tokens, *, inputs_embeds=None, return_hidden=False, segment_ids=None, positions=None,
               ffn_layer: int = -1):
    """Training forward.

    Args:
      tokens: `[batch, seq]` int32 (ignored if inputs_embeds is given; may then be None).
      inputs_embeds: optional `[batch, seq, embed]`, replaces the token embedding.
      return_hidden: also return `{"hidden": final normed hidden [b, t, e], "ffn_input": normed input of
        the last block's feed-forward layer [b, t, e], None if the stack has no "mlp" block}`.
      ffn_layer: which feed-forward block's input is "ffn_input": an index into the stack's "mlp" blocks
        (-1, the default: the last; 0: the first), e.g. MLP Memory's key layer.
      segment_ids: optional `[batch, seq]` packed-document ids (attention does not cross them).
      positions: optional `[batch, seq]` RoPE positions (default 0..seq-1).
    Returns:
      logits `[batch, seq, vocab]` float32, or `(logits, hidden_dict)`.
    """
    if inputs_embeds is None and tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq] int, got shape {tokens.shape}.")
    b, t = (tokens if inputs_embeds is None else inputs_embeds).shape[:2]
    self._check_length(t)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = constrain(self._embed(tokens, inputs_embeds, positions), ACT)
    h, ffn_input, _ = self._stack(x, positions=positions, segment_ids=segment_ids, ffn_layer=ffn_layer)
    logits = self._logits(h)
    if return_hidden:
      return logits, {"hidden": h, "ffn_input": ffn_input}
    return logits

  def init_cache(self, batch: int, max_len: int) -> dict[str, Any]:
    """Decoding state: `{"index": int32 [] tokens seen, "layers": [per-block cache or None]}`.

    Attention blocks preallocate `max_len` key/value slots; memory blocks keep a fixed-size state.
    Needs no parameters: call it on the unbound model.
    """
    c = self.config
    self._check_length(max_len)
    if c.get("scan_layers", False):
      # One entry per block of the group, each stacked over the num_layers groups (the scan's layout).
      stack = lambda x: jnp.broadcast_to(x, (c.num_layers,) + x.shape)
      group = tuple(jax.tree.map(stack, get_block(n)(c, parent=None).init_cache(batch, max_len))
                    for n in c.layer_blocks)
      return {"index": jnp.zeros((), jnp.int32), "layers": group}
    names = tuple(c.layer_blocks) * c.num_layers
    return {
        "index": jnp.zeros((), jnp.int32),
        "layers": [get_block(n)(c, parent=None).init_cache(batch, max_len) for n in names],
    }

  def _cached_forward(self, tokens, cache, inputs_embeds=None, return_hidden=False):
    if inputs_embeds is None and tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq] int, got shape {tokens.shape}.")
    b, t = (tokens if inputs_embeds is None else inputs_embeds).shape[:2]
    index = cache["index"]
    capacity = _cache_capacity(cache)
    if capacity is not None and _is_concrete(index) and int(index) + t > capacity:
      raise ValueError(
          f"the KV cache holds {capacity} tokens; {int(index)} are used and {t} more do not fit. "
          "Call init_cache with a larger max_len."
      )
    positions = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
    x = self._embed(tokens, inputs_embeds, positions)
    h, _, caches = self._stack(x, positions=positions, segment_ids=None, caches=cache["layers"], cache_index=index)
    logits = self._logits(h)
    if capacity is not None:
      # Under jit the index is not known in Python: poison the logits instead of silently wrapping.
      logits = jnp.where(index + t > capacity, jnp.nan, logits)
    if return_hidden:
      return logits, {"index": index + t, "layers": caches}, {"hidden": h}
    return logits, {"index": index + t, "layers": caches}

  def prefill(self, tokens, cache, *, inputs_embeds=None, return_hidden=False):
    """Processes a prompt `[batch, seq]` in parallel. Returns (logits `[batch, seq, vocab]`, cache).

    inputs_embeds: optional `[batch, seq, embed]` that replaces the token embedding (tokens may then be None).
    return_hidden: also return `{"hidden": final normed hidden [b, seq, e]}` (a wrapper's memory embedding).
    """
    return self._cached_forward(tokens, cache, inputs_embeds, return_hidden)

  def decode_step(self, token, cache):
    """One token per sequence, `[batch]` or `[batch, 1]`. Returns (logits `[batch, vocab]`, cache)."""
    if token.ndim == 1:
      token = token[:, None]
    logits, cache = self._cached_forward(token, cache)
    return logits[:, -1], cache


def _cache_capacity(cache) -> int | None:
  """The smallest preallocated length among the layers' caches (None if no layer has a growing cache).
  A KV cache is `[batch, max_len, ...]`, or `[num_layers, batch, max_len, ...]` stacked (scan_layers)."""
  stacked = isinstance(cache["layers"], tuple)
  caps = [c["k"].shape[2 if stacked else 1] for c in cache["layers"] if isinstance(c, dict) and "k" in c]
  return min(caps) if caps else None


class _LayerGroup(nn.Module):
  """One group of `layer_blocks`, each block with its pre-norm: the body that `scan_layers` scans.

  Call: ((x, ffn_inputs), positions, segment_ids, caches (a tuple per block, or None), cache_index) ->
  ((x, this group's feed-forward inputs), new caches (a tuple, or None)). Parameter names are those of one
  group of the unscanned stack with the group's own indices (block_{j}_{name}, norm_{j}).
  """

  config: Any

  @nn.compact
  def __call__(self, carry, positions, segment_ids, caches, cache_index):
    c = self.config
    x, _ = carry
    new_caches, ffn_inputs = [], []
    for j, name in enumerate(c.layer_blocks):
      h = RMSNorm(c.norm_eps, name=f"norm_{j}")(x)
      if name == "mlp":
        ffn_inputs.append(h)
      y, cache = get_block(name)(c, name=f"block_{j}_{name}")(
          h, positions=positions, segment_ids=segment_ids, cache=None if caches is None else caches[j],
          cache_index=cache_index)
      x = constrain(x + y.astype(x.dtype), ACT)
      new_caches.append(cache)
    return (x, tuple(ffn_inputs)), (None if caches is None else tuple(new_caches))


def _layer_keys(config):
  """(scanned key, unscanned key of group l) pairs of one group's blocks and norms."""
  g = len(config.layer_blocks)
  for j, name in enumerate(config.layer_blocks):
    yield f"block_{j}_{name}", lambda l, j=j, name=name: f"block_{l * g + j}_{name}"
    yield f"norm_{j}", lambda l, j=j: f"norm_{l * g + j}"


def stack_layer_params(params, config) -> dict[str, Any]:
  """Unscanned DecoderLM parameters (block_{i}_{name}, norm_{i}, i < num_layers * len(layer_blocks)) -> the
  `scan_layers` layout (`layers/block_{j}_{name}`, `layers/norm_{j}` with a leading [num_layers] axis)."""
  out = {k: v for k, v in params.items() if not k.startswith(("block_", "norm_"))}
  out["layers"] = {key: jax.tree.map(lambda *a: jnp.stack(a), *[params[unrolled(l)] for l in range(config.num_layers)])
                   for key, unrolled in _layer_keys(config)}
  return out


def unstack_layer_params(params, config) -> dict[str, Any]:
  """The inverse of `stack_layer_params`: `scan_layers` parameters -> the unscanned layout."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for key, unrolled in _layer_keys(config):
    for l in range(config.num_layers):
      out[unrolled(l)] = jax.tree.map(lambda a, l=l: a[l], params["layers"][key])
  return out
