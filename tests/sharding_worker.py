"""Multi-device checks, run in their own process with simulated CPU devices (tests/test_sharding.py).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.sharding_worker CASE 'JSON ARGS'

Prints one line `RESULT <json>` that the test reads; the assertions live in the test. Cases:
  step     loss and gradients of one training step of each model on each mesh vs one device; param specs
  kernels  kernels.attention / kernels.linear_scan (impl pallas_interpret) under memarch.sharding's shard_map
           helper on a mesh vs the unsharded reference, forward and gradients
  ckpt     train on one mesh, save, resume on another, vs an uninterrupted run
  hostref  the single-process reference of the 2-process run of tests/test_multihost.py
"""

from __future__ import annotations

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import gated_deltanet, mom, titans, transformer
from memarch import checkpoint as ckpt_lib
from memarch import data as data_lib
from memarch import sharding
from memarch import train as train_lib
from memarch.models import build_model

MODELS = {
    "transformer": lambda: transformer.get_config("size=tiny"),
    "titans_mac": lambda: titans.get_config("variant=mac,size=tiny"),
    "mom": lambda: mom.get_config("size=tiny"),
    "gated_deltanet": lambda: gated_deltanet.get_config("size=tiny"),
}
MESH_KEYS = ("data", "fsdp", "tensor", "sequence")


def small_config(name: str, mesh=(1, 1, 1, 1), *, batch: int = 8, seq_len: int = 32, layers: int = 0):
  """The family's tiny config, with a small batch and sequence (MQAR with few examples) on `mesh`; `layers` > 0
  also narrows it (width 32, MLP 64, that many layers), for the training-loop cases where compiling dominates."""
  c = MODELS[name]()
  if layers:
    c.model.embed_dim, c.model.mlp_dim, c.model.num_layers = 32, 64, layers
  c.data.seq_len = seq_len
  c.model.max_len = max(c.model.get("max_len", seq_len), seq_len)
  c.data.mqar.num_train_examples, c.data.mqar.num_eval_examples = 256, 16
  c.data.mqar.use_tfds = False
  c.data.mqar.settings = ((seq_len, 2), (seq_len, 4))  # (seq_len, kv pairs) mixed in training
  c.data.mqar.eval_settings = ((seq_len, 4),)
  c.train.batch_size, c.eval.batch_size = batch, batch
  c.train.progress, c.train.tensorboard = "none", False
  for key, size in zip(MESH_KEYS, mesh):
    c.mesh[key] = int(size)
  return c


def random_batch(config, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tokens with a loss mask over most positions and two packed documents per row."""
  rng = np.random.default_rng(seed)
  t = config.data.seq_len
  vocab = data_lib.data_info(config.data).vocab_size
  seg = np.where(np.arange(t) < t // 2 + 3, 1, 2).astype(np.int32)
  return {
      "inputs": rng.integers(0, vocab, (batch, t), dtype=np.int32),
      "targets": rng.integers(0, vocab, (batch, t), dtype=np.int32),
      "loss_mask": (rng.random((batch, t)) < 0.8).astype(np.float32),
      "segment_ids": np.broadcast_to(seg, (batch, t)).copy(),
      "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (batch, t)).copy(),
  }


def build_for_training(config, devices=None):
  """Mesh, rules, model and TrainState with the config's own optimizer (as train_and_evaluate builds them)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.mesh)
  model = build_model(train_lib.resolve_model_config(config, data_lib.data_info(config.data)))
  optimizer = train_lib.make_optimizer(config.optim, config.train.steps)
  state, _ = train_lib.create_train_state(model, optimizer, seq_len=config.data.seq_len,
                                          rng=jax.random.key(config.train.seed), mesh=mesh, rules=rules)
  return mesh, rules, model, state


def train_loop(config, batches, devices=None, keep_step: int = 0):
  """train_and_evaluate's steps (same init, optimizer and schedule) over host `batches` (an iterator), on the
  config's mesh or over `devices`. Returns ({step: loss}, final state, parameters after `keep_step` or None)."""
  mesh, rules, model, state = build_for_training(config, devices)
  optimizer = train_lib.make_optimizer(config.optim, config.train.steps)
  schedule = train_lib.make_schedule(config.optim, config.train.steps)
  losses, kept = {}, None
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jax.jit(train_lib.make_train_step(model, optimizer, schedule))
    for i in range(1, config.train.steps + 1):
      state, metrics = step(state, sharding.place_batch(next(batches), mesh))
      losses[i] = float(metrics["loss"])
      if i == keep_step:
        kept = jax.device_get(state.params)
  return losses, state, kept


def max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))))


def on_shardings_of(params):
  """Abstract leaves with the shardings of `params` (a restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)


def loss_and_grads(config, batch, devices=None):
  """(loss, grads as numpy, params) of one step on config's mesh (or over `devices`)."""
  mesh, rules, model, state = build_for_training(config, devices)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fn = jax.jit(jax.value_and_grad(lambda p, b: train_lib.training_loss(model, p, b)[0]))
    loss, grads = fn(state.params, sharding.place_batch(batch, mesh))
  return float(loss), jax.device_get(grads), state.params


def flat(tree) -> dict[str, object]:
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def case_step(args):
  out = []
  layers = int(args.get("layers", 0))  # > 0: fewer, narrower layers (the default run); 0: the family's tiny
  for name in args["models"]:
    ref_config = small_config(name, layers=layers)
    batch = random_batch(ref_config, 8)
    ref_loss, ref_grads, _ = loss_and_grads(ref_config, batch, devices=jax.devices()[:1])
    ref_flat = flat(ref_grads)
    scale = max(float(np.max(np.abs(g))) for g in ref_flat.values())
    for mesh_shape in args["meshes"]:
      config = small_config(name, mesh_shape, layers=layers)
      loss, grads, params = loss_and_grads(config, batch)
      g = flat(grads)
      specs = {k: str(v.sharding.spec) for k, v in flat(params).items()}
      sharded = {k: v.addressable_shards[0].data.size < v.size for k, v in flat(params).items()}
      out.append({
          "model": name, "mesh": mesh_shape, "loss": loss, "ref_loss": ref_loss,
          "grad_max_err": max(float(np.max(np.abs(g[k] - ref_flat[k]))) for k in ref_flat), "grad_scale": scale,
          "specs": specs, "sharded": sharded, "same_keys": sorted(g) == sorted(ref_flat),
      })
  return out


def case_kernels(args):
  """The shard_map helper with impl=pallas_interpret on a (2, 1, 2, 1) mesh vs impl=reference, one device."""
  import kernels  # pylint: disable=g-import-not-at-top

  mesh_config = small_config("transformer", args.get("mesh", (2, 1, 2, 1))).mesh
  mesh = sharding.make_mesh(mesh_config, jax.devices()[:int(np.prod(args.get("mesh", (2, 1, 2, 1))))])
  rules = sharding.logical_rules(mesh_config)
  rng = np.random.default_rng(0)
  b, t, h, kvh, d = 4, 13, 4, 2, 8  # 13: not a multiple of any block or chunk size
  arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, k, v = arr(b, t, h, d), arr(b, t, kvh, d), arr(b, t, kvh, d)
  lengths = jnp.asarray([13, 9, 13, 5], jnp.int32)
  qs, ks, vs = arr(b, t, h, d) * 0.5, arr(b, t, h, d) * 0.5, arr(b, t, h, d)
  g = -jax.nn.softplus(arr(b, t, h))
  beta = jax.nn.sigmoid(arr(b, t, h))
  s0 = arr(b, h, d, d) * 0.1
  ops = {
      "attention": (
          lambda f, impl, q, k, v: f(q, k, v, causal=True, kv_lengths=lengths, q_offset=0, impl=impl),
          (q, k, v)),
      "attention_lse": (
          lambda f, impl, q, k, v: f(q, k, v, causal=True, window=5, return_lse=True, impl=impl)[0],
          (q, k, v)),
      "linear_scan": (
          lambda f, impl, q, k, v: f(q, k, v, g=g, beta=beta, initial_state=s0, chunk_size=8, impl=impl)[0],
          (qs, ks, vs)),
      "linear_scan_state": (
          lambda f, impl, q, k, v: f(q, k, v, g=g, initial_state=s0, chunk_size=8, impl=impl)[1],
          (qs, ks, vs)),
  }
  out = {}
  for name in args.get("ops", list(ops)):
    call, inputs = ops[name]
    wrapped = sharding.attention if name.startswith("attention") else sharding.linear_scan
    raw = kernels.attention if name.startswith("attention") else kernels.linear_scan

    def loss(fn, impl):
      def f(*x):
        y = call(fn, impl, *x)
        return jnp.sum(jnp.sin(y)), y
      return f

    (ref_val, ref_fwd), ref_grads = jax.value_and_grad(loss(raw, "reference"), argnums=(0, 1, 2), has_aux=True)(*inputs)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      traced = jax.jit(jax.value_and_grad(loss(wrapped, "pallas_interpret"), argnums=(0, 1, 2), has_aux=True)).trace(
          *inputs)
      jaxpr = str(traced.jaxpr)
      (val, fwd), grads = traced.lower().compile()(*inputs)
    out[name] = {
        "fwd_err": float(jnp.max(jnp.abs(fwd - ref_fwd))), "val_err": float(abs(val - ref_val)),
        "grad_err": max(float(jnp.max(jnp.abs(a - r))) for a, r in zip(grads, ref_grads)),
        "shard_map": "shard_map" in jaxpr, "pallas": "pallas_call" in jaxpr,
    }
  # Without a Pallas impl the helper is the plain kernel (no shard_map), e.g. "xla" on CPU.
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jaxpr = str(jax.make_jaxpr(lambda *x: sharding.attention(*x, impl="xla"))(q, k, v))
  out["xla_without_shard_map"] = "shard_map" not in jaxpr
  return out


def read_losses(workdir: str) -> dict[int, float]:
  from memarch.metrics import read_metrics  # pylint: disable=g-import-not-at-top

  return {int(r["step"]): float(r["loss"]) for r in read_metrics(workdir) if r.get("split") == "train"}


def case_ckpt(args):
  """Steps 1..4 on mesh A (checkpoint at 4), resumed to 8 on mesh B; vs the same 8 steps on one device."""
  root = args["root"]
  a, b = args["mesh_a"], args["mesh_b"]

  def config(mesh):
    cfg = small_config("transformer", mesh, batch=8, layers=1)
    cfg.train.steps, cfg.train.log_every, cfg.train.eval_every, cfg.train.checkpoint_every = 8, 1, 0, 4
    cfg.optim.warmup_steps = 2
    cfg.train.async_checkpoint = False
    cfg.eval.max_batches = 1
    return cfg

  train_lib.train_and_evaluate(config(a), f"{root}/ab", stop_after=4)
  run_b = train_lib.train_and_evaluate(config(b), f"{root}/ab")
  # The step-4 checkpoint (written on mesh A) read again straight onto mesh B's shardings.
  restored = ckpt_lib.restore_params(f"{root}/ab/checkpoints", on_shardings_of(run_b.state.params), step=4)
  # The unsharded reference: the same steps over the same data order on one device.
  ref_config = config((1, 1, 1, 1))
  batches = data_lib.create_train_iterator(ref_config.data, batch_size=8, seed=ref_config.data.seed)
  losses, state, params_at_4 = train_loop(ref_config, batches, devices=jax.devices()[:1], keep_step=4)
  return {
      "losses_ab": read_losses(f"{root}/ab"), "losses_ref": losses, "restore_err": max_abs_diff(restored, params_at_4),
      "restored_specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(restored)}),
      "mesh_b": {k: int(v) for k, v in dict(run_b.state.params["embedding"].sharding.mesh.shape).items()},
      "param_err": max_abs_diff(run_b.state.params, state.params),
  }


def multihost_config(seq_len: int = 32):
  """The tiny model of the 2-process test: 1 layer of width 32, batch 8, on a (data 2, fsdp 2, tensor 2) mesh."""
  c = small_config("transformer", (2, 2, 2, 1), batch=8, seq_len=seq_len, layers=1)
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 4, 1, 0, 0
  c.train.async_checkpoint = False
  c.optim.warmup_steps = 2
  c.eval.max_batches = 1
  return c


def case_hostref(args):
  """What the 2-process run must give: the same global batches (host 0's rows, then host 1's) through the same
  train step, in one process on 8 devices; and the 2-process run's checkpoint restored here."""
  config = multihost_config()
  iters = [data_lib.create_train_iterator(config.data, batch_size=config.train.batch_size // 2, seed=config.data.seed,
                                          process_index=i, process_count=2) for i in range(2)]

  def global_batches():
    while True:
      parts = [next(it) for it in iters]
      yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  losses, state, _ = train_loop(config, global_batches())
  out = {"losses": losses}
  if args.get("checkpoint"):
    restored = ckpt_lib.restore_params(args["checkpoint"], on_shardings_of(state.params))
    out["param_err"] = max_abs_diff(restored, state.params)
  return out


def case_bundle(args):
  """Several cases in one process: {"step": args, "kernels": args, ...} -> {case: result}."""
  return {name: CASES[name.split("_")[0]](case_args) for name, case_args in args["cases"].items()}


CASES = {"step": case_step, "kernels": case_kernels, "ckpt": case_ckpt, "hostref": case_hostref,
         "bundle": case_bundle}


def main() -> None:
  case, args = sys.argv[1], json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}")
  want = int(args.get("devices", 8))
  if jax.device_count() != want:
    raise SystemExit(f"expected {want} devices (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}), got {jax.device_count()}")
  print("RESULT " + json.dumps(CASES[case](args)), flush=True)


if __name__ == "__main__":
  main()
