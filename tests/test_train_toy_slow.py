"""The default run's claim, end to end (slow: ~6 minutes each on an idle 2-core CPU):
`python train.py` (MTA) drives the toy task's error near 0, the Transformer baseline at the same
reduced scale stays clearly higher. Run with `python -m pytest -q -m slow`."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _final_error(workdir) -> float:
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in records if r["split"] == "eval"][-1]["seq_error"]


def _run(args, workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "train.py", *args, f"--workdir={workdir}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=3600, env=env)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return _final_error(workdir)


@pytest.mark.slow
def test_default_run_mta_beats_baseline(tmp_path):
  mta = _run([], tmp_path / "mta")
  baseline = _run(["--config=configs/toy.py:baseline"], tmp_path / "baseline")
  assert mta <= 0.02, mta
  assert baseline >= mta + 0.2, (baseline, mta)
