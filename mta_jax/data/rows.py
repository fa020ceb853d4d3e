"""The row format every data source ends in, and the grain settings all pipelines share.

One row is a dict of numpy arrays of length T:
  inputs, targets, segment_ids, positions: int32 [T];  loss_mask: float32 [T]
A batch stacks rows along a leading axis. This module imports nothing else of mta_jax.data, so
pipeline.py and text_pipeline.py can both use it.
"""

from __future__ import annotations

import grain
import numpy as np

ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
  """A padding row: all zeros, loss_mask 0 (pads the last eval batch; also the toy row start)."""
  return {k: np.zeros(seq_len, np.float32 if k == "loss_mask" else np.int32) for k in ROW_KEYS}


def stack_rows(rows) -> dict[str, np.ndarray]:
  """A list of row dicts -> a batch dict of stacked arrays (module level: picklable)."""
  return {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}


def eval_batch_rows(cfg) -> int:
  """Global rows of one eval batch: data.eval_batch_size, or data.batch_size when it is 0."""
  return cfg.data.eval_batch_size or cfg.data.batch_size


def read_options(d) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=8, prefetch_buffer_size=max(1, d.prefetch) * 8)


def prefetch(ds: grain.IterDataset, d) -> grain.IterDataset:
  """Worker processes (data.workers > 0) that prefetch data.prefetch elements each."""
  if d.workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside an absl app mark them
      flags.FLAGS.mark_as_parsed()   # parsed (defaults), as train.py's absl.app would
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.workers,
                                                     per_worker_buffer_size=max(1, d.prefetch)))
  return ds
