"""Run lm-evaluation-harness tasks on a training workdir or an export.

    python -m mta_jax.evaluation.harness --model=runs/lm_tiny --tasks=lambada_openai,piqa \
        [--num_fewshot=0] [--limit=100] [--include_path=MY_TASKS_DIR] [--output=results.json]

Tasks come from lm_eval's registry (their datasets are downloaded by lm_eval / Hugging Face
datasets on first use) or from YAML files under --include_path (local data works offline).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional


def run(model_path: str, tasks: list[str], *, include_path: str = "", num_fewshot=None,
        limit=None, batch_size: int = 8, tokenizer: str = "", lm=None) -> dict:
  """lm_eval.simple_evaluate on the model at `model_path` (or an `MTALM` given as `lm`)."""
  import lm_eval
  from lm_eval.tasks import TaskManager

  from mta_jax.evaluation.lm_eval_adapter import MTALM
  if lm is None:
    lm = MTALM.from_path(model_path, tokenizer=tokenizer, batch_size=batch_size)
  tm = TaskManager(include_path=include_path or None)
  return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                 task_manager=tm, log_samples=False)


def main(argv: Optional[list[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m mta_jax.evaluation.harness", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="training workdir or export directory")
  p.add_argument("--tasks", required=True, help="comma-separated lm_eval task names")
  p.add_argument("--include_path", default="", help="directory of extra task YAML files")
  p.add_argument("--num_fewshot", type=int, default=None)
  p.add_argument("--limit", type=float, default=None, help="examples per task (or fraction)")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--tokenizer", default="", help="override the recorded tokenizer file")
  p.add_argument("--output", default="", help="write the results JSON here")
  args = p.parse_args(argv)
  from mta_jax.config import ConfigError
  try:
    res = run(args.model, [t for t in args.tasks.split(",") if t],
              include_path=args.include_path, num_fewshot=args.num_fewshot, limit=args.limit,
              batch_size=args.batch_size, tokenizer=args.tokenizer)
  except (ConfigError, ValueError, KeyError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from lm_eval.utils import make_table
  print(make_table(res))
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
      json.dump({k: res[k] for k in ("results", "configs", "versions", "n-shot") if k in res},
                f, indent=1, default=str)
    print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
