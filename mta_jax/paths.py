"""Where a path given on the command line or in a config points.

Every path the project accepts may be local (relative or absolute) or a URI that `etils.epath`
understands (`gs://bucket/run`, `s3://...`, `memory://...` in tests). Paths are resolved once,
at the edge (train.py, the Checkpointer), so nothing downstream depends on the process's working
directory: a relative local path becomes absolute, a URI is kept as it is. Orbax in particular
refuses relative checkpoint paths.
"""

import os
import re

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(path: str) -> bool:
  """True for `scheme://...` paths (cloud buckets, fsspec file systems)."""
  return bool(_URI.match(str(path)))


def resolve(path) -> str:
  """An absolute local path or the URI unchanged; '' stays '' (the setting is unset)."""
  path = os.fspath(path) if not isinstance(path, str) else path
  if not path or is_uri(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


# Config fields that hold paths: (dotted attribute path under TrainConfig).
CONFIG_PATH_FIELDS = ("data.path", "data.tokenizer", "data.tfds_data_dir",
                      "checkpoint.init_from", "checkpoint.export_dir")


def resolve_config_paths(cfg) -> None:
  """Makes every path field of a TrainConfig absolute (in place), so the resolved config that
  is saved with a run still points at the same files from any working directory."""
  for dotted in CONFIG_PATH_FIELDS:
    *parents, leaf = dotted.split(".")
    obj = cfg
    for p in parents:
      obj = getattr(obj, p)
    setattr(obj, leaf, resolve(getattr(obj, leaf)))
