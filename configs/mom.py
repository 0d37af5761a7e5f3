r"""Mixture-of-Memories (MoM): a router sends each token to k of N linear memories (plus a shared one).

  python -m experiments.run --config configs/mom.py:size=tiny --workdir runs/mom_tiny
  python -m experiments.run --config configs/mom.py:size=tiny,memory_rule=simple_gla --workdir runs/mom_gla

Sizes (`:size=`): tiny (2 MoM-only layers of width 64; MQAR, 64 tokens with 4, 8 and 16 pairs, vocab 256,
trains on a laptop CPU), small (4 layers of width 256 with SwiGLU, MQAR with the Zoology vocabulary),
340m and 1.3b (the paper's shapes: 24 layers of width 1024 / 2048, 4 memories, top-2, a shared memory,
head_dim 256, aux loss 0.01; heads = width / 256, v_dim = head_dim; meant for an accelerator and real text).
`:memory_rule=gated_delta|simple_gla|linear` picks each memory's update rule (also `delta`).
`:task=mqar|text` as in configs/transformer.py. Any value can be overridden, e.g.
`--config.model.num_memories=8 --config.model.capacity_factor=1.25`.

Recurrent state per sequence and layer: (num_memories + shared_memory) x num_heads x head_dim x
(head_dim * expand_v) float32 values, plus the short-convolution caches (conv_width - 1 inputs of q, k, v
per memory).
"""

from __future__ import annotations

import ml_collections

from configs import base, common

SIZES = {
    #        embed layers heads head_dim  mlp   batch steps  lr     vocab
    "tiny": (64, 2, 4, 16, 0, 64, 1000, 3e-3, 256),
    "small": (256, 4, 4, 64, 704, 64, 4000, 1e-3, 8192),
    "340m": (1024, 24, 4, 256, 2816, 256, 20000, 3e-4, 8192),
    "1.3b": (2048, 24, 8, 256, 5632, 256, 20000, 3e-4, 8192),
}
MEMORY_RULES = ("gated_delta", "simple_gla", "linear", "delta")


def model_config(size: str, max_len: int, memory_rule: str) -> ml_collections.ConfigDict:
  embed, layers, heads, head_dim, mlp, *_ = SIZES[size]
  c = ml_collections.ConfigDict()
  c.name = "transformer"  # the DecoderLM stack (memarch.models.registry); layer_blocks makes it MoM
  c.vocab_size = 0  # 0: take the data's vocabulary size
  c.embed_dim = embed
  c.num_layers = layers
  # The block types of one layer: MoM mixer + SwiGLU; tiny drops the MLP (as the tiny MQAR transformer does).
  c.layer_blocks = ("mom",) if mlp == 0 else ("mom", "mlp")
  c.mlp_dim = mlp or 4 * embed  # SwiGLU hidden size (used only with an "mlp" block)
  c.num_heads = heads  # heads per memory (all memories share the head layout)
  c.head_dim = head_dim  # key dim per head (0: embed_dim // num_heads)
  c.expand_v = 1.0  # value dim per head = head_dim * expand_v (the paper's MoM configs use 1)
  c.memory_rule = memory_rule  # each memory's write rule: gated_delta | delta | simple_gla | linear
  c.conv_width = 4  # short causal conv on q, k, v over each memory's own subsequence (0: none, SiLU only)
  c.num_memories = 4  # N routed memories
  c.top_k = 2  # memories each token writes and reads
  # Buffer per memory = ceil(capacity_factor * T * top_k / N) tokens (later routed tokens are dropped and
  # counted in the mom/dropped metric); 0: no capacity (buffers of T tokens, nothing is ever dropped).
  c.capacity_factor = 0.0
  c.shared_memory = True  # one more memory that every token writes and reads (the paper's default)
  c.aux_loss_scale = 0.01  # weight of the load-balancing loss added to the training loss (0: off)
  # "gather": routed tokens buffered per memory (exact MoM); "dense": every memory over the full sequence with
  # masked writes (exact only with conv_width=0, which it requires; no gathers, N x the scan work).
  c.mom_impl = "gather"
  c.scan_impl = "auto"  # kernels.linear_scan impl: auto | xla | pallas | pallas_interpret | reference
  c.scan_chunk_size = 64  # tokens per chunk of the chunked scan
  c.position_embedding = "none"  # memories are recurrent: no position embedding needed
  c.tie_embeddings = True
  c.norm_eps = 1e-6
  c.max_len = max_len  # the training length (a recurrent model runs beyond it)
  c.compute_dtype = "float32"  # "bfloat16" on TPU and recent GPUs; parameters and states stay float32
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = base.parse_arg(arg, size="tiny", memory_rule="gated_delta", task="mqar")
  if a.size not in SIZES:
    raise ValueError(f"unknown size {a.size!r}; choose one of {sorted(SIZES)}.")
  if a.memory_rule not in MEMORY_RULES:
    raise ValueError(f"unknown memory_rule {a.memory_rule!r}; choose one of {MEMORY_RULES}.")
  *_, batch, steps, lr, vocab = SIZES[a.size]
  if a.task == "mqar":
    tiny = a.size == "tiny"
    settings = ((64, 4), (64, 8), (64, 16)) if tiny else ((64, 4), (128, 8), (256, 16), (256, 32), (256, 64))
    data = common.mqar_data(
        vocab_size=vocab, settings=settings, num_train_examples=10_000 if tiny else 100_000,
        num_eval_examples=256 if tiny else 1_000,
    )
  elif a.task == "text":
    data = common.mqar_data()
    data.name = "text"
    data.seq_len = 256 if a.size == "tiny" else 2048
  else:
    raise ValueError(f"unknown task {a.task!r}; choose mqar or text.")
  model = model_config(a.size, data.seq_len, a.memory_rule)
  optim = base.optim_config(lr=lr, warmup_steps=min(100, steps // 10))
  if a.size == "tiny" and a.task == "mqar":
    # As configs/transformer.py's tiny MQAR: constant lr, no weight decay (the recall circuit forms sooner).
    optim.schedule = "constant"
    optim.weight_decay = 0.0
  return base.assemble(model=model, data=data, optim=optim, train=base.train_config(steps=steps, batch_size=batch))
