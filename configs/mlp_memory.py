r"""MLP Memory and Memory Decoder with kNN-LM (memarch.knn.pipeline): one command per stage.

  # 0. the base LM (a Transformer++ of width 128, byte-level, 90/10 split):
  python -m experiments.run --config configs/mlp_memory.py:stage=base --workdir runs/mm_base \
      --config.data.files=../shared/data/tinyshakespeare.txt
  # 1-4. the pipeline, all in one workdir, each stage reading what the previous one wrote:
  python -m experiments.run --config configs/mlp_memory.py:stage=datastore --workdir runs/mm \
      --config.base_workdir=runs/mm_base
  python -m experiments.run --config configs/mlp_memory.py:stage=targets --workdir runs/mm --config.base_workdir=runs/mm_base
  python -m experiments.run --config configs/mlp_memory.py:stage=train,memory=mlp --workdir runs/mm --config.base_workdir=runs/mm_base
  python -m experiments.run --config configs/mlp_memory.py:stage=train,memory=decoder --workdir runs/mm --config.base_workdir=runs/mm_base
  python -m experiments.run --config configs/mlp_memory.py:stage=eval --workdir runs/mm --config.base_workdir=runs/mm_base

`:arg` keys: stage (base | datastore | targets | train | eval), memory (mlp | decoder; the train stage),
base_workdir, files (the corpus; "" = the base run's data.files). stage=base returns an ordinary training
config (configs/transformer.py's Transformer++ with the sizes below); the other stages set `entry`, which
experiments/run.py calls instead of the training loop. Everything else is overridable with --config.X=...
The whole-pipeline benchmark with timings: `python -m experiments.benchmark mlp_memory` (--help).
"""

from __future__ import annotations

import ml_collections

from configs import base, transformer

STAGES = ("base", "datastore", "targets", "train", "eval")


def base_lm_config(files: str) -> ml_collections.ConfigDict:
  """The base LM: Transformer++ on byte-level text, width 128 (the datastore keys have 128 dimensions)."""
  c = transformer.get_config("size=small,task=text")
  c.unlock()
  c.model.embed_dim = 128  # = the key dimension: exact search over ~1M keys costs 2 * 128 FLOPs per pair
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 352  # SwiGLU hidden (about 8/3 * 128, rounded to a multiple of 32)
  c.model.max_len = 256
  c.data.seq_len = 256  # training length = the context of every datastore key
  c.data.files = files
  c.data.val_fraction = 0.1  # the 90/10 split (the pipeline's data.val_fraction must match)
  c.train.steps = 1500
  c.train.batch_size = 16
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.eval.max_batches = 8
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.lock()
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = base.parse_arg(arg, stage="datastore", memory="mlp", base_workdir="", files="")
  if a.stage not in STAGES:
    raise ValueError(f"unknown stage {a.stage!r}; choose one of {STAGES}.")
  if a.memory not in ("mlp", "decoder"):
    raise ValueError(f"unknown memory {a.memory!r}; choose mlp or decoder.")
  if a.stage == "base":
    return base_lm_config(a.files)

  c = ml_collections.ConfigDict()
  c.entry = "memarch.knn.pipeline:run_stage"  # experiments/run.py calls this instead of train_and_evaluate
  c.stage = a.stage  # datastore | targets | train | eval
  c.memory = a.memory  # the memory the train stage trains: mlp (MLP Memory) | decoder (Memory Decoder)
  c.base_workdir = a.base_workdir  # workdir of the trained base LM (experiments.run with stage=base)
  c.progress = True  # tqdm bars and progress lines

  c.data = ml_collections.ConfigDict()
  c.data.files = a.files  # corpus glob; "": the base run's data.files
  c.data.val_fraction = 0.1  # the last 10% of the byte stream is validation (as the base LM was trained)
  c.data.seq_len = 0  # context rows of the datastore and the decoder; 0: the base run's data.seq_len

  c.datastore = ml_collections.ConfigDict()
  c.datastore.key_layer = -1  # which feed-forward block's normed input is the key: -1 the last, 0 the first
  c.datastore.key_dtype = "float32"  # float32 | float16 (half the memory; distances are computed in float32)
  c.datastore.shard_rows = 256  # rows of seq_len per shard file (256 x 256 = 65,536 entries)
  c.datastore.batch_size = 16  # rows per base-LM forward

  c.knn = ml_collections.ConfigDict()
  c.knn.k = 32  # neighbours per query (the sparse top-K targets have K entries)
  c.knn.temperature = 1.0  # T of softmax(-d / T) for the training targets (d: squared L2 distance)
  c.knn.temperatures = (0.5, 1.0, 2.0, 4.0, 8.0)  # kNN-LM evaluated at each; the best is reported
  c.knn.lambdas = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)  # interpolation weights
  c.knn.train_tokens = 200_000  # kNN targets for the first N training positions (0: all of them)
  c.knn.val_tokens = 0  # validation positions evaluated (0: the whole validation split)
  c.knn.block_size = 16384  # datastore keys per block of the exact search
  c.knn.query_batch = 512  # queries per search call
  c.knn.approx = False  # lax.approx_max_k per block (fast on TPU; exact on CPU/GPU)

  c.mlp = ml_collections.ConfigDict()  # MLP Memory: [LayerNorm -> MLP] residual blocks on the key
  c.mlp.name = "mlp_memory"
  c.mlp.width = 256  # residual width (the key is projected to it)
  c.mlp.depth = 4  # residual blocks
  c.mlp.mlp_ratio = 4  # hidden = width * mlp_ratio, GELU
  c.mlp.compute_dtype = "float32"

  c.decoder = transformer.model_config("tiny", 256)  # Memory Decoder: a small Transformer++ on the tokens
  c.decoder.embed_dim = 128
  c.decoder.num_layers = 2
  c.decoder.mlp_dim = 352
  c.decoder.layer_blocks = ("attention", "mlp")

  c.memory_train = ml_collections.ConfigDict()
  c.memory_train.alpha = 0.5  # loss = alpha * KL(p_kNN || p_mem) + (1 - alpha) * CE
  c.memory_train.steps = 2000
  c.memory_train.batch_size = 2048  # positions per step (the decoder: batch_size // seq_len rows)
  c.memory_train.eval_batch_size = 4096  # positions per validation call
  c.memory_train.seed = 0  # initialization and batch order
  c.memory_train.log_every = 100
  c.memory_train.checkpoint_every = 500

  c.optim = base.optim_config(lr=1e-3, warmup_steps=100)  # memarch.optim (AdamW, warmup + cosine)
  c.lock()
  return c

