"""Checksums of training checkpoints: written with each checkpoint, checked before a restore.

    <workdir>/checkpoints/<step>/checksums.json
        {"format": "mta_jax.checksums", "version": 1, "algorithm": "sha256",
         "files": {"params/d/4f0c...": "9b1e...", "meta/metadata": "...", ...}}

Orbax stores arrays through TensorStore without a checksum of the data (a flipped byte in a
params data file restores without a word), so every file of a finished checkpoint gets a
sha256 here, computed after Orbax has finalised it (in its background thread for async saves).
A checkpoint whose files do not match is `CorruptCheckpointError`; the checkpointer then falls
back to the previous one. A checkpoint without checksums.json (written by an older version, or
by a run killed between finalising and hashing) restores with a warning that it is unverified.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

from etils import epath

CHECKSUMS = "checksums.json"
FORMAT = "mta_jax.checksums"
VERSION = 1
_CHUNK = 1 << 22
# Orbax's own markers and step metadata (commit timestamps), rewritten after the files are
# finalised: not part of the data (a damaged one fails Orbax's own read).
_NOT_HASHED = frozenset({"commit_success.txt", "_CHECKPOINT_METADATA"})


class CorruptCheckpointError(RuntimeError):
  """A checkpoint's files do not match their checksums; the message lists them."""


def _sha256(path: epath.Path) -> str:
  h = hashlib.sha256()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def _files(step_dir: epath.Path) -> dict[str, epath.Path]:
  out = {}
  stack = [step_dir]
  while stack:
    d = stack.pop()
    for p in d.iterdir():
      if p.is_dir():
        stack.append(p)
      else:
        rel = str(p)[len(str(step_dir)) + 1:]
        if rel != CHECKSUMS and p.name not in _NOT_HASHED:
          out[rel] = p
  return out


def write(step_dir) -> dict[str, str]:
  """Hash every file of a finished checkpoint directory into its checksums.json."""
  step_dir = epath.Path(step_dir)
  hashes = {rel: _sha256(p) for rel, p in sorted(_files(step_dir).items())}
  record = {"format": FORMAT, "version": VERSION, "algorithm": "sha256", "files": hashes}
  tmp = step_dir / (CHECKSUMS + ".tmp")
  tmp.write_text(json.dumps(record, indent=1))
  tmp.replace(step_dir / CHECKSUMS)
  return hashes


def has_checksums(step_dir) -> bool:
  return (epath.Path(step_dir) / CHECKSUMS).exists()


def verify(step_dir) -> Optional[int]:
  """Check a checkpoint directory against its checksums.json.

  Returns the number of files verified, or None when it has no checksums.json.
  Raises CorruptCheckpointError naming every missing, changed or unreadable file (and a
  malformed checksums.json).
  """
  step_dir = epath.Path(step_dir)
  path = step_dir / CHECKSUMS
  if not path.exists():
    return None
  try:
    record = json.loads(path.read_text())
    files = record["files"]
    if record.get("format") != FORMAT or not isinstance(files, dict) or not files:
      raise ValueError("not a checksum list")
  except (ValueError, KeyError, TypeError) as e:
    raise CorruptCheckpointError(f"{path} is malformed ({e}).") from None
  present = _files(step_dir)
  problems = []
  for rel, want in sorted(files.items()):
    p = present.get(rel)
    if p is None:
      problems.append(f"{rel}: missing")
      continue
    try:
      got = _sha256(p)
    except OSError as e:
      problems.append(f"{rel}: unreadable ({e})")
      continue
    if got != want:
      problems.append(f"{rel}: sha256 {got[:12]}..., expected {want[:12]}...")
  if problems:
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5
                                       else "")
    raise CorruptCheckpointError(f"checkpoint {step_dir} does not match its checksums: "
                                 f"{shown}.")
  return len(files)
