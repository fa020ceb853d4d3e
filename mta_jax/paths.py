"""Where a path given on the command line or in a config points.

Every path the project accepts may be local (relative or absolute) or a URI that `etils.epath`
understands (`gs://bucket/run`, `s3://...`, `memory://...` in tests). Paths are resolved once,
at the edge (train.py, the Checkpointer), so nothing downstream depends on the process's working
directory: a relative local path becomes absolute, a URI is kept as it is. Orbax in particular
refuses relative checkpoint paths.

Experiment files: `configs_dir()` finds the shipped `configs/` (the checkout's, or the installed
package's `mta_jax/configs`), and `resolve_config_arg` lets `--config=configs/toy.py` name it
from any working directory.
"""

import importlib
import os
import re
import sys

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
  items = [item.strip().rpartition(":") for item in cfg.data.mixture.split(",")]
  if cfg.data.mixture and all(p and _is_float(w) for p, _, w in items):  # else: validate() says
    cfg.data.mixture = ",".join(f"{resolve(p)}:{w}" for p, _, w in items)


def _is_float(s: str) -> bool:
  try:
    float(s)
    return True
  except ValueError:
    return False


# ---------------------------------------------------------------------------------------------
# Experiment files (--config=...)
# ---------------------------------------------------------------------------------------------

_PKG = os.path.dirname(os.path.abspath(__file__))


def configs_dir() -> str:
  """The shipped experiment files: mta_jax/configs when installed, else the checkout's configs/."""
  for d in (os.path.join(_PKG, "configs"), os.path.join(os.path.dirname(_PKG), "configs")):
    if os.path.isfile(os.path.join(d, "toy.py")):
      return d
  raise FileNotFoundError(f"no configs/ directory next to or inside {_PKG}; reinstall mta_jax.")


def make_configs_importable(d: str) -> None:
  """`from configs import paper` inside experiment files, from any working directory."""
  if os.path.basename(os.path.dirname(d)) == "mta_jax":  # installed: alias the package copy
    sys.modules.setdefault("configs", importlib.import_module("mta_jax.configs"))
  elif os.path.dirname(d) not in sys.path:
    sys.path.insert(0, os.path.dirname(d))


def resolve_config_arg(argv: list[str], shipped: str) -> list[str]:
  """argv with a `--config=FILE[:arg]` that does not exist as given but names a shipped file
  (`configs/toy.py`, `toy.py`, `toy`) replaced by the shipped file's absolute path."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      value = a[len("--config="):]
    elif a == "--config" and i + 1 < len(out):
      value, i = out[i + 1], i + 1
    else:
      continue
    path, sep, arg = value.partition(":")
    if os.path.exists(path):
      continue
    name = os.path.basename(path)
    name = name if name.endswith(".py") else name + ".py"
    if os.path.dirname(path) in ("", "configs") and os.path.isfile(os.path.join(shipped, name)):
      new = os.path.join(shipped, name) + sep + arg
      out[i] = ("--config=" + new) if out[i].startswith("--config=") else new
  return out
