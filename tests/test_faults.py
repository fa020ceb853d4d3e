"""Faults through the real entry point (`python train.py`), in subprocesses: a job launched twice
on one workdir, Ctrl-C, kill -9 and resume (a stale lease taken over), a full disk (a tiny
tmpfs), an unwritable and a deleted workdir, a flipped bit in the latest checkpoint seen by
eval, export and train. Each must end in one clear line, lose nothing already saved, and leave
clean records (metrics.jsonl with every step once, one TensorBoard run). The default run has
the launch-twice / Ctrl-C / resume test and the unwritable workdir; the rest are slow.
"""

import glob
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from mta_jax import lease as lease_lib
from mta_jax import metrics
import train_cli
from test_checkpoint_train import DEVICES, _cmd, _start_and_wait

ROOT = train_cli.ROOT


def _env():
  return train_cli.env(DEVICES)


def _run(args, prefix=(), timeout=600):
  """`python train.py *args` (after `prefix`, e.g. setpriv) in the checkout's root."""
  return subprocess.run([*prefix, *train_cli.command(*args)], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def _ckpt_steps(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _train_steps(workdir) -> list[int]:
  return [r["step"] for r in metrics.read_records(os.path.join(workdir, "metrics.jsonl"))
          if r["split"] == "train"]


def _tb_events(workdir) -> list[tuple[str, list]]:
  """(file, [(step, kind)]) per event file; kind 'start' for a purge marker, else the tags."""
  from tensorboardX.proto.event_pb2 import Event, SessionLog
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events*"))):
    events = []
    with open(path, "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("Q", data[i:i + 8])
      e = Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      if e.session_log.status == SessionLog.START:
        events.append((e.step, "start"))
      elif e.summary.value:
        events.append((e.step, e.summary.value[0].tag))
    out.append((path, events))
  return out


def _lines(text: str) -> list[str]:
  return [l for l in text.splitlines() if l.strip()]


@pytest.mark.slow  # three train.py runs; test_lease.py and test_checkpoint.py cover the parts
def test_second_launch_refused_ctrl_c_saves_and_resume_keeps_one_record_per_step(tmp_path):
  """A job launched twice: the second exits at once naming the first. Ctrl-C stops the first
  with a save. The resumed run finishes with each step once in metrics.jsonl and TensorBoard
  purging the replayed steps."""
  workdir = str(tmp_path / "run")
  cmd = _cmd(workdir, every_steps=1000, steps=100_000)  # runs until Ctrl-C
  first = _start_and_wait(cmd, workdir, 5, timeout=600)
  second = _run(cmd, timeout=240)
  assert second.returncode == 2, second.stderr[-2000:]
  err = _lines(second.stderr)
  assert err[-1].startswith("error: the workdir") and f"pid {first.pid} on host" in err[-1]
  assert "Traceback" not in second.stderr
  first.send_signal(signal.SIGINT)
  out, _ = first.communicate(timeout=120)
  assert first.returncode == 0, out[-3000:]
  assert "Ctrl-C (SIGINT) received: saving" in out and "stop requested" in out
  stopped = max(_train_steps(workdir))
  assert _ckpt_steps(workdir) == [stopped]
  assert f"last eval was at step" not in out  # no eval ran: nothing stale is reported
  assert not os.path.exists(os.path.join(workdir, lease_lib.LEASE_NAME))
  # Records written after the checkpoint (as a kill between save and exit would leave them).
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": stopped + 1, "split": "train", "loss": 9.0}) + "\n{\"st")
  end = stopped + 5
  p = _run(_cmd(workdir, every_steps=1000, steps=end))
  assert p.returncode == 0, p.stderr[-3000:]
  assert f"dropped 1 record(s) after step {stopped}" in p.stdout
  assert _train_steps(workdir) == list(range(1, end + 1))
  assert f"final eval (step {end})" in p.stdout
  files = _tb_events(workdir)
  assert len(files) == 2
  assert files[1][1][0] == (stopped + 1, "start")  # TensorBoard drops steps > stopped of file 1


def _tmpfs_available() -> bool:
  if not shutil.which("unshare"):
    return False
  r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                     capture_output=True)
  return r.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _tmpfs_available(), reason="needs `unshare -rm` to mount a tmpfs")
def test_disk_full_ends_in_one_line_naming_cause_and_path(tmp_path):
  """The workdir is on a 400 KiB tmpfs (private mount namespace): the first checkpoint or a
  later one does not fit."""
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  workdir = str(mnt / "run")
  cmd = " ".join(f"'{c}'" for c in train_cli.command(*_cmd(workdir, every_steps=10, steps=400)))
  p = subprocess.run(["unshare", "-rm", "sh", "-c",
                      f"mount -t tmpfs -o size=400k tmpfs '{mnt}' && {cmd}; echo rc=$?; "
                      f"ls '{workdir}/checkpoints'"],
                     cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert "rc=1" in p.stdout, (p.stdout[-2000:], p.stderr[-3000:])
  err = [l for l in _lines(p.stderr) if not l.startswith("I")]  # absl INFO lines
  assert len(err) <= 4, p.stderr  # one Orbax line, maybe a TensorBoard warning, the error
  for line in (err[0], err[-1]):
    assert "disk full (ENOSPC) at " + workdir in line, p.stderr
  assert err[-1].startswith("error: ")
  assert "Traceback" not in p.stderr


def _without_permission_override() -> list[str]:
  """A command prefix under which root obeys file permissions (drops CAP_DAC_OVERRIDE), or []
  when not root; None if that is impossible here."""
  if os.geteuid() != 0:
    return []
  if not shutil.which("setpriv"):
    return None
  return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


@pytest.mark.skipif(_without_permission_override() is None,
                    reason="root without setpriv ignores file permissions")
def test_unwritable_workdir_is_one_line(tmp_path):
  parent = tmp_path / "ro"
  parent.mkdir()
  os.chmod(parent, 0o555)
  workdir = str(parent / "run")
  p = _run(_cmd(workdir), prefix=_without_permission_override())
  assert p.returncode == 1, p.stderr[-3000:]
  err = _lines(p.stderr)
  assert err[-1].startswith(f"error: permission denied (EACCES) at {workdir}"), p.stderr
  assert "Traceback" not in p.stderr
  assert os.listdir(parent) == []


@pytest.mark.slow
def test_deleted_workdir_stops_the_run_in_one_line(tmp_path):
  workdir = str(tmp_path / "run")
  proc = _start_and_wait(_cmd(workdir, every_steps=1000, steps=100_000), workdir, 3,
                         timeout=600)
  shutil.rmtree(workdir)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 1, out[-3000:]
  last = _lines(out)[-1]
  assert last.startswith("error: the lease file") and "vanished" in last, out[-2000:]
  assert "Traceback" not in out


@pytest.mark.slow
def test_kill_9_leaves_a_stale_lease_that_the_next_run_takes_over(tmp_path):
  workdir = str(tmp_path / "run")
  proc = _start_and_wait(_cmd(workdir, every_steps=5, steps=100_000), workdir, 12, timeout=600)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert os.path.exists(os.path.join(workdir, lease_lib.LEASE_NAME))  # left behind
  saved = _ckpt_steps(workdir)[-1]
  end = saved + 3
  p = _run(_cmd(workdir, every_steps=5, steps=end))
  assert p.returncode == 0, p.stderr[-3000:]
  assert "taking over the stale lease" in p.stderr and f"pid {proc.pid}" in p.stderr
  assert f"resumed from step {saved}" in p.stdout
  assert _train_steps(workdir) == list(range(1, end + 1))
  assert not os.path.exists(os.path.join(workdir, lease_lib.LEASE_NAME))


def _flip_largest(d):
  files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs
           if f not in ("_CHECKPOINT_METADATA", "commit_success.txt")]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.seek(os.path.getsize(victim) // 2)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 1]))


@pytest.mark.slow
def test_a_flipped_bit_in_the_latest_checkpoint_through_eval_export_and_train(tmp_path):
  workdir = str(tmp_path / "run")
  p = _run(_cmd(workdir, every_steps=10, steps=20))
  assert p.returncode == 0, p.stderr[-3000:]
  _flip_largest(os.path.join(workdir, "checkpoints", "20", "params"))
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  ev = _run(_cmd(workdir, every_steps=10, steps=20) + ["--mode=eval"])
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert "eval @ step 10" in ev.stdout and "does not match its checksums" in ev.stderr
  ex = _run(_cmd(workdir, every_steps=10, steps=20) + ["--mode=export"])
  assert ex.returncode == 0, ex.stderr[-3000:]
  assert "exported step 10" in ex.stdout and "Traceback" not in ex.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
  tr = _run(_cmd(workdir, every_steps=10, steps=25))
  assert tr.returncode == 0, tr.stderr[-3000:]
  assert "resumed from step 10" in tr.stdout
  assert _train_steps(workdir) == list(range(1, 26))


@pytest.mark.parametrize("text,message", [
    (None, "OSError: [Errno 2] No such file or directory"),
    ("def get_config(:\n", "SyntaxError: invalid syntax (line 1 of"),
    ("def get_config():\n  return 1 / 0\n", "ZeroDivisionError: division by zero"),
], ids=["missing", "syntax", "raises"])
def test_a_bad_config_file_is_one_line(tmp_path, text, message):
  path = tmp_path / "exp.py"
  if text is not None:
    path.write_text(text)
  p = _run([f"--config={path}", "--mode=count_params"], timeout=240)
  assert p.returncode == 2
  assert _lines(p.stderr) == [l for l in _lines(p.stderr) if l.startswith("config error: ")]
  assert len(_lines(p.stderr)) == 1 and message in p.stderr, p.stderr
