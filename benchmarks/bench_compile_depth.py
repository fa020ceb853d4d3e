"""Compile time against depth: the real train step, unrolled vs scanned layers (model.scan_layers),
on this host's CPU and ahead of time for a TPU slice, in one run.

    python benchmarks/bench_compile_depth.py                     # 8/16/24/48 layers, cpu + v5e:2x2
    python benchmarks/bench_compile_depth.py --layers 8,16 --targets cpu
    python benchmarks/bench_compile_depth.py --targets v5e:2x2 --impl xla --out results/x.json

A small MTA model (the paper's placement: key-query convs every 4th layer from layer 2, head
mixing over all heads, gated group norm; d_model 256, 4 heads, vocab 1024, batch 8 x 256, bf16
compute, remat=full like the paper presets) compiled by `mta_jax.aot.compile_steps` (abstract
state and batch: nothing is allocated, `jit(...).lower(...).compile()`), each configuration in a
fresh process. Target `cpu` compiles for one device of this host; a TPU topology name (e.g.
`v5e:2x2`) compiles for its compile-only devices from libtpu (`mesh.data` over all chips).

The table reports, per target and depth, wall and CPU seconds of the train-step compile (trace +
lower + compile; CPU seconds are the steadier number on a shared host), the scanned / unrolled
ratio, the compiling process's peak resident memory, and the scanned time at each depth relative
to the shallowest (1.00 everywhere = flat in depth). `--lock FILE` holds an exclusive lock on
FILE around every TPU compile, for hosts where several jobs share libtpu.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
from absl import flags  # noqa: E402


def worker(cfg: dict) -> dict:
  if cfg["target"] == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
  from configs import lm_tiny
  from mta_jax import aot

  c = lm_tiny.get_config(cfg["family"])
  m = c.model
  m.n_layers, m.d_model, m.n_heads, m.vocab_size = cfg["layers"], 256, 4, 1024
  m.max_len, m.dtype, m.remat = cfg["seq_len"], "bfloat16", "full"
  m.attention.kq_offset, m.attention.kq_every = 2, 4
  m.attention.implementation = cfg["impl"]
  m.scan_layers = cfg["scan"]
  c.data.batch_size, c.data.seq_len = 8, cfg["seq_len"]
  c.compile.eval_step = False
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  if cfg["target"] == "cpu":
    import jax
    devices = jax.devices()[:1]
  else:
    devices = aot.topology_devices(cfg["target"])
  _, reports = aot.compile_steps(c, devices)
  r = reports[0]
  return {"wall_s": r.seconds, "cpu_s": r.cpu_seconds, "temp_mib": r.temporaries / 2**20,
          "peak_rss_mib": common.peak_rss_kib() / 1024}


def _run(a, target: str, layers: int, scan: bool) -> dict:
  cfg = {"target": target, "layers": layers, "scan": scan, "family": a.family, "impl": a.impl,
         "seq_len": a.seq_len}
  with common.locked(a.lock if target != "cpu" else ""):
    r = common.run_worker(os.path.abspath(__file__), cfg, a.timeout)
  r.update(cfg)
  status = r.get("error") or (f"wall {r['wall_s']:.1f}s cpu {r['cpu_s']:.1f}s "
                              f"peak RSS {r['peak_rss_mib']:.0f} MiB")
  print(f"{target:8s} layers {layers:3d} {'scanned' if scan else 'unrolled':8s} {status}",
        flush=True)
  return r


def _rows(results: list[dict], target: str) -> list[list]:
  by = {(r["layers"], r["scan"]): r for r in results if r["target"] == target}
  ok = lambda r: r is not None and "error" not in r
  cell = lambda r, k, f="{:.1f}": f.format(r[k]) if ok(r) else (
      "not run" if r is None else "failed: " + r["error"][:40])
  depths = sorted({l for l, _ in by})
  first_scanned = next((by[(l, True)] for l in depths if ok(by.get((l, True)))), None)
  rows = []
  for layers in depths:
    u, s = by.get((layers, False)), by.get((layers, True))
    rows.append([target, layers, cell(u, "wall_s"), cell(u, "cpu_s"), cell(u, "peak_rss_mib",
                                                                         "{:.0f}"),
                 cell(s, "wall_s"), cell(s, "cpu_s"), cell(s, "peak_rss_mib", "{:.0f}"),
                 f"{s['cpu_s'] / u['cpu_s']:.2f}" if ok(u) and ok(s) else "-",
                 f"{s['cpu_s'] / first_scanned['cpu_s']:.2f}" if ok(s) and first_scanned
                 else "-"])
  return rows


# Flags (absl, see common.run).
flags.DEFINE_string("layers", "8,16,24,48", "comma-separated depths")
flags.DEFINE_string("targets", "cpu,v5e:2x2",
                    "comma-separated: 'cpu' (this host) and/or TPU topologies, e.g. v5e:2x2")
flags.DEFINE_string("family", "mta", "lm_tiny variant")
flags.DEFINE_string("impl", "chunked", "attention.implementation")
flags.DEFINE_integer("seq_len", 256, "tokens per row")
flags.DEFINE_float("timeout", 1800, "seconds per compile")
flags.DEFINE_string("lock", "", "a file to lock around every TPU compile")
flags.DEFINE_string("modes", "scanned,unrolled", "which layouts to compile")
flags.DEFINE_string("out", "", "JSON of the results, rewritten after every compile")
flags.DEFINE_bool("append", False, "keep --out's earlier results and compile only what it lacks "
                  "(the table then covers both runs)")
flags.DEFINE_bool("report", False, "only print the table of --out's results (compile nothing)")
flags.DEFINE_string("worker", "", "internal: run one configuration (JSON) in this process")


def main(argv) -> None:
  a = common.flag_args(argv)
  if a.worker:
    common.emit_worker(worker, json.loads(a.worker))
    return
  targets = a.targets.split(",")
  results = []
  if (a.append or a.report) and a.out and os.path.exists(a.out):
    with open(a.out) as f:
      results = [r for r in json.load(f)["results"] if "error" not in r]
  done = {(r["target"], r["layers"], r["scan"], r["family"], r["impl"], r["seq_len"])
          for r in results}
  modes = [m == "scanned" for m in a.modes.split(",")]
  for layers in [int(x) for x in a.layers.split(",")]:  # shallow first: partial runs still tell
    for target in targets:
      for scan in modes:
        if a.report or (target, layers, scan, a.family, a.impl, a.seq_len) in done:
          continue
        results.append(_run(a, target, layers, scan))
        if a.out:
          common.write_json(a.out, {"machine": common.machine(), "args": vars(a),
                                    "results": results})
  rows = [row for t in dict.fromkeys(r["target"] for r in results) for row in _rows(results, t)]
  load = "" if a.report else f", load average at the end {os.getloadavg()[0]:.1f}"
  print(f"\n{a.family} ({a.impl}), d_model 256, batch 8 x {a.seq_len}, train step{load}")
  print(common.table(rows, ["target", "layers", "unrolled wall s", "unrolled CPU s",
                            "unrolled peak RSS MiB", "scanned wall s", "scanned CPU s",
                            "scanned peak RSS MiB", "scanned / unrolled CPU",
                            "scanned CPU / shallowest"]))


if __name__ == "__main__":
  common.run(main)
