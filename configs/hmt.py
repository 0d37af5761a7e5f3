r"""HMT (Hierarchical Memory Transformer) over any registered backbone, on multi-query associative recall.

  python -m experiments.run --config configs/hmt.py:backbone=transformer,size=tiny,segment=16,sensory=4,cache=4,bptt=2,recall=previous,stage=2 --workdir runs/hmt_tiny

The sequence is processed segment by segment (memarch/models/hmt.py): each segment's backbone call sees
[recalled memory embedding; the last `sensory` tokens of the previous segment; the segment; a write token], and
the write token's hidden state is pushed into a cache of the last `cache` memory embeddings, recalled by
cross-attention. The backbone's context is `segment + sensory + 2` positions, whatever the sequence length.

`:arg` keys (defaults in parentheses):
  backbone=transformer|titans|gated_deltanet (transformer): the backbone's model section, from that family's
      config at the same size (titans: variant mac; any other variant via --config.model.backbone.layer_blocks).
  size=tiny|small|base (tiny): backbone size, and the data, optimizer and training sections of the
      Transformer++ config of that size (tiny: 64-token MQAR with 4, 8, 16 pairs, vocab 256; trains on a CPU).
  task=mqar|passkey (mqar): passkey is retrieval of a key hidden in filler (configs/common.passkey_data),
      trained at `passkey_len` tokens and evaluated at 1x, 4x and 16x that length.
  passkey_len (256): the passkey training length.
  segment (16): L, tokens per segment (model.segment_len).
  sensory (4): k, tokens of the previous segment repeated in front of each segment (model.sensory_len).
  cache (4): N, memory embeddings kept for recall (model.cache_size).
  bptt (2): segments per truncated-backpropagation block (model.bptt_depth); gradients never cross a block.
  recall=previous|prefix (previous): which span is summarized into the recall query (model.recall_query):
      "previous" the last summary_fraction of the previous segment (causal; streaming generation works);
      "prefix" the first summary_fraction of the segment itself (the paper's): those tokens become a prompt that
      carries no loss (HMT.position_loss_mask), since they see their own future through the recalled memory.
  stage=1|2 (2): 1 trains without recall (each segment reads the previous memory embedding); 2 with recall.
      Set --config.model.init_from=<stage-1 workdir> to start stage 2 from a stage-1 run (the paper's
      schedule; memarch.models.hmt.load_stage1_params).
Any value can be overridden, e.g. `--config.model.summary_fraction=0.25 --config.model.backbone.num_layers=1`.
"""

from __future__ import annotations

import ml_collections

from configs import base, common, linear_common, titans, transformer

BACKBONES = ("transformer", "titans", "gated_deltanet")


def backbone_model_config(backbone: str, size: str, max_len: int) -> ml_collections.ConfigDict:
  """The backbone's model section (max_len: its context, one segment's call)."""
  if backbone == "transformer":
    m = transformer.model_config(size, max_len)
    if size == "tiny":
      m.layer_blocks = ("attention",)  # as the tiny Transformer++ on MQAR (configs/transformer.py)
  elif backbone == "titans":
    m = titans.model_config("mac", size, max_len)
  elif backbone == "gated_deltanet":
    m = linear_common.linear_model_config(size, max_len, rule="gated_delta")
  else:
    raise ValueError(f"unknown backbone {backbone!r}; choose one of {BACKBONES}.")
  return m


def model_config(*, backbone: str, size: str, max_len: int, segment: int, sensory: int, cache: int, bptt: int,
                 recall: str, stage: int) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "hmt"  # memarch.models.hmt.HMT
  c.vocab_size = 0  # 0: take the data's vocabulary size (the backbone's 0 then takes this one)
  c.max_len = max_len  # the training length (any length runs: the backbone only ever sees one segment)
  c.segment_len = segment  # L: tokens per segment
  c.sensory_len = sensory  # k: last tokens of the previous segment prepended to each segment (0..L)
  c.cache_size = cache  # N: memory embeddings in the long-term cache (a ring buffer)
  c.bptt_depth = bptt  # segments per truncated-BPTT block (stop_gradient on the carry at each block start)
  c.recall_query = recall  # "previous" (causal; streaming) | "prefix" (the paper's; prefix tokens carry no loss)
  c.summary_fraction = 0.5  # the fraction of a segment summarized (with the query token) for recall
  c.stage = stage  # 1: no recall (p_n = m_{n-1}); 2: recall over the cache
  c.init_from = ""  # stage 2: a stage-1 workdir whose latest checkpoint initializes the parameters
  # The backbone: a full model section of any registered model; its context is one segment's call.
  c.backbone = backbone_model_config(backbone, size, segment + sensory + 2)
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = base.parse_arg(arg, backbone="transformer", size="tiny", task="mqar", passkey_len=256, segment=16, sensory=4,
                     cache=4, bptt=2, recall="previous", stage=2)
  if a.backbone not in BACKBONES:
    raise ValueError(f"unknown backbone {a.backbone!r}; choose one of {BACKBONES}.")
  if a.size not in transformer.SIZES:
    raise ValueError(f"unknown size {a.size!r}; choose one of {sorted(transformer.SIZES)}.")
  if a.recall not in ("previous", "prefix"):
    raise ValueError(f"unknown recall {a.recall!r}; choose previous or prefix.")
  if a.stage not in (1, 2):
    raise ValueError(f"unknown stage {a.stage!r}; choose 1 or 2.")
  # The data, optimizer and training sections of the Transformer++ config of the same size, so HMT compares
  # directly with the families trained on them.
  ref = transformer.get_config(f"size={a.size},task=mqar")
  copy = lambda section: ml_collections.ConfigDict(section.to_dict())
  if a.task == "mqar":
    data = copy(ref.data)
  elif a.task == "passkey":
    data = common.passkey_data(seq_len=a.passkey_len)
  else:
    raise ValueError(f"unknown task {a.task!r}; choose mqar or passkey.")
  model = model_config(backbone=a.backbone, size=a.size, max_len=data.seq_len, segment=a.segment, sensory=a.sensory,
                       cache=a.cache, bptt=a.bptt, recall=a.recall, stage=a.stage)
  return base.assemble(model=model, data=data, optim=copy(ref.optim), train=copy(ref.train))
