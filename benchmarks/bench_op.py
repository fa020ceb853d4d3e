"""Op-level benchmark: forward+backward of the paper-default MTA op vs causal softmax attention.

    python benchmarks/bench_op.py                       # T = 512 ... 8192
    python benchmarks/bench_op.py --quick               # T = 512, 1024; two repeats
    python benchmarks/bench_op.py --lengths 2048 --impls softmax,chunked
    python benchmarks/bench_op.py --impls splash,pallas,chunked --dtype bfloat16   # on a TPU
    python benchmarks/bench_op.py --impls cudnn,chunked --dtype bfloat16           # on a GPU
    python benchmarks/bench_op.py --lengths 24 --impls pallas --c-h 4   # CPU: correctness only

Baselines: "softmax" (`jax.nn.dot_product_attention`, XLA), "splash" (the Pallas splash
attention kernel, TPU only), "cudnn" (cuDNN flash attention, NVIDIA GPUs, bf16/fp16 only).
"pallas" off a TPU runs in Pallas interpret mode: it is not timed; its row reports the largest
difference from "chunked" (forward and every gradient) instead.

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

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
from absl import flags  # noqa: E402

HEADS, HEAD_DIM, C_Q, C_K = 16, 64, 6, 11


def counted_flops(impl: str, t: int, batch: int = 1, heads: int = HEADS, d: int = HEAD_DIM,
                  c_q: int = C_Q, c_k: int = C_K, c_h: int = HEADS) -> float:
  """Forward + backward FLOPs as defined in the module docstring."""
  conv, mix = c_q * c_k, c_h
  if impl == "softmax":
    macs = t * t * 2 * d
  elif impl in ("xla",):
    macs = t * t * (2 * d + 2 * conv + 2 * mix)
  elif impl == "pallas":  # the kernels' own cost estimates (every recomputation counted)
    import jax
    from mta_jax import ops_pallas
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, "float32")
    kern, mix = sds(heads, c_q, c_k), sds(heads // c_h, c_h, c_h)
    return ops_pallas.kernel_flops(sds(batch, t, heads, d), kern, kern, mix, mix)
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


def _splash_loss(q, k, v, ct):
  """Causal splash attention (TPU Pallas kernel) on [B, T, H, D], as a scalar loss."""
  import jax
  import jax.numpy as jnp
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  _, t, h, d = q.shape
  mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(h)])
  kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1)
  bhtd = lambda x: jnp.swapaxes(x, 1, 2)
  out = jax.vmap(kernel)(bhtd(q) / jnp.sqrt(d).astype(q.dtype), bhtd(k), bhtd(v))
  return jnp.vdot(jnp.swapaxes(out, 1, 2).astype(jnp.float32), ct)


def _pallas_interpret_check(args, ct) -> dict:
  """Off TPU: max |pallas - chunked| over the output and every gradient (no timing)."""
  import jax
  import jax.numpy as jnp
  from mta_jax import implementations

  def grads(impl):
    def loss(q, k, v, kp, kpo, mp, mpo):
      out = implementations.multi_token_attention(
          q, k, v, kq_kernel_pre=kp, kq_kernel_post=kpo, head_mix_pre=mp, head_mix_post=mpo,
          implementation=impl)
      return jnp.vdot(out.astype(jnp.float32), ct), out
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))(*args)

  (_, out_p), g_p = grads("pallas")
  (_, out_c), g_c = grads("chunked")
  err = lambda a, b: float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())
  return {"note": f"interpret mode on {jax.default_backend()}: not timed; max |pallas - chunked|"
                  f" out {err(out_p, out_c):.1e}, grads "
                  f"{max(err(a, b) for a, b in zip(g_p, g_c)):.1e}"}


def worker(cfg: dict) -> dict:
  import jax
  import jax.numpy as jnp
  from mta_jax import implementations, ops

  t, batch, impl = cfg["t"], cfg["batch"], cfg["impl"]
  keys = jax.random.split(jax.random.PRNGKey(0), 8)
  dtype = jnp.dtype(cfg.get("dtype", "float32"))
  q, k, v = (jax.random.normal(keys[i], (batch, t, HEADS, HEAD_DIM), dtype) for i in range(3))
  near = lambda base, key: base + 0.01 * jax.random.normal(key, base.shape)
  kp = near(ops.identity_kq_kernel(HEADS, C_Q, C_K), keys[3])
  kpo = near(ops.identity_kq_kernel(HEADS, C_Q, C_K), keys[4])
  c_h = cfg.get("c_h", HEADS)
  mp = near(ops.identity_head_mix(HEADS, c_h), keys[5])
  mpo = near(ops.identity_head_mix(HEADS, c_h), keys[6])
  ct = jax.random.normal(keys[7], q.shape)

  if impl == "pallas" and jax.default_backend() != "tpu":
    res = _pallas_interpret_check((q, k, v, kp, kpo, mp, mpo), ct)
    res.update(cfg)
    return res
  if impl in ("softmax", "cudnn"):
    backend = "cudnn" if impl == "cudnn" else None
    def loss(q, k, v, *_):
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=backend)
      return jnp.vdot(out.astype(jnp.float32), ct)
  elif impl == "splash":
    if jax.default_backend() != "tpu":
      raise RuntimeError("splash attention needs a TPU")
    loss = lambda q, k, v, *_: _splash_loss(q, k, v, ct)
  else:
    def loss(q, k, v, kp, kpo, mp, mpo):
      out = implementations.multi_token_attention(
          q, k, v, kq_kernel_pre=kp, kq_kernel_post=kpo, head_mix_pre=mp, head_mix_post=mpo,
          implementation=impl)
      return jnp.vdot(out.astype(jnp.float32), ct)
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5, 6)))
  res = common.measure(step, (q, k, v, kp, kpo, mp, mpo), cfg["repeats"], cfg["mem_budget_gib"])
  res.update(cfg)
  return res


# Flags (absl, see common.run).
flags.DEFINE_string("lengths", "512,1024,2048,4096,8192", "comma-separated sequence lengths")
flags.DEFINE_string("impls", "softmax,chunked,xla", "softmax, splash (TPU), cudnn (GPU) and any "
                    "name in mta_jax.implementations.IMPLEMENTATIONS")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "q, k, v dtype (cudnn needs "
                  "bfloat16)")
flags.DEFINE_string("baseline", "softmax", "the row the ratios divide by")
flags.DEFINE_integer("c-h", HEADS, "heads per mixing group (pallas on TPU compiles with <= 4 "
                     "for now)")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_integer("repeats", 3, "timed calls")
flags.DEFINE_integer("long-repeats", 1, "repeats for T >= 4096")
flags.DEFINE_integer("xla-max-len", 1024, "skip the (very slow) reference above this length")
flags.DEFINE_float("mem-budget-gib", 14.0,
                   "skip a configuration whose compiled temp memory exceeds this")
flags.DEFINE_float("timeout", 1500.0, "seconds per configuration")
flags.DEFINE_bool("quick", False, "T = 512, 1024 and 2 repeats")
flags.DEFINE_string("out", "benchmarks/results/op.json", "JSON output file")
flags.DEFINE_string("worker", None, "internal: run one configuration (JSON) in this process")


def main(argv) -> None:
  args = common.flag_args(argv)
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
             "repeats": args.repeats if t < 4096 else args.long_repeats, "dtype": args.dtype,
             "c_h": args.c_h}
      res = common.run_and_report(os.path.abspath(__file__), cfg, args.timeout, impl)
      res["gflop"] = counted_flops(impl, t, args.batch, c_h=args.c_h) / 1e9
      results.append(res)

  rows, notes = [], []
  for r in results:
    base = common.reference_row(results, r, "impl", args.baseline)
    if "note" in r:
      notes.append(f"T={r['t']} {r['impl']}: {r['note']}")
      continue
    if "error" in r:
      rows.append([r["t"], r["impl"], "-", "-", "-", "-", f"{r['gflop']:.0f}", "-", "-",
                   r["error"][:40]])
      continue
    ratio = lambda key: f"{r[key] / base[key]:.2f}" if base else "-"
    rows.append([r["t"], r["impl"], f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}", ratio("wall_s"),
                 ratio("cpu_s"), f"{r['gflop']:.0f}",
                 f"{r['gflop'] / base['gflop']:.2f}" if base else "-",
                 f"{r['peak_rss_mib']:.0f}", f"{r['xla_temp_mib']:.0f}"])
  b = args.baseline
  header = ["T", "impl", "wall s", "cpu s", f"wall/{b}", f"cpu/{b}", "GFLOP", f"FLOP/{b}",
            "peak MiB", "XLA temp MiB"]
  if rows:
    print(common.table(rows, header))
  print("\n".join(notes))
  common.write_json(args.out, {"machine": common.machine(), "argv": sys.argv,
                               "results": results})
  print(f"wrote {args.out}")


if __name__ == "__main__":
  common.run(main)
