"""The default run's claim, end to end (slow: ~6 minutes each on an idle 2-core CPU):
`python train.py` (MTA) drives the toy task's error near 0, the Transformer baseline at the same
reduced scale stays clearly higher. Run with `python -m pytest -q -m slow`."""

import json
import os

import pytest

import train_cli


def _final_error(workdir) -> float:
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in records if r["split"] == "eval"][-1]["seq_error"]


def _run(args, workdir):
  train_cli.run(*args, f"--workdir={workdir}", timeout=3600, check=True)
  return _final_error(workdir)


@pytest.mark.slow
def test_default_run_mta_beats_baseline(tmp_path):
  mta = _run([], tmp_path / "mta")
  baseline = _run(["--config=configs/toy.py:baseline"], tmp_path / "baseline")
  assert mta <= 0.02, mta
  assert baseline >= mta + 0.2, (baseline, mta)
