"""Compile time against depth: the real train step, unrolled vs scanned layers (model.scan_layers).

    python benchmarks/bench_compile.py                      # this host (CPU), 8/16/24/48 layers
    python benchmarks/bench_compile.py --topology=v5e:2x2   # TPU ahead of time (libtpu)
    python benchmarks/bench_compile.py --layers 8,16 --family baseline --impl xla

A small MTA model (paper placement: key-query convs every 4th layer from layer 2, head mixing,
gated group norm; d_model 128, 4 heads, vocab 1024, batch 8 x 128) compiled ahead of time by
`mta_jax.aot.compile_steps` (abstract state and batch, nothing allocated), each configuration in
a fresh process. The table reports wall and CPU seconds of the train-step compile (CPU seconds
are the steadier number on a shared host), the scanned / unrolled ratio at each depth, and
XLA's temporary memory per device.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
from absl import flags  # noqa: E402


def worker(cfg: dict) -> dict:
  from configs import lm_tiny
  from mta_jax import aot

  c = lm_tiny.get_config(cfg["family"])
  m = c.model
  m.n_layers, m.d_model, m.n_heads, m.vocab_size = cfg["layers"], 128, 4, 1024
  m.attention.implementation = cfg["impl"]
  m.scan_layers = cfg["scan"]
  c.data.batch_size, c.data.seq_len = 8, 128
  c.compile.eval_step = False
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  devices = aot.topology_devices(cfg["topology"]) if cfg["topology"] else None
  _, reports = aot.compile_steps(c, devices)
  r = reports[0]
  return {"wall_s": r.seconds, "cpu_s": r.cpu_seconds, "temp_mib": r.temporaries / 2**20}


# Flags (absl, see common.run).
flags.DEFINE_string("layers", "8,16,24,48", "comma-separated depths")
flags.DEFINE_string("family", "mta", "lm_tiny variant")
flags.DEFINE_string("impl", "chunked", "attention.implementation")
flags.DEFINE_string("topology", "", "e.g. v5e:2x2 (default: this host)")
flags.DEFINE_float("timeout", 3600, "seconds per configuration")
flags.DEFINE_string("out", "", "JSON output file")
flags.DEFINE_string("worker", "", "internal: run one configuration (JSON) in this process")


def main(argv) -> None:
  a = common.flag_args(argv)
  if a.worker:
    import json
    common.emit_worker(worker, json.loads(a.worker))
    return
  rows, results = [], []
  for layers in [int(x) for x in a.layers.split(",")]:
    res = {}
    for scan in (False, True):
      cfg = {"layers": layers, "scan": scan, "family": a.family, "impl": a.impl,
             "topology": a.topology}
      r = common.run_worker(os.path.abspath(__file__), cfg, a.timeout)
      r.update(cfg)
      results.append(r)
      res[scan] = r
      status = r.get("error") or f"wall {r['wall_s']:.1f}s cpu {r['cpu_s']:.1f}s"
      print(f"layers {layers:3d} {'scanned' if scan else 'unrolled':8s} {status}", flush=True)
    ok = all("error" not in res[s] for s in res)
    cell = lambda s, k: f"{res[s][k]:.1f}" if "error" not in res[s] else "failed"
    rows.append([layers, cell(False, "wall_s"), cell(False, "cpu_s"), cell(True, "wall_s"),
                 cell(True, "cpu_s"),
                 f"{res[True]['cpu_s'] / res[False]['cpu_s']:.2f}" if ok else "-",
                 cell(False, "temp_mib"), cell(True, "temp_mib")])
  print(f"\n{a.family} ({a.impl}) on {a.topology or 'this host'}")
  print(common.table(rows, ["layers", "unrolled wall s", "unrolled cpu s", "scanned wall s",
                            "scanned cpu s", "scanned/unrolled cpu", "unrolled temp MiB",
                            "scanned temp MiB"]))
  if a.out:
    common.write_json(a.out, {"machine": common.machine(), "results": results})


if __name__ == "__main__":
  common.run(main)
