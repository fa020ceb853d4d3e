"""Training and evaluation batches for every data source, and their global-array form.

Every source ends in the same row format (one dict of numpy arrays per row of length T):
  inputs, targets, segment_ids, positions: int32 [T];  loss_mask: float32 [T]
`targets[t]` is the token after `inputs[t]` inside the same document; `segment_ids` is 0 on
padding and 1, 2, ... for the documents of a packed row; `positions` restart at 0 for each
document; `loss_mask` is 1 where the target is scored.

Batches hold the rows of ONE process: `data.batch_size // process_count` rows (eval:
`data.eval_batch_size or data.batch_size`, divided the same way); `train_lib.to_global` turns
them into global jax.Arrays.
"""

from __future__ import annotations

from typing import Iterable, Optional

import grain
import jax
import numpy as np

from mta_jax.config import ConfigError, TrainConfig, per_process_rows
from mta_jax.data import text_pipeline, tokenizer
from mta_jax.data import toy as toy_lib
from mta_jax.data.rows import empty_row, eval_batch_rows, prefetch, read_options, stack_rows

SOURCES = ("toy", "synthetic", "tfds", "text")


# ---------------------------------------------------------------------------------------------
# Processes and batch sizes
# ---------------------------------------------------------------------------------------------


def _processes(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
  pc = jax.process_count() if process_count is None else int(process_count)
  pi = jax.process_index() if process_index is None else int(process_index)
  if pc < 1 or not 0 <= pi < pc:
    raise ValueError(f"process_index={pi} must be in 0..process_count-1 (process_count={pc}).")
  return pi, pc


def _eval_setting(cfg: TrainConfig) -> str:
  return "data.eval_batch_size" if cfg.data.eval_batch_size else "data.batch_size"


# ---------------------------------------------------------------------------------------------
# Synthetic source (throughput runs)
# ---------------------------------------------------------------------------------------------


class SyntheticDataSource(grain.sources.RandomAccessDataSource):
  """Uniform random tokens in [1, vocab): one full-length document per row, loss everywhere.

  Row i is a pure function of (seed, split, i). Length is effectively unbounded.
  """

  def __init__(self, vocab: int, seq_len: int, seed: int, split: int = 0,
               length: int = 2**40):
    if vocab < 2:
      raise ValueError(f"synthetic vocab size must be >= 2; got {vocab} "
                       "(data.synthetic_vocab_size or model.vocab_size).")
    self.vocab, self.seq_len, self.seed, self.split, self.n = vocab, seq_len, seed, split, length

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, 7919 + self.split, int(index)])
    t = self.seq_len
    tok = rng.integers(1, self.vocab, size=t + 1, dtype=np.int32)
    return {"inputs": tok[:-1], "targets": tok[1:], "segment_ids": np.ones(t, np.int32),
            "positions": np.arange(t, dtype=np.int32), "loss_mask": np.ones(t, np.float32)}


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


def vocab_size(cfg: TrainConfig) -> int:
  """Vocabulary size of the data: toy vocab, the sentencepiece model's size, or synthetic size."""
  d = cfg.data
  if d.source == "toy":
    return toy_lib.toy_vocab_size()
  if d.source == "synthetic":
    return d.synthetic_vocab_size or cfg.model.vocab_size
  if d.source in ("tfds", "text"):
    return tokenizer.vocab_size_of(d.tokenizer)
  raise ConfigError(f"data.source={d.source!r} is not allowed; choose one of {SOURCES}.")


def check_vocab(cfg: TrainConfig) -> None:
  """ConfigError naming model.vocab_size if the model cannot represent the data's tokens.

  Rule: model.vocab_size >= data vocab size. Larger is allowed (e.g. padded to a multiple of 128
  for fast, evenly sharded embedding matmuls); the extra ids never occur as inputs or targets.
  """
  v = vocab_size(cfg)
  if cfg.model.vocab_size < v:
    pad = -(-v // 128) * 128
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's "
                      f"vocabulary ({v} tokens, data.source={cfg.data.source!r}"
                      f"{', data.tokenizer=' + repr(cfg.data.tokenizer) if cfg.data.tokenizer else ''}"
                      f"); set model.vocab_size to {v} (or {pad}, padded to a multiple of 128).")


# ---------------------------------------------------------------------------------------------
# Training iterator
# ---------------------------------------------------------------------------------------------


def _map_train_rows(cfg: TrainConfig, pi: int, pc: int) -> grain.MapDataset:
  """Random-access sources: shuffle -> repeat -> per-process slice, as a MapDataset of rows.

  Slicing after shuffle+repeat means process p reads global rows p, p + pc, ...: the union of
  the processes' k-th batches is the same set of rows for any process count.
  """
  d = cfg.data
  if d.source == "toy":
    src = toy_lib.ToyDataSource(d.toy, d.seq_len, "train")
  else:
    src = SyntheticDataSource(vocab_size(cfg), d.seq_len, d.seed, split=0)
  ds = grain.MapDataset.source(src)
  if d.shuffle and d.source == "toy":  # synthetic rows are i.i.d. already
    ds = ds.shuffle(seed=d.seed)
  if len(ds) < 2**40:
    ds = ds.repeat()
  return ds[pi::pc]


def make_train_iterator(cfg: TrainConfig, *, process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> grain.DatasetIterator:
  """The infinite training iterator of this process.

  Yields dicts of numpy arrays with `data.batch_size // process_count` rows: `inputs`,
  `targets`, `segment_ids`, `positions` (int32 [b, T]) and `loss_mask` (float32 [b, T]).
  The iterator is a grain DatasetIterator: `it.get_state()` returns a small JSON-able state and
  `it.set_state(state)` on a freshly made iterator (same config and process) continues with
  exactly the next batch. Deterministic in `data.seed` (and `data.toy.seed` for the toy task).

  Args:
    cfg: the whole config; `cfg.data` selects the source.
    process_index, process_count: this process and the number of processes (default
      jax.process_index() / jax.process_count()); each process reads a disjoint share.
  """
  d = cfg.data
  pi, pc = _processes(process_index, process_count)
  b = per_process_rows(d.batch_size, pc, "data.batch_size")
  if d.source in ("toy", "synthetic"):
    ds = _map_train_rows(cfg, pi, pc).batch(b, drop_remainder=True, batch_fn=stack_rows)
    ids = ds.to_iter_dataset(read_options(d))
  elif d.source in ("tfds", "text"):
    ids = text_pipeline.train_rows(cfg, pi, pc).batch(b, drop_remainder=True,
                                                     batch_fn=stack_rows)
  else:
    raise ConfigError(f"data.source={d.source!r} is not allowed; choose one of {SOURCES}.")
  return iter(prefetch(ids, d))


# ---------------------------------------------------------------------------------------------
# Evaluation batches
# ---------------------------------------------------------------------------------------------


class _PaddedRows(grain.transforms.Map):
  """Index j -> source row j, or an all-zero row (loss_mask 0) for j >= len(source)."""

  def __init__(self, source, seq_len: int):
    self.source, self.seq_len = source, seq_len

  def map(self, j):
    j = int(j)
    return self.source[j] if j < len(self.source) else empty_row(self.seq_len)


def padded_eval_dataset(source, seq_len: int, global_rows: int, pi: int, pc: int,
                        rows: int) -> grain.MapDataset:
  """Batches of `rows` rows of this process over `source` exactly once, in order.

  The source is padded with empty rows to a multiple of the global eval batch so every process
  yields the same number of batches; process p takes rows p, p + pc, ...
  """
  n = len(source)
  padded = -(-n // global_rows) * global_rows
  ds = grain.MapDataset.range(padded).map(_PaddedRows(source, seq_len))
  return ds[pi::pc].batch(rows, drop_remainder=True, batch_fn=stack_rows)


def make_eval_batches(cfg: TrainConfig, *, process_index: Optional[int] = None,
                      process_count: Optional[int] = None) -> Iterable[dict[str, np.ndarray]]:
  """This process's evaluation batches: the eval split exactly once, unshuffled.

  Re-iterable (each `iter()` starts from the beginning). Batches have
  `(data.eval_batch_size or data.batch_size) // process_count` rows in the training format; the
  last batch is padded with empty rows (segment_ids 0, loss_mask 0), and all processes yield
  the same number of batches. Toy task: the fixed test set (`data.toy.n_test` samples).
  Synthetic: `max(1, eval_steps)` batches of fresh random rows. Real text: `data.eval_split`,
  packed like training but in file order.
  """
  d = cfg.data
  pi, pc = _processes(process_index, process_count)
  global_rows = eval_batch_rows(cfg)
  b = per_process_rows(global_rows, pc, _eval_setting(cfg))
  if d.source == "toy":
    src = toy_lib.ToyDataSource(d.toy, d.seq_len, "test")
    return padded_eval_dataset(src, d.seq_len, global_rows, pi, pc, b)
  if d.source == "synthetic":
    n = max(1, cfg.eval_steps) * global_rows
    src = SyntheticDataSource(vocab_size(cfg), d.seq_len, d.seed, split=1, length=n)
    return padded_eval_dataset(src, d.seq_len, global_rows, pi, pc, b)
  if d.source in ("tfds", "text"):
    return text_pipeline.eval_batches(cfg, pi, pc, b)
  raise ConfigError(f"data.source={d.source!r} is not allowed; choose one of {SOURCES}.")
