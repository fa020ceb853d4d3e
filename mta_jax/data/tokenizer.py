"""SentencePiece: train a model on your corpus, and load it lazily inside grain workers.

Train (reads the train split of a prepared dataset, or of any TFDS array_record dataset):

  python -m mta_jax.data.tokenizer --data=DATA_DIR/my_corpus --output=TOK_DIR/my_sp \
      --vocab_size=8000 [--model_type=unigram] [--byte_fallback]

writes TOK_DIR/my_sp.model (+ .vocab). Models trained here reserve pad=0, unk=1, bos=2, eos=3.
Any other sentencepiece model works too (its bos/eos ids are read from the model; set
data.add_bos / data.add_eos to False if it has none).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Iterator, Optional

import numpy as np

from mta_jax.config import ConfigError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def _check_model_path(path: str, setting: str = "data.tokenizer") -> str:
  if not path:
    raise ConfigError(f"{setting} is empty; give the path of a sentencepiece .model file "
                      "(train one with `python -m mta_jax.data.tokenizer --help`).")
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise ConfigError(f"{setting}={path!r}: no such file; train a tokenizer with "
                      "`python -m mta_jax.data.tokenizer --data=... --output=...` or fix "
                      "the path.")
  return path


@functools.lru_cache(maxsize=8)
def _load(path: str):
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor()
  try:
    sp.Load(path)
  except (OSError, RuntimeError) as e:
    raise ConfigError(f"data.tokenizer={path!r} is not a readable sentencepiece model "
                      f"({e}).") from None
  return sp


def load(path: str, setting: str = "data.tokenizer"):
  """The sentencepiece processor of `path` (cached per process); ConfigError if missing."""
  return _load(_check_model_path(path, setting))


def vocab_size_of(path: str) -> int:
  return int(load(path).GetPieceSize())


class Tokenizer:
  """Picklable tokenizer handle: only the path travels to grain workers; each process loads the
  model on first use."""

  def __init__(self, path: str, add_bos: bool = True, add_eos: bool = True):
    self.path = _check_model_path(path)
    self.add_bos, self.add_eos = add_bos, add_eos
    sp = load(self.path)
    self.bos_id, self.eos_id = int(sp.bos_id()), int(sp.eos_id())
    self.vocab_size = int(sp.GetPieceSize())
    if add_bos and self.bos_id < 0:
      raise ConfigError(f"data.tokenizer={path!r} has no BOS piece; set data.add_bos=False.")
    if add_eos and self.eos_id < 0:
      raise ConfigError(f"data.tokenizer={path!r} has no EOS piece; set data.add_eos=False.")

  def __getstate__(self):
    return dict(self.__dict__)  # no processor object inside: loaded lazily via `load`

  def encode(self, text: str) -> np.ndarray:
    """One document -> int32 ids, with BOS / EOS as configured."""
    ids = load(self.path).EncodeAsIds(text)
    if self.add_bos:
      ids = [self.bos_id] + ids
    if self.add_eos:
      ids = ids + [self.eos_id]
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids) -> str:
    keep = [int(i) for i in np.asarray(ids).reshape(-1) if i not in (self.bos_id, self.eos_id)]
    return load(self.path).DecodeIds(keep)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


MAX_SENTENCE_BYTES = 1 << 16  # sentencepiece's max_sentence_length: longer lines are dropped


class LineStats:
  """Lines handed to sentencepiece, and the over-long ones cut to fit its limit."""

  def __init__(self):
    self.lines, self.cut_lines, self.cut_pieces, self.longest = 0, 0, 0, 0

  def summary(self) -> str:
    if not self.cut_lines:
      return ""
    return (f"cut {self.cut_lines:,} line(s) longer than {MAX_SENTENCE_BYTES:,} bytes (the longest "
            f"{self.longest:,}) into {self.cut_pieces:,} pieces: sentencepiece drops longer "
            "sentences; nothing was dropped")


def _fit(line: str, stats: LineStats) -> Iterator[str]:
  """`line`, or pieces of it of at most MAX_SENTENCE_BYTES UTF-8 bytes cut at spaces."""
  size = len(line.encode("utf-8"))
  if size <= MAX_SENTENCE_BYTES:
    yield line
    return
  stats.cut_lines += 1
  stats.longest = max(stats.longest, size)
  limit = MAX_SENTENCE_BYTES // 4  # characters: at most 4 UTF-8 bytes each
  start = 0
  while start < len(line):
    end = min(len(line), start + limit)
    if end < len(line):
      space = line.rfind(" ", start + limit // 2, end)
      end = space + 1 if space >= 0 else end
    piece = line[start:end].strip()
    start = end
    if piece:
      stats.cut_pieces += 1
      yield piece


def _lines(source, text_key: str, max_docs: int, stats: Optional[LineStats] = None,
           every: float = 5.0) -> Iterator[str]:
  """Non-empty lines of the first `max_docs` documents (sentencepiece trains on sentences);
  lines over sentencepiece's length limit are cut into pieces that fit (counted in `stats`)."""
  stats = stats if stats is not None else LineStats()
  n = len(source) if max_docs <= 0 else min(len(source), max_docs)
  t0 = last = time.time()
  for i in range(n):
    text = source[i][text_key]
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    for line in text.split("\n"):
      line = line.strip()
      if line:
        for piece in _fit(line, stats):
          stats.lines += 1
          yield piece
    if time.time() - last > every:
      last = time.time()
      print(f"  read {i + 1}/{n} documents ({(i + 1) / (last - t0):.0f}/s)", flush=True)


def train(source, output_prefix: str, *, vocab_size: int = 8000, model_type: str = "unigram",
          byte_fallback: bool = False, character_coverage: float = 0.9995,
          text_key: str = "text", max_docs: int = 0, max_sentences: int = 2_000_000,
          seed_sentencepiece_size: int = 1_000_000, quiet: bool = False) -> str:
  """Trains a sentencepiece model on `source` (random access, rows with `text_key`).

  Returns the path of the .model file. Ids: pad=0, unk=1, bos=2, eos=3. Lines longer than
  sentencepiece accepts are cut into pieces (and the command says how many).
  """
  import sentencepiece as spm
  if len(source) == 0:
    raise ValueError("the tokenizer's training data has no documents.")
  out_dir = os.path.dirname(os.path.abspath(output_prefix))
  os.makedirs(out_dir, exist_ok=True)
  stats = LineStats()
  try:
    spm.SentencePieceTrainer.Train(
        sentence_iterator=_lines(source, text_key, max_docs, stats),
        model_prefix=output_prefix, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=byte_fallback, character_coverage=character_coverage,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size, max_sentence_length=MAX_SENTENCE_BYTES,
        minloglevel=2 if quiet else 0,
        num_threads=max(1, os.cpu_count() or 1))
  except RuntimeError as e:  # sentencepiece's own checks, e.g. "[!sentences_.empty()]"
    raise ValueError(f"sentencepiece could not train on {stats.lines:,} line(s) of text "
                     f"(field {text_key!r}): {str(e).strip().splitlines()[-1][:300].rstrip('.')}. "
                     + ("Give it more text, or a smaller --vocab_size." if stats.lines
                        else "The documents hold no non-empty lines.")) from None
  finally:
    if stats.cut_lines:
      print(f"  {stats.summary()}", flush=True)
  return output_prefix + ".model"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m mta_jax.data.tokenizer",
      description="Train a sentencepiece tokenizer on the train split of a prepared dataset "
                  "(python -m mta_jax.data.prepare) or of a TFDS array_record dataset.")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--data", help="dataset directory written by mta_jax.data.prepare "
                                  "(DATA_DIR/NAME or DATA_DIR/NAME/VERSION)")
  src.add_argument("--tfds_name", help="a TFDS dataset prepared in array_record format")
  p.add_argument("--tfds_data_dir", default="", help="TFDS data_dir ('' = TFDS default)")
  p.add_argument("--split", default="train", help="split to train on (default: train)")
  p.add_argument("--text_key", default="text", help="text feature (default: text)")
  p.add_argument("--output", required=True,
                 help="output prefix: writes OUTPUT.model and OUTPUT.vocab")
  p.add_argument("--vocab_size", type=int, default=8000)
  p.add_argument("--model_type", default="unigram", choices=("unigram", "bpe", "char", "word"))
  p.add_argument("--byte_fallback", action="store_true",
                 help="unknown characters become UTF-8 byte pieces instead of <unk>")
  p.add_argument("--character_coverage", type=float, default=0.9995)
  p.add_argument("--max_docs", type=int, default=0, help="read at most this many documents "
                                                          "(0 = all)")
  p.add_argument("--max_sentences", type=int, default=2_000_000,
                 help="sentencepiece input_sentence_size: lines sampled for training")
  p.add_argument("--quiet", action="store_true", help="hide sentencepiece's progress log")
  return p


def main(argv: Optional[list[str]] = None) -> int:
  args = _parser().parse_args(argv)
  from mta_jax.data import sources
  try:
    if args.data:
      src = sources.open_prepared(args.data, args.split, setting="--data",
                                  split_setting="--split")
    else:
      src = sources.open_tfds(args.tfds_name, args.split, args.tfds_data_dir,
                              name_setting="--tfds_name", split_setting="--split",
                              dir_setting="--tfds_data_dir")
    sources.check_text_key(src, args.text_key, setting="--text_key")
    print(f"training a {args.model_type} sentencepiece model, vocab {args.vocab_size}, on "
          f"{len(src)} documents ...", flush=True)
    path = train(src, args.output, vocab_size=args.vocab_size, model_type=args.model_type,
                 byte_fallback=args.byte_fallback, character_coverage=args.character_coverage,
                 text_key=args.text_key, max_docs=args.max_docs,
                 max_sentences=args.max_sentences, quiet=args.quiet)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path} (vocab size {vocab_size_of(path)}); use it with "
        f"--config.data.tokenizer={path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
