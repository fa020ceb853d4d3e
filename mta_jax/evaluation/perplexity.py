"""Perplexity by position in the document: does the model use long context?

    python -m mta_jax.evaluation.perplexity --model=runs/lm_tiny --text_file=docs.jsonl \
        [--bucket=128] [--max_docs=200] [--out=runs/lm_tiny/ppl_by_position]

Documents: a .jsonl file (one {"text": ...} per line) or a text file (documents separated by
blank lines). Each is tokenized (BOS first when the run used it) and scored up to the model's
max_len; the negative log-likelihood of every token is averaged per bucket of target positions
[0, b), [b, 2b), ... A model that uses long context has lower NLL in later buckets. Writes
ppl_by_position.json and .png.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional, Sequence

import numpy as np
from absl import flags

from mta_jax import cli


def read_documents(path: str, max_docs: int = 0) -> list[str]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--text_file={path!r}: no such file.")
  with open(path) as f:
    if path.endswith(".jsonl"):
      docs = [json.loads(line)["text"] for line in f if line.strip()]
    else:
      docs = [d.strip() for d in f.read().split("\n\n") if d.strip()]
  return docs[:max_docs] if max_docs > 0 else docs


def by_position(scorer, token_docs: Sequence[Sequence[int]], bucket: int) -> dict:
  """Mean NLL and perplexity per bucket of target positions (position of the predicted token)."""
  docs = [list(d)[:scorer.max_len + 1] for d in token_docs if len(d) >= 2]
  if not docs:
    raise ValueError("no document has 2 or more tokens.")
  sums, counts = {}, {}
  for lp, _ in scorer.token_logprobs(docs):
    for b0 in range(0, len(lp), bucket):
      k = b0 // bucket
      sums[k] = sums.get(k, 0.0) - float(lp[b0:b0 + bucket].sum())
      counts[k] = counts.get(k, 0) + len(lp[b0:b0 + bucket])
  rows = []
  for k in sorted(sums):
    nll = sums[k] / counts[k]
    rows.append({"start": k * bucket + 1, "end": (k + 1) * bucket, "tokens": counts[k],
                 "nll": nll, "ppl": math.exp(nll)})
  total = sum(sums.values()) / sum(counts.values())
  return {"bucket": bucket, "documents": len(docs), "buckets": rows, "nll": total,
          "ppl": math.exp(total)}


def plot(result: dict, path: str) -> str:
  from mta_jax import viz
  xs = [(r["start"] + r["end"]) / 2 for r in result["buckets"]]
  return viz.plot_lines({"perplexity": (xs, [r["ppl"] for r in result["buckets"]])}, path,
                        xlabel="position in document (bucket centre)", ylabel="perplexity",
                        title=f"perplexity by position ({result['documents']} documents)")


_FLAGS = flags.FlagValues()  # this command's own (see mta_jax/cli.py)
flags.DEFINE_string("model", None, "training workdir or export directory", flag_values=_FLAGS)
flags.DEFINE_string("text_file", None, ".jsonl file ('text' field) or text file (documents separated by blank lines)", flag_values=_FLAGS)
flags.DEFINE_integer("bucket", 128, "positions per bucket", flag_values=_FLAGS)
flags.DEFINE_integer("max_docs", 0, "read at most this many documents (0 = all)", flag_values=_FLAGS)
flags.DEFINE_string("tokenizer", '', "override the recorded tokenizer file", flag_values=_FLAGS)
flags.DEFINE_string("out", '', "output directory (default: <model>/ppl_by_position)", flag_values=_FLAGS)
flags.mark_flags_as_required(['model', 'text_file'], flag_values=_FLAGS)


def _main(rest: list[str]) -> int:
  del rest
  args = _FLAGS
  from mta_jax import generate
  from mta_jax.config import ConfigError
  from mta_jax.evaluation import scoring
  try:
    if args.bucket < 1:
      raise ConfigError(f"--bucket must be >= 1; got {args.bucket}.")
    lm = generate.load(args.model, tokenizer=args.tokenizer)
    if lm.tokenizer is None:
      raise ConfigError("the run recorded no tokenizer; pass --tokenizer=FILE.")
    docs = [generate.encode_prompt(lm.tokenizer, t, lm.config.data.add_bos)
            for t in read_documents(args.text_file, args.max_docs)]
    result = by_position(scoring.Scorer(lm.model, batch_size=4), docs, args.bucket)
  except (ConfigError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = args.out or os.path.join(args.model, "ppl_by_position")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "ppl_by_position.json"), "w") as f:
    json.dump(result, f, indent=1)
  png = plot(result, os.path.join(out, "ppl_by_position.png"))
  for r in result["buckets"]:
    print(f"positions {r['start']:6d}-{r['end']:6d}: ppl {r['ppl']:10.3f} ({r['tokens']} tokens)")
  print(f"wrote {out}/ppl_by_position.json and {png}")
  return 0


def main(argv: Optional[list[str]] = None) -> int:
  """`python -m mta_jax.evaluation.perplexity`; `argv`: the arguments (tests)."""
  return cli.run(_main, _FLAGS, argv, "python -m mta_jax.evaluation.perplexity", __doc__)


if __name__ == "__main__":
  sys.exit(main())
