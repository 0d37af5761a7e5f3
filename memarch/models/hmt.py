"""HMT: Hierarchical Memory Transformer (He et al. 2024) as a wrapper over any registered backbone.

The sequence is cut into segments of `segment_len` L tokens (the last one padded with id 0; logits are sliced
back to the input length) and processed by a `flax.linen.scan` over segments, with three levels of memory:

- sensory memory: the embeddings of the last `sensory_len` k tokens of segment n-1 (zeros before the first);
- short-term memory: the memory embedding m_{n-1} passed from segment to segment;
- long-term memory: a ring buffer of the last `cache_size` N memory embeddings, recalled by cross-attention.

For segment n (embeddings x_n `[b, L, E]`), with j = round(summary_fraction * L):

1. Representation extraction (stage 2 only): s_n = backbone([span; query_token]).hidden[-1], where the span is
   the last j embeddings of segment n-1 (`recall_query="previous"`, causal) or the first j of segment n
   (`"prefix"`, the paper's). In "prefix" mode the first j tokens of every segment could see their own future
   through the recalled memory, so they act as a prompt and carry no loss: `position_loss_mask(seq_len)` is 0
   there and the training loop multiplies the data's loss mask by it.
2. Memory recall: p_n = softmax((s_n Wq)(C Wk)^T / sqrt(E), masked to the filled slots) C over the cache C
   `[b, N, E]` (the cached embeddings are the values). With an empty cache (the first segment) p_n is the learned
   `initial_memory`. Stage 1 has no recall: p_n = m_{n-1} (`initial_memory` for the first segment).
3. backbone([p_n; sensory (k); x_n (L); write_token]): the logits at positions 1+k .. k+L are the segment's;
   the final hidden state at the write token is m_n, pushed into the ring buffer (slot count % N).

Truncated backpropagation through time: segments form blocks of `bptt_depth`; at the start of each block the
whole carry (m, the cache, the previous segment's embeddings) goes through `jax.lax.stop_gradient`, so the
gradient of a segment's loss reaches the inputs of the segments of its own block (up to itself) and is exactly
zero for earlier blocks.

The backbone is any registered model offering `embed_tokens(tokens)`, `__call__(None, inputs_embeds=...,
return_hidden=True)`, `init_cache(batch, max_len)` and `prefill(None, cache, inputs_embeds=...)`
(memarch.models.lm.DecoderLM: Transformer++, Titans, Gated DeltaNet and the other block stacks). Its calls have
L + k + 2 positions (L + k + 1 for a summary span of j <= L tokens), its own positions 0.. in every call.

Parameters: `core/backbone/...` (the backbone's), `core/query_token`, `core/write_token`, `core/initial_memory`
(each `[E]`) and `core/recall_wq`, `core/recall_wk` (`[E, E]`). Stage 1 and stage 2 have the same parameters
(stage 1 leaves the recall ones unused), so a stage-1 checkpoint initializes stage 2
(`load_stage1_params`).
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from memarch.layers.common import constrain

RECALL_QUERIES = ("previous", "prefix")
# Parameters that only stage 2 uses: a stage-1 checkpoint does not train them, so they keep their fresh init.
RECALL_PARAMS = ("query_token", "recall_wq", "recall_wk")


def backbone_config(config) -> ml_collections.FrozenConfigDict:
  """The backbone's model section with vocab_size resolved (0 -> the HMT's, i.e. the data's)."""
  bb = config.backbone.to_dict()
  if bb.get("name") == "hmt":
    raise ValueError("config.model.backbone.name='hmt': the HMT's backbone must be another registered model.")
  if bb.get("vocab_size", 0) == 0:
    bb["vocab_size"] = config.vocab_size
  elif bb["vocab_size"] < config.vocab_size:
    raise ValueError(f"config.model.backbone.vocab_size={bb['vocab_size']} is smaller than the vocabulary "
                     f"({config.vocab_size}); set it to 0 to take the HMT's.")
  return ml_collections.FrozenConfigDict(bb)


def check_config(c) -> None:
  """ValueError for a bad HMT model section (before anything is built)."""
  def fail(key, why):
    raise ValueError(f"config.model.{key}={c[key]!r} {why}")

  if c.segment_len < 1:
    fail("segment_len", "must be >= 1 (tokens per segment).")
  if not 0 <= c.sensory_len <= c.segment_len:
    fail("sensory_len", f"must be in [0, segment_len={c.segment_len}] (tokens of the previous segment).")
  if c.cache_size < 1:
    fail("cache_size", "must be >= 1 (memory embeddings kept for recall).")
  if c.bptt_depth < 1:
    fail("bptt_depth", "must be >= 1 (segments per truncated-backpropagation block).")
  if c.recall_query not in RECALL_QUERIES:
    fail("recall_query", f"is not one of {RECALL_QUERIES}.")
  if not 0.0 < c.summary_fraction <= 1.0:
    fail("summary_fraction", "must be in (0, 1] (the fraction of a segment summarized for recall).")
  if c.stage not in (1, 2):
    fail("stage", "must be 1 (no recall) or 2 (with recall).")
  if c.recall_query == "prefix" and c.stage == 2 and summary_len(c) >= c.segment_len:
    fail("summary_fraction", "leaves no token of a segment to carry loss with recall_query='prefix'.")


def summary_len(c) -> int:
  """j: the tokens summarized for recall."""
  return max(1, min(c.segment_len, int(round(c.summary_fraction * c.segment_len))))


def backbone_len(c) -> int:
  """Positions of one segment's backbone call: [p_n; k sensory; L segment; write token]."""
  return c.segment_len + c.sensory_len + 2


def _build_backbone(config, *, detached: bool = False) -> nn.Module:
  """The backbone module (detached: with no parent, e.g. for its parameter-free init_cache inside a method)."""
  from memarch.models.registry import MODELS, build_model  # pylint: disable=g-import-not-at-top (registry imports us)

  bb = backbone_config(config)
  if bb.get("position_embedding", "none") == "learned" and bb.max_len < backbone_len(config):
    raise ValueError(
        f"config.model.backbone.max_len={bb.max_len} is shorter than a segment's backbone call (segment_len + "
        f"sensory_len + 2 = {backbone_len(config)}) and the backbone has learned position embeddings.")
  if detached and bb.get("name") in MODELS:
    return MODELS[bb.name](bb, parent=None)
  return build_model(bb)


def _vector(name_init=0.02):
  return nn.with_logical_partitioning(nn.initializers.normal(name_init), ("embed",))


class HMTCore(nn.Module):
  """The backbone and HMT's own parameters, with one method per step of a segment (shared by the scanned
  training forward and the streaming decoder, so both use the same parameter paths)."""

  config: Any  # the HMT model section (vocab_size resolved)

  def setup(self):
    c = self.config
    self.backbone = _build_backbone(c)
    e = backbone_config(c).embed_dim
    self.query_token = self.param("query_token", _vector(), (e,), jnp.float32)
    self.write_token = self.param("write_token", _vector(), (e,), jnp.float32)
    self.initial_memory = self.param("initial_memory", _vector(), (e,), jnp.float32)
    proj = nn.with_logical_partitioning(nn.initializers.normal(e**-0.5), ("embed", "kv"))
    self.recall_wq = self.param("recall_wq", proj, (e, e), jnp.float32)
    self.recall_wk = self.param("recall_wk", proj, (e, e), jnp.float32)

  def embed(self, tokens):
    """`[b, t]` ids -> `[b, t, E]` float32 backbone token embeddings."""
    return self.backbone.embed_tokens(tokens).astype(jnp.float32)

  def summarize(self, span):
    """s_n `[b, E]` float32: the backbone's last hidden state over `[span; query_token]` (span `[b, j, E]`)."""
    q = jnp.broadcast_to(self.query_token, (span.shape[0], 1, span.shape[-1]))
    _, hidden = self.backbone(None, inputs_embeds=jnp.concatenate([span, q], axis=1), return_hidden=True)
    return hidden["hidden"][:, -1].astype(jnp.float32)

  def recall(self, summary, cache, count):
    """Cross-attention of summary `[b, E]` over the ring buffer `cache` `[b, N, E]` holding `count` pushes.

    Slots not yet written are masked; with an empty cache the result is the learned initial memory."""
    n, e = cache.shape[1], cache.shape[2]
    q = summary @ self.recall_wq
    k = jnp.einsum("bne,ef->bnf", cache, self.recall_wk)
    scores = jnp.einsum("bf,bnf->bn", q, k) * e**-0.5
    valid = jnp.arange(n) < jnp.minimum(count, n)
    weights = jax.nn.softmax(jnp.where(valid[None], scores, -1e30), axis=-1)  # uniform (finite) when empty
    recalled = jnp.einsum("bn,bne->be", weights, cache)
    return jnp.where(count > 0, recalled, self.initial_memory[None])

  def memory_input(self, memory, cache, count, prev, seg):
    """p_n `[b, E]`. memory: m_{n-1}; prev / seg: the embeddings of segments n-1 / n (`[b, L, E]`; seg may be
    None with recall_query="previous")."""
    c = self.config
    if c.stage == 1:
      return jnp.where(count > 0, memory, self.initial_memory[None])
    j = summary_len(c)
    span = prev[:, c.segment_len - j:] if c.recall_query == "previous" else seg[:, :j]
    return self.recall(self.summarize(span), cache, count)

  def backbone_inputs(self, p, prev):
    """`[b, 1 + k, E]`: p_n followed by the sensory memory (the last k embeddings of segment n-1)."""
    c = self.config
    return jnp.concatenate([p[:, None], prev[:, c.segment_len - c.sensory_len:]], axis=1)

  def write_inputs(self, batch: int):
    return jnp.broadcast_to(self.write_token, (batch, 1, self.write_token.shape[0]))

  def segment(self, p, prev, seg):
    """One segment's backbone call. Returns (logits `[b, L, V]`, m_n `[b, E]` float32, hidden dict of the
    segment's positions)."""
    c = self.config
    b = seg.shape[0]
    x = jnp.concatenate([self.backbone_inputs(p, prev), seg, self.write_inputs(b)], axis=1)
    logits, hidden = self.backbone(None, inputs_embeds=x, return_hidden=True)
    lo, hi = 1 + c.sensory_len, 1 + c.sensory_len + c.segment_len
    h = {key: None if v is None else v[:, lo:hi] for key, v in hidden.items()}
    return logits[:, lo:hi], hidden["hidden"][:, -1].astype(jnp.float32), h


def push(cache, count, m):
  """Writes m `[b, E]` into the ring buffer `cache` `[b, N, E]` at slot count % N; returns (cache, count + 1)."""
  n = cache.shape[1]
  slot = jax.nn.one_hot(count % n, n, dtype=cache.dtype)[None, :, None]
  return cache * (1 - slot) + m[:, None].astype(cache.dtype) * slot, count + 1


def _segment_step(core: HMTCore, carry, seg):
  """The scanned body over segments. carry: (m_{n-1}, cache, count, previous segment's embeddings, n)."""
  c = core.config
  memory, cache, count, prev, n = carry
  cut = n % c.bptt_depth == 0  # the first segment of a truncation block: no gradient into the carry
  memory, cache, prev = jax.tree.map(lambda a: jnp.where(cut, jax.lax.stop_gradient(a), a), (memory, cache, prev))
  p = core.memory_input(memory, cache, count, prev, seg)
  logits, m, hidden = core.segment(p, prev, seg)
  cache, count = push(cache, count, m)
  return (m, cache, count, seg, n + 1), (logits, m, p, hidden)


class HMT(nn.Module):
  """Hierarchical Memory Transformer over `config.backbone` (see the module docstring).

  `config` is the (frozen) model section with vocab_size resolved; keys: segment_len, sensory_len,
  cache_size, bptt_depth, recall_query, summary_fraction, stage, init_from, backbone.
  Shapes: tokens `[batch, seq]` int32 (any seq >= 1) -> logits `[batch, seq, vocab]` float32.
  """

  config: Any

  def setup(self):
    check_config(self.config)
    self.core = HMTCore(self.config)

  # ------------------------------------------------------------------------------------------ training
  def __call__(self, tokens, *, inputs_embeds=None, return_hidden=False, segment_ids=None, positions=None):
    """Training forward: all segments in one `lax.scan`.

    Args:
      tokens: `[batch, seq]` int32 (ignored if inputs_embeds is given; may then be None).
      inputs_embeds: optional `[batch, seq, embed]` that replaces the backbone's token embedding.
      return_hidden: also return a dict with "hidden" and "ffn_input" (the backbone's, at the tokens'
        positions, `[b, seq, E]`; ffn_input None if the backbone has no "mlp" block), "memory" (m_n per segment,
        `[b, n_seg, E]`), "recalled" (p_n, `[b, n_seg, E]`), "cache" (the final ring buffer `[b, N, E]`) and
        "cache_count" (int32 [], memory embeddings pushed).
      segment_ids, positions: accepted for the training loop's interface and ignored. HMT is a memory model:
        its state flows across packed documents, like the recurrent models' (DESIGN.md, "data"), and every
        backbone call has its own positions 0..L+k+1.
    Returns:
      logits `[batch, seq, vocab]` float32, or `(logits, hidden_dict)`.
    """
    del segment_ids, positions
    c = self.config
    if inputs_embeds is None:
      if tokens is None or tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq] int, got {None if tokens is None else tokens.shape}.")
      b, t = tokens.shape
      pad = -t % c.segment_len
      x = self.core.embed(jnp.pad(tokens, ((0, 0), (0, pad))))  # pad id 0
    else:
      if inputs_embeds.ndim != 3:
        raise ValueError(f"inputs_embeds must be [batch, seq, embed], got {inputs_embeds.shape}.")
      b, t = inputs_embeds.shape[:2]
      pad = -t % c.segment_len
      x = jnp.pad(inputs_embeds.astype(jnp.float32), ((0, 0), (0, pad), (0, 0)))
    if t < 1:
      raise ValueError("HMT needs at least one token.")
    n_seg = (t + pad) // c.segment_len
    e = x.shape[-1]
    segs = x.reshape(b, n_seg, c.segment_len, e)
    carry = (
        jnp.zeros((b, e), jnp.float32),  # m_0 (unused: the first segment reads initial_memory)
        jnp.zeros((b, c.cache_size, e), jnp.float32),
        jnp.zeros((), jnp.int32),
        jnp.zeros((b, c.segment_len, e), jnp.float32),  # the segment before the first: zeros
        jnp.zeros((), jnp.int32),
    )
    scan = nn.scan(_segment_step, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=1, out_axes=1, length=n_seg)
    (_, cache, count, _, _), (logits, mems, ps, hidden) = scan(self.core, carry, segs)
    logits = logits.reshape(b, n_seg * c.segment_len, -1)[:, :t]
    if not return_hidden:
      return logits
    flat = {k: None if v is None else v.reshape(b, n_seg * c.segment_len, -1)[:, :t] for k, v in hidden.items()}
    return logits, {**flat, "memory": mems, "recalled": ps, "cache": cache, "cache_count": count}

  def position_loss_mask(self, seq_len: int) -> np.ndarray:
    """`[seq_len]` float32: 1 where a token may carry loss. With recall_query="prefix" (stage 2) the first
    summary_len tokens of every segment saw their segment's future through the recalled memory, so they are 0
    (a prompt); otherwise all ones. The training loop multiplies the batch's loss_mask by it."""
    c = self.config
    mask = np.ones((seq_len,), np.float32)
    if c.stage == 2 and c.recall_query == "prefix":
      mask[np.arange(seq_len) % c.segment_len < summary_len(c)] = 0.0
    return mask

  # ------------------------------------------------------------------------------------------ streaming
  def init_cache(self, batch: int, max_len: int = 0) -> dict[str, Any]:
    """Streaming state of a fixed size whatever the length (max_len is accepted for the interface and unused):
    `{"backbone": the backbone's cache for one segment call, "open": int32 [] (1 once p_n and the sensory
    memory are in it), "pos": int32 [] tokens of the current segment seen, "seg"/"prev": [b, L, E] embeddings of
    the current / previous segment, "memory": [b, E] m_{n-1}, "cache": [b, N, E], "count": int32 []}`.
    Needs no parameters: call it on the unbound model."""
    del max_len
    c = self.config
    check_config(c)
    if c.recall_query != "previous" and c.stage == 2:
      raise ValueError("streaming generation needs recall_query='previous': with 'prefix' a segment's memory "
                       "depends on its own first tokens, which are not known when it starts.")
    e = backbone_config(c).embed_dim
    return {
        "backbone": _fresh_backbone_cache(c, batch),
        "open": jnp.zeros((), jnp.int32),
        "pos": jnp.zeros((), jnp.int32),
        "seg": jnp.zeros((batch, c.segment_len, e), jnp.float32),
        "prev": jnp.zeros((batch, c.segment_len, e), jnp.float32),
        "memory": jnp.zeros((batch, e), jnp.float32),
        "cache": jnp.zeros((batch, c.cache_size, e), jnp.float32),
        "count": jnp.zeros((), jnp.int32),
    }

  def decode_step(self, token, cache):
    """One token per sequence, `[batch]` or `[batch, 1]`. Returns (logits `[batch, vocab]`, cache).

    Jittable: closing a full segment (write token, push, shift) and opening the next (recall, p_n and the
    sensory memory into a fresh backbone cache) are `nn.cond`s on the traced counters."""
    if token.ndim == 1:
      token = token[:, None]
    if token.ndim != 2 or token.shape[1] != 1:
      raise ValueError(f"decode_step takes one token per sequence, [batch] or [batch, 1]; got {token.shape}.")
    cache, logits = _stream_token(self.core, cache, token[:, 0])
    return logits, cache

  def prefill(self, tokens, cache):
    """Processes a prompt `[batch, seq]` (any length, from any streaming state). Returns (logits
    `[batch, seq, vocab]`, cache). Token by token in one `nn.scan` of the decode step (not in parallel):
    exactly the decoder's computation, jittable."""
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq] int, got shape {tokens.shape}.")
    scan = nn.scan(_stream_token, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=1, out_axes=1, length=tokens.shape[1])
    cache, logits = scan(self.core, cache, tokens)
    return logits, cache


def _fresh_backbone_cache(config, batch: int):
  """The backbone's empty decoding state for one segment call (L + k + 2 positions)."""
  return _build_backbone(config, detached=True).init_cache(batch, backbone_len(config))


def _close_segment(core: HMTCore, cache):
  """The current segment is full: the write token gives m_n, pushed into the ring buffer; the segment becomes
  the previous one and the backbone cache is emptied."""
  b = cache["seg"].shape[0]
  _, _, hidden = core.backbone.prefill(None, cache["backbone"], inputs_embeds=core.write_inputs(b), return_hidden=True)
  m = hidden["hidden"][:, -1].astype(jnp.float32)
  mem_cache, count = push(cache["cache"], cache["count"], m)
  fresh = _fresh_backbone_cache(core.config, b)
  return {**cache, "backbone": fresh, "open": jnp.zeros((), jnp.int32), "pos": jnp.zeros((), jnp.int32),
          "seg": jnp.zeros_like(cache["seg"]), "prev": cache["seg"], "memory": m, "cache": mem_cache,
          "count": count}


def _open_segment(core: HMTCore, cache):
  """A new segment starts: p_n (recall or m_{n-1}) and the sensory memory enter a fresh backbone cache."""
  p = core.memory_input(cache["memory"], cache["cache"], cache["count"], cache["prev"], None)
  _, bb = core.backbone.prefill(None, cache["backbone"], inputs_embeds=core.backbone_inputs(p, cache["prev"]))
  return {**cache, "backbone": bb, "open": jnp.ones((), jnp.int32)}


def _stream_token(core: HMTCore, cache, token):
  """One token `[b]` through the streaming state. Returns (cache, logits `[b, V]`)."""
  c = core.config
  keep = lambda mdl, x: x
  cache = nn.cond(cache["pos"] == c.segment_len, _close_segment, keep, core, cache)
  cache = nn.cond(cache["open"] == 0, _open_segment, keep, core, cache)
  emb = core.embed(token[:, None])
  logits, bb = core.backbone.prefill(None, cache["backbone"], inputs_embeds=emb)
  seg = jax.lax.dynamic_update_slice(cache["seg"], emb, (0, cache["pos"], 0))
  # HMT's own state (segment embeddings [b, L, E], m_{n-1} [b, E], the memory cache [b, N, E]) along the batch.
  state = {name: constrain(cache[name], ("act_batch",) + (None,) * (cache[name].ndim - 1)) for name in
           ("prev", "memory", "cache")}
  return {**cache, **state, "backbone": bb, "seg": constrain(seg, ("act_batch", None, None)),
          "pos": cache["pos"] + 1}, logits[:, -1]


def load_stage1_params(workdir: str, params):
  """Stage-2 parameters initialized from the latest checkpoint of a stage-1 run in `workdir`.

  Every parameter comes from the checkpoint except the recall ones that stage 1 does not train
  (`query_token`, `recall_wq`, `recall_wk`), which keep their values in `params` (the fresh initialization: a
  stage-1 run's weight decay has only shrunk them). params: the stage-2 parameter tree (`{"core": {...}}`, the
  train state's params); each loaded array takes the sharding of the array it replaces. Raises ValueError if
  `workdir` holds no checkpoint, was not written by an HMT, or its parameters differ in shape.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top (only this loader needs orbax)

  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise ValueError(f"config.model.init_from={workdir!r}: no checkpoints directory {directory} (the workdir of a "
                     "stage-1 run, configs/hmt.py:stage=1).")
  manager = ocp.CheckpointManager(directory, item_names=("state", "data", "manifest"))
  step = manager.latest_step()
  if step is None:
    raise ValueError(f"config.model.init_from={workdir!r}: {directory} holds no checkpoint.")
  out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                      manifest=ocp.args.JsonRestore()))
  saved_model = out["manifest"].get("model", {})
  if saved_model.get("name") != "hmt":
    raise ValueError(f"config.model.init_from={workdir!r}: its checkpoint was written by model "
                     f"{saved_model.get('name')!r}, not an HMT.")
  loaded = out["state"]["params"]
  flat_new = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  flat_old = {tuple(str(getattr(k, "key", k)) for k in path): x
              for path, x in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  problems, leaves = [], []
  for path, new in flat_new.items():
    key = tuple(str(getattr(k, "key", k)) for k in path)
    if key[-1] in RECALL_PARAMS:
      leaves.append(new)
      continue
    old = flat_old.get(key)
    if old is None:
      problems.append(f"{'/'.join(key)} is not in the checkpoint")
    elif tuple(old.shape) != tuple(new.shape):
      problems.append(f"{'/'.join(key)}: checkpoint {tuple(old.shape)}, model {tuple(new.shape)}")
    else:
      value = jnp.asarray(old, new.dtype)
      sharding = getattr(new, "sharding", None)
      leaves.append(jax.device_put(value, sharding) if sharding is not None else value)
  if problems:
    raise ValueError(f"config.model.init_from={workdir!r} (step {step}) does not match this model's parameters:\n  "
                     + "\n  ".join(problems))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)
