"""Corpora of a few long documents: prepare cuts them into pieces that the training shuffle mixes,
the window shuffle mixes packed rows and resumes exactly, the tokenizer command cuts lines that
sentencepiece would drop, and memory stays bounded on a single 50 MB line (subprocess)."""

import os
import re
import resource
import subprocess
import sys

import numpy as np
import pytest

from mta_jax.config import DataConfig, ModelConfig, TrainConfig
from mta_jax.data import make_train_iterator, prepare, sources, tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DOCS, DOC_WORDS, T = 6, 6000, 32


def _long_doc(k: int, rng) -> str:
  """Document k: words `q<k>` and `z<k>` (a marker for the document) on lines of ~12 words."""
  words = rng.choice([f"q{k}", f"z{k}", "the", "cat"], DOC_WORDS)
  return "\n".join(" ".join(words[i:i + 12]) for i in range(0, DOC_WORDS, 12))


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("long")
  rng = np.random.default_rng(0)
  for k in range(N_DOCS):
    (root / f"doc{k}.txt").write_text(_long_doc(k, rng))
  out = {}
  for name, limit in (("split", 128), ("whole", 0)):
    out[name] = prepare.prepare([str(root / "*.txt")], str(root / "data"), f"long_{name}",
                                txt_doc="file", validation_fraction=0.0, max_doc_chars=limit)
  tok = str(root / "tok")
  assert tokenizer.main([f"--data={out['split']}", f"--output={tok}", "--vocab_size=64",
                         "--quiet", "--model_type=char"]) == 0
  out["tokenizer"] = tok + ".model"
  out["root"] = root
  return out


def _cfg(path, tok, **kw) -> TrainConfig:
  d = dict(source="text", path=path, tokenizer=tok, seq_len=T, batch_size=16,
           eval_batch_size=16, packing="concat")
  d.update(kw)
  return TrainConfig(model=ModelConfig(vocab_size=64, max_len=T), data=DataConfig(**d))


def _docs_in_batches(it, tok, n_batches=3) -> int:
  """How many distinct documents (by their marker words) the next batches hold together."""
  t = tokenizer.Tokenizer(tok)
  found = set()
  for _ in range(n_batches):
    b = next(it)
    found |= set(re.findall(r"[qz](\d)", " ".join(t.decode(row) for row in b["inputs"])))
  return len(found)


def test_prepare_cuts_long_documents_at_line_boundaries_and_loses_nothing(long_corpus, capsys):
  src = sources.open_prepared(long_corpus["split"], "train")
  pieces = [src[i]["text"].decode() for i in range(len(src))]
  assert all(len(p) <= 128 for p in pieces)
  assert len(pieces) > 100 * N_DOCS
  assert all(not p.startswith(" ") for p in pieces)  # cut after a newline, not inside a line
  rng = np.random.default_rng(0)
  want = "".join(_long_doc(k, rng) for k in range(N_DOCS))
  assert re.sub(r"\s+", "", "".join(pieces)) == re.sub(r"\s+", "", want)
  whole = sources.open_prepared(long_corpus["whole"], "train")
  assert len(whole) == N_DOCS


def test_prepare_says_what_it_split(tmp_path, capsys):
  (tmp_path / "a.txt").write_text("short line\n" + "word " * 1000 + "\n")
  prepare.main([f"--input={tmp_path / 'a.txt'}", f"--output={tmp_path / 'd'}", "--name=c",
                "--validation_fraction=0", "--max_doc_chars=256"])
  out = capsys.readouterr().out
  assert re.search(r"split 1 document\(s\) longer than 256 characters \(the longest 5,000\) "
                   r"into \d+ pieces", out), out
  assert prepare.main([f"--input={tmp_path / 'a.txt'}", f"--output={tmp_path / 'd'}",
                       "--name=c2", "--max_doc_chars=10"]) == 2


def test_batches_mix_many_long_documents(long_corpus):
  """Three batches (1,536 tokens; a document has ~21,000): whole documents give one or two
  documents, pieces give nearly all of them."""
  tok = long_corpus["tokenizer"]
  whole = _docs_in_batches(make_train_iterator(_cfg(long_corpus["whole"], tok)), tok)
  split = _docs_in_batches(make_train_iterator(_cfg(long_corpus["split"], tok)), tok)
  assert whole <= 2, whole
  assert split >= N_DOCS - 1, split


def test_window_shuffle_mixes_rows_and_resumes_exactly(long_corpus):
  tok = long_corpus["tokenizer"]
  cfg = _cfg(long_corpus["whole"], tok, shuffle_window=2048)  # ~3 documents per window
  it = make_train_iterator(cfg)
  assert _docs_in_batches(it, tok) >= 3
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  it2 = make_train_iterator(cfg)
  it2.set_state(state)
  for w in want:
    got = next(it2)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k], err_msg=k)


def test_tokenizer_cuts_lines_sentencepiece_would_drop(tmp_path, capsys):
  """One 300 KB line kept whole by prepare: sentencepiece alone drops it and then fails."""
  line = " ".join(f"w{i % 50}" for i in range(80_000))
  (tmp_path / "a.txt").write_text(line + "\n")
  path = prepare.prepare([str(tmp_path / "a.txt")], str(tmp_path / "d"), "one",
                         validation_fraction=0.0, max_doc_chars=0)
  assert tokenizer.main([f"--data={path}", f"--output={tmp_path / 'tok'}", "--vocab_size=54",
                         "--quiet", "--model_type=word"]) == 0
  out = capsys.readouterr().out
  assert re.search(r"cut 1 line\(s\) longer than 65,536 bytes \(the longest [\d,]+\) into \d+ "
                   "pieces", out), out


def test_tokenizer_on_no_text_is_one_clear_error(tmp_path, capsys):
  (tmp_path / "a.txt").write_text("x\n")
  path = prepare.prepare([str(tmp_path / "a.txt")], str(tmp_path / "d"), "tiny",
                         validation_fraction=0.0)
  rc = tokenizer.main([f"--data={path}", f"--output={tmp_path / 'tok'}", "--vocab_size=500",
                       "--quiet"])
  err = capsys.readouterr().err
  assert rc == 2 and "error: sentencepiece could not train on 1 line(s)" in err, err
  assert "Traceback" not in err


_MEASURE = r"""
import os, resource, sys, time
from mta_jax.data import prepare, tokenizer
from mta_jax.config import DataConfig, ModelConfig, TrainConfig
from mta_jax.data import make_train_iterator
root, tok, mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
words = ("alpha beta gamma delta " * 64).encode()
with open(os.path.join(root, "big.txt"), "wb") as f:
  for _ in range(mb * 2**20 // len(words)):
    f.write(words)
  f.write(b"\n")
t0 = time.time()
limit = int(sys.argv[4]) if len(sys.argv) > 4 else prepare.DEFAULT_MAX_DOC_CHARS
path = prepare.prepare([os.path.join(root, "big.txt")], os.path.join(root, "data"), "big",
                       validation_fraction=0.0, max_doc_chars=limit)
cfg = TrainConfig(model=ModelConfig(vocab_size=64, max_len=256), data=DataConfig(
    source="text", path=path, tokenizer=tok, seq_len=256, batch_size=8))
it = make_train_iterator(cfg)
for _ in range(20):
  next(it)
# VmHWM is this process's own peak: ru_maxrss would also count the parent's RSS at fork time
# (Linux keeps it across exec), so a large pytest parent would hide what this script used.
try:
  with open("/proc/self/status") as f:
    peak_mb = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) // 1024
except OSError:
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print("peak_rss_mb", peak_mb, "seconds", round(time.time() - t0, 1))
"""

GROWTH_MB = 100  # peak RSS may grow by at most this from a 1 MB line to a 50 MB line
BOUND_MB = 1000  # absolute: the interpreter with jax, tfds and grain loaded takes most of it


def _peak_mb(tmp_path, tok, mb: int) -> int:
  root = tmp_path / f"mb{mb}"
  root.mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", _MEASURE, str(root), tok, str(mb)], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  m = re.search(r"peak_rss_mb (\d+)", p.stdout)
  assert m, p.stdout
  assert "split 1 document(s) longer than 16,384 characters" in p.stdout
  return int(m.group(1))


def test_peak_memory_on_one_50mb_line_is_bounded(long_corpus, tmp_path):
  """prepare + 20 training batches on a single line, in fresh processes: peak RSS does not grow
  with the line (whole-document reading and tokenizing took 12 GB on 50 MB)."""
  small = _peak_mb(tmp_path, long_corpus["tokenizer"], 1)
  big = _peak_mb(tmp_path, long_corpus["tokenizer"], 50)
  assert big - small < GROWTH_MB and big < BOUND_MB, (small, big)
