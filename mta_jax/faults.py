"""Storage faults as one clear line: disk full, permission denied, a vanished directory or bucket.

A full disk or a lost bucket shows up deep inside a library (Orbax's background save thread,
TensorStore, the metrics files) and each of them logs or re-raises it its own way. The entry
point reports such an error as one line that names the cause, the path and what to do; the
Orbax log records of the same failure are shortened to one line each (no traceback), and a
failing background thread prints one line instead of a traceback.

    error: disk full (No space left on device) at /runs/x/checkpoints/10.orbax-checkpoint-tmp/...
           [...]; free space or use another --workdir. Checkpoints already in /runs/x/checkpoints
           are intact (latest complete: step 0).
"""

from __future__ import annotations

import errno
import logging
import re
import sys
import threading
from typing import Optional

# errno -> (cause, what to do)
_CAUSES = {
    errno.ENOSPC: ("disk full", "free space or use another --workdir"),
    errno.EDQUOT: ("disk quota exceeded", "free space or use another --workdir"),
    errno.EFBIG: ("file too large for the file system", "use another --workdir"),
    errno.EACCES: ("permission denied", "make it writable by this user or use another --workdir"),
    errno.EPERM: ("operation not permitted",
                  "make it writable by this user or use another --workdir"),
    errno.EROFS: ("read-only file system", "use a writable --workdir"),
    errno.ENOENT: ("no such file or directory (was it deleted or moved, or its bucket removed?)",
                   "check the path; restore it or use another --workdir"),
    errno.EIO: ("input/output error", "check the storage device"),
}
_MESSAGES = [  # how TensorStore / cloud clients spell the same causes
    (re.compile(r"No space left on device|RESOURCE_EXHAUSTED.*(?:writ|space)", re.I),
     errno.ENOSPC),
    (re.compile(r"Disk quota exceeded", re.I), errno.EDQUOT),
    (re.compile(r"Permission denied|PERMISSION_DENIED|403 Forbidden", re.I), errno.EACCES),
    (re.compile(r"Read-only file system", re.I), errno.EROFS),
    (re.compile(r"bucket does not exist|NoSuchBucket|404 .*bucket", re.I), errno.ENOENT),
]
_OS_CODE = re.compile(r"os_error_code='?(\d+)")
_PATH = re.compile(r"""["']((?:/|[a-z][a-z0-9+.-]*://)[^"']+)["']""")
_BARE_PATH = re.compile(r"""(?:^|[\s:=])((?:/|[a-z][a-z0-9+.-]*://)[^\s"',;)]+)""")


def find_path(text: str) -> str:
  """The first (quoted, else bare) absolute path or URI in a message; '' if none."""
  m = _PATH.search(text) or _BARE_PATH.search(text)
  return m.group(1) if m else ""


def _chain(exc: BaseException):
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


def classify(exc: BaseException) -> Optional[tuple[int, str]]:
  """(errno, path) of the storage fault behind `exc`, or None if it is not one."""
  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno in _CAUSES:
      return e.errno, str(e.filename or find_path(str(e)))
    text = str(e)
    code = None
    m = _OS_CODE.search(text)
    if m and int(m.group(1)) in _CAUSES:
      code = int(m.group(1))
    else:
      for pattern, c in _MESSAGES:
        if pattern.search(text):
          code = c
          break
    if code is not None:
      return code, find_path(text)
  return None


def latest_checkpoint_step(workdir: str) -> Optional[int]:
  try:
    from etils import epath
    d = epath.Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()]
  except Exception:  # noqa: BLE001 - the storage is what failed: say nothing rather than fail
    return None
  return max(steps) if steps else None


def describe_found(code: int, path: str) -> str:
  cause, todo = _CAUSES[code]
  where = f" at {path}" if path else ""
  return f"{cause} ({errno.errorcode.get(code, code)}){where}; {todo}."


def describe(exc: BaseException, workdir: str = "") -> Optional[str]:
  """One line for a storage fault (None if `exc` is not one)."""
  found = classify(exc)
  if found is None:
    return None
  code, path = found
  if not path and _FIRST and _FIRST[0][0] == code:  # the library named the path, not the error
    path = _FIRST[0][1]
  if not path and workdir:
    path = f"{workdir} (the run's workdir)"
  line = describe_found(code, path)
  if workdir:
    step = latest_checkpoint_step(workdir)
    if step is not None:
      line += (f" Checkpoints already in {workdir}/checkpoints are intact (latest complete: "
               f"step {step}).")
  return line


def one_line(exc: BaseException) -> str:
  """`Type: first line of the message` of an exception, with its storage cause if it has one."""
  text = str(exc).strip().splitlines()
  line = f"{type(exc).__name__}: {text[0][:400] if text else ''}"
  fault = describe(exc)
  return f"{fault} ({line})" if fault and fault not in line else line


_FIRST: list[tuple[int, str]] = []  # the first storage fault a library logged: (errno, path)


class LibraryFaults(logging.Filter):
  """ERROR records of one library (e.g. Orbax, whose background save threads each log the same
  failure with a traceback) become one short line: the first storage fault is logged as
  `<library> failed: <cause> at <path>`, repeats of it are dropped, other errors lose their
  traceback (the caller re-raises and reports the same error)."""

  def __init__(self, path_part: str, what: str):
    super().__init__()
    self.path_part, self.what = path_part, what

  def filter(self, record: logging.LogRecord) -> bool:
    if self.path_part not in record.pathname or record.levelno < logging.ERROR:
      return True
    exc = record.exc_info[1] if record.exc_info else None
    text = record.getMessage()
    found = classify(exc) if exc is not None else None
    found = found or classify(RuntimeError(text))
    if found is not None and not found[1]:  # e.g. "directory: /run/checkpoints/20" in the text
      found = (found[0], find_path(text))
    if found is not None:
      if _FIRST:
        return False
      _FIRST.append(found)
      msg = f"{self.what} failed: {describe_found(*found)}"
    else:
      msg = text.splitlines()[0][:400] if text else ""
      if exc is not None:
        msg += f": {one_line(exc)}"
    record.msg, record.args, record.exc_info, record.exc_text = msg, (), None, None
    return True


def install_thread_hook() -> None:
  """A failing background thread prints one line instead of a traceback; so do the callbacks
  that TensorStore runs on Orbax's event loop after a failed save closed it (they reach
  `sys.unraisablehook` as "Event loop is closed", once per pending write)."""
  previous = sys.unraisablehook

  def unraisablehook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
      return  # the aftermath of a failed background save, which is reported by itself
    previous(unraisable)

  sys.unraisablehook = unraisablehook

  def hook(args):
    if args.exc_type is SystemExit:
      return
    name = args.thread.name if args.thread is not None else "?"
    print(f"warning: background thread {name!r} failed: {one_line(args.exc_value)}",
          file=sys.stderr, flush=True)

  threading.excepthook = hook
