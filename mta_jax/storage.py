"""Files on local disk or in a bucket: every path the project writes or reads goes through
`etils.epath`, so `gs://`, `s3://` (and any scheme epath supports) work wherever a path is
accepted.

Object stores cannot append to a file, and some writers (tensorboardX, the JAX profiler) only
write to local disk. So:
  AppendFile      appends locally; for a remote path it keeps the lines and rewrites the object
                  at most every `every` seconds and at close (metrics.jsonl)
  LocalMirror     a local directory whose files are copied to the remote one on `sync()`
                  (TensorBoard event files, profiler traces); for a local target it is the
                  target itself
Orbax (checkpoints) and tensorstore speak gs:// natively; ArrayRecord readers need local files
(mount a bucket with gcsfuse, see README).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time

from etils import epath

from mta_jax import paths


def path(p) -> epath.Path:
  return epath.Path(paths.resolve(os.fspath(p)))


def is_remote(p) -> bool:
  return paths.is_uri(os.fspath(p))


def check_dir(p, setting: str, *, create: bool = False) -> epath.Path:
  """The directory `p` (created if `create`); ConfigError naming `setting` if it is a file or
  the storage cannot be reached (no credentials, no such bucket, no gcsfs installed ...)."""
  from mta_jax.config import ConfigError
  d = path(p)
  try:
    if d.exists() and not d.is_dir():
      raise ConfigError(f"{setting}={os.fspath(p)!r} is a file, not a directory; choose a "
                        "directory (it is created if missing).")
    if create:
      d.mkdir(parents=True, exist_ok=True)
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 - each file system raises its own types
    raise ConfigError(f"{setting}={os.fspath(p)!r} cannot be {'written' if create else 'reached'}"
                      f" ({type(e).__name__}: {first_line(e)}); check the path, that the bucket "
                      "exists and your credentials (gs:// needs the gcsfs package: "
                      "pip install gcsfs).") from None
  return d


def ensure_dir(p, setting: str) -> epath.Path:
  """`check_dir` and create it."""
  return check_dir(p, setting, create=True)


def first_line(e: Exception) -> str:
  """The first line of an exception's message, at most 200 characters."""
  return (str(e).strip().splitlines() or [""])[0][:200]


def save_figure(fig, target) -> str:
  """A matplotlib figure as a PNG at `target` (local or remote); returns the path as given."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  t = path(target)
  t.parent.mkdir(parents=True, exist_ok=True)
  t.write_bytes(buf.getvalue())
  return os.fspath(target)


class AppendFile:
  """A text file that grows by lines: metrics.jsonl. See the module docstring."""

  def __init__(self, target, every: float = 30.0):
    self.target = path(target)
    self.remote = is_remote(target)
    self.every = every
    if self.remote:
      self._text = self.target.read_text() if self.target.exists() else ""
      self._dirty, self._last = False, 0.0
    else:
      self.target.parent.mkdir(parents=True, exist_ok=True)
      self._f = open(self.target, "a")

  def write(self, line: str) -> None:
    if not self.remote:
      self._f.write(line)
      self._f.flush()
      return
    self._text += line
    self._dirty = True
    if time.time() - self._last >= self.every:
      self.flush()

  def flush(self) -> None:
    if self.remote and self._dirty:
      self.target.write_text(self._text)
      self._dirty, self._last = False, time.time()

  def close(self) -> None:
    if self.remote:
      self.flush()
    else:
      self._f.close()


class LocalMirror:
  """`local`: a directory to hand to writers that need local disk; `sync()` copies its new or
  grown files to `target` (remote). For a local target, `local` is the target itself."""

  def __init__(self, target):
    self.target = path(target)
    self.remote = is_remote(target)
    if self.remote:
      self.local = tempfile.mkdtemp(prefix="mta_jax_mirror_")
      self._sizes: dict[str, int] = {}
    else:
      self.target.mkdir(parents=True, exist_ok=True)
      self.local = os.fspath(self.target)

  def sync(self) -> None:
    if not self.remote:
      return
    for root, _, files in os.walk(self.local):
      for name in files:
        full = os.path.join(root, name)
        rel = os.path.relpath(full, self.local)
        size = os.path.getsize(full)
        if self._sizes.get(rel) != size:
          dst = self.target / rel
          dst.parent.mkdir(parents=True, exist_ok=True)
          with open(full, "rb") as f:
            dst.write_bytes(f.read())
          self._sizes[rel] = size

  def close(self) -> None:
    self.sync()
    if self.remote:
      shutil.rmtree(self.local, ignore_errors=True)
