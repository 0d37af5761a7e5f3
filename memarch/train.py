"""The research loop: `train_and_evaluate(config, workdir)`.

Builds the mesh, the model and its sharded train state (`jax.eval_shape` + logical partition specs +
`jax.jit(out_shardings=...)`, as flax's lm1b does), then trains with a jitted step that donates its
state, evaluates periodically, checkpoints with orbax (resuming automatically from the latest checkpoint
in the workdir, data position included) and writes metrics (JSON lines + TensorBoard).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import flax
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from memarch import checkpoint as ckpt_lib
from memarch import data as data_lib
from memarch import sharding as shard_lib
from memarch.metrics import MetricWriter, Progress
from memarch.models import build_model
from memarch.models.lm import check_token_ids
from memarch.optim import make_optimizer, make_schedule


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def resolve_model_config(config, info) -> ml_collections.FrozenConfigDict:
  """The model section with vocab_size taken from the data (when 0) and checked against it."""
  m = config.model.to_dict()
  if m["vocab_size"] == 0:
    m["vocab_size"] = info.vocab_size
  elif m["vocab_size"] < info.vocab_size:
    raise ValueError(
        f"config.model.vocab_size={m['vocab_size']} is smaller than the data's vocabulary ({info.vocab_size}); "
        "set it to 0 to take the data's."
    )
  return ml_collections.FrozenConfigDict(m)


def cross_entropy(logits, targets, mask):
  """Masked token cross-entropy and accuracy sums. logits [b, t, v] f32, targets [b, t], mask [b, t]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {"loss_sum": jnp.sum(nll * mask), "correct_sum": jnp.sum(correct * mask), "count": jnp.sum(mask)}


def _model_inputs(batch):
  return dict(segment_ids=batch.get("segment_ids"), positions=batch.get("positions"))


def training_loss(model, params, batch):
  """The training objective: token cross-entropy plus the auxiliary losses the blocks sow.

  Blocks may `sow("losses", name, value)` (already scaled, e.g. MoM's load balancing) and
  `sow("metrics", name, value)`; the sown losses are summed into the objective, and each sown metric name is
  averaged over the blocks that sow it. Evaluation applies the model without these collections (no aux loss).
  Returns `(objective, (sums from cross_entropy, metrics))`; metrics holds "loss" (the cross-entropy alone,
  comparable across models), "aux_loss" if any block sows a loss, and the sown metrics.
  """
  logits, sown = model.apply(
      {"params": params}, batch["inputs"], **_model_inputs(batch), mutable=["losses", "metrics"])
  sums = cross_entropy(logits, batch["targets"], batch["loss_mask"])
  loss = sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)
  metrics = {"loss": loss}
  aux = jax.tree.leaves(sown.get("losses", {}))
  if aux:
    metrics["aux_loss"] = sum(jnp.sum(a) for a in aux)
  grouped: dict[str, list] = {}
  for path, values in traverse_util.flatten_dict(sown.get("metrics", {})).items():
    grouped.setdefault(path[-1], []).extend(values)
  metrics.update({name: jnp.mean(jnp.stack(vals)) for name, vals in grouped.items()})
  return loss + metrics.get("aux_loss", 0.0), (sums, metrics)


def make_train_step(model, optimizer, schedule):
  def train_step(state: TrainState, batch):
    (_, (sums, metrics)), grads = jax.value_and_grad(
        functools.partial(training_loss, model), has_aux=True)(state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        **metrics,
        "accuracy": sums["correct_sum"] / jnp.maximum(sums["count"], 1.0),
        "grad_norm": optax.global_norm(grads),
        "lr": schedule(state.step),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model):
  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], **_model_inputs(batch))
    return cross_entropy(logits, batch["targets"], batch["loss_mask"])

  return eval_step


def create_train_state(model, optimizer, *, seq_len: int, rng, mesh, rules):
  """Sharded TrainState created directly in place, and its shardings.

  The abstract (shape-only) init gives the logical axis names of every parameter; optimizer slots that
  mirror parameters get the parameter's sharding, the rest is replicated.
  """

  def init_boxed(rng):
    return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]

  boxed = jax.eval_shape(init_boxed, rng)
  param_sh = shard_lib.tree_shardings(boxed, mesh, rules)
  abstract_params = nn.meta.unbox(boxed)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_sh = optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_opt, param_sh, transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode),
  )
  state_sh = TrainState(step=replicated, params=param_sh, opt_state=opt_sh)

  def init(rng):
    params = nn.meta.unbox(init_boxed(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(init, out_shardings=state_sh)(rng)
  return state, state_sh


def check_batch(batch: dict[str, np.ndarray], vocab_size: int) -> None:
  """Host-side checks before a batch reaches the device: token ids in the vocabulary."""
  for key in ("inputs", "targets"):
    check_token_ids(batch[key], vocab_size, what=f"batch['{key}'] token ids")


def evaluate(eval_step_fn, params, eval_sets, *, mesh, vocab_size: int, max_batches: int = 0) -> dict[str, float]:
  """Loss, perplexity and token accuracy (on loss-masked positions) for each eval set."""
  out = {}
  for name, batches in eval_sets.items():
    totals = {"loss_sum": 0.0, "correct_sum": 0.0, "count": 0.0}
    for i, batch in enumerate(batches):
      if max_batches and i >= max_batches:
        break
      check_batch(batch, vocab_size)
      sums = jax.device_get(eval_step_fn(params, shard_lib.place_batch(batch, mesh)))
      for k in totals:
        totals[k] += float(sums[k])
    count = max(totals["count"], 1.0)
    loss = totals["loss_sum"] / count
    out[f"{name}/loss"] = loss
    out[f"{name}/perplexity"] = float(np.exp(min(loss, 50.0)))
    out[f"{name}/accuracy"] = totals["correct_sum"] / count
  return out


def save_config(config, workdir: str) -> None:
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


@dataclasses.dataclass
class TrainResult:
  step: int
  eval_metrics: dict[str, float]
  train_metrics: dict[str, float]
  state: Any


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> TrainResult:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns the final metrics.

  stop_after: end this invocation (with a checkpoint) after that many steps, e.g. to fit a job's time
  limit; running again resumes where it stopped, exactly as if it had not stopped.
  """
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = shard_lib.make_mesh(config.mesh)
  rules = shard_lib.logical_rules(config.mesh)
  host_batch = shard_lib.check_batch_size(config.train.batch_size, mesh)
  host_eval_batch = shard_lib.check_batch_size(config.eval.batch_size, mesh)

  info = data_lib.data_info(config.data)
  model_config = resolve_model_config(config, info)
  model = build_model(model_config)
  steps = config.train.steps
  schedule = make_schedule(config.optim, steps)
  optimizer = make_optimizer(config.optim, steps)
  if is_main:
    save_config(config, workdir)

  rng = jax.random.key(config.train.seed)
  state, state_sh = create_train_state(model, optimizer, seq_len=config.data.seq_len, rng=rng, mesh=mesh, rules=rules)
  manifest = ckpt_lib.make_manifest(model_config.to_dict(), state.params)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))

  train_iter = data_lib.create_train_iterator(
      config.data, batch_size=host_batch, seed=config.data.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
  )
  eval_sets = data_lib.create_eval_batches(
      config.data, batch_size=host_eval_batch, process_index=jax.process_index(), process_count=jax.process_count(),
      max_batches=config.eval.max_batches,
  )

  checkpointer = ckpt_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoint
  )
  start = checkpointer.latest_step()
  if start is not None:
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
    state, data_state = checkpointer.restore(start, abstract, manifest)
    train_iter.set_state(data_state)
  start = int(start or 0)

  writer = MetricWriter(workdir, tensorboard=config.train.tensorboard, enabled=is_main)
  progress = Progress(
      steps, start, tokens_per_step=config.train.batch_size * config.data.seq_len, mode=config.train.progress,
      enabled=is_main,
  )
  progress.message(
      f"memarch: {model_config.name} ({n_params:,} parameters) on {config.data.name}, mesh "
      f"{dict(mesh.shape)}, steps {start}->{steps}, workdir {workdir}"
  )

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    train_step = jax.jit(make_train_step(model, optimizer, schedule), donate_argnums=(0,))
    eval_step = jax.jit(make_eval_step(model))
    run_eval = functools.partial(
        evaluate, eval_step, eval_sets=eval_sets, mesh=mesh, vocab_size=model_config.vocab_size,
        max_batches=config.eval.max_batches,
    )

    pending: list[dict[str, jax.Array]] = []
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    step = start
    last = steps if stop_after is None else min(steps, start + stop_after)
    while step < last:
      batch = next(train_iter)
      check_batch(batch, model_config.vocab_size)
      state, metrics = train_step(state, shard_lib.place_batch(batch, mesh))
      step += 1
      pending.append(metrics)
      if step % config.train.log_every == 0 or step == steps:
        fetched = jax.device_get(pending)
        train_metrics = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        train_metrics["lr"] = float(fetched[-1]["lr"])
        if not np.isfinite(train_metrics["loss"]):
          raise FloatingPointError(
              f"training loss is {train_metrics['loss']} at step {step}; lower optim.lr or check the data. "
              f"The last good checkpoint is step {checkpointer.latest_step()}."
          )
        sps, tps, _ = progress.rates(step)
        writer.write(step, "train", {**train_metrics, "steps_per_sec": sps, "tokens_per_sec": tps})
        progress.update(step, train_metrics)
        pending = []
      if (config.train.eval_every and step % config.train.eval_every == 0) or step == steps:
        eval_metrics = run_eval(state.params)
        writer.write(step, "eval", eval_metrics)
        progress.message(f"eval @ {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
      if (config.train.checkpoint_every and step % config.train.checkpoint_every == 0) or step == last:
        checkpointer.save(step, state, train_iter.get_state(), manifest, force=True)
    if not eval_metrics and step == steps:  # resumed a finished run: evaluate what was restored
      eval_metrics = run_eval(state.params)
      progress.message(f"eval @ {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))

  checkpointer.wait()
  checkpointer.close()
  progress.close()
  writer.close()
  if is_main:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({"step": step, "eval": eval_metrics, "train": train_metrics}, f, indent=2)
  return TrainResult(step=step, eval_metrics=eval_metrics, train_metrics=train_metrics, state=state)
