"""Op-level benchmark: forward+backward of the paper-default MTA op vs causal softmax attention.

    python benchmarks/bench_op.py                       # T = 512 ... 8192
    python benchmarks/bench_op.py --quick               # T = 512, 1024; two repeats
    python benchmarks/bench_op.py --lengths 2048 --impls softmax,chunked

MTA op: pre- and post-softmax key-query convs 6 x 11, head mixing pre and post over all 16
heads, 16 heads of 64, batch 1, float32 (random near-identity weights). "softmax" is causal
`jax.nn.dot_product_attention` on the same q, k, v. Every (implementation, T) runs in a fresh
process (see common.py for how time and memory are measured); rows of one T run back to back.

Counted FLOPs (forward + backward = 3 x forward; 1 MAC = 2 FLOPs), per computed logit and head:
    q.k: d   A.v: d   each key-query conv: c_q * c_k   each head mix: c_h
Softmax, masks and exp are not counted. "softmax" and "xla" compute all T x T logits; "chunked"
computes, per query block, (block + halo) rows against keys up to its band's end, and that is
what is counted for it (its causal skipping is real, so it is counted as done).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402

HEADS, HEAD_DIM, C_Q, C_K = 16, 64, 6, 11


def counted_flops(impl: str, t: int, batch: int = 1, heads: int = HEADS, d: int = HEAD_DIM,
                  c_q: int = C_Q, c_k: int = C_K, c_h: int = HEADS) -> float:
  """Forward + backward FLOPs as defined in the module docstring."""
  conv, mix = c_q * c_k, c_h
  if impl == "softmax":
    macs = t * t * 2 * d
  elif impl in ("xla",):
    macs = t * t * (2 * d + 2 * conv + 2 * mix)
  else:  # chunked variants: mirror ops_chunked's blocking
    from mta_jax import ops_chunked
    block = min(ops_chunked.DEFAULT_BLOCK, t)
    n_blocks = -(-t // block)
    per_band = -(-n_blocks // ops_chunked.DEFAULT_BANDS)
    halo_pre = halo_post = c_q - 1
    macs = 0
    for b0 in range(0, n_blocks, per_band):
      b1 = min(n_blocks, b0 + per_band)
      cols = b1 * block
      for _ in range(b0, b1):
        macs += (block + halo_pre + halo_post) * cols * d            # q.k
        macs += (block + halo_post) * cols * (conv + mix)            # pre conv + pre mix
        macs += block * cols * (conv + mix + d)                      # post conv, mix, A.v
  return 3 * 2 * batch * heads * macs


def worker(cfg: dict) -> dict:
  import jax
  import jax.numpy as jnp
  from mta_jax import implementations, ops

  t, batch, impl = cfg["t"], cfg["batch"], cfg["impl"]
  keys = jax.random.split(jax.random.PRNGKey(0), 8)
  q, k, v = (jax.random.normal(keys[i], (batch, t, HEADS, HEAD_DIM)) for i in range(3))
  near = lambda base, key: base + 0.01 * jax.random.normal(key, base.shape)
  kp = near(ops.identity_kq_kernel(HEADS, C_Q, C_K), keys[3])
  kpo = near(ops.identity_kq_kernel(HEADS, C_Q, C_K), keys[4])
  mp = near(ops.identity_head_mix(HEADS, HEADS), keys[5])
  mpo = near(ops.identity_head_mix(HEADS, HEADS), keys[6])
  ct = jax.random.normal(keys[7], q.shape)

  if impl == "softmax":
    def loss(q, k, v, *_):
      return jnp.vdot(jax.nn.dot_product_attention(q, k, v, is_causal=True), ct)
  else:
    def loss(q, k, v, kp, kpo, mp, mpo):
      out = implementations.multi_token_attention(
          q, k, v, kq_kernel_pre=kp, kq_kernel_post=kpo, head_mix_pre=mp, head_mix_post=mpo,
          implementation=impl)
      return jnp.vdot(out, ct)
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5, 6)))
  res = common.measure(step, (q, k, v, kp, kpo, mp, mpo), cfg["repeats"], cfg["mem_budget_gib"])
  res.update(cfg)
  return res


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--lengths", default="512,1024,2048,4096,8192")
  p.add_argument("--impls", default="softmax,chunked,xla",
                 help="softmax and any name in mta_jax.implementations.IMPLEMENTATIONS")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--long-repeats", type=int, default=1, help="repeats for T >= 4096")
  p.add_argument("--xla-max-len", type=int, default=1024,
                 help="skip the (very slow) reference above this length")
  p.add_argument("--mem-budget-gib", type=float, default=14.0,
                 help="skip a configuration whose compiled temp memory exceeds this")
  p.add_argument("--timeout", type=float, default=1500.0, help="seconds per configuration")
  p.add_argument("--quick", action="store_true", help="T = 512, 1024 and 2 repeats")
  p.add_argument("--out", default="benchmarks/results/op.json")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    common.emit_worker(worker, json.loads(args.worker))
    return
  if args.quick:
    args.lengths, args.repeats = "512,1024", 2
  lengths = [int(x) for x in args.lengths.split(",")]
  impls = args.impls.split(",")

  results = []
  for t in lengths:
    for impl in impls:
      if impl == "xla" and t > args.xla_max_len:
        continue
      cfg = {"impl": impl, "t": t, "batch": args.batch, "mem_budget_gib": args.mem_budget_gib,
             "repeats": args.repeats if t < 4096 else args.long_repeats}
      res = common.run_and_report(os.path.abspath(__file__), cfg, args.timeout, impl)
      res["gflop"] = counted_flops(impl, t, args.batch) / 1e9
      results.append(res)

  rows = []
  for r in results:
    base = common.reference_row(results, r, "impl", "softmax")
    if "error" in r:
      rows.append([r["t"], r["impl"], "-", "-", "-", "-", f"{r['gflop']:.0f}", "-", "-",
                   r["error"][:40]])
      continue
    ratio = lambda key: f"{r[key] / base[key]:.2f}" if base else "-"
    rows.append([r["t"], r["impl"], f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}", ratio("wall_s"),
                 ratio("cpu_s"), f"{r['gflop']:.0f}",
                 f"{r['gflop'] / base['gflop']:.2f}" if base else "-",
                 f"{r['peak_rss_mib']:.0f}", f"{r['xla_temp_mib']:.0f}"])
  header = ["T", "impl", "wall s", "cpu s", "wall/softmax", "cpu/softmax", "GFLOP",
            "FLOP/softmax", "peak MiB", "XLA temp MiB"]
  print(common.table(rows, header))
  common.write_json(args.out, {"machine": common.machine(), "argv": sys.argv,
                               "results": results})
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
