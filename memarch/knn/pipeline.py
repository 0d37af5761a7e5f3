"""The MLP Memory / Memory Decoder pipeline, one stage per call: `run_stage(config, workdir)`.

    python -m experiments.run --config configs/mlp_memory.py:stage=datastore --workdir runs/mm
    python -m experiments.run --config configs/mlp_memory.py:stage=targets   --workdir runs/mm
    python -m experiments.run --config configs/mlp_memory.py:stage=train,memory=mlp     --workdir runs/mm
    python -m experiments.run --config configs/mlp_memory.py:stage=train,memory=decoder --workdir runs/mm
    python -m experiments.run --config configs/mlp_memory.py:stage=eval    --workdir runs/mm

Every stage reads what the previous one wrote in the same workdir and writes its own subdirectory, with a
`summary.json` (including its wall time in seconds); a missing or damaged input is an error that names the
stage to run. The base LM is any trained memarch run (`config.base_workdir`, loaded with memarch.train.load_run).

- datastore: keys and values of the whole training split (memarch.knn.datastore) -> `<workdir>/datastore/`.
- targets: exact kNN search (memarch.knn.search) for the first `knn.train_tokens` datastore entries as queries
  (leave-one-out: each query's own entry excluded) and for the first `knn.val_tokens` validation positions (their
  keys from the base LM, with its log p_LM of the true next token) -> `<workdir>/targets/{train,val}.npz`.
- train (memory=mlp|decoder): the memory trained on alpha * KL(p_kNN || p_mem) + (1 - alpha) * CE with sparse
  top-K targets at temperature `knn.temperature`, memarch's optimizer and orbax checkpoints (resumable) ->
  `<workdir>/memory_<memory>/`; its summary holds the validation KL to p_kNN before and after training.
- eval: validation perplexity of the base LM, base + kNN-LM (temperature and lambda grids), base + each trained
  memory (lambda grid); best lambda each -> `<workdir>/eval/results.json`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from memarch import checkpoint as ckpt_lib
from memarch.data import text
from memarch.data.tokenizer import ByteTokenizer
from memarch.knn import knn_lm, search
from memarch.knn.datastore import Datastore, build_datastore, corpus_streams, encode_rows, make_encoder
from memarch.metrics import MetricWriter
from memarch.models.mlp_memory import MemoryDecoder, MLPMemory, memory_loss
from memarch.optim import make_optimizer, make_schedule

STAGES = ("datastore", "targets", "train", "eval")
MEMORIES = ("mlp", "decoder")


# ----------------------------------------------------------------------------------------------------
# Inputs of each stage


def load_base(config):
  """(base config, model, params, step) of config.base_workdir, with a clear error when it is not a trained run."""
  from memarch.train import load_run  # noqa: PLC0415 - memarch.train imports the whole training stack

  base = str(config.base_workdir)
  if not base or not os.path.isdir(base):
    raise FileNotFoundError(f"base_workdir={base!r} is not a directory: train the base LM first (see "
                            "configs/mlp_memory.py: stage=base) and point --config.base_workdir at its workdir.")
  try:
    return load_run(base)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"base_workdir={base!r} holds no trained run: {e}") from e


def corpus_settings(config, base_config) -> tuple[str, float, int]:
  """(files, val_fraction, seq_len): the pipeline's corpus, defaulting to the base run's files and length."""
  files = str(config.data.files) or str(base_config.data.get("files", ""))
  if not files:
    raise ValueError("no corpus: set --config.data.files (the base run has no data.files either).")
  seq_len = int(config.data.seq_len) or int(base_config.data.seq_len)
  return files, float(config.data.val_fraction), seq_len


def _stage_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def _write_json(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _save_npz(path: str, **arrays) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _load_npz(path: str, stage: str) -> dict[str, np.ndarray]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: run stage={stage} first (with the same --workdir).")
  try:
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:  # a truncated or corrupt file
    raise ValueError(f"{path} is damaged ({e}): delete it and run stage={stage} again.") from e


def _check_workdir(workdir: str, stage: str) -> None:
  if stage != "datastore" and not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir {workdir!r} does not exist: run the earlier stages (datastore, targets, "
                            "train) with this workdir first.")


# ----------------------------------------------------------------------------------------------------
# Stages


def stage_datastore(config, workdir: str) -> dict[str, Any]:
  start = time.time()
  base_config, model, params, step = load_base(config)
  files, val_fraction, seq_len = corpus_settings(config, base_config)
  d = config.datastore
  manifest = build_datastore(
      model, params, _stage_dir(workdir, "datastore"), files=files, val_fraction=val_fraction, seq_len=seq_len,
      key_layer=int(d.key_layer), key_dtype=str(d.key_dtype), shard_rows=int(d.shard_rows),
      batch_size=int(d.batch_size), progress=bool(config.progress),
      info={"base_workdir": os.path.abspath(str(config.base_workdir)), "checkpoint_step": int(step)})
  summary = {"stage": "datastore", "seconds": time.time() - start, "size": manifest["size"], "dim": manifest["dim"],
             "key_dtype": manifest["key_dtype"], "shards": len(manifest["shards"])}
  _write_json(os.path.join(_stage_dir(workdir, "datastore"), "summary.json"), summary)
  return summary


def _tokens(requested: int, available: int, seq_len: int) -> int:
  """requested (0: all) positions, at most available, rounded down to whole rows of seq_len."""
  n = available if requested <= 0 else min(requested, available)
  n = (n // seq_len) * seq_len
  if n < seq_len:
    raise ValueError(f"{requested} tokens asked for, {available} available: not one row of {seq_len}.")
  return n


def stage_targets(config, workdir: str) -> dict[str, Any]:
  start = time.time()
  ds = Datastore.open(_stage_dir(workdir, "datastore"))
  base_config, model, params, _ = load_base(config)
  files, val_fraction, seq_len = corpus_settings(config, base_config)
  if (files, val_fraction, seq_len) != (ds.manifest["corpus"], ds.manifest["val_fraction"], ds.manifest["seq_len"]):
    raise ValueError(f"the datastore was built on {ds.manifest['corpus']!r} (val_fraction "
                     f"{ds.manifest['val_fraction']}, seq_len {ds.manifest['seq_len']}); the config now says "
                     f"{files!r} ({val_fraction}, {seq_len}). Rebuild the datastore or restore the config.")
  kc = config.knn
  out = _stage_dir(workdir, "targets")
  os.makedirs(out, exist_ok=True)
  key_dtype = jnp.float16 if ds.manifest["key_dtype"] == "float16" else jnp.float32
  keys = jnp.asarray(np.asarray(ds.keys), key_dtype)
  values = np.asarray(ds.values)
  timings = {}
  common = dict(k=int(kc.k), query_batch=int(kc.query_batch), block_size=int(kc.block_size),
                approx=bool(kc.approx), progress=bool(config.progress))

  path = os.path.join(out, "train.npz")
  if not os.path.exists(path):
    n = _tokens(int(kc.train_tokens), ds.manifest["size"], seq_len)
    t0 = time.time()
    dist, idx = search.knn_search_batched(ds.head(n)[0], keys, exclude=np.arange(n, dtype=np.int32),
                                          desc="kNN targets (train)", **common)
    timings["train_search_seconds"] = time.time() - t0
    _save_npz(path, dist=dist, idx=idx, nbr_values=values[idx], next_tokens=values[:n])

  path = os.path.join(out, "val.npz")
  if not os.path.exists(path):
    _, val = corpus_streams(files, val_fraction)
    src = text.PackedTextSource(val, seq_len, ByteTokenizer.EOS)
    n = _tokens(int(kc.val_tokens), len(src) * seq_len, seq_len)
    t0 = time.time()
    vkeys, vtargets, lp_lm = encode_rows(make_encoder(model, params, key_layer=ds.manifest["key_layer"]), src, 0,
                                         n // seq_len, int(config.datastore.batch_size))
    timings["val_encode_seconds"] = time.time() - t0
    t0 = time.time()
    dist, idx = search.knn_search_batched(vkeys, keys, desc="kNN (validation)", **common)
    timings["val_search_seconds"] = time.time() - t0
    _save_npz(path, keys=vkeys, next_tokens=vtargets, lp_lm=lp_lm, dist=dist, idx=idx, nbr_values=values[idx])
  summary_path = os.path.join(out, "summary.json")
  old = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
  summary = {**old, **timings, "stage": "targets", "k": int(kc.k), "datastore_size": ds.manifest["size"],
             "train_queries": int(np.load(os.path.join(out, "train.npz"))["dist"].shape[0]),
             "val_queries": int(np.load(os.path.join(out, "val.npz"))["dist"].shape[0])}
  summary["seconds"] = old.get("seconds", 0.0) + time.time() - start
  _write_json(summary_path, summary)
  return summary


@flax.struct.dataclass
class MemoryState:
  step: jax.Array
  params: Any
  opt_state: Any


def memory_model(config, memory: str, vocab_size: int, key_dim: int, seq_len: int):
  """(model, frozen model config) of the memory to train."""
  if memory == "mlp":
    m = config.mlp.to_dict()
    m.update(vocab_size=vocab_size, key_dim=key_dim)
    mc = ml_collections.FrozenConfigDict(m)
    return MLPMemory(mc), mc
  if memory == "decoder":
    m = config.decoder.to_dict()
    m.update(vocab_size=vocab_size, max_len=seq_len)
    mc = ml_collections.FrozenConfigDict(m)
    return MemoryDecoder(mc), mc
  raise ValueError(f"memory must be one of {MEMORIES}, got {memory!r}.")


class _MemoryData:
  """The memory's training and validation inputs: keys (mlp) or token rows (decoder), with sparse targets."""

  def __init__(self, config, workdir: str, memory: str, seq_len: int, files: str, val_fraction: float):
    tr = _load_npz(os.path.join(workdir, "targets", "train.npz"), "targets")
    va = _load_npz(os.path.join(workdir, "targets", "val.npz"), "targets")
    temp = float(config.knn.temperature)
    self.memory, self.seq_len = memory, seq_len
    ids, probs = knn_lm.sparse_knn_targets(tr["dist"], tr["nbr_values"], temp)
    self.train = {"ids": np.asarray(ids), "probs": np.asarray(probs), "next": tr["next_tokens"]}
    ids, probs = knn_lm.sparse_knn_targets(va["dist"], va["nbr_values"], temp)
    self.val = {"ids": np.asarray(ids), "probs": np.asarray(probs), "next": va["next_tokens"]}
    n, nv = len(self.train["next"]), len(self.val["next"])
    if memory == "mlp":
      ds = Datastore.open(os.path.join(workdir, "datastore"), check=False)
      self.train["x"] = ds.head(n)[0].astype(np.float32)
      self.val["x"] = va["keys"]
      self.key_dim = int(ds.manifest["dim"])
    else:
      train, val = corpus_streams(files, val_fraction)
      for split, stream, count in ((self.train, train, n), (self.val, val, nv)):
        b = text.PackedTextSource(stream, seq_len, ByteTokenizer.EOS).__getitems__(list(range(count // seq_len)))
        if not np.array_equal(b["targets"].reshape(-1), split["next"]):
          raise ValueError("the targets stage's next tokens do not match the corpus: rebuild the targets.")
        split["x"] = b["inputs"]
        split["segment_ids"], split["positions"] = b["segment_ids"], b["positions"]
        for key in ("ids", "probs", "next"):  # positions -> rows of seq_len
          split[key] = split[key].reshape(count // seq_len, seq_len, *split[key].shape[1:])
      self.key_dim = 0

  def batch(self, split: dict, index: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in split.items()}

  def size(self, split: dict) -> int:
    return len(split["x"])


def _apply_memory(model, memory: str, params, batch):
  if memory == "mlp":
    return model.apply({"params": params}, batch["x"])
  return model.apply({"params": params}, batch["x"], segment_ids=batch["segment_ids"], positions=batch["positions"])


def _val_metrics(model, memory, params, data: _MemoryData, alpha: float, batch: int, fn=None) -> dict[str, float]:
  """KL to p_kNN, CE and loss over the whole validation set (batched; a weighted mean over positions)."""
  n = data.size(data.val)
  tot = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
  count = 0
  for s in range(0, n, batch):
    idx = np.arange(s, min(s + batch, n))
    b = data.batch(data.val, np.concatenate([idx, np.full(batch - len(idx), idx[-1])]))
    m = np.zeros((batch,) + b["next"].shape[1:], np.float32)
    m[: len(idx)] = 1.0
    out = fn(params, b, m)
    w = float(m.sum())
    for k in tot:
      tot[k] += float(out[k]) * w
    count += w
  return {k: v / count for k, v in tot.items()}


def stage_train(config, workdir: str) -> dict[str, Any]:
  start = time.time()
  memory = str(config.memory)
  base_config, base_model, _, _ = load_base(config)
  files, val_fraction, seq_len = corpus_settings(config, base_config)
  data = _MemoryData(config, workdir, memory, seq_len, files, val_fraction)
  model, mc = memory_model(config, memory, int(base_model.config.vocab_size), data.key_dim, seq_len)
  tc = config.memory_train
  steps, alpha = int(tc.steps), float(tc.alpha)
  # batch sizes count positions; the decoder takes them as rows of seq_len tokens
  per = 1 if memory == "mlp" else seq_len
  bsz, eval_batch = int(tc.batch_size) // per, max(1, int(tc.eval_batch_size) // per)
  if steps < 1 or bsz < 1:
    raise ValueError(f"memory_train.steps ({steps}) must be >= 1 and batch_size ({tc.batch_size}) >= {per} "
                     f"(one row of seq_len for the decoder).")
  out = _stage_dir(workdir, f"memory_{memory}")
  os.makedirs(out, exist_ok=True)
  _write_json(os.path.join(out, "model_config.json"), mc.to_dict())
  optimizer, schedule = make_optimizer(config.optim, steps), make_schedule(config.optim, steps)

  def init(rng):
    params = model.init(rng, jnp.asarray(data.batch(data.train, np.arange(1))["x"]))["params"]
    params = flax.linen.meta.unbox(params)
    return MemoryState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

  state = jax.jit(init)(jax.random.key(int(tc.seed)))
  manifest = ckpt_lib.make_manifest(mc.to_dict(), state.params)
  ckpt = ckpt_lib.Checkpointer(os.path.join(out, "checkpoints"), keep=2, async_save=False)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = ckpt.restore_latest(abstract, manifest)

  def loss_fn(params, batch, mask):
    return memory_loss(_apply_memory(model, memory, params, batch), batch["ids"], batch["probs"], batch["next"],
                       alpha=alpha, mask=mask)

  eval_fn = jax.jit(loss_fn)

  @jax.jit
  def train_step(state, batch):
    (_, metrics), grads = jax.value_and_grad(lambda p: (lambda o: (o["loss"], o))(loss_fn(p, batch, None)),
                                             has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
    return MemoryState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  summary_path = os.path.join(out, "summary.json")
  summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
  if restored is None:
    summary = {"val_initial": _val_metrics(model, memory, state.params, data, alpha, eval_batch, eval_fn)}
  else:
    state = restored[1]
  writer = MetricWriter(out, tensorboard=False)
  first = int(state.step)
  n = data.size(data.train)
  t0 = time.time()
  for step in range(first, steps):
    rng = np.random.default_rng([int(tc.seed), step])  # batch `step` is the same after a resume
    state, metrics = train_step(state, {k: jnp.asarray(v) for k, v in data.batch(data.train, rng.integers(0, n, bsz)).items()})
    done = step + 1
    if done % int(tc.log_every) == 0 or done == steps:
      writer.write(done, "train", jax.device_get(metrics))
      if config.progress:
        print(f"memory {memory} step {done}/{steps}: loss {float(metrics['loss']):.4f} kl {float(metrics['kl']):.4f} "
              f"ce {float(metrics['ce']):.4f}", flush=True)
    if done % int(tc.checkpoint_every) == 0 or done == steps:
      ckpt.save(done, state, {"step": done}, manifest)
  ckpt.wait()
  ckpt.close()
  train_seconds = time.time() - t0
  final = _val_metrics(model, memory, state.params, data, alpha, eval_batch, eval_fn)
  writer.write(steps, "eval", final)
  writer.close()
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  summary.update({"stage": "train", "memory": memory, "steps": steps, "parameters": n_params, "val_final": final,
                  "train_tokens": int(np.prod(data.train["next"].shape)),
                  "seconds": summary.get("seconds", 0.0) + time.time() - start,
                  "train_loop_seconds": summary.get("train_loop_seconds", 0.0) + train_seconds})
  _write_json(summary_path, summary)
  return summary


def load_memory(workdir: str, memory: str):
  """(model, params) of a trained memory in `<workdir>/memory_<memory>/`."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  out = _stage_dir(workdir, f"memory_{memory}")
  cfg_path = os.path.join(out, "model_config.json")
  ckpt = ckpt_lib.Checkpointer(os.path.join(out, "checkpoints"), keep=1_000_000, async_save=False)
  if not os.path.exists(cfg_path) or ckpt.latest_step() is None:
    raise FileNotFoundError(f"no trained {memory} memory in {out}: run stage=train,memory={memory} first.")
  with open(cfg_path) as f:
    mc = ml_collections.FrozenConfigDict(json.load(f))
  model = MLPMemory(mc) if memory == "mlp" else MemoryDecoder(mc)
  step = ckpt.latest_step()
  problems = ckpt.problems(step)
  if problems:
    raise ValueError(f"the {memory} memory's checkpoint {step} in {out} is damaged: " + "; ".join(problems))
  state = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return model, jax.tree.map(jnp.asarray, state["params"])


def memory_log_probs(model, memory: str, params, val: dict[str, np.ndarray], seq_len: int, files: str,
                     val_fraction: float, batch: int = 1024) -> np.ndarray:
  """log p_mem(true next token) at the validation positions `[n]` float32."""
  n = len(val["next_tokens"])
  if memory == "mlp":
    fn = jax.jit(lambda p, x, y: jnp.take_along_axis(
        jax.nn.log_softmax(model.apply({"params": p}, x), -1), y[:, None], -1)[:, 0])
    out = [np.asarray(fn(params, jnp.asarray(val["keys"][s:s + batch]), jnp.asarray(val["next_tokens"][s:s + batch])))
           for s in range(0, n, batch)]
    return np.concatenate(out)
  _, stream = corpus_streams(files, val_fraction)
  src = text.PackedTextSource(stream, seq_len, ByteTokenizer.EOS)
  encode = jax.jit(lambda p, b: jnp.take_along_axis(jax.nn.log_softmax(model.apply(
      {"params": p}, b["inputs"], segment_ids=b["segment_ids"], positions=b["positions"]), -1),
      b["targets"][..., None], -1)[..., 0])
  rows = n // seq_len
  rb = max(1, batch // seq_len)
  out = []
  for s in range(0, rows, rb):
    b = src.__getitems__(list(range(s, min(s + rb, rows))))
    out.append(np.asarray(encode(params, {k: jnp.asarray(v) for k, v in b.items()})).reshape(-1))
  return np.concatenate(out)


def stage_eval(config, workdir: str) -> dict[str, Any]:
  start = time.time()
  base_config, _, _, _ = load_base(config)
  files, val_fraction, seq_len = corpus_settings(config, base_config)
  va = _load_npz(os.path.join(workdir, "targets", "val.npz"), "targets")
  lambdas = [float(x) for x in config.knn.lambdas]
  lp_lm = va["lp_lm"]
  results: dict[str, Any] = {"val_tokens": int(len(lp_lm)), "lambdas": lambdas,
                             "base": {"perplexity": float(np.exp(-lp_lm.mean()))}}
  best = None
  curves = {}
  for temp in [float(t) for t in config.knn.temperatures]:
    lp = np.asarray(knn_lm.knn_target_log_prob(va["dist"], va["nbr_values"], va["next_tokens"], temp))
    ppl = knn_lm.perplexity_grid(lp_lm, lp, lambdas)
    curves[str(temp)] = ppl.tolist()
    if best is None or ppl.min() < best[0]:
      best = (float(ppl.min()), temp, lambdas[int(ppl.argmin())], ppl.tolist())
  results["knn_lm"] = {"perplexity": best[0], "temperature": best[1], "lambda": best[2], "curve": best[3],
                       "curves_by_temperature": curves}
  for memory in MEMORIES:
    try:
      model, params = load_memory(workdir, memory)
    except FileNotFoundError as e:
      results[f"memory_{memory}"] = {"skipped": str(e)}
      continue
    lp = memory_log_probs(model, memory, params, va, seq_len, files, val_fraction)
    ppl = knn_lm.perplexity_grid(lp_lm, lp, lambdas)
    results[f"memory_{memory}"] = {"perplexity": float(ppl.min()), "lambda": lambdas[int(ppl.argmin())],
                                   "curve": ppl.tolist(), "alone_perplexity": float(np.exp(-lp.mean()))}
  results["seconds"] = time.time() - start
  out = _stage_dir(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  _write_json(os.path.join(out, "results.json"), results)
  return results


def run_stage(config, workdir: str) -> dict[str, Any]:
  """Runs `config.stage` (datastore | targets | train | eval) in `workdir`; returns the stage's summary."""
  stage = str(config.stage)
  if stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}.")
  if str(config.memory) not in MEMORIES:
    raise ValueError(f"memory must be one of {MEMORIES}, got {config.memory!r}.")
  _check_workdir(workdir, stage)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, f"config_{stage}.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return {"datastore": stage_datastore, "targets": stage_targets, "train": stage_train, "eval": stage_eval}[stage](
      config, workdir)
