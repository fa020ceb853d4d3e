"""Random-access text sources: TFDS datasets in array_record format, and prepared corpora.

Both come back as TFDS `ArrayRecordDataSource`s (len / getitem, picklable) whose rows are dicts
with a bytes text feature. Nothing here downloads: an unprepared dataset is an error that says
how to prepare it.
"""

from __future__ import annotations

import os

import numpy as np

from mta_jax.config import ConfigError

_PREPARE_HINT = ("prepare it in array_record format, e.g. on a machine with TensorFlow: "
                 "`tfds build {name} --data_dir={data_dir} --file_format=array_record`")


def _tfds():
  import tensorflow_datasets as tfds
  return tfds


def _data_source(builder, split: str, split_setting: str, what: str):
  splits = list(builder.info.splits.keys())
  base = split.split("[")[0]
  if base not in splits:
    raise ConfigError(f"{split_setting}={split!r} is not a split of {what}; available: "
                      f"{splits}.")
  try:
    return builder.as_data_source(split=split)
  except ValueError as e:  # e.g. a bad slice such as 'train[:200%]'
    raise ConfigError(f"{split_setting}={split!r} cannot be read from {what}: {e}") from None


def open_tfds(name: str, split: str, data_dir: str = "", *, name_setting: str = "data.tfds_name",
              split_setting: str = "data.train_split",
              dir_setting: str = "data.tfds_data_dir"):
  """`split` of the TFDS dataset `name` (prepared in array_record format under `data_dir`)."""
  tfds = _tfds()
  if not name:
    raise ConfigError(f"{name_setting} is empty; name a TFDS dataset, e.g. 'lm1b'.")
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f"{name_setting}={name!r}: no such TFDS dataset (not registered, and not "
                      f"found prepared under {dir_setting}={data_dir or '(TFDS default)'!r}); "
                      "check the name, or point the data dir at where it was prepared.") from None
  where = builder.data_dir
  if not builder.is_prepared():
    raise ConfigError(f"{name_setting}={name!r} is not prepared under {dir_setting}="
                      f"{data_dir or '(TFDS default)'!r} (looked in {where}); "
                      + _PREPARE_HINT.format(name=name, data_dir=data_dir or "~/tensorflow_datasets")
                      + f", or set {dir_setting} to where it was prepared.")
  fmt = builder.info.file_format
  if fmt is None or getattr(fmt, "value", str(fmt)) != "array_record":
    raise ConfigError(f"{name_setting}={name!r} is prepared under {where} in the {fmt} format; "
                      "grain needs random access: " + _PREPARE_HINT.format(
                          name=name, data_dir=data_dir or "~/tensorflow_datasets")
                      + " (into another data dir, or delete the old files).")
  src = _data_source(builder, split, split_setting, f"TFDS dataset {name!r} ({where})")
  if data_dir:
    _check_local(data_dir, dir_setting)
  return src


def resolve_prepared_dir(path: str, setting: str = "data.path") -> str:
  """DATA_DIR/NAME/VERSION (the folder holding dataset_info.json) from that folder or its
  parent NAME folder (newest version). Local or remote (read through etils.epath)."""
  from mta_jax import storage
  if not path:
    raise ConfigError(f"{setting} is empty; give the directory written by "
                      "`python -m mta_jax.data.prepare`.")
  path = os.path.expanduser(path)
  d = storage.path(path)
  try:
    is_dir = d.is_dir()
    if is_dir and (d / "dataset_info.json").is_file():
      return path
    versions = [c.name for c in d.iterdir() if (c / "dataset_info.json").is_file()] \
        if is_dir else []
  except Exception as e:  # noqa: BLE001 - remote file systems raise many types
    raise ConfigError(f"{setting}={path!r} cannot be read ({type(e).__name__}: "
                      f"{storage.first_line(e)}); check the path, the bucket and your "
                      "credentials.") from None
  if not is_dir:
    what = "is a file, not a directory" if d.exists() else "no such directory"
    raise ConfigError(f"{setting}={path!r}: {what}; create it with "
                      "`python -m mta_jax.data.prepare --input=... --output=...`.")
  if not versions:
    raise ConfigError(f"{setting}={path!r} holds no prepared dataset (no dataset_info.json in "
                      "it or in a version folder below it); run `python -m mta_jax.data.prepare` "
                      "or fix the path.")
  def key(v):
    try:
      return tuple(int(x) for x in v.split("."))
    except ValueError:
      return (-1,)
  return os.path.join(path, max(versions, key=key))


def open_prepared(path: str, split: str, *, setting: str = "data.path",
                  split_setting: str = "data.train_split"):
  """`split` of a dataset written by `mta_jax.data.prepare` (or any prepared TFDS folder)."""
  tfds = _tfds()
  folder = resolve_prepared_dir(path, setting)
  try:
    builder = tfds.builder_from_directory(folder)
  except Exception as e:  # noqa: BLE001 - tfds raises several types for broken metadata
    raise ConfigError(f"{setting}={path!r}: cannot read the dataset metadata in {folder} "
                      f"({type(e).__name__}: {e}); prepare it again.") from None
  fmt = builder.info.file_format
  if fmt is None or getattr(fmt, "value", str(fmt)) != "array_record":
    raise ConfigError(f"{setting}={path!r} is in the {fmt} format; grain needs array_record "
                      "(prepare it again with `python -m mta_jax.data.prepare`).")
  src = _data_source(builder, split, split_setting, f"the dataset in {folder}")
  _check_local(path, setting)
  return src


def _check_local(path: str, setting: str) -> None:
  """ArrayRecord readers open local files only: a bucket is read through a gcsfuse mount."""
  from mta_jax import paths
  if paths.is_uri(path):
    raise ConfigError(f"{setting}={path!r}: the dataset's metadata reads fine, but grain's "
                      "ArrayRecord reader needs local files; mount the bucket with gcsfuse "
                      "(e.g. `gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`, see README) and "
                      f"set {setting} to the path under the mount.")


def check_text_key(source, text_key: str, setting: str = "data.text_key") -> None:
  if len(source) == 0:
    raise ConfigError("the split has no documents.")
  row = source[0]
  if text_key not in row:
    raise ConfigError(f"{setting}={text_key!r} is not a feature of the dataset; it has "
                      f"{sorted(row)}.")


class ConcatSource:
  """Several random-access sources one after the other (the eval split of a mixture)."""

  def __init__(self, sources):
    self.sources = list(sources)
    self.ends = np.cumsum([len(s) for s in self.sources])

  def __len__(self) -> int:
    return int(self.ends[-1]) if len(self.ends) else 0

  def __getitem__(self, i: int):
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(i)
    k = int(np.searchsorted(self.ends, i, side="right"))
    return self.sources[k][i - (int(self.ends[k - 1]) if k else 0)]


def open_mixture(cfg, split: str, split_setting: str) -> list[tuple[object, float]]:
  """[(source, normalised weight)] of `split` of every dataset in data.mixture."""
  from mta_jax.config import parse_mixture
  d = cfg.data
  out = []
  for path, weight in parse_mixture(d.mixture):
    src = open_prepared(path, split, setting="data.mixture", split_setting=split_setting)
    check_text_key(src, d.text_key)
    out.append((src, weight))
  return out


def open_source(cfg, split: str, split_setting: str):
  """The configured text source (data.source 'tfds' or 'text') for `split`; a mixture's
  datasets one after the other."""
  d = cfg.data
  if d.source == "tfds":
    src = open_tfds(d.tfds_name, split, d.tfds_data_dir, split_setting=split_setting)
  elif d.source == "text" and d.mixture:
    return ConcatSource(s for s, _ in open_mixture(cfg, split, split_setting))
  elif d.source == "text":
    src = open_prepared(d.path, split, split_setting=split_setting)
  else:
    raise ConfigError(f"data.source={d.source!r} is not a text source.")
  check_text_key(src, d.text_key)
  return src
