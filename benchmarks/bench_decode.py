"""Decoding benchmark: per-token latency and cache memory, incremental vs recompute, MTA vs baseline.

    python benchmarks/bench_decode.py                   # contexts 512, 2048, 8192
    python benchmarks/bench_decode.py --lengths 512 --steps 10

The CPU-sized model of bench_model.py (d_model 256, 4 layers, 4 heads of 64, vocab 8192,
batch 1) in two families: "baseline" and "mta" (paper placement: pre+post 6 x 11 key-query
convs on layer 2, pre+post head mixing over all heads, gated group norm on every layer; MTA
weights random, not identity, so no stage can be skipped by accident). For each context T:

  * incremental: `decode.Decoder.step` on a cache of T slots (the jitted one-token step, cache
    donated, as generation uses it). A step's work does not depend on how full the fixed-size
    cache is (every slot is read, empty ones masked), so one prefill of 16 tokens is followed by
    `--steps` timed steps; the median is reported.
  * recompute: the full forward over T tokens (what generating one token costs without a cache;
    the model's default op: chunked MTA / XLA's dot_product_attention for the baseline).

Cache memory is the bytes of the decoding cache (K/V plus, for MTA, the cached logit and softmax
rows). Each configuration runs in a fresh process; wall and process CPU time are both recorded
(see common.py).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
from absl import flags  # noqa: E402


def _model(cfg: dict):
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from mta_jax.config import ModelConfig, attention_family
  from mta_jax.model import TransformerLM
  mcfg = ModelConfig(vocab_size=cfg["vocab"], d_model=cfg["d_model"], n_layers=cfg["layers"],
                     n_heads=cfg["heads"], head_dim=cfg["head_dim"], max_len=cfg["t"],
                     attention=attention_family(cfg["family"]))
  model = TransformerLM(mcfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for block in model.blocks:
    for name in ("kq_pre", "kq_post", "mix_pre", "mix_post", "gate_w"):
      p = getattr(block.attn, name, None)
      if p is not None:
        p[...] = jnp.asarray(rng.normal(size=p.shape) * 0.3, p.dtype)
  return model


def _incremental(cfg: dict, model) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from mta_jax import decode
  dec = decode.Decoder(model)
  prompt = jax.random.randint(jax.random.PRNGKey(1), (cfg["batch"], 16), 0, cfg["vocab"])
  t0 = time.perf_counter()
  logits, cache = dec.prefill(prompt, cfg["t"])
  tok = jnp.argmax(logits, -1).astype(jnp.int32)
  logits, cache = dec.step(cache, tok)  # compiles
  jax.block_until_ready(logits)
  compile_s = time.perf_counter() - t0
  base_kib = common.reset_peak_rss()
  walls, cpus = [], []
  for _ in range(cfg["steps"]):
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    jax.block_until_ready(tok)
    w, c = time.perf_counter(), time.process_time()
    logits, cache = dec.step(cache, tok)
    jax.block_until_ready(logits)
    walls.append(time.perf_counter() - w)
    cpus.append(time.process_time() - c)
  b = decode.cache_bytes(cache)
  return {"wall_s": float(np.median(walls)), "cpu_s": float(np.median(cpus)),
          "wall_all_s": walls, "cpu_all_s": cpus, "compile_s": compile_s,
          "peak_rss_mib": max(0, common.peak_rss_kib() - base_kib) / 1024,
          "cache_kv_mib": b["kv"] / 2**20, "cache_mta_rows_mib": b["mta_rows"] / 2**20,
          "cache_mib": b["total"] / 2**20}


def _recompute(cfg: dict, model) -> dict:
  import jax
  from flax import nnx
  graphdef, state = nnx.split(model)

  @jax.jit
  def last_logits(state, tokens):
    return nnx.merge(graphdef, state)(tokens)[:, -1]

  tokens = jax.random.randint(jax.random.PRNGKey(1), (cfg["batch"], cfg["t"]), 0, cfg["vocab"])
  return common.measure(last_logits, (state, tokens), cfg["repeats"])


def worker(cfg: dict) -> dict:
  model = _model(cfg)
  res = _incremental(cfg, model) if cfg["mode"] == "incremental" else _recompute(cfg, model)
  res.update(cfg)
  return res


def _rows(results: list[dict]) -> list[list]:
  rows = []
  for r in results:
    if "error" in r:
      rows.append([r["t"], r["family"], r["mode"], r["error"], "", "", "", "", ""])
      continue
    base = common.reference_row([x for x in results if x["mode"] == r["mode"]], r, "family",
                                "baseline")
    rec = next((x for x in results if x["t"] == r["t"] and x["family"] == r["family"]
                and x["mode"] == "recompute" and "error" not in x), None)
    ratio = lambda k: f"{r[k] / base[k]:.2f}" if base else "-"
    speedup = (f"{rec['cpu_s'] / r['cpu_s']:.0f}x" if rec and r["mode"] == "incremental"
               else "-")
    cache = f"{r['cache_mib']:.1f} ({r['cache_mta_rows_mib']:.2f})" if "cache_mib" in r else "-"
    rows.append([r["t"], r["family"], r["mode"], f"{1e3 * r['wall_s']:.2f}",
                 f"{1e3 * r['cpu_s']:.2f}", ratio("wall_s"), ratio("cpu_s"), speedup, cache])
  return rows


# Flags (absl, see common.run).
flags.DEFINE_string("lengths", "512,2048,8192", "comma-separated context lengths")
flags.DEFINE_string("families", "baseline,mta", "comma-separated model families")
flags.DEFINE_string("modes", "incremental,recompute", "comma-separated decode modes")
flags.DEFINE_integer("steps", 30, "timed decode steps per configuration")
flags.DEFINE_integer("repeats", 2, "timed full forwards (recompute)")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        "decode.json"), "JSON output file")
flags.DEFINE_string("worker", "", "internal: run one configuration (JSON) in this process")


def main(argv) -> None:
  args = common.flag_args(argv)
  if args.worker:
    import json
    common.emit_worker(worker, json.loads(args.worker))
    return
  results = []
  for t in [int(x) for x in args.lengths.split(",")]:
    for mode in args.modes.split(","):
      for family in args.families.split(","):
        cfg = dict(t=t, family=family, mode=mode, batch=1, d_model=256, layers=4, heads=4,
                   head_dim=64, vocab=8192, steps=args.steps, repeats=args.repeats)
        results.append(common.run_and_report(__file__, cfg, 1800, f"{family} {mode}"))
  header = ["T", "family", "mode", "ms/token wall", "ms/token cpu", "wall/baseline",
            "cpu/baseline", "vs recompute (cpu)", "cache MiB (MTA rows)"]
  print(common.table(_rows(results), header))
  common.write_json(args.out, {"machine": common.machine(), "results": results})
  print(f"wrote {args.out}")


if __name__ == "__main__":
  common.run(main)
