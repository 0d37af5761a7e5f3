r"""Titans (neural long-term memory; MAC, MAG, MAL, LMM) on multi-query associative recall.

  python -m experiments.run --config configs/titans.py:variant=mac,size=tiny --workdir runs/titans_mac_tiny

Variants (`:variant=`), the block types of one layer (memarch.layers.blocks; repeated num_layers times):
  mac: ("mac", "mlp")                                   memory as context (segments + retrieval + attention)
  mag: ("mag", "mlp")                                   memory as gate (sliding-window attention x memory)
  mal: ("neural_memory", "window_attention", "mlp")     memory as layer, then sliding-window attention
  lmm: ("neural_memory", "mlp")                         the neural memory alone, no attention
  atlas: ("neural_memory", "mlp") with the ATLAS memory  (Behrouz et al. 2025; the DeepTransformer-style model:
        attention-free memory blocks + MLP, like lmm) whose memory optimizes an Omega-rule objective over the
        last memory_objective_window = 8 tokens (gates gamma), with the Muon optimizer (Newton-Schulz
        orthogonalized momentum) and elementwise polynomial features of degree 3 on keys and queries; its
        decoding state holds, besides the memory, the last 7 keys, values and gammas (a fixed size)
Sizes (`:size=`): tiny (width 64, 2 layers, 4 heads; the tiny MQAR task of configs/transformer.py: 64
tokens with 4, 8 and 16 pairs, vocab 256, and its training settings, so the two compare directly), small
and base (MQAR with the Zoology vocabulary, as configs/transformer.py). `task=mqar|text` as in
configs/transformer.py. Every value can be overridden, e.g. `--config.model.memory_chunk_size=8`.

ATLAS options of the neural memory (every variant has them; the Titans values are the defaults of mac, mag,
mal, lmm; memarch/layers/neural_memory.py and memarch/memory/neural.py give the math):
  memory_objective_window  c >= 1: the Omega rule, each update's gradient is that of the gamma-weighted losses of
                           the last c tokens (1: Titans, no gamma gates). MAC supports only 1.
  memory_optimizer         "momentum" (Titans) | "gd" (no momentum) | "muon" (momentum orthogonalized by 5
                           Newton-Schulz steps before the update; theta_max is then the step size per token).
  memory_feature_map       "identity" | "poly_elementwise" (sum_{r<=p} a_r x^r elementwise with learned a_r: the
                           memory's input size stays head_dim) | "poly" (all monomials of degree <= p, Based's
                           Taylor map: input size C(head_dim + p, p), e.g. 153 for head_dim 16 and p = 2, 969 for
                           head_dim 16 and p = 3; the memory's first layer grows to that many rows).
  memory_feature_degree    p >= 1 of the feature maps (unused by "identity").
"""

from __future__ import annotations

import ml_collections

from configs import base, transformer

VARIANTS = {
    "mac": ("mac", "mlp"),
    "mag": ("mag", "mlp"),
    "mal": ("neural_memory", "window_attention", "mlp"),
    "lmm": ("neural_memory", "mlp"),
    "atlas": ("neural_memory", "mlp"),
}

# The ATLAS memory of variant=atlas (the other variants keep the Titans memory: window 1, momentum, identity).
ATLAS = {"memory_objective_window": 8, "memory_optimizer": "muon", "memory_feature_map": "poly_elementwise",
         "memory_feature_degree": 3}

SIZES = {
    #         embed layers heads mlp   window segment persistent chunk
    "tiny": (64, 2, 4, 192, 32, 32, 4, 16),
    "small": (256, 4, 8, 704, 128, 128, 16, 16),
    "base": (768, 12, 12, 2048, 512, 512, 32, 16),
}


def model_config(variant: str, size: str, max_len: int) -> ml_collections.ConfigDict:
  embed, layers, heads, mlp, window, segment, persistent, chunk = SIZES[size]
  c = ml_collections.ConfigDict()
  # DecoderLM assembles any stack of registered block types; its registry name is "transformer".
  c.name = "transformer"
  c.vocab_size = 0  # 0: take the data's vocabulary size
  c.embed_dim = embed
  c.num_layers = layers
  c.layer_blocks = VARIANTS[variant]  # the block types of one layer
  c.num_heads = heads  # attention heads and memory heads
  c.num_kv_heads = 0  # attention GQA (0: num_heads)
  c.head_dim = 0  # 0: embed_dim // num_heads (attention and memory heads)
  c.mlp_dim = mlp  # SwiGLU hidden size
  c.rope_base = 10000.0
  c.position_embedding = "none"  # RoPE only in the attention; the memory is position-free
  # Attention (mag, mal, mac).
  c.window = window  # sliding window of the attention in mag and mal (keys per query); also the cache size
  c.num_persistent = persistent  # learned persistent-memory tokens in front of every attention's keys
  c.segment_len = segment  # mac: tokens per segment (attention sees one segment + its retrieved memory)
  # The neural memory (memarch.layers.neural_memory; memarch.memory.neural).
  c.memory_depth = 2  # layers of the per-head memory MLP (1: a matrix, a linear memory)
  c.memory_expansion = 4  # hidden size = expansion * head_dim (depth >= 2)
  c.memory_activation = "silu"  # "silu" | "gelu"
  c.memory_residual = False  # M(x) = x + MLP(x)
  # Tokens per chunk of the parallel form (gradients inside a chunk at the chunk's starting weights; 1 is
  # the exact token recurrence, slower). Decoding always runs the exact recurrence.
  c.memory_chunk_size = chunk
  c.memory_read = "after"  # "after" (M_{W_t}(q_t)) | "before" (M_{W_{t-1}}(q_t)) | "chunk_start" (approximate)
  # Inner learning rate theta = theta_max * sigmoid(.). The chunked form applies a chunk's gradients at once,
  # so keep theta_max * memory_chunk_size around 0.3: larger values diverge on runs of similar tokens
  # (MQAR's zero padding; measured, see memarch/layers/neural_memory.py). With chunk 1 up to 0.5 is stable.
  c.theta_max = 0.02
  # theta_t scaled by (1 - eta_t): momentum as a moving average of the surprise, so the step stays bounded
  # when the model learns eta -> 1 (False: the paper's parametrization; diverged on MQAR at lr >= 3e-3).
  c.memory_ema_momentum = True
  # ATLAS options (module docstring): the Titans memory unless variant=atlas.
  c.memory_objective_window = 1  # Omega rule window c (1: Titans' last-token objective)
  c.memory_optimizer = "momentum"  # "gd" | "momentum" | "muon"
  c.memory_feature_map = "identity"  # "identity" | "poly_elementwise" | "poly" (input size C(head_dim + p, p))
  c.memory_feature_degree = 2  # p of the feature maps
  if variant == "atlas":
    for key, value in ATLAS.items():
      setattr(c, key, value)
  c.conv_width = 4  # short causal depthwise convolution on q, k, v
  c.tie_embeddings = True
  c.norm_eps = 1e-6
  c.max_len = max_len  # the training length (the caches have a fixed size: generation runs beyond it)
  c.compute_dtype = "float32"  # "bfloat16" on TPU and recent GPUs; parameters and memory state stay float32
  c.attention_impl = "auto"  # kernels.attention impl: auto | xla | pallas | pallas_interpret | reference
  # nn.scan over the num_layers identical layers: compile time flat in depth (slower to compile below ~4
  # layers); parameters under layers/ with a leading [num_layers] axis (memarch.models.lm.stack_layer_params
  # converts unscanned checkpoints), so it is off by default.
  c.scan_layers = False
  # Recompute every block in the backward (nn.remat): activations kept per layer shrink to the block's input, for
  # one more forward; same parameters (experiments.benchmark plan shows the memory either way).
  c.remat = False
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = base.parse_arg(arg, variant="mac", size="tiny", task="mqar")
  if a.variant not in VARIANTS:
    raise ValueError(f"unknown variant {a.variant!r}; choose one of {sorted(VARIANTS)}.")
  if a.size not in SIZES:
    raise ValueError(f"unknown size {a.size!r}; choose one of {sorted(SIZES)}.")
  # The data, optimizer and training sections of the Transformer++ config of the same size and task:
  # the same data, steps, batch and learning-rate schedule, so the families compare directly.
  ref = transformer.get_config(f"size={a.size},task={a.task}")
  copy = lambda section: ml_collections.ConfigDict(section.to_dict())
  model = model_config(a.variant, a.size, ref.data.seq_len)
  return base.assemble(model=model, data=copy(ref.data), optim=copy(ref.optim), train=copy(ref.train))
