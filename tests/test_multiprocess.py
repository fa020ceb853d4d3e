"""Two processes (jax.distributed, CPU collectives, 4 simulated devices each) train like one
process with 8 devices; checkpoints restore across process counts; the data position follows a
resume when the process count is unchanged.

The launch is the README's hand-launch example ("Accelerators and multi-host runs").
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/lm_tiny.py:mta (key-query convs, head mixing, group norm) on a data=2 x fsdp=4 mesh, so
# parameters and optimizer state are split across both processes.
ARGS = ["--config=configs/lm_tiny.py:mta", "--config.mesh.fsdp=4", "--config.data.seq_len=64",
        "--config.data.batch_size=8", "--config.optim.warmup_steps=1", "--config.log_every=1",
        "--config.eval_every=0",
        "--config.eval_steps=2", "--config.checkpoint.every_steps=0"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _run(processes: int, workdir, *args) -> list[str]:
  """Runs train.py as `processes` processes of 8 // processes devices; returns their stdouts."""
  cmd = [sys.executable, "train.py", *ARGS, f"--workdir={workdir}", *args]
  if processes == 1:
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(8), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
  else:
    port = _free_port()
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=_env(8 // processes,
                                                  JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                                  JAX_NUM_PROCESSES=processes, JAX_PROCESS_ID=i))
             for i in range(processes)]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _eval_loss(out: str) -> float:
  line = [l for l in out.splitlines() if l.startswith("eval @ step") and "loss " in l][-1]
  return float(line.split("loss ")[1].split()[0].rstrip(","))


@pytest.mark.slow
def test_two_processes_match_one_and_checkpoints_cross_process_counts(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  _run(1, one, "--config.steps=4")
  outs = _run(2, two, "--config.steps=4")
  assert "processes: 2" in outs[0]
  l1, l2 = _losses(one), _losses(two)
  assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
  # The global batch holds the same rows (process p reads rows p, p + 2, ...), so only the
  # order of the float sums differs.
  np.testing.assert_allclose([l2[s] for s in l1], [l1[s] for s in l1], rtol=1e-5)

  # Resume with the same process count: the data position follows, the losses stay equal.
  _run(1, one, "--config.steps=6")
  _run(2, two, "--config.steps=6")
  l1, l2 = _losses(one), _losses(two)
  np.testing.assert_allclose([l2[s] for s in (5, 6)], [l1[s] for s in (5, 6)], rtol=1e-5)

  # A checkpoint of either run restores in the other process count (resharded by Orbax).
  evals = [_eval_loss(_run(1, two, "--mode=eval")[0]), _eval_loss(_run(2, one, "--mode=eval")[0]),
           _eval_loss(_run(1, one, "--mode=eval")[0])]
  np.testing.assert_allclose(evals, evals[-1], rtol=1e-5)
