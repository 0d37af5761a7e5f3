r"""Mixture-of-Memories (MoM): a router sends each token to k of N linear memories (plus a shared one).

  python -m experiments.run --config configs/mom.py:size=tiny --workdir runs/mom_tiny
  python -m experiments.run --config configs/mom.py:size=tiny,memory_rule=simple_gla --workdir runs/mom_gla

`:arg` keys:
  size=tiny|small|340m|1.3b   tiny: 2 MoM-only layers of width 64, 2 heads of 32 x 32 per memory (the tiny
      Gated DeltaNet's state, configs/gated_deltanet.py, per memory), on the tiny Transformer++'s MQAR task
      (64 tokens with 4, 8, 16 pairs, vocab 256). small: 4 (MoM, SwiGLU) layers of width 256, 4 heads of
      64 x 64, MQAR with the Zoology vocabulary. 340m / 1.3b: the paper's shapes (24 layers of width 1024 /
      2048, heads of 256 x 256 (width / 256 heads), SwiGLU; meant for an accelerator and `task=text`).
      Every size: 4 memories, top-2 routing, a shared memory, load-balancing loss 0.01 (the paper's).
  memory_rule=gated_delta|simple_gla|linear (also delta)   each memory's write rule.
  task=mqar|text   as in configs/transformer.py (data, optimizer and training sections are the Transformer++
      config's for tiny and small, so runs compare like with like; 340m / 1.3b use small's).
Any value can be overridden, e.g. `--config.model.num_memories=8 --config.model.capacity_factor=1.25`.
The attention keys of the Transformer++ section are kept for hybrids, e.g.
`--config.model.layer_blocks='("mom", "mlp", "attention", "mlp")'`.

Recurrent state per sequence and layer: (num_memories + shared_memory) x num_heads x head_dim x value_dim
float32 values, plus the short-convolution caches (conv_width - 1 inputs of q, k and v per memory).
"""

from __future__ import annotations

import ml_collections

from configs import base, transformer

SIZES = {
    #        embed layers heads head_dim  mlp (0: no MLP block)
    "tiny": (64, 2, 2, 32, 0),
    "small": (256, 4, 4, 64, 704),
    "340m": (1024, 24, 4, 256, 2816),
    "1.3b": (2048, 24, 8, 256, 5632),
}
MEMORY_RULES = ("gated_delta", "simple_gla", "linear", "delta")


def model_config(size: str, max_len: int, memory_rule: str) -> ml_collections.ConfigDict:
  embed, layers, heads, head_dim, mlp = SIZES[size]
  c = transformer.model_config("tiny" if size == "tiny" else "small", max_len)  # embedding, norms, attention keys
  c.name = "transformer"  # memarch.models.lm.DecoderLM: any stack of registered block types
  c.embed_dim = embed
  c.num_layers = layers
  # The block types of one layer: the MoM mixer, then SwiGLU (tiny has no MLP, like the tiny MQAR transformer).
  c.layer_blocks = ("mom",) if mlp == 0 else ("mom", "mlp")
  c.mlp_dim = mlp or 4 * embed  # SwiGLU hidden size (only used by "mlp" blocks)
  c.num_heads = heads  # heads per memory (every memory has the same head layout)
  c.num_kv_heads = 0  # attention blocks in hybrids: 0 = num_heads (no GQA)
  c.head_dim = head_dim  # q/k dim per head (0: embed_dim // num_heads)
  c.value_dim = 0  # v dim per head (0: head_dim, as in the paper's MoM configs)
  c.memory_rule = memory_rule  # each memory's write rule: gated_delta | delta | simple_gla | linear
  c.conv_width = 4  # short causal conv on q, k, v over each memory's own subsequence (0: none, SiLU only)
  c.num_memories = 4  # N routed memories
  c.top_k = 2  # memories each token is routed to (writes and reads)
  # Buffer per memory = ceil(capacity_factor * T * top_k / N) tokens; later routed tokens are dropped (they
  # neither write nor read that memory) and counted in the mom/dropped metric. 0: no capacity (buffers of T
  # tokens, nothing is dropped; the paper's setting).
  c.capacity_factor = 0.0
  c.shared_memory = True  # one more memory that every token writes and reads (the paper's default)
  c.aux_loss_scale = 0.01  # weight of the load-balancing loss added to the training loss (0: off)
  # "gather": each memory's routed tokens buffered and scanned alone (exact MoM); "dense": every memory over
  # the full sequence with masked writes (exact only with conv_width=0, which it requires; N x the scan work).
  c.mom_impl = "gather"
  c.chunk_size = 64  # tokens per chunk of kernels.linear_scan's chunked form
  c.scan_impl = "auto"  # kernels.linear_scan impl: auto | xla | pallas | pallas_interpret | reference
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = base.parse_arg(arg, size="tiny", memory_rule="gated_delta", task="mqar")
  if a.size not in SIZES:
    raise ValueError(f"unknown size {a.size!r}; choose one of {sorted(SIZES)}.")
  if a.memory_rule not in MEMORY_RULES:
    raise ValueError(f"unknown memory_rule {a.memory_rule!r}; choose one of {MEMORY_RULES}.")
  ref = transformer.get_config(f"size={'tiny' if a.size == 'tiny' else 'small'},task={a.task}")
  model = model_config(a.size, ref.model.max_len, a.memory_rule)
  return base.assemble(model=model, data=ref.data, optim=ref.optim, train=ref.train)
