"""Exactness on the device, then the op benchmark: run this once a TPU is at hand.

    python benchmarks/pallas_on_device.py              # exactness at T = 200, 515, then timing
    python benchmarks/pallas_on_device.py --check-only

1. Exactness: `implementation="pallas"` (the Mosaic-compiled kernel on TPU) against the "xla"
   reference, float32, forward and every gradient, all MTA stages with packed documents, the
   pre-softmax stages together (the backward kernels' case), and each stage alone. Prints the
   largest error per case and exits with status 1 on any error above 1e-4 x the largest
   reference value (TPU float32 matmuls at HIGHEST precision).
2. Timing: `benchmarks/bench_op.py --impls splash,pallas,chunked --dtype bfloat16 --c-h 4`
   (ratios to splash attention) for T = 1024 ... 8192; paste the table into docs/BENCHMARKS.md.
   Head-mixing groups of 4; the paper's full mixing (`bench_op.py --c-h 16`) also compiles
   for v5e (the kernels loop over the heads of a program, see mta_jax/ops_pallas.py).

On a GPU the kernel runs in Pallas interpret mode (no GPU lowering yet), so step 2 then times
cudnn and chunked only.
"""

from __future__ import annotations

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from mta_jax import implementations  # noqa: E402

TOL = 1e-4
HEADS, HEAD_DIM = 8, 128


def _case(t: int, seed: int, stages: str, segments: bool):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(2, t, HEADS, HEAD_DIM)), jnp.float32)
             for _ in range(3))
  kern = lambda: jnp.asarray(rng.normal(size=(HEADS, 6, 11)) * 0.3, jnp.float32)
  mix = lambda: jnp.asarray(rng.normal(size=(HEADS // 4, 4, 4)) * 0.5, jnp.float32)
  w = {"kq_kernel_pre": kern() if "pre" in stages else None,
       "kq_kernel_post": kern() if "post" in stages else None,
       "head_mix_pre": mix() if "mixpre" in stages else None,
       "head_mix_post": mix() if "mixpost" in stages else None}
  seg = None
  if segments:
    cuts = np.sort(rng.choice(np.arange(1, t), size=5, replace=False))
    seg = jnp.asarray(np.stack([np.searchsorted(cuts, np.arange(t), side="right")] * 2),
                      jnp.int32)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  return (q, k, v), w, seg, ct


def _fwd_grads(impl, qkv, w, seg, ct):
  names = [n for n, x in w.items() if x is not None]

  def loss(q, k, v, *ws):
    out = implementations.multi_token_attention(q, k, v, segment_ids=seg, implementation=impl,
                                                **dict(zip(names, ws)))
    return jnp.vdot(out, ct), out

  fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(3 + len(names))), has_aux=True))
  (_, out), grads = fn(*qkv, *(w[n] for n in names))
  return [out, *grads]


def check() -> bool:
  ok = True
  # Every gradient runs the Pallas backward kernels (with post ops: the dpost pass too).
  cases = [(515, "pre post mixpre mixpost", True), (515, "pre post mixpre mixpost", False),
           (515, "pre mixpre", True), (200, "pre", True), (200, "post", True),
           (200, "mixpre", False), (200, "mixpost", True), (200, "", True)]
  for n, (t, stages, segments) in enumerate(cases):
    qkv, w, seg, ct = _case(t, n, stages, segments)
    want = _fwd_grads("xla", qkv, w, seg, ct)
    got = _fwd_grads("pallas", qkv, w, seg, ct)
    errs = [float(jnp.abs(a - b).max() / max(1.0, float(jnp.abs(b).max())))
            for a, b in zip(got, want)]
    bad = max(errs) > TOL
    ok &= not bad
    print(f"T={t} stages=[{stages}] segments={segments}: max relative error out "
          f"{errs[0]:.1e}, grads {max(errs[1:]):.1e} {'FAIL' if bad else 'ok'}", flush=True)
  return ok


# Flags (absl, see common.run).
flags.DEFINE_bool("check-only", False, "only the exactness check, no timing table")
flags.DEFINE_string("lengths", "1024,2048,4096,8192", "comma-separated lengths of the timing "
                    "table")


def main(argv) -> None:
  args = common.flag_args(argv)
  backend = jax.default_backend()
  print(f"backend: {backend}, devices: {jax.devices()}", flush=True)
  ok = check() if backend == "tpu" else True
  if backend != "tpu":
    print("not a TPU: the kernel would run in interpret mode; exactness check skipped "
          "(tests/test_ops_pallas.py covers it on CPU)")
  if not args.check_only:
    impls = "splash,pallas,chunked" if backend == "tpu" else "cudnn,chunked"
    bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_op.py")
    subprocess.run([sys.executable, bench, "--impls", impls, "--dtype", "bfloat16",
                    "--baseline", impls.split(",")[0], "--lengths", args.lengths, "--c-h", "4",
                    "--mem-budget-gib", "0", "--out", f"benchmarks/results/op_{backend}.json"],
                   check=True)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  common.run(main)
