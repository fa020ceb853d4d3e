"""Kill / SIGTERM / resume through the real entry point (`python train.py`), in subprocesses.

A run killed with SIGKILL at an arbitrary step, or stopped with SIGTERM, and then resumed with
the same command must reproduce the uninterrupted run exactly: the same loss at every step and
bitwise-equal final parameters and optimizer state (CPU, same config, same device count).
Attention dropout is on, so this also checks that randomness is derived from the step.
"""

import json
import os
import signal
import sys
import time

import numpy as np
import pytest

import train_cli
from mta_jax import checkpoint, tree_io

STEPS = 60
DEVICES = 2


def _cmd(workdir, every_steps=10, steps=STEPS, extra=()):
  return ["--config=" + os.path.join(train_cli.ROOT, "configs", "toy.py"),
          f"--workdir={workdir}",
          "--config.model.d_model=16", "--config.model.n_layers=1", "--config.model.n_heads=2",
          "--config.model.attention.kq_layers=(0,)", "--config.model.attention.dropout=0.1",
          "--config.data.source=synthetic", "--config.data.seq_len=16",
          "--config.data.batch_size=4", "--config.data.eval_batch_size=4",
          f"--config.steps={steps}", "--config.eval_every=0", "--config.eval_steps=1",
          "--config.log_every=1", f"--config.checkpoint.every_steps={every_steps}",
          "--config.checkpoint.keep_last=2", "--config.optim.warmup_steps=5", *extra]


def _run(cmd, timeout=240):
  return train_cli.run(*cmd, devices=DEVICES, timeout=timeout, check=True)


def _train_losses(workdir) -> dict[int, float]:
  """step -> loss; a step logged twice (before a kill, and again after resuming) keeps the last."""
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except ValueError:  # a line cut by the kill
        continue
      if r.get("split") == "train":
        out[r["step"]] = r["loss"]
  return out


def _all_train_losses(workdir) -> list[tuple[int, float]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip().endswith("}")]
  return [(r["step"], r["loss"]) for r in rows if r.get("split") == "train"]


def _start_and_wait(cmd, workdir, at_step, timeout=180):
  proc = train_cli.popen(*cmd, devices=DEVICES)
  t0 = time.time()
  while True:
    steps = _train_losses(workdir)
    if steps and max(steps) >= at_step:
      return proc
    if proc.poll() is not None:
      raise AssertionError(f"run ended before step {at_step}:\n{proc.stdout.read()[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError(f"run did not reach step {at_step} in {timeout}s")
    time.sleep(0.002)


def _final_state(workdir) -> dict:
  """Flat {item.path: numpy array} of params and opt_state of the latest checkpoint."""
  ck = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    step = ck.latest_step()
    out = {"step": step}
    for item in ("params", "opt_state"):
      shapes = ck.stored_shapes(step, item)
      target = tree_io.nest({p: np.zeros(m.shape, m.dtype) for p, m in shapes.items()})
      for p, v in tree_io.flatten(ck.restore_item(step, item, target)).items():
        out[item + "." + ".".join(p)] = np.asarray(v)
  finally:
    ck.close()
  return out


def _assert_same_run(got_dir, want_dir):
  want, got = _train_losses(want_dir), _train_losses(got_dir)
  assert sorted(want) == list(range(1, STEPS + 1))
  assert sorted(got) == sorted(want)
  bad = [(s, got[s], want[s]) for s in want if got[s] != want[s]]
  assert not bad, f"losses differ from the uninterrupted run at (step, got, want): {bad[:5]}"
  a, b = _final_state(got_dir), _final_state(want_dir)
  assert a["step"] == b["step"] == STEPS
  assert sorted(a) == sorted(b)
  for k in b:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  _run(_cmd(workdir))
  return workdir


@pytest.mark.parametrize("every_steps,kill_at", [
    (10, 23), pytest.param(1, 31, marks=pytest.mark.slow)])
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path, uninterrupted,
                                                              every_steps, kill_at):
  """every_steps=1 keeps a save in flight almost always, so the kill usually lands mid-save."""
  workdir = str(tmp_path / "run")
  cmd = _cmd(workdir, every_steps=every_steps)
  proc = _start_and_wait(cmd, workdir, kill_at)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  killed_at = max(_train_losses(workdir))
  assert killed_at < STEPS, "the run finished before it could be killed; make it longer"
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  steps = sorted(int(n) for n in names if n.isdigit())
  assert steps and steps[-1] <= killed_at
  half_written = [n for n in names if "tmp" in n]  # a save the kill interrupted, if any
  out = _run(cmd)  # the same command resumes
  assert f"resumed from step {steps[-1]}" in out.stdout + out.stderr
  if half_written:
    assert "ignoring incomplete checkpoint" in out.stderr
  _assert_same_run(workdir, uninterrupted)
  assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]


@pytest.mark.slow  # test_checkpoint.py checks the SIGTERM save in-process
def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path, uninterrupted):
  workdir = str(tmp_path / "run")
  cmd = _cmd(workdir, every_steps=1000)  # no periodic save: only the SIGTERM one
  proc = _start_and_wait(cmd, workdir, 20)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out[-3000:]
  assert "stop requested" in out
  stopped_at = max(_train_losses(workdir))
  assert 20 <= stopped_at < STEPS
  steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  assert steps == [stopped_at], (steps, stopped_at)  # saved exactly where it stopped
  _run(cmd)
  _assert_same_run(workdir, uninterrupted)
  logged = [s for s, _ in _all_train_losses(workdir)]
  assert logged == list(range(1, STEPS + 1)), "a step was repeated or skipped after SIGTERM"


@pytest.mark.slow
def test_resume_on_another_device_count(tmp_path, uninterrupted, monkeypatch):
  """Stopped on 2 devices, resumed on 1: the state is resharded and training continues on the
  same trajectory (not bitwise: the gradient reduction order changes with the device count)."""
  workdir = str(tmp_path / "run")
  cmd = _cmd(workdir, every_steps=1000)
  proc = _start_and_wait(cmd, workdir, 20)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out[-3000:]
  monkeypatch.setattr(sys.modules[__name__], "DEVICES", 1)
  out = _run(cmd)
  assert "resumed from step" in out.stdout
  want, got = _train_losses(uninterrupted), _train_losses(workdir)
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)],
                             rtol=1e-5)


def test_resume_with_another_model_is_refused_naming_the_field(tmp_path, uninterrupted):
  import shutil
  workdir = str(tmp_path / "copy")
  shutil.copytree(uninterrupted, workdir)
  cmd = _cmd(workdir, extra=["--config.model.attention.pre_conv=False"])
  p = train_cli.run(*cmd, devices=DEVICES, timeout=240)
  assert p.returncode == 2, p.stderr[-3000:]
  assert "model.attention.pre_conv: checkpoint True, current False" in p.stderr
  assert "Traceback" not in p.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == sorted(
      os.listdir(os.path.join(uninterrupted, "checkpoints")))
