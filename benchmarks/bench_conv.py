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


HEADS, D, C_Q, C_K = 16, 64, 6, 11
SLOW = ("conv: conv_general_dilated", "conv: shift-and-add, autodiff")


def _fwd_bwd(f, xs, key):
  """jit(f's forward + its VJP of a random cotangent). Output materialised and a random
  cotangent pulled back: a scalar loss like sum(f * c) would let XLA fuse the whole conv into a
  (slow, unvectorised) reduction loop."""
  import jax
  ct = jax.random.normal(key, jax.eval_shape(f, *xs).shape)

  @jax.jit
  def step(*a):
    out, vjp = jax.vjp(f, *a)
    return out, vjp(ct)
  return step


def _candidates(r: int, c: int) -> dict:
  """{name: (function, its arguments)} on a [1, HEADS, r, c] score slab."""
  import jax
  import jax.numpy as jnp
  from mta_jax import ops, ops_chunked

  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  x = jax.random.normal(keys[0], (1, HEADS, r + C_Q - 1, c))
  w = jax.random.normal(keys[1], (HEADS, C_Q, C_K))
  mix = jax.random.normal(keys[2], (1, HEADS, HEADS))
  q = jax.random.normal(keys[3], (1, HEADS, r, D))
  k = jax.random.normal(keys[4], (1, HEADS, c, D))
  q_wide = jax.random.normal(keys[3], (1, HEADS, r, C_Q * D))
  k_wide = jax.random.normal(keys[4], (1, HEADS, c, C_Q * D))
  sl = x[:, :, C_Q - 1:]  # a [1, 16, rows, keys] slab for head mixing
  return {
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


def main(argv) -> None:
  args = common.flag_args(argv)
  import jax
  import numpy as np

  r, c = args.rows, args.cols
  results = []
  for name, (f, xs) in _candidates(r, c).items():
    if args.skip_slow and name in SLOW:
      continue
    step = _fwd_bwd(f, xs, jax.random.split(jax.random.PRNGKey(0), 6)[5])
    jax.block_until_ready(step(*xs))
    walls, cpus = [], []
    for _ in range(args.repeats if name not in SLOW else 2):
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
  print(f"slab [1, {HEADS}, {r}, {c}], forward + backward")
  print(common.table(rows, ["candidate", "cpu ms", "wall ms", "cpu / q.k"]))
  common.write_json(args.out, {"machine": common.machine(), "argv": sys.argv,
                               "slab": [1, HEADS, r, c], "results": results})
  print(f"wrote {args.out}")


if __name__ == "__main__":
  common.run(main)
