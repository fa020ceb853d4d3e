"""Tokenizers: read a sentencepiece model, a tiktoken BPE file or a Hugging Face tokenizer.json;
train a sentencepiece model on your corpus.

`data.tokenizer` names a file of any of three kinds, told apart by its content (not its name):

  sentencepiece   a `.model` protobuf (e.g. one trained by this command, Llama-2, Gemma)
  tiktoken        a BPE rank file, one `<base64 token> <rank>` per line, read in the Llama-3
                  format: the 256 special tokens follow the ranks (Llama-3's `tokenizer.model`:
                  128,000 ranks + 256 specials = 128,256 ids, the paper presets' vocabulary),
                  <|begin_of_text|> = BOS, <|end_of_text|> = EOS, <|finetune_right_pad_id|> = pad
  huggingface     a `tokenizer.json` of the `tokenizers` library; BOS / EOS / pad come from a
                  `tokenizer_config.json` beside it, else from the file's post-processor
                  template, else from the usual special-token names (<s>, </s>, <pad>, ...)

The BOS / EOS / pad ids always come from the file; set data.add_bos / data.add_eos to False for a
tokenizer without them. Files are read through etils.epath, so `gs://...` paths work too.

Train (reads the train split of a prepared dataset, or of any TFDS array_record dataset):

  python -m mta_jax.data.tokenizer --data=DATA_DIR/my_corpus --output=TOK_DIR/my_sp \
      --vocab_size=8000 [--model_type=unigram] [--byte_fallback]

writes TOK_DIR/my_sp.model (+ .vocab). Models trained here reserve pad=0, unk=1, bos=2, eos=3.
Inspect any tokenizer file: `python -m mta_jax.data.tokenizer --inspect=PATH`.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import sys
import time
from typing import Iterator, Optional

import numpy as np
from absl import flags

from mta_jax import cli
from mta_jax.config import ConfigError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
KINDS = ("sentencepiece", "tiktoken", "huggingface")


def _epath(path: str):
  from etils import epath
  return epath.Path(path)


def _check_model_path(path: str, setting: str = "data.tokenizer") -> str:
  if not path:
    raise ConfigError(f"{setting} is empty; give the path of a tokenizer file (sentencepiece "
                        ".model, tiktoken BPE file or tokenizer.json; train one with "
                        "`python -m mta_jax.data.tokenizer --help`).")
  from mta_jax import paths
  path = paths.resolve(path)
  try:
    ok = _epath(path).is_file()
  except Exception as e:  # noqa: BLE001 - remote file systems raise many types
    raise ConfigError(f"{setting}={path!r} cannot be reached ({type(e).__name__}: {e}); check "
                        "the path and your credentials.") from None
  if not ok:
    raise ConfigError(f"{setting}={path!r}: no such file; train a tokenizer with "
                        "`python -m mta_jax.data.tokenizer --data=... --output=...` or fix "
                        "the path.")
  return path


# ---------------------------------------------------------------------------------------------
# The three kinds: each backend has kind, vocab_size, bos_id / eos_id / pad_id (-1 = none),
# encode(text) -> list[int] (no special tokens) and decode(ids) -> str.
# ---------------------------------------------------------------------------------------------

# Llama 3's tokenizer (github.com/meta-llama/llama-models, tokenizer.py): the split pattern and
# the special tokens that follow the BPE ranks. tiktoken files carry only the ranks.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL = 256
_LLAMA3_NAMED = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                 "<|python_tag|>")


def llama3_special_tokens() -> list[str]:
  """The 256 special-token names of Llama 3, in id order after the ranks."""
  n = LLAMA3_NUM_SPECIAL - len(_LLAMA3_NAMED)
  return list(_LLAMA3_NAMED) + [f"<|reserved_special_token_{2 + i}|>" for i in range(n)]


def parse_tiktoken_ranks(data: bytes) -> dict[bytes, int]:
  """`<base64 token> <rank>` lines -> {token bytes: rank}. tiktoken's own loader
  (`tiktoken.load.load_tiktoken_bpe`) only opens local / http paths with its own cache; this is
  the same two-column parse on bytes already read through epath."""
  ranks = {}
  for line in data.splitlines():
    if line.strip():
      token, rank = line.split()
      ranks[base64.b64decode(token, validate=True)] = int(rank)
  return ranks


class _SentencePiece:
  kind = "sentencepiece"

  def __init__(self, data: bytes):
    import sentencepiece as spm
    self.sp = spm.SentencePieceProcessor(model_proto=data)
    self.vocab_size = int(self.sp.GetPieceSize())
    self.bos_id, self.eos_id = int(self.sp.bos_id()), int(self.sp.eos_id())
    self.pad_id = int(self.sp.pad_id())

  def encode(self, text: str) -> list[int]:
    return self.sp.EncodeAsIds(text)

  def decode(self, ids: list[int]) -> str:
    return self.sp.DecodeIds(ids)


class _Tiktoken:
  kind = "tiktoken"

  def __init__(self, data: bytes, name: str):
    import tiktoken
    ranks = parse_tiktoken_ranks(data)
    n = len(ranks)
    specials = {tok: n + i for i, tok in enumerate(llama3_special_tokens())}
    self.enc = tiktoken.Encoding(name=name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                 special_tokens=specials)
    self.vocab_size = int(self.enc.n_vocab)
    self.bos_id = specials["<|begin_of_text|>"]
    self.eos_id = specials["<|end_of_text|>"]
    self.pad_id = specials["<|finetune_right_pad_id|>"]

  def encode(self, text: str) -> list[int]:
    return self.enc.encode_ordinary(text)  # special-token text in a document stays text

  def decode(self, ids: list[int]) -> str:
    return self.enc.decode(ids)


_HF_NAMES = {  # the usual special-token spellings, tried in order when the file names none
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[CLS]"),
    "eos": ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "[SEP]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>"),
}


class _HuggingFace:
  kind = "huggingface"

  def __init__(self, text: str, config: Optional[dict]):
    import tokenizers
    self.tok = tokenizers.Tokenizer.from_str(text)
    self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
    ids = self._template_ids(json.loads(text).get("post_processor"))
    for role in ("bos", "eos", "pad"):
      setattr(self, f"{role}_id", self._special_id(role, config, ids.get(role)))

  @staticmethod
  def _template_ids(proc) -> dict:
    """BOS / EOS of a TemplateProcessing post-processor: the special tokens around $A."""
    if not isinstance(proc, dict):
      return {}
    if proc.get("type") == "Sequence":
      for p in proc.get("processors", []):
        if p.get("type") == "TemplateProcessing":
          proc = p
    if proc.get("type") != "TemplateProcessing":
      return {}
    out, seen_a = {}, False
    for piece in proc.get("single", []):
      if "Sequence" in piece:
        seen_a = True
      elif "SpecialToken" in piece:
        out.setdefault("eos" if seen_a else "bos", piece["SpecialToken"]["id"])
    return out

  def _special_id(self, role: str, config: Optional[dict], from_template: Optional[str]) -> int:
    if config is not None and f"{role}_token" in config:  # tokenizer_config.json decides
      tok = config[f"{role}_token"]
      tok = tok.get("content") if isinstance(tok, dict) else tok
      i = self.tok.token_to_id(tok) if tok else None
      return -1 if i is None else int(i)
    for tok in ((from_template,) if from_template else ()) + _HF_NAMES[role]:
      i = self.tok.token_to_id(tok)
      if i is not None:
        return int(i)
    return -1

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self.tok.decode(ids, skip_special_tokens=False)


_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+$")


def detect_kind(data: bytes) -> Optional[str]:
  """'huggingface' / 'tiktoken' / 'sentencepiece' from a file's bytes; None if none fits."""
  head = data[:4096].lstrip()
  if head.startswith(b"{"):
    try:
      obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
      obj = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
      return "huggingface"
  if _TIKTOKEN_LINE.match(data.split(b"\n", 1)[0].strip()):
    return "tiktoken"
  if data[:1] == b"\n":  # a serialized ModelProto starts with field 1 (pieces), wire type 2
    return "sentencepiece"
  return None


def _read_sibling_config(path: str) -> Optional[dict]:
  cfg = _epath(path).parent / "tokenizer_config.json"
  try:
    return json.loads(cfg.read_text()) if cfg.exists() else None
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None


@functools.lru_cache(maxsize=8)
def _load(path: str, setting: str = "data.tokenizer"):
  data = _epath(path).read_bytes()
  kind = detect_kind(data)
  try:
    if kind == "huggingface":
      return _HuggingFace(data.decode("utf-8"), _read_sibling_config(path))
    if kind == "tiktoken":
      return _Tiktoken(data, os.path.basename(path))
    if kind == "sentencepiece":
      return _SentencePiece(data)
  except Exception as e:  # noqa: BLE001 - each library raises its own types for a bad file
    raise ConfigError(f"{setting}={path!r} looks like a {kind} file but cannot be read "
                        f"({type(e).__name__}: {e}).") from None
  raise ConfigError(f"{setting}={path!r} is a tokenizer of an unknown kind: not a "
                      "sentencepiece .model, a tiktoken BPE file (base64 token and rank per "
                      "line) or a Hugging Face tokenizer.json; point it at one of those.")


def load(path: str, setting: str = "data.tokenizer"):
  """The backend of the tokenizer file `path` (cached per process); ConfigError if missing,
  unreadable or of an unknown kind. Has kind, vocab_size, bos_id, eos_id, pad_id (-1 = none),
  encode(text) and decode(ids)."""
  return _load(_check_model_path(path, setting), setting)


def vocab_size_of(path: str) -> int:
  return int(load(path).vocab_size)


class Tokenizer:
  """Picklable tokenizer handle: only the path travels to grain workers; each process loads the
  file on first use."""

  def __init__(self, path: str, add_bos: bool = True, add_eos: bool = True,
               setting: str = "data.tokenizer"):
    self.path = _check_model_path(path, setting)
    self.add_bos, self.add_eos = add_bos, add_eos
    b = load(self.path, setting)
    self.kind = b.kind
    self.bos_id, self.eos_id, self.pad_id = b.bos_id, b.eos_id, b.pad_id
    self.vocab_size = b.vocab_size
    if add_bos and self.bos_id < 0:
      raise ConfigError(f"{setting}={path!r} ({b.kind}) has no BOS token; set "
                          "data.add_bos=False.")
    if add_eos and self.eos_id < 0:
      raise ConfigError(f"{setting}={path!r} ({b.kind}) has no EOS token; set "
                          "data.add_eos=False.")

  def __getstate__(self):
    return dict(self.__dict__)  # no library object inside: loaded lazily via `load`

  def encode(self, text: str) -> np.ndarray:
    """One document -> int32 ids, with BOS / EOS as configured."""
    ids = list(load(self.path).encode(text))
    if self.add_bos:
      ids = [self.bos_id] + ids
    if self.add_eos:
      ids = ids + [self.eos_id]
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids) -> str:
    keep = [int(i) for i in np.asarray(ids).reshape(-1) if i not in (self.bos_id, self.eos_id)]
    return load(self.path).decode(keep)


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
  sentencepiece accepts are cut into pieces (and the command says how many). A remote prefix
  (gs://...) is trained locally, then copied (sentencepiece writes local files only).
  """
  if len(source) == 0:
    raise ValueError("the tokenizer's training data has no documents.")
  from mta_jax import paths
  if paths.is_uri(output_prefix):
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
      local = os.path.join(tmp, "sp")
      _train(source, local, vocab_size, model_type, byte_fallback, character_coverage,
             text_key, max_docs, max_sentences, seed_sentencepiece_size, quiet)
      for ext in (".model", ".vocab"):
        dst = _epath(output_prefix + ext)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(local + ext, "rb") as f:
          dst.write_bytes(f.read())
    return output_prefix + ".model"
  os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
  _train(source, output_prefix, vocab_size, model_type, byte_fallback, character_coverage,
         text_key, max_docs, max_sentences, seed_sentencepiece_size, quiet)
  return output_prefix + ".model"


def _train(source, output_prefix, vocab_size, model_type, byte_fallback, character_coverage,
           text_key, max_docs, max_sentences, seed_sentencepiece_size, quiet) -> None:
  import sentencepiece as spm
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


def inspect(path: str, sample: str = "Multi-Token Attention, 2025.") -> str:
  """A few lines describing the tokenizer file at `path`."""
  b = load(path, "--inspect")
  ids = b.encode(sample)
  return (f"{path}: {b.kind}, vocabulary {b.vocab_size}, bos {b.bos_id}, eos {b.eos_id}, "
          f"pad {b.pad_id} (-1 = none)\n  {sample!r} -> {len(ids)} tokens {ids[:16]}"
          f"\n  decodes back: {b.decode(ids) == sample}")


# ---------------------------------------------------------------------------------------------
# Command line (absl flags on this command's own FlagValues: see mta_jax/cli.py)
# ---------------------------------------------------------------------------------------------

_PROG = "python -m mta_jax.data.tokenizer"
_DESCRIPTION = ("Train a sentencepiece tokenizer on the train split of a prepared dataset "
                "(python -m mta_jax.data.prepare) or of a TFDS array_record dataset; or "
                "--inspect a tokenizer file.")
_FLAGS = flags.FlagValues()
flags.DEFINE_string("data", None, "dataset directory written by mta_jax.data.prepare "
                    "(DATA_DIR/NAME or DATA_DIR/NAME/VERSION)", flag_values=_FLAGS)
flags.DEFINE_string("tfds_name", None, "a TFDS dataset prepared in array_record format",
                    flag_values=_FLAGS)
flags.DEFINE_string("inspect", None, "print the kind, vocabulary size and BOS / EOS / pad ids "
                    "of a tokenizer file (sentencepiece, tiktoken or tokenizer.json) and exit",
                    flag_values=_FLAGS)
flags.mark_flags_as_mutual_exclusive(["data", "tfds_name", "inspect"], required=True,
                                     flag_values=_FLAGS)
flags.DEFINE_string("tfds_data_dir", "", "TFDS data_dir ('' = TFDS default)", flag_values=_FLAGS)
flags.DEFINE_string("split", "train", "split to train on", flag_values=_FLAGS)
flags.DEFINE_string("text_key", "text", "text feature", flag_values=_FLAGS)
flags.DEFINE_string("output", None, "output prefix: writes OUTPUT.model and OUTPUT.vocab",
                    flag_values=_FLAGS)
flags.DEFINE_integer("vocab_size", 8000, "vocabulary size", flag_values=_FLAGS)
flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe", "char", "word"],
                  "sentencepiece model type", flag_values=_FLAGS)
flags.DEFINE_bool("byte_fallback", False,
                  "unknown characters become UTF-8 byte pieces instead of <unk>",
                  flag_values=_FLAGS)
flags.DEFINE_float("character_coverage", 0.9995, "sentencepiece character_coverage",
                   flag_values=_FLAGS)
flags.DEFINE_integer("max_docs", 0, "read at most this many documents (0 = all)",
                     flag_values=_FLAGS)
flags.DEFINE_integer("max_sentences", 2_000_000,
                     "sentencepiece input_sentence_size: lines sampled for training",
                     flag_values=_FLAGS)
flags.DEFINE_bool("quiet", False, "hide sentencepiece's progress log", flag_values=_FLAGS)


def _main(rest: list[str]) -> int:
  del rest
  args = _FLAGS
  from mta_jax.config import ConfigError
  from mta_jax.data import sources
  if args.inspect:
    try:
      print(inspect(args.inspect))
    except ConfigError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    return 0
  if not args.output:
    raise cli.UsageError("--output is required to train a tokenizer")
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


def main(argv: Optional[list[str]] = None) -> int:
  """`mta-tokenizer` / `python -m mta_jax.data.tokenizer`; `argv`: the arguments (tests)."""
  return cli.run(_main, _FLAGS, argv, _PROG, _DESCRIPTION)


if __name__ == "__main__":
  sys.exit(main())
