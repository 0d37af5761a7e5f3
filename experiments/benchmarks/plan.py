r"""Launch planner: what a config needs on a device mesh, computed without running it.

  python -m experiments.benchmark plan --config configs/titans.py:variant=mac,size=base \
      --mesh data=2,fsdp=4,tensor=1,sequence=1 --device tpu_v5p [--batch 128 --seq 4096] [--compute-dtype bfloat16]

Prints (and writes bench_results/plan_<config>_<device>.json):
  - parameters (counted from the model's abstract init) and analytic FLOPs per token (memarch.flops);
  - per-device memory: parameters (float32, sharded as memarch.sharding places them: the config's mesh rules
    fitted to each shape, with the fsdp fallback), gradients (float32, same sharding), AdamW's two float32
    moments, activations saved for the backward (per block type, without and with per-layer rematerialization)
    and the recurrent states among them, the logits; and whether the total fits the device's HBM (90% usable);
  - communication per device and step: FSDP all-gathers of the parameters (one in the forward, one in the
    backward) and reduce-scatters of the gradients, the data-parallel all-reduce of the gradient shards, the
    tensor-parallel all-reduces of every block's output (forward) and input gradient (backward), and the
    sequence-parallel ring passes (attention keys/values; memory states);
  - an estimated step time: compute at an assumed model FLOPs utilization (--mfu, default 0.4) plus the
    tensor- and sequence-parallel communication (on the critical path) plus whatever FSDP / data-parallel
    communication the compute cannot hide.
  - `--check`: the train step compiled on this CPU for the same mesh (simulated devices, in a subprocess with
    XLA_FLAGS=--xla_force_host_platform_device_count) and its per-device memory analysis, next to the analytic
    total. Practical for small configs and meshes of up to 8 devices; CPU buffers are float32 whatever the
    --compute-dtype.

The activation model counts, per token and block, the tensors a block keeps for its backward (residual input,
normed input, projections, attention outputs and statistics, gates; chunk-start states of the scans and the
Titans memory's per-chunk weights in float32) in the compute dtype; tensors with a heads / MLP / vocabulary
axis are split over `tensor`, the residual stream is not. With rematerialization (`--set model.remat=True`,
memarch.models.lm) only each block's input is kept (plus one block's activations while it is recomputed): the
"fits" line says which of the two a config needs. Estimates, not measurements: XLA's buffer assignment reuses
and fuses buffers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from typing import Any

from experiments.benchmarks.harness import format_table, write_json

# Public per-chip figures.
#   TPU v5p (cloud.google.com/tpu/docs/v5p): 459 TFLOP/s bf16 peak, 95 GB HBM2e at 2765 GB/s, inter-chip
#     interconnect 4800 Gbps per chip (1200 GB/s bidirectional; taken as 600 GB/s per direction), 3D torus;
#     4 chips per host (a v5p-N slice has N / 2 chips).
#   H100 SXM5 (NVIDIA H100 datasheet): 989 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s, NVLink 4 at 900 GB/s
#     per GPU (450 GB/s per direction) inside a node of 8; between nodes one 400 Gb/s NDR InfiniBand port per
#     GPU (50 GB/s per direction), as in a DGX H100.
DEVICES: dict[str, dict[str, Any]] = {
    "tpu_v5p": {"name": "TPU v5p chip", "hbm_gb": 95.0, "hbm_gbs": 2765.0, "peak_bf16_tflops": 459.0,
                "peak_f32_tflops": 459.0 / 2, "link_gbs": 600.0, "node_link_gbs": 600.0, "devices_per_node": 4,
                "interconnect": "ICI 3D torus (every axis of a slice)"},
    "h100": {"name": "H100 SXM5", "hbm_gb": 80.0, "hbm_gbs": 3350.0, "peak_bf16_tflops": 989.0,
             "peak_f32_tflops": 67.0, "link_gbs": 450.0, "node_link_gbs": 50.0, "devices_per_node": 8,
             "interconnect": "NVLink inside a node of 8, InfiniBand NDR between nodes"},
}
MESH_AXES = ("data", "fsdp", "tensor", "sequence")
HBM_USABLE = 0.9  # leave room for XLA's scratch, fragmentation and the runtime
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,fsdp=4' -> every mesh axis with its size (missing axes 1)."""
  mesh = {a: 1 for a in MESH_AXES}
  for item in filter(None, text.split(",")):
    key, _, value = item.partition("=")
    if key not in mesh or not value.isdigit() or int(value) < 1:
      raise ValueError(f"--mesh item {item!r}: expected AXIS=N with AXIS in {MESH_AXES} and N >= 1.")
    mesh[key] = int(value)
  return mesh


# ------------------------------------------------------------------------------------------- activations


def _dims(c):
  heads = int(c.num_heads)
  kv = int(c.get("num_kv_heads", 0) or heads)
  hd = int(c.get("head_dim", 0) or c.embed_dim // heads)
  dv = int(c.get("value_dim", 0) or hd)
  return heads, kv, hd, dv


def block_activations(name: str, c, t: int) -> dict[str, float]:
  """Floats per token a block keeps for its backward: `rep` (residual-stream sized, replicated over tensor),
  `split` (with a heads / MLP axis, split over tensor), `state` (float32 recurrent states, split over tensor)."""
  from memarch import flops as fl  # noqa: PLC0415

  e = c.embed_dim
  h, kv, hd, dv = _dims(c)
  rep = 2 * e  # the block's input (pre-norm) and the normed input its projections read
  if name in ("attention", "window_attention"):
    # q, k before and after RoPE, v, the output, the log-sum-exp (flash: no t x t matrix is kept)
    return {"rep": rep, "split": 3 * h * hd + 3 * kv * hd + h, "state": 0.0}
  if name == "mlp":
    return {"rep": rep, "split": 3 * c.mlp_dim, "state": 0.0}
  if name == "linear_memory":
    # q, k, v before and after the convolution, g, beta, the output, its norm and gate; chunk-start states
    return {"rep": rep, "split": h * (2 * (2 * hd + dv) + 2 + 3 * dv),
            "state": h * hd * dv / int(c.get("chunk_size", 64))}
  if name == "based":
    f = int(c.get("feature_dim", 16))
    d = 1 + f + f * f
    return {"rep": rep, "split": h * (2 * f + 2 * d + 2 * (hd + 1)), "state": h * d * (hd + 1) / int(c.get("chunk_size", 64))}
  if name == "mom":
    m = int(c.num_memories) + int(bool(c.get("shared_memory", True)))
    # every memory's buffer holds T slots (no capacity): the linear memory's tensors m times, plus the router
    return {"rep": rep + int(c.num_memories), "split": m * h * (2 * (2 * hd + dv) + 2 + dv) + 2 * h * dv,
            "state": m * h * hd * dv / int(c.get("chunk_size", 64))}
  if name in ("neural_memory", "mag", "mac"):
    shapes = fl._memory_mlp_shapes(c)  # noqa: SLF001 - the memory MLP's (d_in, d_out) per layer
    b = min(int(c.memory_chunk_size), t)
    mem = {"rep": rep, "split": h * (6 * hd + 3 + 3 * hd),  # q k v pre/post conv, gates, reads, out gate, norm
           "state": 2 * h * sum(a * o for a, o in shapes) / b}  # (W, S) at every chunk start (checkpointed body)
    if name == "neural_memory":
      return mem
    att = block_activations("attention", c, t)
    if name == "mag":
      return {"rep": rep + e, "split": mem["split"] + att["split"] + 2 * e, "state": mem["state"]}
    # mac: retrieval (queries, reads, projected tokens), attention over [h; x] (two of everything), memory on y
    return {"rep": rep + 3 * e, "split": mem["split"] + 2 * att["split"] + 2 * h * hd, "state": mem["state"]}
  raise NotImplementedError(f"no activation model for block type {name!r}.")


def activation_bytes(model_cfg, t_local: int, b_local: int, tensor: int, dtype_bytes: int, vocab: int) -> dict:
  """Per-device activation bytes (no remat, with remat), the float32 states among them, and the logits."""
  c = model_cfg
  if c.get("name", "transformer") == "hmt":
    bb = c.backbone
    seg = int(c.segment_len)
    n_call = seg + int(c.sensory_len) + 2
    inner = activation_bytes(bb, n_call, b_local, tensor, dtype_bytes, vocab)
    scale = t_local / seg  # one backbone call per segment, all kept (no remat in the segment scan)
    return {k: v * scale for k, v in inner.items()}
  names = tuple(c.layer_blocks) * int(c.num_layers)
  tokens = b_local * t_local
  full, states, per_block = 0.0, 0.0, []
  for n in names:
    a = block_activations(n, c, t_local)
    act = (a["rep"] + a["split"] / tensor) * dtype_bytes + a["state"] / tensor * 4
    per_block.append(act * tokens)
    full += act * tokens
    states += a["state"] / tensor * 4 * tokens
  # Logits [b, t, V] in float32, the softmax the cross-entropy keeps and the logits' gradient, which coexist at
  # the start of the backward; vocabulary split over tensor.
  logits = 3 * 4 * vocab / tensor * tokens
  remat = len(names) * c.embed_dim * dtype_bytes * tokens + max(per_block)
  return {"activations": full, "activations_remat": remat, "states": states, "logits": logits}


# ---------------------------------------------------------------------------------------------- the plan


def plan(config, mesh: dict[str, int], device: str, *, batch: int, seq: int, compute_dtype: str | None,
         mfu: float) -> dict[str, Any]:
  """The plan as a dict (see the module docstring)."""
  import flax.linen as nn  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from memarch import data as data_lib  # noqa: PLC0415
  from memarch import flops as flops_lib  # noqa: PLC0415
  from memarch import sharding as shard_lib  # noqa: PLC0415
  from memarch.models import build_model  # noqa: PLC0415
  from memarch.train import resolve_model_config  # noqa: PLC0415

  if device not in DEVICES:
    raise ValueError(f"unknown device {device!r}; choose one of {sorted(DEVICES)}.")
  spec = DEVICES[device]
  n_dev = math.prod(mesh.values())
  dp = mesh["data"] * mesh["fsdp"]
  if batch % dp:
    raise ValueError(f"batch {batch} does not split over data x fsdp = {dp} devices.")
  if seq % mesh["sequence"]:
    raise ValueError(f"seq {seq} does not split over sequence = {mesh['sequence']} devices.")
  model_cfg = resolve_model_config(config, data_lib.data_info(config.data))
  dtype = compute_dtype or model_cfg.get("compute_dtype", "float32")
  if model_cfg.get("name") == "hmt":
    dtype = compute_dtype or model_cfg.backbone.get("compute_dtype", "float32")
  dtype_bytes = DTYPE_BYTES[dtype]
  vocab = int(model_cfg.vocab_size)
  model = build_model(model_cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, min(seq, 64)), jnp.int32)))["params"]
  rules = shard_lib.logical_rules(config.mesh)
  fallback = bool(config.mesh.get("fsdp_fallback", True))
  n_params, per_dev_params = 0, 0
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    shape, names = (leaf.value.shape, leaf.names) if isinstance(leaf, nn.Partitioned) else (leaf.shape, (None,) * leaf.ndim)
    pspec = shard_lib.param_spec(shape, names, mesh, rules, fsdp_fallback=fallback)
    split = 1
    for entry in pspec:
      for axis in ((entry,) if isinstance(entry, str) else (entry or ())):
        split *= mesh[axis]
    n_params += math.prod(shape)
    per_dev_params += math.prod(shape) // split
  fl = flops_lib.model_flops(model_cfg, seq)
  b_local, t_local = batch // dp, seq // mesh["sequence"]
  act = activation_bytes(model_cfg, t_local, b_local, mesh["tensor"], dtype_bytes, vocab)
  p_bytes = 4 * per_dev_params
  memory = {"parameters": p_bytes, "gradients": p_bytes, "adamw_moments": 2 * p_bytes, **act}
  total = p_bytes * 4 + act["activations"] + act["logits"]
  total_remat = p_bytes * 4 + act["activations_remat"] + act["logits"]
  hbm = spec["hbm_gb"] * 1e9 * HBM_USABLE
  decode_state = sum(math.prod(x.shape) * x.dtype.itemsize
                     for x in jax.tree.leaves(jax.eval_shape(lambda: model.init_cache(1, seq))))
  comm = communication(model_cfg, mesh, n_params, b_local, t_local, dtype_bytes, vocab)
  flops_step = fl["per_token_train"] * batch * seq
  peak = spec["peak_bf16_tflops"] if dtype_bytes == 2 else spec["peak_f32_tflops"]
  compute_s = flops_step / n_dev / (peak * 1e12 * mfu)
  bw = axis_bandwidths(mesh, spec)
  times = {k: v / (bw[AXIS_OF[k]] * 1e9) for k, v in comm.items()}
  overlappable = times["fsdp_all_gather"] + times["fsdp_reduce_scatter"] + times["data_all_reduce"]
  critical = times["tensor_all_reduce"] + times["sequence_ring"]
  step_s = compute_s + critical + max(0.0, overlappable - compute_s)
  return {
      "config": {"batch": batch, "seq": seq, "compute_dtype": dtype, "mesh": mesh, "devices": n_dev,
                 "device": spec["name"], "mfu_assumed": mfu},
      "parameters": n_params, "flops_per_token_forward": fl["per_token_forward"],
      "flops_per_token_train": fl["per_token_train"], "train_flops_per_step": flops_step,
      "memory_per_device_bytes": memory, "total_per_device_bytes": total,
      "total_per_device_bytes_remat": total_remat, "usable_hbm_bytes": hbm,
      "fits": total <= hbm, "fits_with_remat": total_remat <= hbm,
      "decode_state_bytes_per_sequence": decode_state,
      "communication_bytes_per_device": comm, "communication_seconds": times, "axis_bandwidth_gbs": bw,
      "compute_seconds": compute_s, "estimated_step_seconds": step_s,
      "tokens_per_second": batch * seq / step_s,
  }


AXIS_OF = {"fsdp_all_gather": "fsdp", "fsdp_reduce_scatter": "fsdp", "data_all_reduce": "data",
           "tensor_all_reduce": "tensor", "sequence_ring": "sequence"}


def axis_bandwidths(mesh: dict[str, int], spec: dict[str, Any]) -> dict[str, float]:
  """Per-direction GB/s of each mesh axis' collectives: devices are laid out with the last mesh axis fastest
  (memarch.sharding.make_mesh), so an axis stays inside a node while it and the axes after it fit there."""
  out, inner = {}, 1
  for axis in reversed(MESH_AXES):
    inner *= mesh[axis]
    out[axis] = spec["link_gbs"] if inner <= spec["devices_per_node"] else spec["node_link_gbs"]
  return out


def _ring(n: int) -> float:
  return (n - 1) / n if n > 1 else 0.0


def communication(c, mesh, n_params: int, b_local: int, t_local: int, dtype_bytes: int, vocab: int) -> dict:
  """Bytes each device sends per step, per kind (ring collectives: (n - 1) / n of the buffer per pass)."""
  fsdp, data, tp, sp = mesh["fsdp"], mesh["data"], mesh["tensor"], mesh["sequence"]
  p_tp = 4 * n_params / tp  # float32 parameters of one tensor shard
  out = {"fsdp_all_gather": 2 * _ring(fsdp) * p_tp, "fsdp_reduce_scatter": _ring(fsdp) * p_tp,
         "data_all_reduce": 2 * _ring(data) * p_tp / fsdp, "tensor_all_reduce": 0.0, "sequence_ring": 0.0}
  if c.get("name") == "hmt":
    c = c.backbone
  names = tuple(c.layer_blocks) * int(c.num_layers)
  act = b_local * t_local * c.embed_dim * dtype_bytes
  # Every block's output projection is row-parallel (one all-reduce forward, one for its input's gradient),
  # and the unembedding's hidden-state gradient is summed over the vocabulary shards.
  out["tensor_all_reduce"] = 2 * _ring(tp) * act * (2 * len(names) + 1)
  h, kv, hd, dv = _dims(c)
  for n in names:
    if n in ("attention", "window_attention", "mag", "mac"):
      window = int(c.get("window", 0) or 0) if n != "mac" else int(c.segment_len)
      steps = sp - 1 if not window else min(sp - 1, math.ceil(window / t_local))
      kv_bytes = b_local * t_local * 2 * kv * hd * dtype_bytes / max(1, tp)
      out["sequence_ring"] += 3 * steps * kv_bytes  # K, V forward; K, V and dK, dV backward
    if n in ("linear_memory", "based", "mom", "neural_memory", "mag", "mac") and sp > 1:
      a = block_activations(n, c, t_local)
      chunk = int(c.get("chunk_size", 0) or c.get("memory_chunk_size", 16))
      state = a["state"] * chunk * 4 / max(1, tp) * b_local  # one chunk-start state per sequence
      out["sequence_ring"] += 2 * state  # the carried state forward, its gradient backward
  return out


# ------------------------------------------------------------------------------------------ compiled check


def compiled_memory(spec: str, overrides: list[str], mesh: dict[str, int], batch: int, seq: int) -> dict[str, int]:
  """Per-device memory analysis of the train step compiled for `mesh` (needs that many JAX devices)."""
  import jax  # noqa: PLC0415

  from experiments.benchmarks import harness  # noqa: PLC0415

  model_cfg, config = harness.model_config(spec, overrides + [f"mesh.{a}={n}" for a, n in mesh.items()])
  step, state, data, m = harness.train_step_setup(model_cfg, config, batch=batch, seq=seq)
  from memarch import sharding as shard_lib  # noqa: PLC0415

  with jax.set_mesh(m):
    data = {k: jax.device_put(v, shard_lib.batch_sharding(m, v.shape)) for k, v in data.items()}
    analysis = step.lower(state, data).compile().memory_analysis()
  temp, arg = int(analysis.temp_size_in_bytes), int(analysis.argument_size_in_bytes)
  out, alias = int(analysis.output_size_in_bytes), int(analysis.alias_size_in_bytes)
  return {"temp": temp, "argument": arg, "output": out, "alias": alias, "peak": temp + arg + out - alias}


def run_check(spec: str, overrides: list[str], mesh: dict[str, int], batch: int, seq: int) -> dict[str, int]:
  """`compiled_memory` in a subprocess with as many simulated CPU devices as the mesh has."""
  n = math.prod(mesh.values())
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
  code = ("import json, sys; from experiments.benchmarks.plan import compiled_memory; "
          "print('RESULT', json.dumps(compiled_memory(*json.loads(sys.argv[1]))))")
  args = json.dumps([spec, overrides, mesh, batch, seq])
  res = subprocess.run([sys.executable, "-c", code, args], env=env, capture_output=True, text=True, check=False)
  for line in res.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  raise RuntimeError(f"compiled memory check failed:\n{res.stderr[-3000:]}")


# -------------------------------------------------------------------------------------------------- main


def _gib(x: float) -> str:
  return f"{x / 2**30:.3f} GiB"


def report(p: dict[str, Any]) -> str:
  cfg = p["config"]
  mem = p["memory_per_device_bytes"]
  lines = [
      f"{cfg['devices']} x {cfg['device']}, mesh {cfg['mesh']}, batch {cfg['batch']} x seq {cfg['seq']}, "
      f"compute {cfg['compute_dtype']}",
      f"parameters {p['parameters']:,}; FLOPs per token: forward {p['flops_per_token_forward'] / 1e6:.2f} M, "
      f"train {p['flops_per_token_train'] / 1e6:.2f} M; per step {p['train_flops_per_step'] / 1e12:.2f} TFLOP",
      "",
      format_table([{"memory per device": k, "size": _gib(v)} for k, v in mem.items()]
                   + [{"memory per device": "total (no remat)", "size": _gib(p["total_per_device_bytes"])},
                      {"memory per device": "total (per-layer remat)", "size": _gib(p["total_per_device_bytes_remat"])},
                      {"memory per device": "usable HBM (90%)", "size": _gib(p["usable_hbm_bytes"])}],
                   ["memory per device", "size"]),
      f"fits: {'yes' if p['fits'] else 'no'} (with per-layer remat, model.remat=True: "
      f"{'yes' if p['fits_with_remat'] else 'no'}); "
      f"decoding state per sequence at seq {cfg['seq']}: {_gib(p['decode_state_bytes_per_sequence'])}",
      "",
      format_table([{"communication": k, "GiB per device": v / 2**30, "axis GB/s": p["axis_bandwidth_gbs"][AXIS_OF[k]],
                     "seconds": p["communication_seconds"][k]} for k, v in p["communication_bytes_per_device"].items()],
                   ["communication", "GiB per device", "axis GB/s", "seconds"]),
      f"compute {p['compute_seconds']:.3f} s at MFU {cfg['mfu_assumed']}; estimated step {p['estimated_step_seconds']:.3f} s "
      f"({p['tokens_per_second']:,.0f} tokens/s)",
  ]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  ap = argparse.ArgumentParser(prog="python -m experiments.benchmark plan", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True, help="configs/x.py:arg")
  ap.add_argument("--set", action="append", default=[], help="override section.key=value (repeatable)")
  ap.add_argument("--mesh", default="data=1", help="data=..,fsdp=..,tensor=..,sequence=.. (missing axes 1)")
  ap.add_argument("--device", default="tpu_v5p", choices=sorted(DEVICES))
  ap.add_argument("--batch", type=int, default=0, help="global batch (default: the config's train.batch_size)")
  ap.add_argument("--seq", type=int, default=0, help="sequence length (default: the config's data.seq_len)")
  ap.add_argument("--compute-dtype", default="", help="override model.compute_dtype (e.g. bfloat16)")
  ap.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization for the step time")
  ap.add_argument("--check", action="store_true", help="also compile on CPU with simulated devices (small configs)")
  ap.add_argument("--out", default="", help="JSON path (default bench_results/plan_<config>_<device>.json)")
  args = ap.parse_args(argv)
  from experiments import sweep  # noqa: PLC0415

  config = sweep.load_config(args.config)
  for item in args.set:
    sweep.apply_override(config, item)
  mesh = parse_mesh(args.mesh)
  batch = args.batch or int(config.train.batch_size)
  seq = args.seq or int(config.data.seq_len)
  p = plan(config, mesh, args.device, batch=batch, seq=seq, compute_dtype=args.compute_dtype or None, mfu=args.mfu)
  print(report(p))
  if args.check:
    compiled = run_check(args.config, args.set, mesh, batch, seq)
    p["compiled_cpu_float32"] = compiled
    print(f"\ncompiled on CPU ({math.prod(mesh.values())} simulated devices, float32): per-device peak "
          f"{_gib(compiled['peak'])} (arguments {_gib(compiled['argument'])}, temporaries {_gib(compiled['temp'])}); "
          f"analytic at float32: see --compute-dtype float32")
  stem = os.path.splitext(os.path.basename(args.config.partition(":")[0]))[0]
  arg = args.config.partition(":")[2].replace(",", "_").replace("=", "-")
  out = args.out or os.path.join("bench_results", f"plan_{stem}{'_' + arg if arg else ''}_{args.device}.json")
  write_json(out, {"command": "python -m experiments.benchmark plan " + " ".join(argv), **p})
