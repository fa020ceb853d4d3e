"""Run lm-evaluation-harness tasks on a training workdir or an export.

    python -m mta_jax.evaluation.harness --model=runs/lm_tiny --tasks=lambada_openai,piqa \
        [--num_fewshot=0] [--limit=100] [--include_path=MY_TASKS_DIR] [--output=results.json]

Tasks come from lm_eval's registry (their datasets are downloaded by lm_eval / Hugging Face
datasets on first use) or from YAML files under --include_path (local data works offline).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

from absl import flags

from mta_jax import cli


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


_FLAGS = flags.FlagValues()  # this command's own (see mta_jax/cli.py)
flags.DEFINE_string("model", None, "training workdir or export directory", flag_values=_FLAGS)
flags.DEFINE_string("tasks", None, "comma-separated lm_eval task names", flag_values=_FLAGS)
flags.DEFINE_string("include_path", '', "directory of extra task YAML files", flag_values=_FLAGS)
flags.DEFINE_integer("num_fewshot", None, "few-shot examples (default: the task's)", flag_values=_FLAGS)
flags.DEFINE_float("limit", None, "examples per task (or fraction)", flag_values=_FLAGS)
flags.DEFINE_integer("batch_size", 8, "sequences scored per batch", flag_values=_FLAGS)
flags.DEFINE_string("tokenizer", '', "override the recorded tokenizer file", flag_values=_FLAGS)
flags.DEFINE_string("output", '', "write the results JSON here", flag_values=_FLAGS)
flags.mark_flags_as_required(['model', 'tasks'], flag_values=_FLAGS)


def _main(rest: list[str]) -> int:
  del rest
  args = _FLAGS
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


def main(argv: Optional[list[str]] = None) -> int:
  """`python -m mta_jax.evaluation.harness`; `argv`: the arguments (tests)."""
  return cli.run(_main, _FLAGS, argv, "python -m mta_jax.evaluation.harness", __doc__)


if __name__ == "__main__":
  sys.exit(main())
