"""Real text: tokenize documents and pack them into rows with segment ids and positions.

Train:  source -> shuffle(data.seed) -> repeat -> process slice [p::count] -> tokenize
        (data.mixture: each dataset shuffled (data.seed + k) and repeated, then
        grain's MapDataset.mix by weight, then the process slice)
        -> (first_fit: split / reject long documents) -> pack -> row format
        -> (data.shuffle_window > 1: shuffle rows in windows of that many rows)

Long documents: `mta_jax.data.prepare` stores a document longer than --max_doc_chars as
consecutive pieces, which the document shuffle above mixes with the rest of the corpus (and
which bound what one read holds). For corpora prepared elsewhere, data.shuffle_window mixes the
rows of a long document with the rows around it.
Eval:   source (data.eval_split, file order) -> tokenize -> pack -> rows j with j % count == p

Per document, tokens = [BOS] + pieces + [EOS] (data.add_bos / data.add_eos) and the shift to
(inputs, targets) = (tokens[:-1], tokens[1:]) happens BEFORE packing. So every target is the
next token of the same document: no position ever predicts another document's first token, the
EOS is predicted by the last real token, and loss_mask is simply 1 on every real (segment > 0)
position and 0 on padding.

Packing uses grain's own transforms (grain.experimental):
- "concat" (ConcatThenSplitIterDataset): documents are concatenated and cut into rows of
  exactly data.seq_len; a document that does not fit is split, and each piece becomes its own
  segment with positions restarting at 0 (attention, RoPE and the MTA convolutions see a piece
  as a document of its own). No padding except at the very end of an eval split.
- "first_fit" (FirstFitPackIterDataset): whole documents are placed into data.pack_bins rows
  (0 -> the per-process batch size) by first fit, padding the rest. Documents longer than
  data.seq_len are cut into data.seq_len-sized pieces (data.long_docs="split") or rejected with
  an error naming the settings (data.long_docs="error").
"""

from __future__ import annotations

from typing import Iterator

import grain
import grain.experimental as gx
import numpy as np

from mta_jax.config import ConfigError, per_process_rows
from mta_jax.data import sources
from mta_jax.data.rows import empty_row, eval_batch_rows, prefetch, read_options, stack_rows
from mta_jax.data.tokenizer import Tokenizer

_FEATURES = ("inputs", "targets")


class Tokenize(grain.transforms.Map):
  """Text row -> {"inputs": tokens[:-1], "targets": tokens[1:]} (int32). Picklable: the
  sentencepiece model is loaded lazily in each process."""

  def __init__(self, tokenizer: Tokenizer, text_key: str):
    self.tokenizer, self.text_key = tokenizer, text_key

  def map(self, row):
    text = row[self.text_key]
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    ids = self.tokenizer.encode(text)
    return {"inputs": ids[:-1], "targets": ids[1:]}


class NonEmpty(grain.transforms.Filter):
  """Drops documents with no (input, target) pair (e.g. empty text without BOS/EOS)."""

  def filter(self, doc) -> bool:
    return len(doc["inputs"]) > 0


class SplitLongDocuments(gx.FlatMapTransform):
  """first_fit: a document longer than the row becomes row-sized pieces, or an error."""

  max_fan_out = 1 << 20  # not enforced by FlatMapIterDataset; pieces = ceil(len / seq_len)

  def __init__(self, seq_len: int, reject: bool):
    self.seq_len, self.reject = seq_len, reject

  def flat_map(self, doc):
    n = len(doc["inputs"])
    if n <= self.seq_len:
      return [doc]
    if self.reject:
      raise ValueError(f"a document has {n} tokens (after BOS/EOS and the one-token shift) but "
                       f"data.seq_len={self.seq_len} and data.long_docs='error' with "
                       "data.packing='first_fit'; set data.long_docs='split' (cut it into "
                       "row-sized pieces), use data.packing='concat', raise data.seq_len, or "
                       "remove long documents from the corpus.")
    return [{k: v[i:i + self.seq_len] for k, v in doc.items()}
            for i in range(0, n, self.seq_len)]


class ToRow(grain.transforms.Map):
  """Packed element -> the training row format (segment ids, positions, loss mask)."""

  def map(self, p):
    seg = np.asarray(p["inputs_segment_ids"], np.int32)
    return {"inputs": np.asarray(p["inputs"], np.int32),
            "targets": np.asarray(p["targets"], np.int32),
            "segment_ids": seg,
            "positions": np.asarray(p["inputs_positions"], np.int32),
            "loss_mask": (seg > 0).astype(np.float32)}


def make_tokenizer(cfg) -> Tokenizer:
  d = cfg.data
  return Tokenizer(d.tokenizer, add_bos=d.add_bos, add_eos=d.add_eos)


def pack(docs: grain.IterDataset, cfg, rows_per_batch: int, train: bool) -> grain.IterDataset:
  """Tokenized documents -> packed rows in the training format (see module docstring)."""
  d = cfg.data
  t = d.seq_len
  docs = docs.filter(NonEmpty())
  length = {k: t for k in _FEATURES}
  if d.packing == "concat":
    packed = gx.ConcatThenSplitIterDataset(docs, length_struct=length)
  elif d.packing == "first_fit":
    docs = gx.FlatMapIterDataset(docs, SplitLongDocuments(t, reject=d.long_docs == "error"))
    packed = gx.FirstFitPackIterDataset(docs, length_struct=length,
                                        num_packing_bins=d.pack_bins or rows_per_batch,
                                        seed=d.seed, shuffle_bins=train)
  else:
    raise ConfigError(f"data.packing={d.packing!r} is not allowed; choose 'concat' or "
                      "'first_fit'.")
  return packed.map(ToRow())


def train_documents(cfg, pi: int, pc: int, repeat: bool = True) -> grain.MapDataset:
  """This process's tokenized training documents (shuffled, repeated, sliced)."""
  d = cfg.data
  if d.mixture:  # each dataset shuffled and repeated, then interleaved by weight (by index)
    parts = sources.open_mixture(cfg, d.train_split, "data.train_split")
    ds = grain.MapDataset.mix([_shuffled(src, d, i, repeat) for i, (src, _) in enumerate(parts)],
                              [w for _, w in parts])
  else:
    ds = _shuffled(sources.open_source(cfg, d.train_split, "data.train_split"), d, 0, repeat)
  return ds[pi::pc].map(Tokenize(make_tokenizer(cfg), d.text_key))


def _shuffled(src, d, k: int, repeat: bool) -> grain.MapDataset:
  ds = grain.MapDataset.source(src)
  if d.shuffle:
    ds = ds.shuffle(seed=d.seed + k)
  return ds.repeat() if repeat else ds


def train_rows(cfg, pi: int, pc: int, repeat: bool = True) -> grain.IterDataset:
  b = per_process_rows(cfg.data.batch_size, pc, "data.batch_size")
  docs = train_documents(cfg, pi, pc, repeat).to_iter_dataset(read_options(cfg.data))
  rows = pack(docs, cfg, b, train=True)
  if cfg.data.shuffle_window > 1:  # grain restores the window exactly (refills it on resume)
    rows = gx.WindowShuffleIterDataset(rows, window_size=cfg.data.shuffle_window,
                                       seed=cfg.data.seed)
  return rows


class EvalBatches:
  """Re-iterable eval batches of one process (see `pipeline.make_eval_batches`).

  Every process tokenizes and packs the whole eval split in the same order and keeps rows
  j with j % process_count == process_index, so all processes agree on the number of batches
  without communicating; the last batch is padded with empty rows (loss_mask 0).
  """

  def __init__(self, cfg, pi: int, pc: int, rows: int):
    self.cfg, self.pi, self.pc, self.rows = cfg, pi, pc, rows
    self.global_rows = eval_batch_rows(cfg)
    d = cfg.data
    # Open eagerly so that a bad split, path or tokenizer fails here, not mid-training.
    self.source = sources.open_source(cfg, d.eval_split, "data.eval_split")
    self.tokenizer = make_tokenizer(cfg)

  def _rows(self) -> grain.IterDataset:
    d = self.cfg.data
    docs = grain.MapDataset.source(self.source).map(Tokenize(self.tokenizer, d.text_key))
    docs = docs.to_iter_dataset(read_options(d))
    return prefetch(pack(docs, self.cfg, self.global_rows, train=False), d)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    t = self.cfg.data.seq_len
    mine, j = [], 0
    for row in self._rows():
      if not row["segment_ids"].any():  # an unused first-fit bin
        continue
      if j % self.pc == self.pi:
        mine.append(row)
      j += 1
      if j % self.global_rows == 0:
        yield stack_rows(mine)
        mine = []
    if j % self.global_rows:
      yield stack_rows(mine + [empty_row(t)] * (self.rows - len(mine)))


def eval_batches(cfg, pi: int, pc: int, rows: int) -> EvalBatches:
  return EvalBatches(cfg, pi, pc, rows)
