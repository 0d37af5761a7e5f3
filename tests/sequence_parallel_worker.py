"""Context-parallel checks on simulated CPU devices, run in their own process by tests/test_sequence_parallel.py.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.sequence_parallel_worker CASE 'JSON ARGS'

Prints one line `RESULT <json>` (maximum errors against the unsharded references, and which collectives the
sharded programs contain); the assertions live in the test. Cases:
  ring    kernels.ring_attention_sharded vs kernels.attention(impl="reference") on the whole sequence, o, dq, dk, dv
  scan    kernels.sharded_linear_scan vs kernels.linear_scan(impl="reference"): o, final state and gradients
  memory  memory.sequence_parallel.sharded_update vs neural.chunked_update: reads, (W, S) and gradients
  models  DecoderLM forward (and gradients) on a mesh with a sequence axis vs the same parameters on one device
  export  ring attention and the SP scan with Pallas kernels exported for TPU and GPU (Triton) on a 4-device mesh
  multi   several of the above in one process: {"ring": {...}, "scan": {...}}
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from memarch.memory import neural
from memarch.memory import sequence_parallel as memory_sp

AXES = ("data", "fsdp", "tensor", "sequence")


def mesh_of(shape):
  return jax.make_mesh(tuple(shape), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4,
                       devices=jax.devices()[: int(np.prod(shape))])


def max_err(a, b) -> float:
  return max((float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), default=0.0)


def max_abs(a) -> float:
  return max((float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(a)), default=0.0)


def compare(sharded_fn, ref_fn, args, argnums, weights_fn, mesh):
  """Forward outputs and the gradients of sum(outputs * fixed weights) of both functions."""

  def loss(fn):
    return lambda *a: sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in zip(jax.tree.leaves(fn(*a)),
                                                                               jax.tree.leaves(weights_fn)))

  def value_and_grads(fn):  # one program for the outputs and the gradients (compiling dominates on CPU)
    with_out = lambda *a: (loss(fn)(*a), fn(*a))
    return jax.jit(jax.grad(with_out, argnums=argnums, has_aux=True))

  with jax.set_mesh(mesh):
    grads, out = value_and_grads(sharded_fn)(*args)
    jaxpr = str(jax.make_jaxpr(sharded_fn)(*args))
  ref_grads, ref = value_and_grads(ref_fn)(*args)
  return {
      "out_err": max_err(out, ref), "out_scale": max_abs(ref),
      "grad_err": [max_err(g, r) for g, r in zip(grads, ref_grads)], "grad_scale": [max_abs(r) for r in ref_grads],
      "ppermute": "ppermute" in jaxpr, "all_gather": "all_gather" in jaxpr, "cond": "cond[" in jaxpr,
  }


def case_ring(args):
  mesh = mesh_of(args.get("mesh", (1, 1, 1, 4)))
  b, t, h, kvh, d = 2, args.get("seq", 20), 4, 2, 8  # t / 4 = 5 tokens per device: no block size divides it
  rng = np.random.default_rng(0)
  arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, k, v = arr(b, t, h, d), arr(b, t, kvh, d), arr(b, t, kvh, d)
  seg = jnp.asarray(np.where(np.arange(t) < t // 2 + 3, 1, 2)[None].repeat(b, 0), jnp.int32)
  out = {}
  for name in args["variants"]:
    causal = not name.startswith("full")
    window = {"window": 7, "window1": 1, "full_window": 5}.get(name)
    segment_ids = seg if name == "segments" else None
    impl = args.get("impl", "xla")
    kw = dict(causal=causal, window=window, segment_ids=segment_ids)
    sharded = lambda q, k, v: kernels.ring_attention_sharded(q, k, v, impl=impl, **kw)
    ref = lambda q, k, v: kernels.attention(q, k, v, impl="reference", **kw)
    w = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    out[name] = compare(sharded, ref, (q, k, v), (0, 1, 2), w, mesh)
  return out


def case_scan(args):
  mesh = mesh_of(args.get("mesh", (1, 1, 1, 4)))
  b, t, h, dk, dv = 2, args.get("seq", 20), 2, 4, 3
  rng = np.random.default_rng(1)
  arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q, k, v = unit(arr(b, t, h, dk)), unit(arr(b, t, h, dk)), arr(b, t, h, dv)
  g, beta, s0 = -jax.nn.softplus(arr(b, t, h)), jax.nn.sigmoid(arr(b, t, h)), 0.5 * arr(b, h, dk, dv)
  out = {}
  for name in args["variants"]:  # linear | simple_gla | delta | gated_delta
    use_g, use_beta = name in ("simple_gla", "gated_delta"), name in ("delta", "gated_delta")

    def call(fn, **kw):
      return lambda q, k, v, g_, beta_, s: fn(q, k, v, g=g_ if use_g else None, beta=beta_ if use_beta else None,
                                              initial_state=s, **kw)

    sharded = call(kernels.sharded_linear_scan, chunk_size=args.get("chunk", 3), impl="xla")
    ref = call(kernels.linear_scan, impl="reference")
    weights = (jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32),
               jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32))
    res = compare(sharded, ref, (q, k, v, g, beta, s0), (0, 1, 2, 3, 4, 5), weights, mesh)
    res["grad_err"] = [e for e, used in zip(res["grad_err"], (1, 1, 1, use_g, use_beta, 1)) if used]
    res["grad_scale"] = [e for e, used in zip(res["grad_scale"], (1, 1, 1, use_g, use_beta, 1)) if used]
    out[name] = res
  return out


def case_memory(args):
  mesh = mesh_of(args.get("mesh", (1, 1, 1, 4)))
  b, t, h, d = 2, args.get("seq", 24), 2, 4
  rng = np.random.default_rng(2)
  arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  k, q, v = unit(arr(b, t, h, d)), unit(arr(b, t, h, d)), arr(b, t, h, d)
  theta = 0.2 * jax.nn.sigmoid(arr(b, t, h))
  eta, alpha = jax.nn.sigmoid(arr(b, t, h)), 0.1 * jax.nn.sigmoid(arr(b, t, h))
  gamma = jax.nn.sigmoid(arr(b, t, h))
  out = {}
  for v_ in args["variants"]:
    spec = neural.MemorySpec(dim=d, depth=v_["depth"], expansion=2, residual=v_.get("residual", False))
    w0 = neural.broadcast(neural.init_weights(jax.random.key(0), spec, h), b)
    s0 = tuple(0.1 * jnp.ones_like(x) for x in w0)
    window = v_.get("window", 1)
    kw = dict(chunk_size=v_.get("chunk", 3), read=v_.get("read", "after"), optimizer=v_.get("optimizer", "momentum"),
              window=window)
    sharded = lambda w0, s0, k, v, q, th, et, al, gm: memory_sp.sharded_update(
        w0, s0, k, v, q, th, et, al, spec, scheme=v_.get("scheme", "auto"), gamma=gm if window > 1 else None, **kw)
    ref = lambda w0, s0, k, v, q, th, et, al, gm: neural.chunked_update(
        w0, s0, k, v, q, th, et, al, spec, gamma=gm if window > 1 else None, **kw)
    weights = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32),
               jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), (w0, s0)))
    argnums = (0, 1, 2, 3, 4, 5, 6, 7) + ((8,) if window > 1 else ())
    res = compare(sharded, ref, (w0, s0, k, v, q, theta, eta, alpha, gamma), argnums, weights, mesh)
    res["affine"] = memory_sp.is_affine(spec, window, kw["optimizer"]) and v_.get("scheme", "auto") != "handoff"
    out[v_["name"]] = res
  return out


def case_models(args):
  """Logits (and, for `grad` models, gradients of a loss) of a tiny model under a mesh (`mesh`: data, fsdp,
  tensor, sequence; default (1, 1, 1, 4)) with the config's logical rules vs the same parameters on one device."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  from configs import gated_deltanet, mom, titans, transformer  # pylint: disable=g-import-not-at-top
  from memarch import data as data_lib  # pylint: disable=g-import-not-at-top
  from memarch import sharding  # pylint: disable=g-import-not-at-top
  from memarch import train as train_lib  # pylint: disable=g-import-not-at-top
  from memarch.models import build_model  # pylint: disable=g-import-not-at-top

  families = {"transformer": (transformer, "size=tiny"), "gated_deltanet": (gated_deltanet, "size=tiny"),
              "mom": (mom, "size=tiny"), "titans_mal": (titans, "variant=mal,size=tiny"),
              "titans_lmm": (titans, "variant=lmm,size=tiny")}
  out = {}
  t = args.get("seq", 32)
  for name in args["models"]:
    module, arg = families[name]
    c = module.get_config(arg)
    for axis, size in zip(AXES, args.get("mesh", (1, 1, 1, 4))):
      c.mesh[axis] = int(size)
    c.data.seq_len = t
    for key, value in args.get("overrides", {}).get(name, {}).items():
      c.model[key] = value
    model_config = train_lib.resolve_model_config(c, data_lib.data_info(c.data))
    model = build_model(model_config)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, model_config.vocab_size, (2, t)), jnp.int32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
    fwd = lambda p, x: model.apply({"params": p}, x)
    loss = lambda p, x: jnp.mean(jax.nn.log_softmax(fwd(p, x).astype(jnp.float32))[..., 0])
    ref_logits = jax.jit(fwd)(params, tokens)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[: int(np.prod([c.mesh[a] for a in AXES]))])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules(c.mesh)):
      logits = jax.jit(fwd)(params, tokens)
      jaxpr = str(jax.make_jaxpr(fwd)(params, tokens))
      res = {"out_err": max_err(logits, ref_logits), "out_scale": max_abs(ref_logits),
             "ppermute": "ppermute" in jaxpr, "all_gather": "all_gather" in jaxpr}
      if name in args.get("grad", ()):
        grads = jax.jit(jax.grad(loss))(params, tokens)
    if name in args.get("grad", ()):
      ref_grads = jax.jit(jax.grad(loss))(params, tokens)
      res["grad_err"], res["grad_scale"] = max_err(grads, ref_grads), max_abs(ref_grads)
    out[name] = res
  return out


def case_export(args):
  """The gradients of ring attention and of the SP scan with impl="pallas" on a (1, 1, 1, 4) mesh, exported for
  TPU (Mosaic) and GPU (Triton) from this CPU-only machine: which kernels and collectives the modules contain.

  `impl="pallas"` picks its kernel by the default backend (cpu here), so the target is forced by replacing
  the two selectors (`kernels.attention._pallas_variant`, `kernels.linear_scan_pallas.default_backend`), the
  test-only equivalent of running on that backend.
  """
  from jax import export  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  attention_module = sys.modules["kernels.attention"]
  from kernels import linear_scan_pallas  # pylint: disable=g-import-not-at-top

  mesh = mesh_of((1, 1, 1, 4))
  t = args.get("seq", 512)
  seq = NamedSharding(mesh, P(None, "sequence"))
  x = jax.ShapeDtypeStruct((1, t, 2, 64), jnp.bfloat16, sharding=seq)
  gate = jax.ShapeDtypeStruct((1, t, 2), jnp.float32, sharding=seq)
  ops = {
      "ring": (lambda q, k, v: kernels.ring_attention_sharded(q, k, v, window=t // 2, impl="pallas"), (x, x, x)),
      "scan": (lambda q, k, v, g, b: kernels.sharded_linear_scan(q, k, v, g=g, beta=b, impl="pallas")[0],
               (x, x, x, gate, gate)),
  }
  targets = {"tpu": ("pallas_tpu", "tpu", "tpu_custom_call"), "cuda": ("pallas_triton", "triton", "__gpu$xla.gpu.triton")}
  out = {}
  saved = attention_module._pallas_variant, linear_scan_pallas.default_backend  # pylint: disable=protected-access
  try:
    for platform, (variant, scan_backend, marker) in targets.items():
      attention_module._pallas_variant = lambda impl, v=variant: v if impl == "pallas" else impl  # pylint: disable=protected-access
      linear_scan_pallas.default_backend = lambda b=scan_backend: b
      checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if platform == "cuda" else []
      for name, (fn, shapes) in ops.items():
        grad = jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2))
        with jax.set_mesh(mesh):
          text = export.export(jax.jit(grad), platforms=[platform], disabled_checks=checks)(*shapes).mlir_module()
        out[f"{name}_{platform}"] = {"kernel": marker in text, "collective_permute": "collective_permute" in text,
                                     "all_gather": "all_gather" in text}
  finally:
    attention_module._pallas_variant, linear_scan_pallas.default_backend = saved  # pylint: disable=protected-access
  return out


def case_multi(args):
  """Several cases in one process (one interpreter and JAX start-up): {"case": args, ...} -> {"case": result}."""
  out = {}
  for name, case_args in args.items():
    start = time.perf_counter()
    out[name] = CASES[name](case_args)
    out[name]["seconds"] = time.perf_counter() - start
  return out


CASES = {"ring": case_ring, "scan": case_scan, "memory": case_memory, "models": case_models, "export": case_export,
         "multi": case_multi}

if __name__ == "__main__":
  result = CASES[sys.argv[1]](json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
  print("RESULT " + json.dumps(result))
