"""Analytic FLOPs per token of every memarch model: `model_flops(config, seq_len)`.

Conventions (stated once, used by the roofline benchmark and the launch planner):

- One multiply-add is 2 FLOPs; only matrix products (and depthwise convolutions, which are multiply-adds) are
  counted. Elementwise work (norms, activations, gates, softmax, RoPE, the feature maps' products) is not: on an
  accelerator it hides under the matmuls, and it is what makes XLA's own count (`cost_analysis()["flops"]`,
  which adds one FLOP per elementwise output) 5-20% higher at small widths (tests/test_flops.py).
- The embedding lookup is free (a gather); the unembedding is a `[embed, vocab]` matmul at every position.
- Softmax attention counts QK^T and PV over the keys each query actually sees: (t + 1) / 2 on average for
  causal attention over t tokens ("causal halving"), min(i + 1, window) for a sliding window, plus every
  prefix key (persistent memory tokens). The blockwise kernels skip fully masked blocks, so this is within a
  block's worth of what they execute.
- Chunked forms (the linear scans, Titans' neural memory) count what they execute: dense C x C intra-chunk
  products (masked by multiplication, not skipped), the chunk-to-chunk state updates, and the WY/UT inverse
  of the delta rule as `kernels.linear_scan_xla.unit_lower_inverse` computes it (matmuls only).
- Training = 3 x forward (the backward of a matmul is two matmuls of the same size) plus the recomputation a
  layer does in its backward:
    attention: the flash backward recomputes QK^T (+ the QK^T half of the core);
    linear scans (kernels.linear_scan_xla's custom VJP): the per-chunk `prep` (everything but the state pass
    and the output read) is recomputed group by group (+ that part);
    Titans' neural memory: the `jax.checkpoint`ed chunk body is recomputed (+ the whole chunk update and
    reads, not the projections). ATLAS options: the Omega rule widens every chunk's keys to b + c - 1; muon
    adds Newton-Schulz (5 steps) on every token's momentum, which dominates (memory_chunk_flops).
  MoM counts the useful work: the router, the top-k routed memories and the shared memory per token (the
  "gather" implementation scans every memory over a buffer of `capacity(T)` tokens, T without a capacity
  factor, so it executes num_memories / top_k times the routed memories' work; `executed_forward` in its
  `by_layer` entry says how much).
- HMT: each segment of L tokens is one backbone call over L + k + 2 positions (recalled memory, k sensory
  tokens, the segment, the write token) plus, in stage 2, a summary call over j + 1 positions without the
  unembedding (its logits are unused and dead-code eliminated) and the recall cross-attention; divided by L.
  HMT's segment scan has no remat, so its train FLOPs are the backbone's rule.

`model_flops(config, seq_len)` takes a full config (`config.model`, with `model.vocab_size` 0 resolved from
`config.data.vocab_size`) or a resolved model section, and returns
`{"per_token_forward", "per_token_train", "by_layer": {block: {"count", "forward", "train"}}}` (per token of
the sequence, summed over the blocks of that type; `forward`/`train` of all of them together).
"""

from __future__ import annotations

import math
from typing import Any, Callable

__all__ = ["model_flops", "block_flops", "BLOCK_FLOPS"]


def _get(c, key: str, default=None):
  if hasattr(c, "get"):
    return c.get(key, default)
  return getattr(c, key, default)


def _cost(forward: float, recompute: float = 0.0, **extra) -> dict[str, float]:
  return {"forward": float(forward), "recompute": float(recompute), **{k: float(v) for k, v in extra.items()}}


def _heads(c) -> tuple[int, int, int]:
  """(heads, kv_heads, head_dim) of the attention blocks."""
  heads = int(c.num_heads)
  kv = int(_get(c, "num_kv_heads", 0) or heads)
  hd = int(_get(c, "head_dim", 0) or c.embed_dim // heads)
  return heads, kv, hd


def mean_visible_keys(t: int, window: int = 0) -> float:
  """Mean number of keys a causal query sees over t tokens (window 0: full causal attention)."""
  if t <= 0:
    return 0.0
  if not window or window >= t:
    return (t + 1) / 2
  w = window
  return (w * (w + 1) / 2 + (t - w) * w) / t


def _attention_core(heads: int, hd: int, visible: float) -> tuple[float, float]:
  """(forward, recompute) of QK^T and PV for one query over `visible` keys."""
  qk = 2 * heads * hd * visible
  return 2 * qk, qk  # PV has the same size (v_dim = head_dim); the backward recomputes QK^T


def attention_flops(c, t: int) -> dict[str, float]:
  """Transformer++ attention block (RoPE, GQA, optional sliding window)."""
  heads, kv, hd = _heads(c)
  e = c.embed_dim
  proj = 2 * e * heads * hd * 2 + 2 * 2 * e * kv * hd  # q and o; k and v
  fwd, rec = _attention_core(heads, hd, mean_visible_keys(t, int(_get(c, "window", 0) or 0)))
  return _cost(proj + fwd, rec)


def mlp_flops(c, t: int) -> dict[str, float]:
  """SwiGLU: gate, up and down projections."""
  return _cost(3 * 2 * c.embed_dim * c.mlp_dim)


def _conv(width: int, channels: int) -> float:
  return 2 * width * channels  # depthwise causal convolution


def unit_lower_inverse_flops(n: int) -> float:
  """FLOPs of `kernels.linear_scan_xla.unit_lower_inverse` on one n x n matrix (matmuls only)."""
  if n <= 16:
    iters, p = 0, 2
    while p < n:
      iters, p = iters + 1, p * 2
    return iters * 2 * 2 * n**3  # nil @ nil and t @ nil per doubling
  h = n // 2
  return 2 * unit_lower_inverse_flops(h if n % 2 == 0 else max(h, n - h)) + 2 * 2 * (n - h) * h * h


def scan_flops(t: int, dk: int, dv: int, chunk: int, delta: bool) -> dict[str, float]:
  """`kernels.linear_scan` (chunked XLA form) per token and head: (forward, recompute = the `prep` part).

  Per chunk of C tokens: QK^T (C^2 dk), the decayed key sums P, B; with the delta rule also KK^T, the
  (I + A)^{-1} and its product with [K, V], the corrections of Qeff and P. The state pass (P S, C tokens at a
  time) and the output read Qeff S are not recomputed."""
  c = max(1, min(chunk, t)) if t else chunk
  prep = 2 * c * dk + 2 * c * dv + 2 * dk * dv  # QK^T, (QK^T * D) V or U, B = Kdec^T V or U
  state = 2 * dk * dv  # o = Qeff S
  if delta:
    prep += 2 * c * dk  # K K^T
    prep += unit_lower_inverse_flops(c) / c  # (I + A)^{-1}
    prep += 2 * c * (dk + dv)  # (I + A)^{-1} [diag(beta gamma) K, diag(beta) V]
    prep += 2 * c * dk  # (QK^T * D) w
    prep += 2 * dk * dk  # P = gamma I - Kdec^T w
    state += 2 * dk * dk * dv / c  # P S per chunk
  return {"forward": prep + state, "recompute": prep}


def _memory_dims(c) -> tuple[int, int, int]:
  h = int(c.num_heads)
  dk = int(_get(c, "head_dim", 0) or c.embed_dim // h)
  dv = int(_get(c, "value_dim", 0) or dk)
  return h, dk, dv


def linear_memory_flops(c, t: int) -> dict[str, float]:
  """LinearMemory block (linear | simple_gla | delta | gated_delta)."""
  rule = _get(c, "memory_rule", "gated_delta")
  use_g, use_beta = rule in ("simple_gla", "gated_delta"), rule in ("delta", "gated_delta")
  h, dk, dv = _memory_dims(c)
  e, w = c.embed_dim, int(_get(c, "conv_width", 0))
  proj = 2 * e * h * (2 * dk + dv) + 2 * e * h * dv + 2 * h * dv * e  # q, k, v; gate; out
  proj += 2 * e * h * (int(use_g) + int(use_beta))  # wa, wb
  if w:
    proj += _conv(w, h * (2 * dk + dv))
  s = scan_flops(t, dk, dv, int(_get(c, "chunk_size", 64)), use_beta)
  return _cost(proj + h * s["forward"], h * s["recompute"])


def based_flops(c, t: int) -> dict[str, float]:
  """Based linear attention: Taylor features of size 1 + f + f^2, a Hebbian scan with a ones column."""
  h, f = int(c.num_heads), int(_get(c, "feature_dim", 16))
  dv = int(_get(c, "head_dim", 0) or c.embed_dim // h)
  e = c.embed_dim
  proj = 2 * e * h * (2 * f + dv) + 2 * h * dv * e
  s = scan_flops(t, 1 + f + f * f, dv + 1, int(_get(c, "chunk_size", 64)), False)
  return _cost(proj + h * s["forward"], h * s["recompute"])


def mom_flops(c, t: int) -> dict[str, float]:
  """Mixture-of-Memories: router, shared q projection, top-k routed memories and the shared one."""
  rule = _get(c, "memory_rule", "gated_delta")
  use_g, use_beta = rule in ("simple_gla", "gated_delta"), rule in ("delta", "gated_delta")
  h, dk, dv = _memory_dims(c)
  e, w = c.embed_dim, int(_get(c, "conv_width", 0))
  n, k = int(c.num_memories), int(c.top_k)
  active = k + int(bool(_get(c, "shared_memory", True)))
  buffers = n + int(bool(_get(c, "shared_memory", True)))
  per_memory = 2 * e * h * (dk + dv) + 2 * e * h * (int(use_g) + int(use_beta))
  if w:
    per_memory += _conv(w, h * (2 * dk + dv))  # k, v and the shared q convolution, per memory's subsequence
  # A routed memory scans only its own tokens: chunk utilization as in a sequence of ~t * k / n tokens.
  s = scan_flops(max(1, t * k // n), dk, dv, int(_get(c, "chunk_size", 64)), use_beta)
  per_memory_fwd = per_memory + h * s["forward"]
  shared = 2 * e * n + 2 * e * h * dk + 2 * e * h * dv + 2 * h * dv * e  # router, q, gate, out
  return _cost(shared + active * per_memory_fwd, active * h * s["recompute"],
               executed_forward=shared + buffers * per_memory_fwd)


# ------------------------------------------------------------------------------------------------- Titans


def _memory_mlp_shapes(c) -> list[tuple[int, int]]:
  h, d, _ = _memory_dims(c)
  depth, exp = int(c.memory_depth), int(c.memory_expansion)
  din = d
  if _get(c, "memory_feature_map", "identity") == "poly":
    p = int(_get(c, "memory_feature_degree", 2))
    din = math.comb(d + p, p)
  if depth == 1:
    return [(din, d)]
  hid = exp * d
  return [(din, hid)] + [(hid, hid)] * (depth - 2) + [(hid, d)]


def _check_titans(c) -> None:
  opt = _get(c, "memory_optimizer", "momentum")
  if opt not in ("momentum", "gd", "muon"):
    raise NotImplementedError(f"no FLOP model for memory_optimizer={opt!r} (known: momentum, gd, muon).")


def _newton_schulz_flops(din: int, dout: int, steps: int = 5) -> float:
  """`memarch.memory.neural.newton_schulz` on one [din, dout] matrix: per step X X^T, M M and (.) X; or, for a
  matrix at least twice as wide as tall, in the Gram space (one X X^T, m x m products per step, one Q X)."""
  m, n = min(din, dout), max(din, dout)
  from memarch.memory.neural import gram_segments, uses_gram_space  # noqa: PLC0415

  if uses_gram_space(m, n):  # per segment X X^T and Q X once, m x m products per step
    return sum(2 * 2 * m * m * n + (k + 3 * (k - 1)) * 2 * m**3 for k in gram_segments(steps))
  return steps * (2 * m * m * n + 2 * m**3 + 2 * m * m * n)


def memory_chunk_flops(c, chunk_tokens: int, read: str | None = None) -> float:
  """Per token and head: the chunked update of `memarch.memory.neural.chunked_update` (all recomputed in the
  backward: its chunk body is `jax.checkpoint`ed). Per chunk of b tokens whose gradients see e = b + c - 1 keys
  (c: the Omega rule's window; 1 for Titans) and per layer (d_in, d_out):
    momentum / gd (closed form): the forward at W_0 on the keys, the hand backward (delta W^T), the reads
      diag(beta) Z W_0 + diag(b) Z S_0 - (C * Z X^T) Delta, the end state's W and S; the coefficients C (b^3);
    muon (every token at once): the forward and backward at W_0, every token's momentum S_t straight from the
      window's gradients (b e d_in d_out, through the [b, e] coefficients mix: 2 b^2 e), the weights' closed
      form (b^2 d_in d_out), Newton-Schulz on every token's momentum, each token's read through its own
      weights."""
  b = max(1, chunk_tokens)
  e = b + int(_get(c, "memory_objective_window", 1)) - 1
  read = read or _get(c, "memory_read", "after")
  opt = _get(c, "memory_optimizer", "momentum")
  shapes = _memory_mlp_shapes(c)
  # momentum/gd: C[t, i] = sum_j (beta_t / beta_j)(E_j / E_i) theta_i; muon: mix = (E_t / E_i) wgt
  per_chunk = 2 * b * b * e if opt == "muon" else 2 * b**3
  for l, (din, dout) in enumerate(shapes):
    per_chunk += 2 * e * din * dout  # forward on the keys at W_0
    if l > 0:
      per_chunk += 2 * e * dout * din  # delta @ W^T
    if opt == "muon":
      per_chunk += 2 * b * e * din * dout + 2 * b * b * din * dout  # S_t (through mix), W_t closed forms
      per_chunk += b * _newton_schulz_flops(din, dout)
      per_chunk += 2 * b * din * dout  # reads (chunk_start: the same product with W_0)
      continue
    if read == "chunk_start":
      per_chunk += 2 * b * din * dout
    else:
      per_chunk += 2 * 2 * b * din * dout + 2 * b * e * din + 2 * b * e * dout  # Z W_0, Z S_0, Z X^T, (.) Delta
    per_chunk += 2 * 2 * din * e * dout  # W_end and S_end
  return per_chunk / b


def neural_memory_parts(c, t: int) -> tuple[float, float]:
  """(projections + output per token, chunked update per token) of a NeuralMemory over t tokens."""
  _check_titans(c)
  h, d, _ = _memory_dims(c)
  e, w = c.embed_dim, int(_get(c, "conv_width", 4))
  proj = 3 * 2 * e * h * d + 2 * e * 3 * h + 2 * e * h * d + 2 * h * d * e  # q k v, gates, out gate, wo
  proj += _conv(w, 3 * h * d)
  if int(_get(c, "memory_objective_window", 1)) > 1:
    proj += 2 * e * h
  chunk = min(int(c.memory_chunk_size), max(1, t))
  return proj, h * memory_chunk_flops(c, chunk)


def neural_memory_flops(c, t: int) -> dict[str, float]:
  """Titans' neural memory block (LMM, MAL): projections, the chunked update and reads, output head."""
  proj, mem = neural_memory_parts(c, t)
  return _cost(proj + mem, mem)


def _window_attention(c, t: int) -> tuple[float, float]:
  """Titans' WindowAttention (persistent prefix + sliding window): (forward, recompute) per token."""
  heads, kv, hd = _heads(c)
  e, p = c.embed_dim, int(_get(c, "num_persistent", 0))
  proj = 2 * e * heads * hd * 2 + 2 * 2 * e * kv * hd
  proj += 2 * 2 * e * kv * hd * p / max(1, t)  # the persistent tokens' keys and values, once per call
  fwd, rec = _attention_core(heads, hd, mean_visible_keys(t, int(c.window)) + p)
  return proj + fwd, rec


def window_attention_flops(c, t: int) -> dict[str, float]:
  fwd, rec = _window_attention(c, t)
  return _cost(fwd, rec)


def mag_flops(c, t: int) -> dict[str, float]:
  """MAG: window attention and the neural memory on the same input, gated, one [e, e] output projection."""
  a_fwd, a_rec = _window_attention(c, t)
  m = neural_memory_flops(c, t)
  return _cost(a_fwd + m["forward"] + 2 * c.embed_dim**2, a_rec + m["recompute"])


def mac_flops(c, t: int) -> dict[str, float]:
  """MAC per segment of S tokens: retrieval (query projection and the memory MLP at the segment's starting
  weights, the [h, d, e] projection), attention over [persistent; h tokens; segment] (h and x causal inside
  the segment), the memory's write and read on the attention output y, the [e, e] final projection."""
  _check_titans(c)
  heads, kv, hd = _heads(c)
  h, d, _ = _memory_dims(c)
  e, p, w = c.embed_dim, int(_get(c, "num_persistent", 0)), int(_get(c, "conv_width", 4))
  s = min(int(c.segment_len), max(1, t))
  retrieve = 2 * e * h * d + _conv(w, h * d) + h * sum(2 * a * b for a, b in _memory_mlp_shapes(c)) + 2 * h * d * e
  qkv = 2 * e * heads * hd + 2 * 2 * 2 * e * kv * hd + 2 * 2 * e * kv * hd * p / s  # q; k, v of x and h; persistent
  att_fwd, att_rec = _attention_core(heads, hd, p + 2 * mean_visible_keys(s))
  wo = 2 * heads * hd * e
  proj, mem = neural_memory_parts(c, s)
  return _cost(retrieve + qkv + att_fwd + wo + proj + mem + 2 * e * e, att_rec + mem)


# ---------------------------------------------------------------------------------------------------- models

BLOCK_FLOPS: dict[str, Callable[[Any, int], dict[str, float]]] = {
    "attention": attention_flops,
    "mlp": mlp_flops,
    "linear_memory": linear_memory_flops,
    "based": based_flops,
    "mom": mom_flops,
    "neural_memory": neural_memory_flops,
    "window_attention": window_attention_flops,
    "mag": mag_flops,
    "mac": mac_flops,
}


def block_flops(name: str, c, t: int) -> dict[str, float]:
  """Per-token cost dict (`forward`, `recompute`, ...) of one block of type `name` over t tokens."""
  if name not in BLOCK_FLOPS:
    raise NotImplementedError(f"no FLOP model for block type {name!r}; known: {sorted(BLOCK_FLOPS)}.")
  return BLOCK_FLOPS[name](c, t)


def _model_section(config):
  """(model section, vocab size) of a full config or a model section."""
  if _get(config, "model") is not None and _get(config, "data") is not None:
    m = config.model
    vocab = int(_get(m, "vocab_size", 0) or config.data.vocab_size)
    return m, vocab
  return config, int(_get(config, "vocab_size", 0))


def _decoder(m, vocab: int, t: int, *, unembed: bool = True) -> dict[str, Any]:
  """Per-token costs of a DecoderLM over t tokens: {"by_layer": {...}, "forward", "recompute"}."""
  if vocab < 1:
    raise ValueError("model_flops needs the vocabulary size: pass the full config (config.data.vocab_size) or a "
                     "model section with vocab_size resolved.")
  names = tuple(m.layer_blocks) * int(m.num_layers)
  by_layer: dict[str, dict[str, float]] = {}
  for name in names:
    cost = block_flops(name, m, t)
    entry = by_layer.setdefault(name, {"count": 0, "forward": 0.0, "recompute": 0.0})
    entry["count"] += 1
    for key, value in cost.items():
      entry[key] = entry.get(key, 0.0) + value
  if unembed:
    by_layer["unembedding"] = {"count": 1, "forward": 2.0 * m.embed_dim * vocab, "recompute": 0.0}
  return {"by_layer": by_layer, "forward": sum(v["forward"] for v in by_layer.values()),
          "recompute": sum(v["recompute"] for v in by_layer.values())}


def _hmt(m, vocab: int, t: int) -> dict[str, Any]:
  """HMT: per segment a backbone call over L + k + 2 positions, a summary call over j + 1 (stage 2) and the
  recall; per token of the sequence."""
  bb = m.backbone.to_dict() if hasattr(m.backbone, "to_dict") else dict(m.backbone)
  bb_vocab = int(bb.get("vocab_size", 0) or vocab)
  bb_cfg = _Section(bb)
  seg, k = int(m.segment_len), int(m.sensory_len)
  n_call = seg + k + 2
  call = _decoder(bb_cfg, bb_vocab, n_call)
  by_layer = {f"backbone/{name}": {**v, "forward": v["forward"] * n_call / seg,
                                   "recompute": v["recompute"] * n_call / seg}
              for name, v in call["by_layer"].items()}
  fwd, rec = call["forward"] * n_call / seg, call["recompute"] * n_call / seg
  if int(m.stage) == 2:
    j = max(1, min(seg, int(round(float(m.summary_fraction) * seg))))
    summ = _decoder(bb_cfg, bb_vocab, j + 1, unembed=False)
    e = int(bb["embed_dim"])
    recall = 2 * e * e + 2 * int(m.cache_size) * e * e + 2 * 2 * int(m.cache_size) * e  # q, k of the cache, scores+mix
    extra = summ["forward"] * (j + 1) / seg + recall / seg
    by_layer["summary"] = {"count": 1, "forward": extra, "recompute": summ["recompute"] * (j + 1) / seg}
    fwd += extra
    rec += summ["recompute"] * (j + 1) / seg
  return {"by_layer": by_layer, "forward": fwd, "recompute": rec}


class _Section(dict):
  """A plain dict with attribute access (HMT's backbone section as a model config)."""

  def __getattr__(self, key):
    try:
      return self[key]
    except KeyError as e:
      raise AttributeError(key) from e


def model_flops(config, seq_len: int) -> dict[str, Any]:
  """Analytic FLOPs per token (module docstring for the conventions).

  Args:
    config: a full config (uses config.model and, for vocab_size 0, config.data.vocab_size) or a model
      section with vocab_size resolved.
    seq_len: the training sequence length t.
  Returns:
    `{"per_token_forward": float, "per_token_train": float, "by_layer": {name: {"count", "forward", "train",
    ...}}}`, train = 3 x forward + the recomputation (module docstring).
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
  m, vocab = _model_section(config)
  name = _get(m, "name", "transformer")
  if name == "hmt":
    out = _hmt(m, vocab, seq_len)
  elif name == "transformer":
    out = _decoder(m, vocab, seq_len)
  else:
    raise NotImplementedError(f"no FLOP model for model.name {name!r} (known: transformer, hmt).")
  by_layer = {}
  for key, v in out["by_layer"].items():
    entry = {k: val for k, val in v.items() if k != "recompute"}
    entry["train"] = 3 * v["forward"] + v["recompute"]
    by_layer[key] = entry
  return {"per_token_forward": out["forward"], "per_token_train": 3 * out["forward"] + out["recompute"],
          "by_layer": by_layer}
