"""What the chunked MTA op costs to compile for a TPU: the op alone, forward + backward, one
880M-shaped layer, ahead of time for one chip of a TPU topology, in fresh processes.

    python benchmarks/bench_op_compile.py                                # T = 512, v5e:2x2
    python benchmarks/bench_op_compile.py --lengths 512,2048 --variants auto,before
    python benchmarks/bench_op_compile.py --variants auto --target cpu   # this host's CPU

Shapes: batch 1 (one row per chip, as the paper presets on 128 chips), 16 heads of 96, bf16
q / k / v, float32 MTA weights; pre and post key-query convs 6 x 11, pre and post head mixing
over all 16 heads, segment ids, `jax.checkpoint` around the op (as model.remat=full), gradients
for q, k, v and every weight. `make_chunked()`'s defaults (block 256, at most 4 bands) unless
--block / --bands say otherwise.

Variants (how the op's blocks mix heads and convolve, and which parts are on):
  auto         the op as it is: on TPU elementwise head mixing (head_mix_elementwise) and the
               conv looped over kernel rows (shift_conv_looped); elsewhere GEMM and unrolled conv
  before       head_mix_2d (float32 GEMM, Precision.HIGHEST, contraction 16) and the unrolled
               shift_conv on every backend: what the op did on TPU before
  elementwise_unrolled   head_mix_elementwise and the unrolled shift_conv on every backend
  nokq_<v>     <v> without the key-query convs (head mixing only, the talking-heads layers)
  nomix        neither convs nor mixing (causal softmax through the chunked blocks)

Per variant: trace + lower seconds, compile wall and CPU seconds, the process's peak resident
memory, and XLA's temporaries for the step. `--lock FILE` holds an exclusive lock on FILE
around each TPU compile.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
from absl import flags  # noqa: E402

HEADS, HEAD_DIM, C_Q, C_K = 16, 96, 6, 11


def worker(cfg: dict) -> dict:
  if cfg["target"] == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  import jax.numpy as jnp
  from mta_jax import aot, ops_chunked

  variant = cfg["variant"]
  paths = variant.removeprefix("nokq_")
  if paths in ("before", "elementwise_unrolled"):  # one path on every backend
    ops_chunked.shift_conv_block = ops_chunked.shift_conv
    ops_chunked.head_mix_block = (ops_chunked.head_mix_2d if paths == "before"
                                  else ops_chunked.head_mix_elementwise)
  elif paths not in ("auto", "nomix"):
    raise ValueError(f"unknown variant {variant!r}")
  kq_on = not variant.startswith("nokq_") and variant != "nomix"
  mix_on = variant != "nomix"
  device = jax.devices()[0] if cfg["target"] == "cpu" else aot.topology_devices(cfg["target"])[0]
  sh = jax.sharding.SingleDeviceSharding(device)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  t = cfg["length"]
  qkv = spec((1, t, HEADS, HEAD_DIM), jnp.bfloat16)
  kern = spec((HEADS, C_Q, C_K), jnp.float32) if kq_on else None
  mixw = spec((1, HEADS, HEADS), jnp.float32) if mix_on else None
  seg = spec((1, t), jnp.int32)
  op = ops_chunked.make_chunked(block=cfg["block"], bands=cfg["bands"])

  def loss(q, k, v, kp, kpo, mp, mpo, segment_ids):
    f = jax.checkpoint(lambda *a: op(*a[:3], kq_kernel_pre=a[3], kq_kernel_post=a[4],
                                     head_mix_pre=a[5], head_mix_post=a[6], segment_ids=a[7],
                                     dropout_rate=0.0, dropout_rng=None))
    out = f(q, k, v, kp, kpo, mp, mpo, segment_ids).astype(jnp.float32)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape)))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5, 6)))
  t0 = time.time()
  lowered = grad.lower(qkv, qkv, qkv, kern, kern, mixw, mixw, seg)
  t1, c1 = time.time(), time.process_time()
  compiled = lowered.compile()
  t2, c2 = time.time(), time.process_time()
  mem = compiled.memory_analysis()
  return {"lower_s": t1 - t0, "compile_s": t2 - t1, "compile_cpu_s": c2 - c1,
          "peak_rss_mib": common.peak_rss_kib() / 1024,
          "temp_mib": (mem.temp_size_in_bytes if mem else 0) / 2**20}


flags.DEFINE_string("variants", "before,elementwise_unrolled,auto,nokq_before,nokq_auto,nomix",
                    "comma-separated")
flags.DEFINE_string("lengths", "512", "comma-separated sequence lengths")
flags.DEFINE_string("target", "v5e:2x2", "a TPU topology (one of its chips) or 'cpu'")
flags.DEFINE_integer("block", 256, "query rows per block")
flags.DEFINE_integer("bands", 4, "at most this many bands")
flags.DEFINE_float("timeout", 1200, "seconds per compile")
flags.DEFINE_string("lock", "", "a file to lock around every TPU compile")
flags.DEFINE_string("out", "", "JSON of the results, rewritten after every compile")
flags.DEFINE_string("worker", "", "internal: run one configuration (JSON) in this process")


def main(argv) -> None:
  a = common.flag_args(argv)
  if a.worker:
    common.emit_worker(worker, json.loads(a.worker))
    return
  results = []
  for length in [int(x) for x in a.lengths.split(",")]:
    for variant in a.variants.split(","):
      cfg = {"target": a.target, "variant": variant, "length": length, "block": a.block,
             "bands": a.bands}
      with common.locked(a.lock if a.target != "cpu" else ""):
        r = common.run_worker(os.path.abspath(__file__), cfg, a.timeout)
      r.update(cfg)
      results.append(r)
      print(f"T {length:5d} {variant:16s} " + (r.get("error") or (
          f"compile {r['compile_s']:.1f} s ({r['compile_cpu_s']:.1f} s CPU), peak RSS "
          f"{r['peak_rss_mib']:.0f} MiB")), flush=True)
      if a.out:
        common.write_json(a.out, {"machine": common.machine(), "args": vars(a),
                                  "results": results})
  ok = [r for r in results if "error" not in r]
  ref = {r["length"]: r for r in ok if r["variant"] == "before"}
  rows = [[r["length"], r["variant"], f"{r['lower_s']:.1f}", f"{r['compile_s']:.1f}",
           f"{r['compile_cpu_s']:.1f}", f"{r['peak_rss_mib']:.0f}", f"{r['temp_mib']:.0f}",
           f"{r['compile_cpu_s'] / ref[r['length']]['compile_cpu_s']:.2f}"
           if r["length"] in ref else "-"] for r in ok]
  print(f"\nchunked op fwd + bwd, 16 heads x 96, batch 1, compiled for one chip of {a.target}, "
        f"load average at the end {os.getloadavg()[0]:.1f}")
  print(common.table(rows, ["T", "variant", "lower s", "compile s", "compile CPU s",
                            "peak RSS MiB", "XLA temp MiB", "CPU / before"]))


if __name__ == "__main__":
  common.run(main)
