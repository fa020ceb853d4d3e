"""One writer per workdir: a lease file that a training run holds while it writes.

    <workdir>/lock.json   {"host", "pid", "started", "heartbeat", "token", "command"}

A training run takes the lease before it writes anything into its workdir and gives it back
when it ends; a background thread refreshes `heartbeat` every `heartbeat_s` seconds. A second
run on the same workdir (a job submitted twice) stops at once with `WorkdirBusyError`, whose
message names the holder. A lease left behind by a process that died without releasing it is
stale and is taken over:
  - same host: the holder's pid is gone (or now belongs to a process started after the lease);
  - another host: its heartbeat is older than `stale_after_s` (its pid cannot be checked).

Paths go through `etils.epath`, so a workdir on cloud storage (gs://...) works too. Neither
epath nor Orbax offers an atomic create-if-absent, so this is written by hand: on a local file
system the lease is created with O_CREAT | O_EXCL and a stale one is moved aside with an atomic
rename (exactly one contender wins each); on object stores, which have neither, the lease is
written and read back after `settle_s`, and the run whose token is there wins (a lost race is
detected, not prevented: two runs started within `settle_s` of each other on a bucket may both
read back their own token only if the store is not read-after-write consistent; GCS is).

Only process 0 of a multi-process run takes the lease; the others learn the outcome from it.
`--mode=eval` and `--mode=export` take no lease: they never write into the run's checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional

from etils import epath

from mta_jax import paths

log = logging.getLogger(__name__)

LEASE_NAME = "lock.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir's lease; the message names it."""


class LeaseLostError(RuntimeError):
  """The lease this run held was removed or taken by another run."""


def pid_alive(pid: int, since: Optional[float] = None) -> bool:
  """True if `pid` runs on this host (and, given `since`, was started before it: otherwise the
  pid was reused by another process)."""
  import psutil
  try:
    p = psutil.Process(pid)
    return (p.status() != psutil.STATUS_ZOMBIE
            and (since is None or p.create_time() <= since + 1.0))
  except (psutil.NoSuchProcess, psutil.ZombieProcess):
    return False
  except psutil.AccessDenied:
    return True


def describe(holder: dict) -> str:
  """`pid 1234 on host h (started 2026-01-01 12:00:00 UTC, heartbeat 5s ago): python train.py`."""
  now = time.time()
  started = holder.get("started")
  when = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
          if isinstance(started, (int, float)) else "?")
  beat = holder.get("heartbeat")
  ago = f"{now - beat:.0f}s ago" if isinstance(beat, (int, float)) else "never"
  cmd = holder.get("command") or ""
  return (f"pid {holder.get('pid')} on host {holder.get('host')} (started {when}, heartbeat "
          f"{ago}){': ' + cmd if cmd else ''}")


class WorkdirLease:
  """The lease on one workdir (see the module docstring). Use as a context manager, or call
  `acquire()` / `release()`; `check()` raises `LeaseLostError` once the lease is gone."""

  def __init__(self, workdir, *, heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S, settle_s: float = 1.0,
               check_s: float = 5.0, command: str = ""):
    self.workdir = epath.Path(paths.resolve(workdir))
    self.path = self.workdir / LEASE_NAME
    self.local = not paths.is_uri(str(self.workdir))
    self.heartbeat_s, self.stale_after_s, self.settle_s = heartbeat_s, stale_after_s, settle_s
    self.check_s, self._checked = check_s, time.time()
    self.host = socket.gethostname()
    self.pid = os.getpid()
    self.token = uuid.uuid4().hex
    self.started = time.time()
    self.command = command
    self.held = False
    self.lost: Optional[str] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  # -- the record -------------------------------------------------------------------------------

  def _record(self) -> str:
    return json.dumps({"host": self.host, "pid": self.pid, "started": self.started,
                       "heartbeat": time.time(), "token": self.token,
                       "command": self.command}, indent=1)

  def read(self) -> Optional[dict]:
    """The current holder's record; None when there is no lease file; {} when unreadable."""
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return None
    try:
      rec = json.loads(text)
      return rec if isinstance(rec, dict) else {}
    except ValueError:  # being written right now, or a torn write of a killed process
      return {}

  def _is_stale(self, holder: dict) -> bool:
    if not holder:  # unreadable: stale only once nobody has touched it for a while
      try:
        age = time.time() - self.path.stat().mtime
      except FileNotFoundError:
        return True
      return age > self.stale_after_s
    if holder.get("host") == self.host and isinstance(holder.get("pid"), int):
      return not pid_alive(holder["pid"], float(holder.get("started") or 0))
    beat = holder.get("heartbeat")
    return not isinstance(beat, (int, float)) or time.time() - beat > self.stale_after_s

  # -- taking and giving back -------------------------------------------------------------------

  def _create_exclusive(self) -> bool:
    """Write our record if no lease file exists; True on success."""
    if self.local:
      try:
        fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(self._record())
        f.flush()
        os.fsync(f.fileno())
      return True
    if self.path.exists():
      return False
    self.path.write_text(self._record())
    time.sleep(self.settle_s)  # a competitor that wrote at the same time overwrote us, or not
    rec = self.read()
    return bool(rec) and rec.get("token") == self.token

  def _remove_stale(self, holder: dict) -> None:
    """Move a stale lease aside; only one of several contenders succeeds on a local disk."""
    if not self.local:
      self.path.unlink(missing_ok=True)
      return
    aside = epath.Path(f"{self.path}.stale.{self.token}")
    try:
      os.rename(os.fspath(self.path), os.fspath(aside))
    except FileNotFoundError:  # another contender moved it first
      return
    try:
      moved = json.loads(aside.read_text())
    except ValueError:
      moved = {}
    if holder and moved.get("token") != holder.get("token"):
      # Between our read and the rename a live run replaced the stale lease: put it back.
      try:
        os.link(os.fspath(aside), os.fspath(self.path))
      except FileExistsError:
        pass
    aside.unlink(missing_ok=True)

  def acquire(self) -> "WorkdirLease":
    """Take the lease or raise WorkdirBusyError naming the live holder."""
    self.workdir.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
      if self._create_exclusive():
        self.held = True
        self._start_heartbeat()
        return self
      holder = self.read()
      if holder is None:  # released between our attempt and the read: try again
        continue
      if holder and holder.get("token") == self.token:
        continue
      if not self._is_stale(holder):
        raise WorkdirBusyError(
            f"the workdir {self.workdir} is in use by another run: {describe(holder)}. Wait "
            f"for it to finish, stop it, or use another --workdir (if that process is gone and "
            f"was on another host, its lease {self.path} goes stale {self.stale_after_s:.0f}s "
            "after its last heartbeat, or delete the file).")
      log.warning("taking over the stale lease %s of %s", self.path,
                  describe(holder) if holder else "an unreadable record")
      self._remove_stale(holder)
    raise WorkdirBusyError(f"could not take the lease {self.path}: other runs keep taking it; "
                           "is the same job starting several times?")

  def _start_heartbeat(self) -> None:
    self._thread = threading.Thread(target=self._beat, name="workdir-lease", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        self.refresh()
      except Exception as e:  # noqa: BLE001 - e.g. disk full: the loop's own writes report it
        log.warning("could not refresh the lease %s: %s", self.path, e)

  def _note_if_lost(self) -> None:
    """Reads the lease file; sets `lost` (the reason) if it vanished or another run holds it."""
    rec = self.read()
    if rec is None:
      self.lost = f"the lease file {self.path} vanished (was the workdir deleted or moved?)"
    elif rec and rec.get("token") != self.token:
      self.lost = f"the lease {self.path} was taken by {describe(rec)}"

  def refresh(self) -> None:
    """Check the lease is still ours and push its heartbeat; marks it lost otherwise."""
    self._note_if_lost()
    if self.lost:
      self._stop.set()
      return
    if self.local:
      tmp = f"{self.path}.{self.token}.tmp"
      with open(tmp, "w") as f:
        f.write(self._record())
      os.replace(tmp, os.fspath(self.path))
    else:
      self.path.write_text(self._record())

  def check(self) -> None:
    """Raise LeaseLostError if the lease is gone or taken (found by the heartbeat, or by a
    read of the lease file here at most every `check_s` seconds)."""
    now = time.time()
    if not self.lost and self.held and now - self._checked > self.check_s:
      self._checked = now
      self._note_if_lost()
    if self.lost:
      raise LeaseLostError(f"{self.lost}; stopping so two runs never write one workdir.")

  def release(self) -> None:
    """Stop the heartbeat and delete the lease file if it is still ours (idempotent)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
    if not self.held:
      return
    self.held = False
    rec = self.read()
    if rec and rec.get("token") == self.token:
      try:
        self.path.unlink(missing_ok=True)
      except OSError as e:  # read-only or vanished storage: the lease goes stale by itself
        log.warning("could not remove the lease %s: %s", self.path, e)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def acquire_for_run(workdir, **kwargs) -> Optional[WorkdirLease]:
  """Process 0 takes the lease; every process raises WorkdirBusyError if it could not.

  Returns the lease on process 0 and None on the others.
  """
  import jax
  lease, error = None, ""
  if jax.process_index() == 0:
    try:
      lease = WorkdirLease(workdir, **kwargs).acquire()
    except WorkdirBusyError as e:
      error = str(e)
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    busy = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
    if int(busy) and not error:
      error = f"the workdir {workdir} is in use by another run (see process 0's message)."
  if error:
    raise WorkdirBusyError(error)
  return lease
