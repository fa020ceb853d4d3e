"""Model-level benchmark: train-step tokens/s and peak memory, MTA model vs baseline Transformer.

    python benchmarks/bench_model.py                   # T = 1024, 2048
    python benchmarks/bench_model.py --quick           # T = 512, one repeat less
    python benchmarks/bench_model.py --variants baseline,mta:chunked,mta:xla --lengths 1024

A small CPU-sized Llama-style model (default: d_model 256, 4 layers, 4 heads of 64, vocab
8192, batch 1) in two families of `mta_jax.config.attention_family`: "baseline" (softmax
attention through `jax.nn.dot_product_attention`) and "mta" (paper placement: pre+post 6 x 11
key-query convs on layer 2 (every 4th layer from 2), pre+post head mixing over all heads,
gated group norm on every layer), the MTA op run by the named implementation. Identity-
initialised MTA weights, as in the paper. The train step is forward, backward and an AdamW
update, jitted (a self-contained step: loss = next-token cross-entropy on random tokens).
Each configuration runs in a fresh process; see common.py for how time and memory are measured.
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
  import dataclasses

  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from mta_jax.config import ModelConfig, attention_family
  from mta_jax.model import TransformerLM, count_params

  family, _, impl = cfg["variant"].partition(":")
  attention = attention_family(family)
  if impl:
    attention = dataclasses.replace(attention, implementation=impl)
  mcfg = ModelConfig(vocab_size=cfg["vocab"], d_model=cfg["d_model"], n_layers=cfg["layers"],
                     n_heads=cfg["heads"], head_dim=cfg["head_dim"], max_len=cfg["t"],
                     attention=attention)
  model = TransformerLM(mcfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-4, b1=0.9, b2=0.98, weight_decay=0.05)
  opt_state = tx.init(params)

  def loss_fn(params, tokens):
    m = nnx.merge(graphdef, params, rest)
    logits = m(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  tokens = jax.random.randint(jax.random.PRNGKey(1), (cfg["batch"], cfg["t"] + 1), 0,
                              cfg["vocab"], dtype=jnp.int32)
  res = common.measure(step, (params, opt_state, tokens), cfg["repeats"])
  res["tokens_per_s"] = cfg["batch"] * cfg["t"] / res["wall_s"]
  res["tokens_per_cpu_s"] = cfg["batch"] * cfg["t"] / res["cpu_s"]
  res["params"] = count_params(mcfg)
  res["kq_layers"] = list(mcfg.kq_layer_indices())
  res.update(cfg)
  return res


# Flags (absl, see common.run).
flags.DEFINE_string("lengths", "1024,2048", "comma-separated sequence lengths")
flags.DEFINE_string("variants", "baseline,mta:chunked,mta:xla",
                    "family[:implementation], family in baseline|talking_heads|mta")
flags.DEFINE_integer("xla-max-len", 1024,
                     "skip variants using the (slow) reference op above this length")
flags.DEFINE_integer("d-model", 256, "model width")
flags.DEFINE_integer("layers", 4, "layers")
flags.DEFINE_integer("heads", 4, "heads")
flags.DEFINE_integer("head-dim", 64, "head dimension")
flags.DEFINE_integer("vocab", 8192, "vocabulary size")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_integer("repeats", 3, "timed calls")
flags.DEFINE_float("timeout", 1500.0, "seconds per configuration")
flags.DEFINE_bool("quick", False, "T = 512 and 2 repeats")
flags.DEFINE_string("out", "benchmarks/results/model.json", "JSON output file")
flags.DEFINE_string("worker", None, "internal: run one configuration (JSON) in this process")


def main(argv) -> None:
  args = common.flag_args(argv)
  if args.worker:
    common.emit_worker(worker, json.loads(args.worker))
    return
  if args.quick:
    args.lengths, args.repeats = "512", 2
  lengths = [int(x) for x in args.lengths.split(",")]

  results = []
  for t in lengths:
    for variant in args.variants.split(","):
      if variant.endswith(":xla") and t > args.xla_max_len:
        continue
      cfg = {"variant": variant, "t": t, "batch": args.batch, "d_model": args.d_model,
             "layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
             "vocab": args.vocab, "repeats": args.repeats}
      results.append(common.run_and_report(os.path.abspath(__file__), cfg, args.timeout,
                                           variant))

  rows = []
  for r in results:
    base = common.reference_row(results, r, "variant", "baseline")
    if "error" in r:
      rows.append([r["t"], r["variant"]] + ["-"] * 8 + [r["error"][:40]])
      continue
    ratio = lambda key: f"{r[key] / base[key]:.2f}" if base else "-"
    rows.append([r["t"], r["variant"], f"{r['tokens_per_s']:.0f}", f"{r['wall_s']:.2f}",
                 f"{r['cpu_s']:.2f}", ratio("wall_s"), ratio("cpu_s"),
                 f"{r['peak_rss_mib']:.0f}", ratio("peak_rss_mib"), f"{r['xla_temp_mib']:.0f}",
                 ratio("xla_temp_mib")])
  header = ["T", "variant", "tok/s", "wall s", "cpu s", "wall/base", "cpu/base", "peak MiB",
            "peak/base", "XLA temp MiB", "temp/base"]
  print(common.table(rows, header))
  common.write_json(args.out, {"machine": common.machine(), "argv": sys.argv,
                               "results": results})
  print(f"wrote {args.out}")


if __name__ == "__main__":
  common.run(main)
