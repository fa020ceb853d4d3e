"""Turn text corpora into a TFDS-compatible array_record dataset (no TensorFlow).

  python -m mta_jax.data.prepare --input='corpus/*.jsonl.zst' --output=DATA_DIR --name=my_corpus \
      [--txt_doc=line|file] [--text_key=text] [--validation_fraction=0.01] [--workers=8]

writes DATA_DIR/my_corpus/1.0.0/ with dataset_info.json, features.json and
my_corpus-{train,validation}.array_record-* files (one feature, 'text'). The result loads with
`tfds.builder_from_directory(DATA_DIR/my_corpus/1.0.0)` or
`tfds.data_source('my_corpus', data_dir=DATA_DIR)`; train on it with `data.source='text'`,
`data.path=DATA_DIR/my_corpus` (or `data.source='tfds'`, `data.tfds_name='my_corpus'`,
`data.tfds_data_dir=DATA_DIR`), or mix several with `data.mixture`.

Inputs: .txt files give one document per non-empty line (`--txt_doc=line`) or one per file
(`--txt_doc=file`); .jsonl files give one document per line, the string in field `--text_key`;
either may be compressed (.gz, .zst: SlimPajama's `*.jsonl.zst` chunks). A directory saved by
Hugging Face `datasets` (`save_to_disk`) gives one document per row (`--hf_split` of a
DatasetDict). Whitespace-only documents are skipped. A document longer than `--max_doc_chars`
characters (default 16,384) becomes consecutive pieces of at most that length, cut at line (else
word) boundaries: the training shuffle then mixes pieces of a long document with the rest of the
corpus instead of filling many consecutive batches with it, and no record is larger than the
limit, so reading and tokenizing stay bounded however long the input lines are (the command
says how many documents it split). Documents go to the validation split by a seeded random
choice of `--validation_fraction` of them (at least one when the fraction is > 0), the rest to
train; both splits keep the input order (the training pipeline shuffles).

Scale: inputs are streamed (never held in memory as a whole). `--workers=N` reads and parses
files (and ranges of rows of a `datasets` directory) in N processes, in order, with at most 2N
pieces in flight; a progress bar shows files and documents.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import threading
import types
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
from absl import flags

from mta_jax import cli


class PrepareError(ValueError):
  """Bad input to the prepare command; the message names the path or option."""


TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
SUFFIXES = tuple(s + c for s in TEXT_SUFFIXES + JSONL_SUFFIXES for c in ("",) + COMPRESSED_SUFFIXES)
HF_ROWS_PER_PIECE = 50_000  # rows of a `datasets` directory one worker reads at a time


def _plain_name(path: str) -> str:
  """The file name without its compression suffix ('a.jsonl.zst' -> 'a.jsonl')."""
  for c in COMPRESSED_SUFFIXES:
    if path.endswith(c):
      return path[:-len(c)]
  return path


def is_hf_dataset_dir(path: str) -> bool:
  """A directory written by `datasets.Dataset(Dict).save_to_disk`."""
  return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(
      os.path.join(path, "dataset_dict.json"))


def expand_inputs(patterns: Sequence[str]) -> list[str]:
  """Files and `datasets` directories from paths, globs and directories (searched recursively
  for .txt / .jsonl files, optionally .gz / .zst compressed)."""
  files = []
  for pat in patterns:
    pat = os.path.expanduser(pat)
    if os.path.isdir(pat) and is_hf_dataset_dir(pat):
      files.append(pat)
    elif os.path.isdir(pat):
      found = sorted(f for f in glob.glob(os.path.join(pat, "**", "*"), recursive=True)
                     if f.endswith(SUFFIXES) and os.path.isfile(f))
      if not found:
        raise PrepareError(f"--input {pat!r} is a directory without .txt / .jsonl files "
                           "(plain, .gz or .zst) and not a Hugging Face `datasets` directory.")
      files += found
    elif any(c in pat for c in "*?["):
      found = sorted(f for f in glob.glob(pat, recursive=True)
                     if os.path.isfile(f) or is_hf_dataset_dir(f))
      if not found:
        raise PrepareError(f"--input {pat!r} matches no files.")
      files += found
    elif not os.path.isfile(pat):
      raise PrepareError(f"--input {pat!r}: no such file.")
    else:
      files.append(pat)
  return files


def _open_text(path: str):
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8", errors="strict")
  if path.endswith((".zst", ".zstd")):
    import zstandard
    raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
  return open(path, encoding="utf-8", errors="strict")


DEFAULT_MAX_DOC_CHARS = 16_384


class SplitStats:
  """How many documents were longer than the limit and how many pieces they became."""

  def __init__(self):
    self.split_docs, self.pieces, self.longest = 0, 0, 0

  def summary(self, limit: int) -> str:
    if not self.split_docs:
      return ""
    return (f"split {self.split_docs:,} document(s) longer than {limit:,} characters (the "
            f"longest {self.longest:,}) into {self.pieces:,} pieces of at most {limit:,} "
            "(--max_doc_chars); nothing was dropped")

  def add(self, other: "SplitStats") -> None:
    self.split_docs += other.split_docs
    self.pieces += other.pieces
    self.longest = max(self.longest, other.longest)


def _cut(text: str, limit: int) -> int:
  """Where to end a piece of `text` (len > limit): after the last newline, else the last
  space, in the second half of the first `limit` characters; else at `limit`."""
  window = text[:limit]
  for sep in ("\n", " ", "\t"):
    i = window.rfind(sep, limit // 2)
    if i >= 0:
      return i + 1
  return limit


def split_pieces(chunks: Iterable[str], limit: int, stats: Optional[SplitStats] = None
                 ) -> Iterator[str]:
  """The text given as consecutive `chunks` as pieces of at most `limit` characters, cut at
  line (else word) boundaries; whitespace-only pieces are skipped. Holds at most ~2 x limit
  characters plus one chunk, however long the text (limit 0: one piece, unbounded)."""
  buf, n_pieces, total = "", 0, 0
  for chunk in chunks:
    buf += chunk
    total += len(chunk)
    while limit and len(buf) > limit:
      cut = _cut(buf, limit)
      piece, buf = buf[:cut].strip("\n"), buf[cut:]
      if piece.strip():
        n_pieces += 1
        yield piece
  piece = buf.strip("\n")
  if piece.strip():
    n_pieces += 1
    yield piece
  if stats is not None and n_pieces > 1:
    stats.split_docs += 1
    stats.pieces += n_pieces
    stats.longest = max(stats.longest, total)


def _line_chunks(f, first: str, limit: int) -> Iterator[str]:
  """The rest of the line that starts with `first`, read `limit` characters at a time."""
  chunk = first
  while True:
    yield chunk.rstrip("\n") if chunk.endswith("\n") else chunk
    if chunk.endswith("\n") or not chunk:
      return
    chunk = f.readline(limit or -1)


def _file_chunks(f, limit: int) -> Iterator[str]:
  while True:
    chunk = f.read(limit or -1)
    if not chunk:
      return
    yield chunk


def _jsonl_text(path: str, lineno: int, line: str, text_key: str) -> str:
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise PrepareError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line of a "
                       ".jsonl file must be one JSON object.") from None
  if not isinstance(obj, dict) or text_key not in obj:
    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise PrepareError(f"{path}:{lineno}: no field --text_key={text_key!r} (has "
                       f"{keys}); set --text_key to the field holding the text.")
  text = obj[text_key]
  if not isinstance(text, str):
    raise PrepareError(f"{path}:{lineno}: field {text_key!r} is a "
                       f"{type(text).__name__}, not a string.")
  return text


def _file_documents(path: str, txt_doc: str, text_key: str, limit: int,
                    stats: Optional[SplitStats]) -> Iterator[str]:
  """Documents (or pieces of them, see `split_pieces`) of one file. Text is read `limit`
  characters at a time, so a single 50 MB line never sits in memory whole; a .jsonl line is
  parsed whole (JSON cannot be parsed in pieces)."""
  if os.path.getsize(path) == 0:
    print(f"  warning: {path} is empty; skipped", file=sys.stderr)
    return
  is_jsonl = _plain_name(path).endswith(JSONL_SUFFIXES)
  try:
    with _open_text(path) as f:
      if not is_jsonl and txt_doc == "file":
        yield from split_pieces(_file_chunks(f, limit), limit, stats)
        return
      lineno = 0
      while True:
        line = f.readline(limit or -1) if not is_jsonl else f.readline()
        if not line:
          break
        lineno += 1
        if not is_jsonl:
          yield from split_pieces(_line_chunks(f, line, limit), limit, stats)
        elif line.strip():
          yield from split_pieces([_jsonl_text(path, lineno, line, text_key)], limit, stats)
  except UnicodeDecodeError as e:
    raise PrepareError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
    raise PrepareError(f"{path}: cannot be read ({type(e).__name__}: {e}).") from None
  except Exception as e:  # noqa: BLE001 - zstandard.ZstdError and friends
    if type(e).__module__.startswith("zstandard"):
      raise PrepareError(f"{path}: not a valid zstd file ({e}).") from None
    raise


def _hf_dataset(path: str, split: str, text_key: str):
  try:
    import datasets
  except ImportError:
    raise PrepareError(f"--input {path!r} is a Hugging Face `datasets` directory; install the "
                       "datasets package (`pip install datasets`) to read it.") from None
  ds = datasets.load_from_disk(path)  # memory-mapped Arrow files: nothing is loaded up front
  if isinstance(ds, datasets.DatasetDict):
    if split not in ds:
      raise PrepareError(f"--hf_split={split!r} is not a split of {path} (has {sorted(ds)}).")
    ds = ds[split]
  if text_key not in ds.column_names:
    raise PrepareError(f"{path}: no column --text_key={text_key!r} (has {ds.column_names}); "
                       "set --text_key to the column holding the text.")
  return ds.select_columns([text_key])


def _hf_documents(path: str, split: str, text_key: str, start: int = 0,
                  stop: Optional[int] = None, limit: int = 0,
                  stats: Optional[SplitStats] = None) -> Iterator[str]:
  ds = _hf_dataset(path, split, text_key)
  stop = len(ds) if stop is None else min(stop, len(ds))
  for i in range(start, stop, 1000):
    for text in ds[i:min(i + 1000, stop)][text_key]:
      if isinstance(text, str) and text.strip():
        yield from split_pieces([text], limit, stats)


def _pieces(files: Sequence[str], hf_split: str, text_key: str) -> list[tuple]:
  """Units of work, in order: (file,) or (datasets dir, start row, stop row)."""
  out = []
  for f in files:
    if os.path.isdir(f):
      n = len(_hf_dataset(f, hf_split, text_key))
      out += [(f, i, i + HF_ROWS_PER_PIECE) for i in range(0, n, HF_ROWS_PER_PIECE)]
    else:
      out.append((f,))
  return out


def _piece_documents(piece: tuple, txt_doc: str, text_key: str, hf_split: str, limit: int,
                     stats: Optional[SplitStats]) -> Iterator[str]:
  if len(piece) == 1:
    return _file_documents(piece[0], txt_doc, text_key, limit, stats)
  return _hf_documents(piece[0], hf_split, text_key, piece[1], piece[2], limit, stats)


def _read_piece(args) -> tuple[list[str], SplitStats]:
  """Worker: every document (piece) of one unit of work and how many documents it split
  (module level: picklable)."""
  stats = SplitStats()
  return list(_piece_documents(*args, stats)), stats


def worker_pool(workers: int):
  """A process pool for `iter_documents`, or None for workers <= 1. Made before anything starts
  threads (prepare makes it first), it forks: workers start at once and inherit the imports;
  in a process that already has other threads it spawns (forking those can deadlock)."""
  if workers <= 1:
    return None
  single = threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods()
  return multiprocessing.get_context("fork" if single else "spawn").Pool(workers)


def iter_documents(files: Sequence[str], *, txt_doc: str = "line", text_key: str = "text",
                   hf_split: str = "train", pool=None, workers: int = 0,
                   max_doc_chars: int = DEFAULT_MAX_DOC_CHARS,
                   stats: Optional[SplitStats] = None) -> Iterator[str]:
  """Non-empty documents of `files` (and `datasets` directories), in order; parsed in the
  `workers` processes of `pool` (see `worker_pool`) when given. A document longer than
  `max_doc_chars` comes out as consecutive pieces of at most that length (0: no limit), counted
  in `stats`."""
  pieces = _pieces(files, hf_split, text_key)
  limit = max_doc_chars
  if pool is None:
    for piece in pieces:
      yield from _piece_documents(piece, txt_doc, text_key, hf_split, limit, stats)
    return
  # Ordered, with at most 2 pieces per worker in flight (Pool.imap would read ahead without
  # bound when the consumer, the dataset writer, is slower than the readers).
  in_flight = 2 * max(1, workers)
  todo = iter(pieces)
  pending = [pool.apply_async(_read_piece, ((p, txt_doc, text_key, hf_split, limit),))
             for _, p in zip(range(in_flight), todo)]
  while pending:
    docs, piece_stats = pending.pop(0).get()
    nxt = next(todo, None)
    if nxt is not None:
      pending.append(pool.apply_async(_read_piece, ((nxt, txt_doc, text_key, hf_split, limit),)))
    if stats is not None:
      stats.add(piece_stats)
    yield from docs


def _bar(total: Optional[int], what: str, unit: str):
  """A tqdm progress bar on stderr (sparse updates when stderr is not a terminal)."""
  from tqdm import tqdm
  tty = sys.stderr.isatty()
  return tqdm(total=total, desc=f"  {what}", unit=unit, mininterval=0.5 if tty else 30,
              dynamic_ncols=True, file=sys.stderr)


def _progress(docs: Iterator[str], what: str, total: Optional[int] = None) -> Iterator[str]:
  n = 0
  with _bar(total, what, "doc") as bar:
    for n, doc in enumerate(docs, 1):
      bar.update(1)
      yield doc
  print(f"  {what}: {n} documents", flush=True)


def _make_builder_class(name: str):
  import tensorflow_datasets as tfds

  class TextCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Plain-text documents, one feature 'text'."""
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Prepared by mta_jax.data.prepare."}

    def __init__(self, *, documents, validation: np.ndarray, n: int, description: str,
                 **kwargs):
      self._documents, self._validation, self._n = documents, validation, n
      self._description = description
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description=self._description,
          features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      splits = {"train": self._generate_examples(False)}
      if len(self._validation):
        splits["validation"] = self._generate_examples(True)
      return splits

    def _generate_examples(self, validation: bool):
      what = "validation" if validation else "train"
      val, j = self._validation, 0  # sorted indices; documents arrive in index order
      for i, doc in enumerate(_progress(self._documents(), f"writing {what}", self._n)):
        is_val = j < len(val) and val[j] == i
        j += is_val
        if is_val == validation:
          yield i, {"text": doc}

  # The dataset's name (its folder and file prefix) is the builder's class attribute.
  return types.new_class("TextCorpus_" + name, (TextCorpus,), {"skip_registration": True},
                         lambda ns: ns.update(name=name))


def prepare(inputs: Sequence[str], output: str, name: str, *, txt_doc: str = "line",
            text_key: str = "text", validation_fraction: float = 0.01, seed: int = 0,
            overwrite: bool = False, workers: int = 0, hf_split: str = "train",
            max_doc_chars: int = DEFAULT_MAX_DOC_CHARS) -> str:
  """Writes the dataset; returns DATA_DIR/NAME/VERSION. Raises PrepareError on bad input."""
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise PrepareError(f"--name={name!r} must be snake_case (lowercase letters, digits, '_'; "
                       "starting with a letter), as TFDS dataset names are.")
  if txt_doc not in ("line", "file"):
    raise PrepareError(f"--txt_doc={txt_doc!r} must be 'line' or 'file'.")
  if not 0.0 <= validation_fraction < 1.0:
    raise PrepareError(f"--validation_fraction={validation_fraction} must be in [0, 1).")
  if workers < 0:
    raise PrepareError(f"--workers={workers} must be >= 0 (0 = read in this process).")
  if max_doc_chars < 0 or 0 < max_doc_chars < 64:
    raise PrepareError(f"--max_doc_chars={max_doc_chars} must be 0 (no limit) or >= 64.")
  _local_output(output)  # before reading anything
  files = expand_inputs(inputs)
  print(f"reading {len(files)} input(s)" + (f" with {workers} workers" if workers > 1 else ""),
        flush=True)
  pool = worker_pool(workers)
  try:
    return _prepare(files, inputs, output, name, txt_doc, text_key, validation_fraction, seed,
                    overwrite, hf_split, pool, workers, max_doc_chars)
  finally:
    if pool is not None:
      pool.terminate()


def _prepare(files, inputs, output, name, txt_doc, text_key, validation_fraction, seed,
             overwrite, hf_split, pool, workers, max_doc_chars) -> str:
  stats = SplitStats()
  documents = lambda s=None: iter_documents(  # noqa: E731
      files, txt_doc=txt_doc, text_key=text_key, hf_split=hf_split, pool=pool,
      workers=workers, max_doc_chars=max_doc_chars, stats=s)
  n = sum(1 for _ in _progress(documents(stats), "counting"))
  if stats.split_docs:
    print(f"  {stats.summary(max_doc_chars)}", flush=True)
  if n == 0:
    raise PrepareError(f"--input {list(inputs)} holds no non-empty documents "
                       f"(files: {files[:5]}{' ...' if len(files) > 5 else ''}).")
  n_val = 0 if validation_fraction == 0 else max(1, round(validation_fraction * n))
  if n_val >= n:
    raise PrepareError(f"only {n} document(s): too few for a validation split of "
                       f"--validation_fraction={validation_fraction}; add text or set "
                       "--validation_fraction=0.")
  rng = np.random.default_rng(seed)
  validation = np.sort(rng.choice(n, size=n_val, replace=False)) if n_val else np.zeros(0, int)

  data_dir = _local_output(output)
  builder_cls = _make_builder_class(name)
  version_dir = os.path.join(data_dir, name, str(builder_cls.VERSION))
  if os.path.exists(version_dir):
    if not overwrite:
      raise PrepareError(f"{version_dir} already exists; pass --overwrite to replace it or "
                         "choose another --name / --output.")
    shutil.rmtree(version_dir)
  desc = (f"{n} documents from {len(files)} file(s) (txt_doc={txt_doc}, text_key={text_key}, "
          f"max_doc_chars={max_doc_chars}); validation: {n_val} chosen with seed {seed}."
          + (f" {stats.summary(max_doc_chars)}." if stats.split_docs else ""))
  builder = builder_cls(documents=documents, validation=validation, n=n, description=desc,
                        data_dir=data_dir, file_format="array_record")
  import tensorflow_datasets as tfds
  with tempfile.TemporaryDirectory() as tmp:  # nothing is downloaded; keep data_dir clean
    builder.download_and_prepare(
        download_dir=tmp, download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  # Verify: it must load back without the builder class.
  loaded = tfds.builder_from_directory(version_dir)
  got = {k: v.num_examples for k, v in loaded.info.splits.items()}
  want = {"train": n - n_val, **({"validation": n_val} if n_val else {})}
  if got != want:
    raise RuntimeError(f"prepared {version_dir} reads back {got} examples, expected {want}.")
  return version_dir


def _local_output(output: str) -> str:
  from mta_jax import paths
  if paths.is_uri(output):
    raise PrepareError(f"--output={output!r}: ArrayRecord files are written to local disk; "
                       "write to a local directory and copy it (`gcloud storage cp -r DIR "
                       "gs://...`), or to a gcsfuse mount of the bucket.")
  data_dir = paths.resolve(output)
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise PrepareError(f"--output={output!r} is a file, not a directory.")
  return data_dir


# ---------------------------------------------------------------------------------------------
# Command line (absl flags on this command's own FlagValues: see mta_jax/cli.py)
# ---------------------------------------------------------------------------------------------

_PROG = "python -m mta_jax.data.prepare"
_FLAGS = flags.FlagValues()
flags.DEFINE_multi_string(
    "input", None, "files, globs (quote them) or directories of .txt / .jsonl files (.gz / .zst "
    "too), or `datasets` save_to_disk directories; repeat the flag, or list more after it",
    flag_values=_FLAGS)
flags.DEFINE_string("output", None, "data dir; the dataset goes to OUTPUT/NAME/1.0.0",
                    flag_values=_FLAGS)
flags.DEFINE_string("name", None, "dataset name (snake_case), e.g. my_corpus", flag_values=_FLAGS)
flags.DEFINE_enum("txt_doc", "line", ["line", "file"],
                  ".txt files: one document per non-empty line (default) or per file",
                  flag_values=_FLAGS)
flags.DEFINE_string("text_key", "text", ".jsonl files: the text field", flag_values=_FLAGS)
flags.DEFINE_float("validation_fraction", 0.01,
                   "share of documents for the validation split (0 = none)", flag_values=_FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the validation choice", flag_values=_FLAGS)
flags.DEFINE_integer(
    "max_doc_chars", DEFAULT_MAX_DOC_CHARS,
    "documents longer than this many characters become consecutive pieces (cut at line, else "
    "word, boundaries) that the training shuffle mixes with the rest; bounds memory too (0 = "
    "keep documents whole)", flag_values=_FLAGS)
flags.DEFINE_bool("overwrite", False, "replace an existing dataset", flag_values=_FLAGS)
flags.DEFINE_integer("workers", 0, "processes that read and parse the inputs (0 = this process)",
                     flag_values=_FLAGS)
flags.DEFINE_string("hf_split", "train",
                    "split of a Hugging Face DatasetDict directory to read", flag_values=_FLAGS)
flags.mark_flags_as_required(["input", "output", "name"], flag_values=_FLAGS)


def _main(rest: list[str]) -> int:
  f = _FLAGS
  try:
    # Arguments after --input are more inputs (an unquoted glob the shell expanded).
    path = prepare(f.input + rest, f.output, f.name, txt_doc=f.txt_doc, text_key=f.text_key,
                   validation_fraction=f.validation_fraction, seed=f.seed,
                   overwrite=f.overwrite, workers=f.workers, hf_split=f.hf_split,
                   max_doc_chars=f.max_doc_chars)
  except PrepareError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path}\n  train a tokenizer: python -m mta_jax.data.tokenizer --data={path} "
        f"--output=<prefix> --vocab_size=8000\n  train: --config.data.source=text "
        f"--config.data.path={path}")
  return 0


def main(argv: Optional[list[str]] = None) -> int:
  """`mta-prepare` / `python -m mta_jax.data.prepare`; `argv`: the arguments (tests)."""
  return cli.run(_main, _FLAGS, argv, _PROG, __doc__, positional=True)


if __name__ == "__main__":
  sys.exit(main())
