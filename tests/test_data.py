"""Real-text pipeline: prepare -> tokenizer -> packed batches, on small text written here.

Covers: TFDS-compatible prepare without TensorFlow, sentencepiece training and lazy loading,
packing invariants (segments, positions, no token lost or duplicated), determinism, iterator
state, multi-process slicing, clear errors for bad input, synthetic source, global arrays, and
the document-aware contract: a model forward on a packed row equals forwards on its documents.
"""

import collections
import dataclasses
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_mta
from mta_jax import config, train_lib
from mta_jax.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from mta_jax.data import (check_vocab, make_eval_batches, make_train_iterator, prepare,
                          sources, text_pipeline, tokenizer, validate_data, vocab_size)

T = 32
V = 300  # tokenizer vocabulary: 4 special ids + 256 byte pieces + characters and words
WORDS = ("the cat sat on a mat and dog ran far away from home while birds sang over tall "
         "trees in spring rain").split()


def _doc(rng, i, long=False):
  n = rng.integers(40, 90) if long else rng.integers(1, 12)
  return " ".join(rng.choice(WORDS, n)) + f" {i}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Text files -> prepared dataset -> tokenizer. Returns paths and the documents."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  line_docs = [_doc(rng, i, long=i % 17 == 0) for i in range(160)]
  (root / "a.txt").write_text("\n".join(line_docs[:100]) + "\n\n")  # a blank line is skipped
  (root / "sub").mkdir()
  (root / "sub" / "b.jsonl").write_text(
      "".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(line_docs[100:])))
  data_dir = root / "data"
  path = prepare.prepare([str(root / "a.txt"), str(root / "sub" / "*.jsonl")], str(data_dir),
                         "my_corpus", text_key="body", validation_fraction=0.1, seed=3)
  tok_prefix = str(root / "tok" / "sp")
  rc = tokenizer.main([f"--data={path}", f"--output={tok_prefix}", "--vocab_size=300",
                       "--byte_fallback", "--quiet"])
  assert rc == 0
  return dict(root=root, data_dir=str(data_dir), path=path, docs=line_docs,
              tokenizer=tok_prefix + ".model")


def _cfg(corpus, **data_kw):
  d = dict(source="text", path=corpus["path"], tokenizer=corpus["tokenizer"], seq_len=T,
           batch_size=4, eval_batch_size=4)
  d.update(data_kw)
  return TrainConfig(model=ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                                       max_len=T), data=DataConfig(**d))


def _split_texts(corpus, split):
  src = sources.open_prepared(corpus["path"], split)
  return [src[i]["text"].decode() for i in range(len(src))]


def _tok(corpus, **kw):
  return tokenizer.Tokenizer(corpus["tokenizer"], **kw)


def _segments(rows):
  """(inputs, targets, positions) of every segment of every row, in row order."""
  out = []
  for r in range(len(rows["inputs"])):
    seg = rows["segment_ids"][r]
    for s in np.unique(seg[seg > 0]):
      m = seg == s
      out.append((rows["inputs"][r][m], rows["targets"][r][m], rows["positions"][r][m]))
  return out


def _check_row_invariants(batch, packing):
  for r in range(batch["inputs"].shape[0]):
    seg, pos = batch["segment_ids"][r], batch["positions"][r]
    n = int((seg > 0).sum())
    assert (seg[:n] > 0).all() and not seg[n:].any(), "padding only at the end"
    assert not batch["inputs"][r][n:].any() and not pos[n:].any()
    np.testing.assert_array_equal(batch["loss_mask"][r], (seg > 0).astype(np.float32))
    if n == 0:  # a padding row (end of an eval split)
      continue
    assert seg[0] == 1 and (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
    for s in np.unique(seg[:n]):
      np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
    # Inside a segment, the target of position t is the input at t + 1.
    same = (seg[1:] == seg[:-1]) & (seg[1:] > 0)
    np.testing.assert_array_equal(batch["targets"][r][:-1][same], batch["inputs"][r][1:][same])
    if packing == "concat":
      assert n == len(seg), "concat-then-split rows are full during training"


# --- prepare ------------------------------------------------------------------------------------


def test_prepare_writes_a_tfds_dataset_that_loads_back(corpus):
  import tensorflow_datasets as tfds
  train, val = _split_texts(corpus, "train"), _split_texts(corpus, "validation")
  assert len(val) == 16 and len(train) == 144
  assert sorted(train + val) == sorted(corpus["docs"])  # every document once
  order = {d: i for i, d in enumerate(corpus["docs"])}
  assert [order[d] for d in train] == sorted(order[d] for d in train)  # input order kept
  # Plain TFDS loading, no builder class, no TensorFlow.
  b = tfds.builder_from_directory(corpus["path"])
  assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 144,
                                                                   "validation": 16}
  ds = tfds.data_source("my_corpus", split="validation", data_dir=corpus["data_dir"],
                        download=False)
  assert ds[0]["text"].decode() == val[0]
  # The parent NAME folder resolves to its newest version.
  assert sources.resolve_prepared_dir(str(corpus["root"] / "data" / "my_corpus")) == \
      corpus["path"]


def test_prepare_validation_choice_is_seeded(tmp_path):
  (tmp_path / "a.txt").write_text("".join(f"doc {i}\n" for i in range(50)))
  def val(seed, name):
    p = prepare.prepare([str(tmp_path / "a.txt")], str(tmp_path / "d"), name,
                        validation_fraction=0.2, seed=seed)
    src = sources.open_prepared(p, "validation")
    return [src[i]["text"] for i in range(len(src))]
  assert val(0, "a") == val(0, "b") != val(1, "c")
  assert len(val(0, "e")) == 10


def test_prepare_one_document_per_file(tmp_path):
  for i in range(3):
    (tmp_path / f"f{i}.txt").write_text(f"line one of {i}\nline two\n")
  p = prepare.prepare([str(tmp_path)], str(tmp_path / "d"), "files", txt_doc="file",
                      validation_fraction=0.0)
  src = sources.open_prepared(p, "train")
  assert sorted(src[i]["text"].decode() for i in range(3)) == [
      f"line one of {i}\nline two" for i in range(3)]


def test_prepare_bad_input(tmp_path, capsys):
  out = str(tmp_path / "d")
  with pytest.raises(prepare.PrepareError, match="missing.txt.*no such file"):
    prepare.prepare([str(tmp_path / "missing.txt")], out, "x")
  with pytest.raises(prepare.PrepareError, match="matches no files"):
    prepare.prepare([str(tmp_path / "*.txt")], out, "x")
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "blank.txt").write_text("\n  \n")
  with pytest.raises(prepare.PrepareError, match="no non-empty documents"):
    prepare.prepare([str(tmp_path / "empty.txt"), str(tmp_path / "blank.txt")], out, "x")
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
  with pytest.raises(prepare.PrepareError, match=r"bad.jsonl:2: not valid JSON"):
    prepare.prepare([str(tmp_path / "bad.jsonl")], out, "x")
  (tmp_path / "other.jsonl").write_text('{"content": "ok"}\n')
  with pytest.raises(prepare.PrepareError, match=r"other.jsonl:1: no field --text_key='text'"):
    prepare.prepare([str(tmp_path / "other.jsonl")], out, "x")
  (tmp_path / "one.txt").write_text("a single document\n")
  with pytest.raises(prepare.PrepareError, match="too few for a validation split"):
    prepare.prepare([str(tmp_path / "one.txt")], out, "x")
  with pytest.raises(prepare.PrepareError, match="snake_case"):
    prepare.prepare([str(tmp_path / "one.txt")], out, "MyData")
  prepare.prepare([str(tmp_path / "one.txt")], out, "x", validation_fraction=0)
  with pytest.raises(prepare.PrepareError, match="already exists; pass --overwrite"):
    prepare.prepare([str(tmp_path / "one.txt")], out, "x", validation_fraction=0)
  # The command prints the message and exits with status 2.
  assert prepare.main([f"--input={tmp_path / 'nope.txt'}", f"--output={out}", "--name=y"]) == 2
  assert "nope.txt': no such file" in capsys.readouterr().err


# --- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_roundtrip_and_special_ids(corpus):
  tok = _tok(corpus)
  assert tok.vocab_size == V and (tok.bos_id, tok.eos_id) == (2, 3)
  text = corpus["docs"][5]
  ids = tok.encode(text)
  assert ids[0] == 2 and ids[-1] == 3 and ids.dtype == np.int32
  assert tok.decode(ids) == text
  # Byte fallback: an unseen character survives the round trip.
  assert tok.decode(tok.encode("cat ü")) == "cat ü"
  # Only the path travels to grain workers.
  clone = pickle.loads(pickle.dumps(tok))
  assert "processor" not in str(vars(clone)) and (clone.encode(text) == ids).all()
  assert _tok(corpus, add_bos=False, add_eos=False).encode(text).tolist() == ids[1:-1].tolist()


def test_vocab_size_comes_from_the_tokenizer(corpus):
  cfg = _cfg(corpus)
  assert vocab_size(cfg) == V
  check_vocab(cfg)
  validate_data(cfg)
  cfg.model.vocab_size = 384  # padded to a multiple of 128: fine
  check_vocab(cfg)
  cfg.model.vocab_size = 299
  with pytest.raises(ConfigError, match=r"model.vocab_size=299 .* \(300 tokens.*sp.model.*"
                                        r"set model.vocab_size to 300 \(or 384"):
    check_vocab(cfg)
  with pytest.raises(ConfigError, match="model.vocab_size=299"):
    validate_data(cfg)


def test_missing_tokenizer_file(corpus, tmp_path):
  cfg = _cfg(corpus, tokenizer=str(tmp_path / "nope.model"))
  with pytest.raises(ConfigError, match=r"data.tokenizer=.*nope.model.*no such file"):
    make_train_iterator(cfg, process_index=0, process_count=1)
  with pytest.raises(ConfigError, match=r"data.tokenizer=.*nope.model"):
    validate_data(cfg)
  cfg.data.tokenizer = ""
  with pytest.raises(ConfigError, match="data.tokenizer"):
    config.validate_data(cfg.data)


def test_tokenizer_command_errors(corpus, tmp_path, capsys):
  assert tokenizer.main([f"--data={tmp_path}", f"--output={tmp_path}/t"]) == 2
  assert "no prepared dataset" in capsys.readouterr().err
  assert tokenizer.main([f"--data={corpus['path']}", "--split=test",
                         f"--output={tmp_path}/t"]) == 2
  assert "--split='test' is not a split" in capsys.readouterr().err


# --- pipeline: round trip and packing -----------------------------------------------------------


def test_eval_concat_is_the_validation_split_in_order(corpus):
  """prepare -> tokenizer -> pipeline: the eval rows hold exactly the tokenized split."""
  cfg = _cfg(corpus)
  tok = _tok(corpus)
  docs = [tok.encode(t) for t in _split_texts(corpus, "validation")]
  batches = list(make_eval_batches(cfg, process_index=0, process_count=1))
  assert all(b["inputs"].shape == (4, T) for b in batches)
  for b in batches:
    _check_row_invariants(b, "first_fit")  # the last eval row may be padded
  real = lambda k: np.concatenate(  # noqa: E731
      [b[k][b["segment_ids"] > 0] for b in batches])
  np.testing.assert_array_equal(real("inputs"), np.concatenate([d[:-1] for d in docs]))
  np.testing.assert_array_equal(real("targets"), np.concatenate([d[1:] for d in docs]))
  n_tokens = sum(len(d) - 1 for d in docs)
  assert len(batches) == -(-n_tokens // (4 * T))
  # Padding rows at the end have no loss; every real token has loss.
  assert sum(b["loss_mask"].sum() for b in batches) == n_tokens
  # The text comes back: cut the input stream at each BOS and decode.
  stream = real("inputs")
  pieces = np.split(stream, np.flatnonzero(stream == tok.bos_id)[1:])
  assert [tok.decode(p) for p in pieces] == _split_texts(corpus, "validation")
  assert list(make_eval_batches(cfg, process_index=0, process_count=1))[0]["inputs"].tolist() \
      == batches[0]["inputs"].tolist()  # re-iterable, same order


def test_eval_first_fit_keeps_every_document_piece(corpus):
  cfg = _cfg(corpus, packing="first_fit")
  tok = _tok(corpus)
  pieces = collections.Counter()
  for t in _split_texts(corpus, "validation"):
    ids = tok.encode(t)
    for i in range(0, len(ids) - 1, T):
      pieces[bytes(ids[:-1][i:i + T])] += 1
  got = collections.Counter()
  for b in make_eval_batches(cfg, process_index=0, process_count=1):
    _check_row_invariants(b, "first_fit")
    for inp, tgt, pos in _segments(b):
      got[bytes(inp)] += 1
  assert got == pieces


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_one_training_epoch_loses_and_duplicates_no_token(corpus, packing):
  cfg = _cfg(corpus, packing=packing)
  tok = _tok(corpus)
  docs = [tok.encode(t) for t in _split_texts(corpus, "train")]
  rows = list(text_pipeline.train_rows(cfg, 0, 1, repeat=False))
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  _check_row_invariants({k: v[:-1] for k, v in batch.items()}, packing)  # last row: epoch end
  _check_row_invariants({k: v[-1:] for k, v in batch.items()}, "first_fit")
  pairs = lambda inp, tgt: collections.Counter(zip(inp.tolist(), tgt.tolist()))  # noqa: E731
  want = sum((pairs(d[:-1], d[1:]) for d in docs), collections.Counter())
  m = batch["segment_ids"] > 0
  assert pairs(batch["inputs"][m], batch["targets"][m]) == want
  # Documents are shuffled: the first row does not start with the first document.
  assert not np.array_equal(batch["inputs"][0][:len(docs[0]) - 1], docs[0][:-1])
  # BOS starts every document exactly once, and only documents.
  assert (batch["inputs"][m] == tok.bos_id).sum() == len(docs)
  if packing == "concat":  # concat-then-split keeps the stream order of the shuffled docs
    stream = batch["inputs"][m]
    starts = np.flatnonzero(stream == tok.bos_id)
    got = sorted(map(bytes, np.split(stream, starts[1:])))
    assert got == sorted(bytes(d[:-1]) for d in docs)


def test_first_fit_long_documents(corpus):
  cfg = _cfg(corpus, packing="first_fit", long_docs="error")
  it = make_train_iterator(cfg, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"data.seq_len=32 and data.long_docs='error'"):
    for _ in range(50):
      next(it)
  cfg.data.long_docs = "split"
  it = make_train_iterator(cfg, process_index=0, process_count=1)
  for _ in range(10):
    _check_row_invariants(next(it), "first_fit")


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_train_iterator_determinism_and_state_roundtrip(corpus, packing):
  cfg = _cfg(corpus, packing=packing)
  it = make_train_iterator(cfg, process_index=0, process_count=1)
  first = [next(it) for _ in range(5)]
  for b in first:
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "inputs": ((4, T), "int32"), "targets": ((4, T), "int32"),
        "segment_ids": ((4, T), "int32"), "positions": ((4, T), "int32"),
        "loss_mask": ((4, T), "float32")}
    _check_row_invariants(b, packing)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expect = [next(it) for _ in range(4)]
  resumed = make_train_iterator(cfg, process_index=0, process_count=1)
  resumed.set_state(state)
  for want in expect:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  again = make_train_iterator(cfg, process_index=0, process_count=1)
  np.testing.assert_array_equal(next(again)["inputs"], first[0]["inputs"])
  cfg.data.seed = 1
  other = make_train_iterator(cfg, process_index=0, process_count=1)
  assert not np.array_equal(next(other)["inputs"], first[0]["inputs"])


def test_training_runs_past_one_epoch(corpus):
  cfg = _cfg(corpus, batch_size=8)
  tok = _tok(corpus)
  n_pairs = sum(len(tok.encode(t)) - 1 for t in _split_texts(corpus, "train"))
  it = make_train_iterator(cfg, process_index=0, process_count=1)
  steps = 2 * n_pairs // (8 * T) + 2
  seen = sum(int(next(it)["segment_ids"].astype(bool).sum()) for _ in range(steps))
  assert seen == steps * 8 * T  # never runs dry, rows stay full


def test_multi_process_slicing(corpus):
  cfg = _cfg(corpus, batch_size=6)
  tok = _tok(corpus)
  docs = sorted(bytes(tok.encode(t)[:-1]) for t in _split_texts(corpus, "train"))

  def process_docs(p, pc):
    rows = list(text_pipeline.train_rows(cfg, p, pc, repeat=False))
    stream = np.concatenate([r["inputs"][r["segment_ids"] > 0] for r in rows])
    starts = np.flatnonzero(stream == tok.bos_id)
    return sorted(map(bytes, np.split(stream, starts[1:])))

  parts = [process_docs(p, 3) for p in range(3)]
  assert sorted(sum(parts, [])) == docs  # disjoint shares that cover the split
  assert all(abs(len(p) - len(docs) / 3) <= 1 for p in parts)
  b = next(make_train_iterator(_cfg(corpus, batch_size=6), process_index=2, process_count=3))
  assert b["inputs"].shape == (2, T)
  # Eval: every process yields the same number of batches; together they hold the split.
  single = list(make_eval_batches(cfg, process_index=0, process_count=1))
  per = [list(make_eval_batches(cfg, process_index=p, process_count=2)) for p in range(2)]
  assert len(per[0]) == len(per[1]) == len(single)
  for k, b1 in enumerate(single):
    merged = np.empty_like(b1["inputs"])
    merged[0::2], merged[1::2] = per[0][k]["inputs"], per[1][k]["inputs"]
    np.testing.assert_array_equal(merged, b1["inputs"])


def test_tfds_source_reads_the_same_dataset(corpus):
  text_cfg = _cfg(corpus)
  tfds_cfg = _cfg(corpus, source="tfds", tfds_name="my_corpus", tfds_data_dir=corpus["data_dir"],
                  path="")
  config.validate(tfds_cfg)
  a = next(make_train_iterator(text_cfg, process_index=0, process_count=1))
  b = next(make_train_iterator(tfds_cfg, process_index=0, process_count=1))
  np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_bad_sources_name_the_setting(corpus, tmp_path):
  mk = lambda **kw: make_train_iterator(_cfg(corpus, **kw), process_index=0,  # noqa: E731
                                        process_count=1)
  with pytest.raises(ConfigError, match="data.tfds_name='no_such_dataset_xyz': no such TFDS"):
    mk(source="tfds", tfds_name="no_such_dataset_xyz", tfds_data_dir=str(tmp_path))
  with pytest.raises(ConfigError, match=r"data.tfds_name='mnist' is not prepared .*tfds build "
                                        r"mnist .*--file_format=array_record"):
    mk(source="tfds", tfds_name="mnist", tfds_data_dir=str(tmp_path))
  with pytest.raises(ConfigError, match=r"data.train_split='test' is not a split .*'train', "
                                        r"'validation'"):
    mk(train_split="test")
  with pytest.raises(ConfigError, match=r"data.eval_split='dev' is not a split"):
    make_eval_batches(_cfg(corpus, eval_split="dev"), process_index=0, process_count=1)
  with pytest.raises(ConfigError, match=r"data.path=.*nowhere.*no such directory"):
    mk(path=str(tmp_path / "nowhere"))
  with pytest.raises(ConfigError, match=r"data.path=.* holds no prepared dataset"):
    mk(path=str(tmp_path))
  with pytest.raises(ConfigError, match=r"data.text_key='body' is not a feature .*\['text'\]"):
    mk(text_key="body")
  with pytest.raises(ConfigError, match="data.path"):
    config.validate_data(DataConfig(source="text", tokenizer="x.model"))
  with pytest.raises(ConfigError, match="data.packing"):
    config.validate_data(DataConfig(source="text", path="p", tokenizer="t", packing="best"))


@pytest.mark.slow
def test_worker_process_matches_in_process(corpus):
  cfg = _cfg(corpus)
  want = [next(it) for it in [make_train_iterator(cfg, process_index=0, process_count=1)]
          for _ in range(3)]
  cfg.data.workers = 1
  it = make_train_iterator(cfg, process_index=0, process_count=1)
  for w in want:
    np.testing.assert_array_equal(next(it)["inputs"], w["inputs"])


# --- synthetic source, global arrays ------------------------------------------------------------


def test_synthetic_source():
  cfg = TrainConfig(model=ModelConfig(vocab_size=100, max_len=16),
                    data=DataConfig(source="synthetic", seq_len=16, batch_size=4))
  config.validate(cfg)
  it = make_train_iterator(cfg, process_index=0, process_count=1)
  a, b = next(it), next(it)
  assert a["inputs"].shape == (4, 16) and not np.array_equal(a["inputs"], b["inputs"])
  assert a["inputs"].min() >= 1 and a["inputs"].max() < 100 and a["loss_mask"].all()
  np.testing.assert_array_equal(a["targets"][:, :-1], a["inputs"][:, 1:])
  np.testing.assert_array_equal(
      next(make_train_iterator(cfg, process_index=0, process_count=1))["inputs"], a["inputs"])
  cfg.data.synthetic_vocab_size = 10
  assert vocab_size(cfg) == 10
  assert next(make_train_iterator(cfg, process_index=0, process_count=1))["inputs"].max() < 10
  ev = list(make_eval_batches(cfg, process_index=0, process_count=1))
  assert len(ev) == 1 and ev[0]["loss_mask"].all()


def test_to_global():
  devices = np.array(jax.devices()[:8])
  mesh = jax.sharding.Mesh(devices, ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  cfg = TrainConfig(model=ModelConfig(vocab_size=100, max_len=16),
                    data=DataConfig(source="synthetic", seq_len=16, batch_size=8))
  batch = next(make_train_iterator(cfg, process_index=0, process_count=1))
  g = train_lib.to_global(batch, sharding)
  assert set(g) == set(batch)
  for k, v in g.items():
    assert isinstance(v, jax.Array) and v.sharding == sharding and v.dtype == batch[k].dtype
    np.testing.assert_array_equal(np.asarray(v), batch[k])


# --- the document-aware MTA contract (docs/MTA.md Sec. 4) ---------------------------------------

FULL_MTA = tiny_mta.attention(c_q=3, c_k=5, kq_layers=(0, 1))


def test_model_on_packed_rows_equals_separate_documents(corpus):
  from mta_jax.model import TransformerLM
  cfg = _cfg(corpus, packing="concat")
  cfg.model = dataclasses.replace(cfg.model, attention=FULL_MTA)
  model = TransformerLM(cfg.model, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)  # non-identity MTA weights: the test cannot pass by accident
  for block in model.blocks:
    for name in ("kq_pre", "kq_post", "mix_pre", "mix_post", "gate_w"):
      p = getattr(block.attn, name, None)
      if p is not None:
        p[...] = jnp.asarray(rng.normal(size=p.shape) * 0.5, p[...].dtype)
  it = make_train_iterator(cfg, process_index=0, process_count=1)
  batch = next(b for b in it if b["segment_ids"].max() >= 3)  # a row with 3+ documents
  row = int(np.argmax(batch["segment_ids"].max(1)))
  seg = batch["segment_ids"][row]
  packed = np.asarray(model(jnp.asarray(batch["inputs"][row:row + 1]),
                            segment_ids=jnp.asarray(seg[None]),
                            positions=jnp.asarray(batch["positions"][row][None])))
  for s in range(1, seg.max() + 1):
    m = seg == s
    alone = np.asarray(model(jnp.asarray(batch["inputs"][row][m][None])))
    np.testing.assert_allclose(packed[0][m], alone[0], rtol=1e-5, atol=1e-5)
  # Not vacuous: without segment ids the later documents see the earlier ones.
  mixed = np.asarray(model(jnp.asarray(batch["inputs"][row:row + 1])))
  assert np.abs(mixed[0][seg == 2] - packed[0][seg == 2]).max() > 1e-3
