"""The alternatives for the pieces of one chunked-MTA block, measured on one logit slab.

    python benchmarks/bench_conv.py                 # slab [1, 16, 256 (+5 halo), 2048]
    python benchmarks/bench_conv.py --rows 128 --cols 1024

Forward+backward (w.r.t. the slab and the weights) of:
  * key-query conv 6 x 11:  conv_general_dilated | shift-and-add with autodiff |
    shift-and-add with the hand-written VJP (ops_chunked.shift_conv)
  * the algebraic "wider attention" rewrite of the pre-softmax conv: its main matmul
    [q_i, ..., q_{i-5}] . [K~_0[j], ..., K~_5[j]] (contraction c_q * d = 384), WITHOUT the
    near-diagonal band correction it also needs (so a lower bound of its cost); and the
    q . k matmul it replaces (contraction d = 64) for scale
  * head mixing over 16 heads: 5-D einsum (ops.head_mix) | 2-D GEMM (ops_chunked.head_mix_2d)
Times are medians of CPU seconds (all threads) and wall seconds, in one process.
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


# Flags (absl, see common.run).
flags.DEFINE_integer("rows", 256, "rows of the score matrix")
flags.DEFINE_integer("cols", 2048, "columns of the score matrix")
flags.DEFINE_integer("repeats", 5, "timed calls")
flags.DEFINE_bool("skip-slow", False, "skip conv_general_dilated and the autodiff shift-and-add "
                  "(each takes seconds per call)")
flags.DEFINE_string("out", "benchmarks/results/conv.json", "JSON output file")


def main(argv) -> None:
  args = common.flag_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from mta_jax import ops, ops_chunked

  heads, d, c_q, c_k = 16, 64, 6, 11
  r, c = args.rows, args.cols
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  x = jax.random.normal(keys[0], (1, heads, r + c_q - 1, c))
  w = jax.random.normal(keys[1], (heads, c_q, c_k))
  mix = jax.random.normal(keys[2], (1, heads, heads))
  q = jax.random.normal(keys[3], (1, heads, r, d))
  k = jax.random.normal(keys[4], (1, heads, c, d))
  q_wide = jax.random.normal(keys[3], (1, heads, r, c_q * d))
  k_wide = jax.random.normal(keys[4], (1, heads, c, c_q * d))
  sl = x[:, :, c_q - 1:]  # a [1, 16, rows, keys] slab for head mixing

  def fb(f, *xs):
    # Output materialised and a random cotangent pulled back: a scalar loss like sum(f * c)
    # would let XLA fuse the whole conv into a (slow, unvectorised) reduction loop.
    ct = jax.random.normal(keys[5], jax.eval_shape(f, *xs).shape)

    @jax.jit
    def step(*a):
      out, vjp = jax.vjp(f, *a)
      return out, vjp(ct)
    return step

  cands = {
      "conv: conv_general_dilated": (lambda x, w: ops_chunked.xla_conv(x, w, None), (x, w)),
      "conv: shift-and-add, autodiff": (
          lambda x, w: ops_chunked.shift_conv_autodiff(x, w, None), (x, w)),
      "conv: shift-and-add, custom VJP": (lambda x, w: ops_chunked.shift_conv(x, w, None),
                                          (x, w)),
      "rewrite: wide q.k matmul (c_q*d=384)": (
          lambda a, b: jnp.einsum("bhqd,bhkd->bhqk", a, b), (q_wide, k_wide)),
      "q.k matmul (d=64), for scale": (lambda a, b: jnp.einsum("bhqd,bhkd->bhqk", a, b),
                                       (q, k)),
      "head mix: 5-D einsum (ops.head_mix)": (ops.head_mix, (sl, mix)),
      "head mix: 2-D GEMM (head_mix_2d)": (ops_chunked.head_mix_2d, (sl, mix)),
  }
  slow = ("conv: conv_general_dilated", "conv: shift-and-add, autodiff")
  results = []
  for name, (f, xs) in cands.items():
    if args.skip_slow and name in slow:
      continue
    step = fb(f, *xs)
    jax.block_until_ready(step(*xs))
    walls, cpus = [], []
    for _ in range(args.repeats if name not in slow else 2):
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(step(*xs))
      walls.append(time.perf_counter() - t0)
      cpus.append(time.process_time() - c0)
    results.append({"name": name, "cpu_s": float(np.median(cpus)),
                    "wall_s": float(np.median(walls))})
    print(f"{name:40s} cpu {results[-1]['cpu_s'] * 1e3:8.1f} ms  "
          f"wall {results[-1]['wall_s'] * 1e3:8.1f} ms", flush=True)
  qk = next(x for x in results if x["name"].startswith("q.k"))
  rows = [[x["name"], f"{x['cpu_s'] * 1e3:.0f}", f"{x['wall_s'] * 1e3:.0f}",
           f"{x['cpu_s'] / qk['cpu_s']:.1f}"] for x in results]
  print(f"slab [1, {heads}, {r}, {c}], forward + backward")
  print(common.table(rows, ["candidate", "cpu ms", "wall ms", "cpu / q.k"]))
  common.write_json(args.out, {"machine": common.machine(), "argv": sys.argv,
                               "slab": [1, heads, r, c], "results": results})
  print(f"wrote {args.out}")


if __name__ == "__main__":
  common.run(main)
