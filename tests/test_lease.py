"""The workdir lease (mta_jax.lease): one holder, busy errors naming it, stale takeover, loss."""

import json
import os
import subprocess
import sys
import time

import pytest

from mta_jax import lease as lease_lib


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_second_holder_is_refused_naming_the_first(tmp_path):
  with lease_lib.WorkdirLease(tmp_path, command="python train.py --x") as first:
    rec = json.loads((tmp_path / lease_lib.LEASE_NAME).read_text())
    assert rec["pid"] == os.getpid() and rec["token"] == first.token
    with pytest.raises(lease_lib.WorkdirBusyError) as e:
      lease_lib.WorkdirLease(tmp_path).acquire()
    msg = str(e.value)
    assert f"pid {os.getpid()}" in msg and "python train.py --x" in msg and str(tmp_path) in msg
  assert not (tmp_path / lease_lib.LEASE_NAME).exists()  # released
  lease_lib.WorkdirLease(tmp_path).acquire().release()  # and free again


def test_stale_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
  holder = lease_lib.WorkdirLease(tmp_path)
  stale = {"host": holder.host, "pid": _dead_pid(), "started": time.time() - 5,
           "heartbeat": time.time(), "token": "old"}
  (tmp_path / lease_lib.LEASE_NAME).write_text(json.dumps(stale))
  with holder:
    assert json.loads((tmp_path / lease_lib.LEASE_NAME).read_text())["token"] == holder.token
  assert os.listdir(tmp_path) == []  # nothing left behind (no '.stale' copies)


def test_other_host_is_stale_only_after_the_heartbeat_timeout(tmp_path):
  rec = {"host": "elsewhere", "pid": 1, "started": time.time(), "heartbeat": time.time() - 30,
         "token": "other"}
  (tmp_path / lease_lib.LEASE_NAME).write_text(json.dumps(rec))
  with pytest.raises(lease_lib.WorkdirBusyError, match="host elsewhere"):
    lease_lib.WorkdirLease(tmp_path, stale_after_s=60).acquire()
  with lease_lib.WorkdirLease(tmp_path, stale_after_s=10) as taker:
    assert json.loads((tmp_path / lease_lib.LEASE_NAME).read_text())["token"] == taker.token


def test_live_process_with_a_reused_pid_is_not_a_holder(tmp_path):
  """Our own pid, but a lease dated before this process started: the pid was reused."""
  holder = lease_lib.WorkdirLease(tmp_path)
  rec = {"host": holder.host, "pid": os.getpid(), "started": 1.0, "heartbeat": 1.0, "token": "x"}
  (tmp_path / lease_lib.LEASE_NAME).write_text(json.dumps(rec))
  holder.acquire().release()


def test_heartbeat_notices_a_vanished_or_stolen_lease(tmp_path):
  with lease_lib.WorkdirLease(tmp_path, heartbeat_s=0.05) as held:
    first = json.loads((tmp_path / lease_lib.LEASE_NAME).read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((tmp_path / lease_lib.LEASE_NAME).read_text())["heartbeat"] > first
    held.check()
    (tmp_path / lease_lib.LEASE_NAME).unlink()
    time.sleep(0.3)
    with pytest.raises(lease_lib.LeaseLostError, match="vanished"):
      held.check()
  with lease_lib.WorkdirLease(tmp_path, heartbeat_s=0.05) as held:
    other = {"host": "h2", "pid": 7, "started": time.time(), "heartbeat": time.time(),
             "token": "thief"}
    (tmp_path / lease_lib.LEASE_NAME).write_text(json.dumps(other))
    time.sleep(0.3)
    with pytest.raises(lease_lib.LeaseLostError, match="taken by pid 7 on host h2"):
      held.check()
  assert (tmp_path / lease_lib.LEASE_NAME).exists()  # the thief's lease is not removed


def test_object_store_protocol_detects_a_lost_race(tmp_path, monkeypatch):
  """Without O_EXCL (buckets) the lease is written and read back: the last writer wins."""
  a = lease_lib.WorkdirLease(tmp_path, settle_s=0.0)
  a.local = False
  b = lease_lib.WorkdirLease(tmp_path, settle_s=0.0)
  b.local = False
  real_write = type(a.path).write_text

  def racing_write(path, text, *args, **kw):  # b writes right after a, before a reads back
    real_write(path, text, *args, **kw)
    if json.loads(text)["token"] == a.token:
      real_write(path, b._record(), *args, **kw)

  monkeypatch.setattr(type(a.path), "write_text", racing_write)
  with pytest.raises(lease_lib.WorkdirBusyError):
    a.acquire()
  monkeypatch.undo()
  assert json.loads((tmp_path / lease_lib.LEASE_NAME).read_text())["token"] == b.token


def test_concurrent_acquires_have_exactly_one_winner(tmp_path):
  code = ("import sys; from mta_jax import lease\n"
          "try:\n  l = lease.WorkdirLease(sys.argv[1]).acquire()\n"
          "except lease.WorkdirBusyError:\n  print('busy'); sys.exit(0)\n"
          "print('won'); import time; time.sleep(2); l.release()\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=root,
                            stdout=subprocess.PIPE, text=True) for _ in range(6)]
  outs = [p.communicate(timeout=60)[0].strip() for p in procs]
  assert sorted(outs) == ["busy"] * 5 + ["won"], outs


def test_check_reads_the_lease_between_heartbeats(tmp_path):
  with lease_lib.WorkdirLease(tmp_path, heartbeat_s=3600, check_s=0.0) as held:
    held.check()
    (tmp_path / lease_lib.LEASE_NAME).unlink()
    with pytest.raises(lease_lib.LeaseLostError, match="vanished"):
      held.check()
