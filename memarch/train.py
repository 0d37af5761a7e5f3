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
import time
from typing import Any, Callable

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
from memarch import validate
from memarch.metrics import MetricWriter, Progress, host_rss_mib, release_free_memory
from memarch.preemption import Preempted, SignalCheckpoint
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


def loss_mask(model, batch):
  """The batch's loss mask, times the model's own per-position mask when it has one (HMT's "prefix" recall
  takes no loss on each segment's prefix: `position_loss_mask(seq_len) -> [seq_len]`)."""
  mask = batch["loss_mask"]
  position_mask = getattr(model, "position_loss_mask", None)
  if position_mask is not None:
    mask = mask * jnp.asarray(position_mask(mask.shape[1]), mask.dtype)[None]
  return mask


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
  sums = cross_entropy(logits, batch["targets"], loss_mask(model, batch))
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
  """One optimizer step. A step whose objective or gradient norm is not finite is skipped: parameters and
  optimizer moments stay as they were (the step counter and the data still advance), and metrics["nonfinite"]
  is 1 for the loop to count."""

  def train_step(state: TrainState, batch):
    (objective, (sums, metrics)), grads = jax.value_and_grad(
        functools.partial(training_loss, model), has_aux=True)(state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), (params, opt_state), (state.params, state.opt_state))
    metrics = {
        **metrics,
        "accuracy": sums["correct_sum"] / jnp.maximum(sums["count"], 1.0),
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
        "nonfinite": 1.0 - finite.astype(jnp.float32),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model):
  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], **_model_inputs(batch))
    mask = loss_mask(model, batch)
    sums = cross_entropy(logits, batch["targets"], mask)
    # Exact match per row: every loss-masked token right. On a QA eval row (one example, the answer is the
    # masked span) this is what greedy decoding after a prefill would score, and the metric a sweep should pick by: a
    # 7-byte answer whose format fixes 6 bytes has 6/7 token accuracy when it is always wrong.
    wrong = jnp.sum((jnp.argmax(logits, axis=-1) != batch["targets"]) * mask, axis=-1)
    has_answer = jnp.sum(mask, axis=-1) > 0
    sums["exact_sum"] = jnp.sum((wrong == 0) & has_answer).astype(jnp.float32)
    sums["rows"] = jnp.sum(has_answer).astype(jnp.float32)
    return sums

  return eval_step


def create_train_state(model, optimizer, *, seq_len: int, rng, mesh, rules, fsdp_fallback: bool = True):
  """Sharded TrainState created directly in place, and its shardings.

  The abstract (shape-only) init gives the logical axis names of every parameter, mapped onto the mesh by
  `rules` and fitted to each shape (`memarch.sharding.tree_shardings`: an axis that does not divide is left
  out; with fsdp_fallback a parameter the `embed` rule cannot shard goes over fsdp along another dimension);
  optimizer slots that mirror parameters get the parameter's sharding, the rest is replicated.
  """

  def init_boxed(rng):
    return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]

  boxed = jax.eval_shape(init_boxed, rng)
  param_sh = shard_lib.tree_shardings(boxed, mesh, rules, fsdp_fallback=fsdp_fallback)
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


def evaluate(eval_step_fn, params, eval_sets, *, mesh, vocab_size: int, max_batches: int = 0,
             log: Callable[[str, int, float], None] | None = None) -> dict[str, float]:
  """Loss, perplexity, token accuracy (on loss-masked positions) and exact match (rows with every loss-masked
  token right) for each eval set; `log(name, batches, seconds)` after each set, when given."""
  out = {}
  for name, batches in eval_sets.items():
    totals = {"loss_sum": 0.0, "correct_sum": 0.0, "count": 0.0, "exact_sum": 0.0, "rows": 0.0}
    t0, n = time.perf_counter(), 0
    for i, batch in enumerate(batches):
      if max_batches and i >= max_batches:
        break
      check_batch(batch, vocab_size)
      sums = jax.device_get(eval_step_fn(params, shard_lib.place_batch(batch, mesh)))
      n += 1
      for k in totals:
        totals[k] += float(sums.get(k, 0.0))
    if log is not None:
      log(name, n, time.perf_counter() - t0)
    count = max(totals["count"], 1.0)
    loss = totals["loss_sum"] / count
    out[f"{name}/loss"] = loss
    out[f"{name}/perplexity"] = float(np.exp(min(loss, 50.0)))
    out[f"{name}/accuracy"] = totals["correct_sum"] / count
    if totals["rows"]:
      out[f"{name}/exact"] = totals["exact_sum"] / totals["rows"]
  return out


def mean_metrics(fetched: list[dict[str, Any]]) -> dict[str, float]:
  """Means over a logging interval of the steps that were applied; `nonfinite_steps` counts the skipped ones
  (all skipped: the means are over them, so the log shows the nan or inf)."""
  good = [m for m in fetched if not m["nonfinite"]] or fetched
  out = {k: float(np.mean([m[k] for m in good])) for k in fetched[0] if k != "nonfinite"}
  out["lr"] = float(fetched[-1]["lr"])
  out["nonfinite_steps"] = float(sum(m["nonfinite"] for m in fetched))
  return out


class NonfiniteGuard:
  """Counts skipped (non-finite) steps in a row and stops the run after `limit` of them.

  The flag of step s is read after step s+1 is dispatched, so the host never waits for the device on a
  healthy run. The stop is a FloatingPointError that names the step and the batch; the offending batch is
  saved to <workdir>/nonfinite_batch_step<N>.npz; no checkpoint is written after a skipped step's error, so the
  last good checkpoint stays the latest.
  """

  def __init__(self, limit: int, workdir: str, checkpointer):
    self.limit, self.workdir, self.checkpointer = max(int(limit), 0), workdir, checkpointer
    self.streak, self.first = 0, None
    self._previous = None  # (step, host batch, metrics) of the step whose flag is read next

  def _check(self, step: int, batch, metrics) -> None:
    if not float(jax.device_get(metrics["nonfinite"])):
      self.streak, self.first = 0, None
      return
    self.streak += 1
    self.first = self.first or step
    if self.streak > self.limit:
      path = os.path.join(self.workdir, f"nonfinite_batch_step{step}.npz")
      if jax.process_index() == 0:
        np.savez(path, **{k: np.asarray(v) for k, v in batch.items() if v is not None})
      m = jax.device_get(metrics)
      raise FloatingPointError(
          f"{self.streak} training steps in a row had a non-finite loss or gradient (steps {self.first}..{step}; "
          f"at step {step}: loss {float(m['loss'])}, grad_norm {float(m['grad_norm'])}). None of them was applied. "
          f"Step {step} trained on batch {step - 1} of the data order, saved to {path}. The last good checkpoint "
          f"is step {self.checkpointer.latest_step()}. `python -m experiments.nonfinite {self.workdir}` replays "
          f"that batch there and names the first module whose output is non-finite. Lower optim.lr, check the "
          f"data, or raise train.max_nonfinite_steps (now {self.limit})."
      )

  def after_dispatch(self, step: int, batch, metrics) -> None:
    if self._previous is not None:
      self._check(*self._previous)
    self._previous = (step, batch, metrics)

  def finish(self) -> None:
    if self._previous is not None:
      self._check(*self._previous)
      self._previous = None


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
  validate.validate_config(config, jax.device_count())  # every inconsistent value named before any work
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
  state, state_sh = create_train_state(model, optimizer, seq_len=config.data.seq_len, rng=rng, mesh=mesh, rules=rules,
                                       fsdp_fallback=config.mesh.get("fsdp_fallback", True))
  manifest = ckpt_lib.make_manifest(model_config.to_dict(), state.params)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))

  train_iter = data_lib.create_train_iterator(
      config.data, batch_size=host_batch, seed=config.data.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
  )
  eval_sets = data_lib.create_eval_batches(
      config.data, batch_size=host_eval_batch, process_index=jax.process_index(), process_count=jax.process_count(),
      max_batches=config.eval.max_batches,
      # A small set (16 needles at 16k tokens) is not padded to the whole eval batch: only to the devices' rows.
      row_multiple=max(1, shard_lib.data_parallel_size(mesh) // jax.process_count()),
  )

  checkpointer = ckpt_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
      keep_period=config.train.get("keep_period", 0),
      async_save=config.train.async_checkpoint, verify=config.train.verify_checkpoints,
  )
  # The live state's arrays carry their shardings (state_sh has a sharding where optax keeps an empty
  # MaskedNode, e.g. under muon, so it does not map leaf for leaf onto the state).
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = checkpointer.restore_latest(abstract, manifest)  # falls back past damaged steps, naming them
  start = 0
  if restored is not None:
    start, state, data_state = restored
    train_iter.set_state(data_state)
  elif config.model.get("init_from"):  # HMT stage 2 starts from a stage-1 run's parameters
    from memarch.models.hmt import load_stage1_params  # noqa: PLC0415

    state = state.replace(params=load_stage1_params(config.model.init_from, state.params))

  writer = MetricWriter(workdir, tensorboard=config.train.tensorboard, enabled=is_main)
  progress = Progress(
      steps, start, tokens_per_step=config.train.batch_size * config.data.seq_len, mode=config.train.progress,
      enabled=is_main,
  )
  # DecoderLM's registry name is "transformer" whatever its blocks: name the blocks too (an LMM run would
  # otherwise announce itself as a transformer).
  blocks = model_config.get("layer_blocks")
  arch = f"{model_config.name} [{', '.join(blocks)}] x {model_config.num_layers}" if blocks else model_config.name
  progress.message(
      f"memarch: {arch} ({n_params:,} parameters) on {config.data.name}, mesh "
      f"{dict(mesh.shape)}, steps {start}->{steps}, workdir {workdir}"
  )

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    train_step = jax.jit(make_train_step(model, optimizer, schedule), donate_argnums=(0,))
    eval_step = jax.jit(make_eval_step(model))
    def run_eval(params, step):
      # A line per eval set (with its time) where there are several: long-length sets take minutes each.
      log = None if len(eval_sets) < 2 else (
          lambda name, n, seconds: progress.message(f"  eval @ {step}: {name} ({n} batches, {seconds:.0f} s)"))
      return evaluate(eval_step, params, eval_sets, mesh=mesh, vocab_size=model_config.vocab_size,
                      max_batches=config.eval.max_batches, log=log)


    pending: list[dict[str, jax.Array]] = []
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    step = start
    last = steps if stop_after is None else min(steps, start + stop_after)
    nonfinite = NonfiniteGuard(config.train.max_nonfinite_steps, workdir, checkpointer)
    try:
      with SignalCheckpoint(enabled=config.train.handle_signals) as signals:
        while step < last:
          batch = next(train_iter)
          check_batch(batch, model_config.vocab_size)
          state, metrics = train_step(state, shard_lib.place_batch(batch, mesh))
          step += 1
          nonfinite.after_dispatch(step, batch, metrics)  # checks the previous step's flag (one step of lag)
          pending.append(metrics)
          if step % config.train.log_every == 0 or step == last:
            fetched = jax.device_get(pending)
            train_metrics = mean_metrics(fetched)
            sps, tps, _ = progress.rates(step)
            release_free_memory()  # so that host_rss_mib shows what is in use, not what glibc keeps cached
            writer.write(step, "train", {**train_metrics, "steps_per_sec": sps, "tokens_per_sec": tps,
                                         "host_rss_mib": host_rss_mib()})
            progress.update(step, {k: v for k, v in train_metrics.items() if k != "nonfinite_steps" or v})
            pending = []
          if step == last:
            nonfinite.finish()
          # The checkpoint before the evaluation: an evaluation at long lengths can take longer than the steps
          # since the last checkpoint (measured: 17 min for the tiny Transformer++'s 16k NIAH sets), and a run
          # stopped during it keeps its steps.
          preempted = signals.signum is not None or checkpointer.reached_preemption(step)
          if (config.train.checkpoint_every and step % config.train.checkpoint_every == 0) or step == last or preempted:
            checkpointer.save(step, state, train_iter.get_state(), manifest, force=True)
          if preempted:
            progress.message(f"signal received: checkpoint at step {step} saved, waiting for it to be written ...")
            checkpointer.wait()
            checkpointer.close()
            progress.close()
            writer.close()
            raise Preempted(step, signals.signum, workdir)
          if (config.train.eval_every and step % config.train.eval_every == 0) or step == steps:
            eval_metrics = run_eval(state.params, step=step)
            writer.write(step, "eval", eval_metrics)
            progress.message(f"eval @ {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
    except Preempted:
      raise
    except BaseException:  # Ctrl-C included: a stop during a long evaluation keeps the checkpoint before it
      # Saves already dispatched (asynchronously) finish before the error propagates, so the checkpoint an
      # error names as the last good one is on disk (measured: under load, right after a non-finite stop, a
      # fresh Checkpointer found no checkpoint at all).
      try:
        checkpointer.wait()
      except Exception:  # noqa: BLE001  the original error is the one to report
        pass
      raise
    if not eval_metrics and step == steps:  # resumed a finished run: evaluate what was restored
      eval_metrics = run_eval(state.params, step=step)
      progress.message(f"eval @ {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))

  checkpointer.wait()
  checkpointer.close()
  progress.close()
  writer.close()
  if is_main:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({"step": step, "eval": eval_metrics, "train": train_metrics}, f, indent=2)
  return TrainResult(step=step, eval_metrics=eval_metrics, train_metrics=train_metrics, state=state)


# ----------------------------------------------------------------------------------------------------
# Loading a finished run (experiments.evaluate, memarch.knn)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a training run's directory (experiments.run).")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the checkpoints in `workdir` (a training run's directory), ascending; [] when none."""
  return ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1_000_000, async_save=False).all_steps()


def load_run(workdir: str, step: int | None = None):
  """(config, model, params, step) of the latest usable checkpoint in `workdir` (parameters only), or of the
  checkpoint at `step` (an error naming the steps there when it is missing or damaged)."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  config = load_config(workdir)
  model_config = resolve_model_config(config, data_lib.data_info(config.data))
  model = build_model(model_config)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1_000_000, async_save=False)
  steps = ckpt.all_steps()
  if step is not None and step not in steps:
    raise FileNotFoundError(f"no checkpoint at step {step} in {workdir}/checkpoints (it has {steps or 'none'}).")
  errors = []
  for candidate in reversed(steps if step is None else [step]):
    problems = ckpt.problems(candidate)
    if problems:
      errors.append(f"step {candidate}: " + "; ".join(problems))
      continue
    out = ckpt.manager.restore(candidate, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                 manifest=ocp.args.JsonRestore()))
    saved = out["manifest"].get("model")
    if saved is not None:
      diffs = ckpt_lib.manifest_differences({"model": saved}, {"model": json.loads(json.dumps(model_config.to_dict()))})
      if diffs:
        raise ValueError(f"the checkpoint in {workdir} does not match its config.json:\n  " + "\n  ".join(diffs))
    return config, model, jax.tree.map(jnp.asarray, out["state"]["params"]), candidate
  raise FileNotFoundError(f"no usable checkpoint in {workdir}/checkpoints" + (f" (damaged: {errors})" if errors else "")
                          + ": train the run first.")
