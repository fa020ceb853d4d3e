"""Multi-needle retrieval (after the paper's Sec. 4.3): accuracy by needle count and depth.

    python -m mta_jax.evaluation.needle --model=runs/lm_tiny --context_len=2048 \
        --needles=2,4,6 --depths=0,0.25,0.5,0.75,1 --samples=10 --out=runs/lm_tiny/needle

N needles "The magic number of <city> is <number>." are hidden in filler text of about
`context_len` tokens; the queried one sits at the given depth (0 = start, 1 = end of the
filler), the others at random depths. The prompt ends with a question and the answer prefix:

    ... What is the magic number of <city>? The magic number of <city> is

A sample is correct when greedy decoding produces exactly the number's tokens (scored in one
forward pass: every answer token must be the argmax). Writes needle.json (accuracy per cell, by
needle count, by depth, mean log-likelihood of the answer) and needle.png (heat map).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

import numpy as np
from absl import flags

from mta_jax import cli

CITIES = ("Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Delhi", "Rome", "Berlin", "Madrid",
          "Nairobi", "Seoul", "Lagos", "Dublin", "Vienna", "Quito", "Hanoi", "Athens", "Prague",
          "Havana", "Manila", "Bogota", "Lisbon", "Warsaw", "Ottawa")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")


def _sentences(filler: str) -> list[str]:
  return [s.strip() + "." for s in filler.split(".") if s.strip()]


def make_sample(tok, rng: np.random.Generator, *, context_len: int, n_needles: int,
                depth: float, digits: int = 6, filler: str = FILLER, add_bos: bool = True
                ) -> tuple[list[int], list[int], dict]:
  """(context ids, answer ids, info) of one retrieval question of about `context_len` tokens."""
  if not 1 <= n_needles <= len(CITIES):
    raise ValueError(f"needles must be in 1..{len(CITIES)}; got {n_needles}.")
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1]; got {depth}.")
  cities = list(rng.choice(CITIES, n_needles, replace=False))
  numbers = [str(rng.integers(10 ** (digits - 1), 10 ** digits)) for _ in cities]
  needles = [f"The magic number of {c} is {n}." for c, n in zip(cities, numbers)]
  target = int(rng.integers(n_needles))
  question = (f" What is the magic number of {cities[target]}? The magic number of "
              f"{cities[target]} is")
  enc = lambda s: [int(t) for t in tok.encode(s)]
  fixed = len(enc(question)) + sum(len(enc(" " + n)) for n in needles) + 1 + int(add_bos)
  sents = _sentences(filler)
  lens = [len(enc(" " + s)) for s in sents]
  if fixed + min(lens) > context_len:
    raise ValueError(f"context_len={context_len} is too short for {n_needles} needles and the "
                     f"question ({fixed} tokens); raise it.")
  hay, used, i = [], fixed, 0
  while used + lens[i % len(sents)] <= context_len:
    hay.append(sents[i % len(sents)])
    used += lens[i % len(sents)]
    i += 1
  slots = [round(depth * len(hay))] + [int(rng.integers(len(hay) + 1))
                                       for _ in range(n_needles - 1)]
  order = [target] + [k for k in range(n_needles) if k != target]
  for slot, k in sorted(zip(slots, order), reverse=True):  # later slots first: indices hold
    hay.insert(slot, needles[k])
  context = enc(" ".join(hay) + question)
  if add_bos and getattr(tok, "bos_id", -1) is not None and tok.bos_id >= 0:
    context = [int(tok.bos_id)] + context
  answer = enc(" " + numbers[target])
  return context, answer, {"city": cities[target], "number": numbers[target]}


def evaluate(scorer, tok, *, context_len: int, needles: Sequence[int], depths: Sequence[float],
             samples: int, seed: int = 0, digits: int = 6, add_bos: bool = True,
             filler: str = FILLER, progress: bool = True) -> dict:
  """Accuracy and mean answer log-likelihood per (needles, depth) cell."""
  rng = np.random.default_rng(seed)
  cells = []
  for n in needles:
    for d in depths:
      pairs = [make_sample(tok, rng, context_len=context_len, n_needles=n, depth=d,
                           digits=digits, filler=filler, add_bos=add_bos)[:2]
               for _ in range(samples)]
      res = scorer.loglikelihood(pairs)
      acc = float(np.mean([g for _, g in res]))
      cells.append({"needles": n, "depth": d, "accuracy": acc,
                    "mean_logprob": float(np.mean([lp for lp, _ in res])), "samples": samples})
      if progress:
        print(f"needles {n} depth {d:.2f}: accuracy {acc:.2f}", flush=True)
  by = lambda key, v: float(np.mean([c["accuracy"] for c in cells if c[key] == v]))
  return {"context_len": context_len, "cells": cells,
          "by_needles": {str(n): by("needles", n) for n in needles},
          "by_depth": {str(d): by("depth", d) for d in depths},
          "accuracy": float(np.mean([c["accuracy"] for c in cells]))}


def plot(result: dict, path: str) -> str:
  from mta_jax import viz
  needles = sorted({c["needles"] for c in result["cells"]})
  depths = sorted({c["depth"] for c in result["cells"]})
  grid = np.zeros((len(needles), len(depths)))
  for c in result["cells"]:
    grid[needles.index(c["needles"]), depths.index(c["depth"])] = c["accuracy"]
  return viz.plot_heatmap(grid, path, rows=[f"{n} needles" for n in needles],
                          cols=[f"{d:g}" for d in depths], xlabel="depth of the queried needle",
                          title=f"multi-needle retrieval accuracy, context "
                                f"{result['context_len']}")


_FLAGS = flags.FlagValues()  # this command's own (see mta_jax/cli.py)
flags.DEFINE_string("model", None, "training workdir or export directory", flag_values=_FLAGS)
flags.DEFINE_integer("context_len", 0, "0 = the model's max_len", flag_values=_FLAGS)
flags.DEFINE_string("needles", '2,4,6', "comma-separated needle counts", flag_values=_FLAGS)
flags.DEFINE_string("depths", '0,0.25,0.5,0.75,1', "comma-separated depths of the queried needle", flag_values=_FLAGS)
flags.DEFINE_integer("samples", 10, "questions per cell", flag_values=_FLAGS)
flags.DEFINE_integer("digits", 6, "digits of each needle's number", flag_values=_FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the haystacks and needles", flag_values=_FLAGS)
flags.DEFINE_string("tokenizer", '', "override the recorded tokenizer file", flag_values=_FLAGS)
flags.DEFINE_string("out", '', "output directory (default: <model>/needle)", flag_values=_FLAGS)
flags.mark_flags_as_required(['model'], flag_values=_FLAGS)


def _main(rest: list[str]) -> int:
  del rest
  args = _FLAGS
  from mta_jax import generate
  from mta_jax.config import ConfigError
  from mta_jax.evaluation import scoring
  try:
    needles = [int(x) for x in args.needles.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    lm = generate.load(args.model, tokenizer=args.tokenizer)
    if lm.tokenizer is None or isinstance(lm.tokenizer, generate.ToyTokenizer):
      raise ConfigError("the needle test needs a text tokenizer (the run recorded none); pass "
                        "--tokenizer=FILE.")
    context_len = args.context_len or lm.config.model.max_len
    if context_len > lm.config.model.max_len:
      raise ConfigError(f"--context_len={context_len} exceeds the model's max_len="
                        f"{lm.config.model.max_len}.")
    result = evaluate(scoring.Scorer(lm.model, batch_size=4), lm.tokenizer,
                      context_len=context_len, needles=needles, depths=depths,
                      samples=args.samples, seed=args.seed, digits=args.digits,
                      add_bos=lm.config.data.add_bos)
  except (ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = args.out or os.path.join(args.model, "needle")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "needle.json"), "w") as f:
    json.dump(result, f, indent=1)
  png = plot(result, os.path.join(out, "needle.png"))
  print(f"accuracy {result['accuracy']:.3f}; by needles {result['by_needles']}; wrote "
        f"{out}/needle.json and {png}")
  return 0


def main(argv: Optional[list[str]] = None) -> int:
  """`python -m mta_jax.evaluation.needle`; `argv`: the arguments (tests)."""
  return cli.run(_main, _FLAGS, argv, "python -m mta_jax.evaluation.needle", __doc__)


if __name__ == "__main__":
  sys.exit(main())
